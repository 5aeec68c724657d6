"""A tiny value-object base for modules on kestrel's boot path.

Not dataclasses: importing ``dataclasses`` pulls in ``inspect``, ``ast`` and
``re`` and costs more than everything else kestrel does before it spawns the
workload (measured with -X importtime). Subclasses list their fields in
``__slots__`` and write a keyword ``__init__``; this gives them repr and ==.
"""

from __future__ import annotations


class Record:
    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and type(self) is type(other) and (
            self._fields() == other._fields()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, *(repr(f) for f in self._fields())))
