"""The `fledge` command: build, inspect, manifest update.

Errors print one line, `fledge: <file>: <key>: <problem>`, and exit 2 (configuration or
usage) or 1 (a build that failed); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from builder.errors import FledgeError
from kestrel.cliout import VerbosityError, split_verbosity


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line instead of argparse's usage block, like every other fledge error.
        print(f"fledge: {message} (see fledge {self.prog.split()[-1]} --help)"
              if " " in self.prog else f"fledge: {message} (see fledge --help)",
              file=sys.stderr)
        raise SystemExit(2)


def _verbosity_help(p: argparse.ArgumentParser) -> None:
    # Only for --help: kestrel.cliout.split_verbosity takes them out of argv first,
    # wherever they are, the same way volar does.
    level = p.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true", help="print only errors and data")
    level.add_argument("-v", "--verbose", action="store_true", help="print every detail")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fledge", description="Build reproducible initramfs images for "
                     "kestrel microVMs.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    b = sub.add_parser("build", help="build an initramfs from fledge.toml")
    b.add_argument("-c", "--config", type=Path, default=Path("fledge.toml"),
                   help="configuration file (default: ./fledge.toml)")
    b.add_argument("-o", "--output", type=Path, default=None,
                   help="output image (default: ./plugin.cpio.gz)")
    b.add_argument("--compression", choices=("gzip", "zstd", "none"), default=None,
                   help="override [output] compression (default gzip)")
    b.add_argument("--copy-host-libs", action="store_true",
                   help="copy missing shared libraries from this host")
    b.add_argument("--update-manifest", type=Path, metavar="MANIFEST", default=None,
                   help="write the image's url and sha256 into this plugin manifest")
    b.add_argument("--url", default=None, help="with --update-manifest: the url to write "
                   "(default: the image's absolute path)")
    _verbosity_help(b)

    i = sub.add_parser("inspect", help="list what an image holds")
    i.add_argument("image", type=Path)
    i.add_argument("--summary", action="store_true", help="omit the entry list")

    m = sub.add_parser("manifest", help="plugin manifest helpers")
    msub = m.add_subparsers(dest="manifest_command", parser_class=_Parser)
    u = msub.add_parser("update", help="set initramfs url and checksum from an image")
    u.add_argument("manifest", type=Path)
    u.add_argument("--image", type=Path, required=True)
    u.add_argument("--url", default=None, help="default: the image's absolute path")
    return parser


def _build(args: argparse.Namespace) -> int:
    from builder.build import BuildOptions, Progress, build, source_date_epoch
    from builder.publish import update_manifest
    from kestrel.layout import agent_of_init_mode

    progress = Progress(verbosity=args.verbosity)
    progress.route_logging()
    result = build(
        BuildOptions(config_path=args.config, output=args.output,
                     compression=args.compression, copy_host_libs=args.copy_host_libs,
                     source_date_epoch=source_date_epoch()),
        progress=progress,
    )
    progress.step(f"sha256:{result.sha256}")
    if args.update_manifest is not None:
        update_manifest(args.update_manifest, image=result.output, url=args.url,
                        sha256=result.sha256, agent=agent_of_init_mode(result.init_mode))
        progress.step(f"Updated {args.update_manifest}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from builder.inspect import format_report, inspect_image

    print(format_report(inspect_image(args.image), entries=not args.summary))
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from builder.publish import update_manifest

    data = update_manifest(args.manifest, image=args.image, url=args.url)
    print(f"{args.manifest}: initramfs.url = {data['initramfs']['url']}, "
          f"checksum = {data['initramfs']['checksum']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        verbosity, rest = split_verbosity(sys.argv[1:] if argv is None else argv)
    except VerbosityError as exc:
        print(f"fledge: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(rest)
    args.verbosity = verbosity
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "manifest" and args.manifest_command == "update":
            return _manifest(args)
    except FledgeError as e:
        print(e.line(), file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # `fledge inspect IMG | head`: the reader left; not an error worth a traceback.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fledge: interrupted", file=sys.stderr)
        return 130
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
