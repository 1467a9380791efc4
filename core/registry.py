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
    otherwise kept as strings. A comma-separated item without ``=`` continues the previous value
    (``"jeffrey:target=0:0.5,1:0.5"`` gives ``{"target": "0:0.5,1:0.5"}``).

    Raises:
        ValueError: a first option without ``=``, or an empty key.
    """
    name, _, rest = spec.partition(":")
    raw: dict[str, str] = {}
    last = None
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            if last is None:
                raise ValueError(f"bad option {item!r} in {spec!r}; expected key=value")
            raw[last] += "," + item  # a comma inside a value, e.g. target=0:0.5,1:0.5
            continue
        if not key.strip():
            raise ValueError(f"bad option {item!r} in {spec!r}; expected key=value")
        last = key.strip()
        raw[last] = value.strip()
    options: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
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

    def check(self, spec: str) -> str:
        """The name of ``spec``; raises the registry's ``ValueError`` (listing the valid names) for an
        unknown one, or for malformed options."""
        name = parse_spec(spec)[0]
        self._entry(name)
        return name

    def _entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}")
        return self._entries[name]

    def accepts(self, spec: str, parameter: str) -> bool:
        """Whether the factory of ``spec``'s name takes a keyword ``parameter``."""
        import inspect

        return parameter in inspect.signature(self._entry(parse_spec(spec)[0]).factory).parameters

    def create(self, spec: str, **overrides: Any) -> T:
        """Instantiate ``"name[:key=value,...]"``; ``overrides`` win over the spec's options."""
        name, options = parse_spec(spec)
        entry = self._entry(name)
        kwargs = {**entry.defaults, **options, **overrides}
        try:
            return entry.factory(**kwargs)
        except TypeError as exc:
            raise ValueError(f"bad options for {self.kind} {name!r}: {exc}") from None
