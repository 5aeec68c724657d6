"""Helper that builder/freeze.py runs under the interpreter being frozen (Debian's python3.11).

Two jobs, chosen by argv[1]:
  probe    import the given modules with only the given paths and print which modules
           got loaded and from where;
  compile  (config in a JSON file) compile sources to -OO .pyc files with their
           in-bundle file names, so bytecode and tracebacks match the bundle.
Runs with -I -S: nothing from the build host's site-packages leaks in.
"""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ast

# The probe must not import anything itself before the targets (json would drag
# re, enum, ... into every bundle): arguments come as plain strings and the answer
# goes out as a repr() the builder reads with ast.literal_eval. For the same reason
# no `from __future__` and no typing (builtin generics need no import).


def probe(path: str, required: str, optional: str) -> dict[str, object]:
    sys.path[:0] = [p for p in path.split(":") if p]
    failed: dict[str, str] = {}
    for name in filter(None, required.split(",")):
        __import__(name)  # a failure here is a build error: let it show
    for name in filter(None, optional.split(",")):
        try:
            __import__(name)
        except Exception as exc:  # optional: guarded imports in kestrel, other platforms
            failed[name] = f"{type(exc).__name__}: {exc}"
    modules: dict[str, tuple[str | None, bool]] = {}
    for name, mod in sorted(sys.modules.items()):
        spec = getattr(mod, "__spec__", None)
        modules[name] = (getattr(spec, "origin", None), hasattr(mod, "__path__"))
    return {"modules": modules, "failed": failed, "version": sys.version}


FUTURE_ANNOTATIONS = b"from __future__ import annotations\n"


def _flags(source: bytes) -> int:
    import __future__

    return __future__.annotations.compiler_flag if FUTURE_ANNOTATIONS in source else 0


def _without_future_import(source: bytes, filename: str) -> "bytes | ast.Module":
    """The module without its ``from __future__ import annotations`` statement,
    compiled with that feature's flag instead: the same code, minus a run-time
    import of the __future__ module (one more zip read before kestrel's spawn).
    Any other form keeps the source as it is."""
    if FUTURE_ANNOTATIONS not in source:
        return source
    import ast

    tree = ast.parse(source, filename)
    tree.body = [node for node in tree.body
                 if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"
                         and [a.name for a in node.names] == ["annotations"])]
    return tree


def compile_all(config: str) -> dict[str, object]:
    import importlib.util
    import json
    import marshal

    with open(config, encoding="utf-8") as f:
        cfg = json.load(f)
    # Sourceless .pyc: the loader checks only the magic and the flags word, so the
    # timestamp and size fields stay zero (deterministic).
    header = importlib.util.MAGIC_NUMBER + b"\0" * 12
    for src, dst, filename in cfg["files"]:
        with open(src, "rb") as f:
            source = f.read()
        code = compile(_without_future_import(source, filename), filename, "exec",
                       flags=_flags(source), dont_inherit=True, optimize=2)
        with open(dst, "wb") as f:
            f.write(header + marshal.dumps(code))
    return {"compiled": len(cfg["files"])}


def main() -> None:
    result = probe(*sys.argv[2:5]) if sys.argv[1] == "probe" else compile_all(sys.argv[2])
    sys.stdout.write(repr(result))


if __name__ == "__main__":
    main()
