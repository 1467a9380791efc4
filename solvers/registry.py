"""Name -> factory registries (one per concept) and the ``name:key=value,...`` spec syntax."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,key=value"`` into the name and a dict of options.

    Values are read as Python literals where possible (``3``, ``0.5``, ``True``, ``'bh1'``),
    otherwise kept as strings.

    Raises:
        ValueError: an option without ``=``.
    """
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad option {item!r} in {spec!r}; expected key=value")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return name.strip(), options


@dataclass(frozen=True)
class Entry(Generic[T]):
    factory: Callable[..., T]
    summary: str
    defaults: dict[str, Any]


class Registry(Generic[T]):
    """An ordered mapping of names to factories with one-line summaries.

    ``registry.create("name:key=value")`` builds an instance; an unknown name raises a
    ``ValueError`` listing the valid names, and unknown options raise a ``ValueError`` naming them.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, factory: Callable[..., T], summary: str, **defaults: Any) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(factory, summary, defaults)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def summary(self, name: str) -> str:
        return self._entry(name).summary

    def _entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}")
        return self._entries[name]

    def create(self, spec: str, **overrides: Any) -> T:
        """Instantiate ``"name[:key=value,...]"``; ``overrides`` win over the spec's options."""
        name, options = parse_spec(spec)
        entry = self._entry(name)
        kwargs = {**entry.defaults, **options, **overrides}
        try:
            return entry.factory(**kwargs)
        except TypeError as exc:
            raise ValueError(f"bad options for {self.kind} {name!r}: {exc}") from None
