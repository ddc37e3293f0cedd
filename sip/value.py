"""Small value classes of the compiled core (``Flow``, ``Node``, ``Send``...).

A subclass lists its fields in ``_fields()``: it is equal to another of its own class
with the same fields, hashes as they do, and shows as its constructor call.  Plain
classes, not msgspec Structs, so that the compiled core reads their attributes natively
(a Struct's are generic look-ups from compiled code).  Nothing changes one once made.
"""

from __future__ import annotations


class Value:
    __slots__ = ()

    def _fields(self) -> tuple[object, ...]:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, Value) and self._fields() == other._fields()

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._fields()!r}"
