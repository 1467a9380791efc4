"""The spec boundary: ``"name:key=value,key=value"`` parsed once, at the edge, into a :class:`Spec`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffsample.core.registry import parse_spec


@dataclass(frozen=True)
class Spec:
    """A registry entry's name with its options, parsed once.

    Attributes:
        name: the registry name as the user gave it (an alias stays as typed, so records show it).
        options: option values keyed by option name (Python literals where the text was one).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: "str | Spec") -> "Spec":
        """``"name:key=value,..."`` -> :class:`Spec` (a :class:`Spec` is returned as is).

        Raises:
            ValueError: malformed options (the message names the bad item).
        """
        if isinstance(text, Spec):
            return text
        name, options = parse_spec(str(text))
        return cls(name, options)

    def with_options(self, **options: Any) -> "Spec":
        """A copy with ``options`` set (replacing values of the same keys)."""
        return Spec(self.name, {**self.options, **options})

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format(v)}" for k, v in self.options.items())


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return repr(value) if not isinstance(value, (list, tuple, dict)) else str(value).replace(" ", "")
