"""The spec boundary: ``"name:key=value,key=value"`` parsed once, at the edge, into a :class:`Spec`.

Syntax (one grammar for solvers, step schedules, guidance terms and rewards)::

    spec   := name [":" option ("," option)*]
    option := key "=" value
    value  := plain | "[" text "]" | "(" text ")" | quoted

* ``,`` is the one separator between options.
* A value that holds commas is bracketed: ``[...]`` for a list (``jeffrey:target=[0:0.5,1:0.5]``),
  ``(...)`` for a nested spec (``noisetilt:reward=(class_logp:label=3,classifier=clean)``). The
  brackets group (they nest, and may hold ``,`` ``:`` ``=``); the value is the text between them,
  kept as a string for the option's consumer to read. A Python string literal (``'a, b'``) also
  groups.
* A plain value is read as a Python literal where it is one (``3``, ``0.5``, ``1e-4``, ``True``,
  ``None``; ``inf`` / ``-inf`` are floats), else kept as text (``bh2``, ``/path/file.json``).
  Registries then convert it to the option's type (``normalize=false`` is ``False`` for a bool
  option).
* Legacy forms keep working: ``;`` between the entries of a list value
  (``target=0:0.5;1:0.5``) and between a nested spec's options
  (``reward=class_logp:label=3;classifier=clean``); and an unbracketed comma continuation, an item
  without ``=`` extending the previous plain value (``target=0:0.5,1:0.5`` is ``"0:0.5,1:0.5"``).
* A key may appear once; names and keys are stripped of surrounding spaces.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

_CLOSE = {"[": "]", "(": ")"}
_QUOTES = "'\""
_SPEC_LIKE = re.compile(r"^[A-Za-z_][\w-]*(:[A-Za-z_]\w*\s*=|$)")


@dataclass(frozen=True)
class Spec:
    """A registry entry's name with its options, parsed once (grammar: this module's docstring).

    Attributes:
        name: the registry name as the user gave it (an alias stays as typed, so records show it;
            ``Registry.canonical`` maps it to the registered name).
        options: option values keyed by option name: Python literals where the text was one,
            else strings (bracketed values are the text inside the brackets). Code may also put
            objects here (a reward callable); they are passed to the factory as they are.

    ``Spec.parse(str(spec)) == spec`` for every parsed spec.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: "str | Spec", separators: str = ",") -> "Spec":
        """``"name:key=value,..."`` -> :class:`Spec` (a :class:`Spec` is returned as is).

        Args:
            text: the spec text.
            separators: characters that separate options at the top level; ``",;"`` reads the
                legacy nested form ``class_logp:label=3;classifier=clean``.

        Raises:
            ValueError: an empty name, an option without ``=`` (that continues no plain value), a
                bad key, an unclosed or stray bracket, text after a closing bracket, or a key given
                twice (the message names the bad item).
        """
        if isinstance(text, Spec):
            return text
        text = str(text)
        name, _, rest = text.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"bad spec {text!r}: no name before ':'; expected NAME[:key=value,...]")
        return cls(name, _parse_options(rest, text, separators))

    def with_options(self, **options: Any) -> "Spec":
        """A copy with ``options`` set (replacing values of the same keys)."""
        return Spec(self.name, {**self.options, **options})

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in self.options.items())


def _parse_options(rest: str, text: str, separators: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    plain: dict[str, str] = {}  # unbracketed raw text, for the legacy comma continuation
    last: str | None = None
    pos, n = 0, len(rest)
    while pos < n:
        end = pos
        while end < n and rest[end] != "=" and rest[end] not in separators:
            end += 1
        if end == n or rest[end] != "=":  # an item without '=': continues the previous plain value
            item = rest[pos:end]
            pos = end + 1
            if item.strip():
                last = _continue(plain, last, item, text)
            continue
        key = rest[pos:end].strip()
        start = end + 1
        while start < n and rest[start] == " ":
            start += 1
        if not key.isidentifier():
            stop = _next_separator(rest, start, separators)
            last = _continue(plain, last, rest[pos:stop], text)
            pos = stop + 1
            continue
        if key in options:
            raise ValueError(f"option {key!r} given twice in {text!r}; give each option once")
        if start < n and rest[start] in _CLOSE:
            close = _matching(rest, start, text)
            value: Any = rest[start + 1:close].strip()
            stop = _after_group(rest, close + 1, separators, text)
            last = None
        elif start < n and rest[start] in _QUOTES:
            close = _closing_quote(rest, start, text)
            value = _literal(rest[start:close + 1])
            stop = _after_group(rest, close + 1, separators, text)
            last = None
        else:
            stop = _next_separator(rest, start, separators)
            plain[key] = rest[start:stop].strip()
            value = None  # filled below
            last = key
        options[key] = value
        pos = stop + 1
    for key, raw in plain.items():
        options[key] = parse_value(raw)
    return options


def _continue(plain: dict[str, str], last: str | None, item: str, text: str) -> str:
    if last is None:
        raise ValueError(f"bad option {item.strip()!r} in {text!r}; expected key=value (bracket a value that "
                         "holds commas: key=[a,b])")
    plain[last] += "," + item.strip()
    return last


def _next_separator(rest: str, pos: int, separators: str) -> int:
    while pos < len(rest) and rest[pos] not in separators:
        pos += 1
    return pos


def _matching(rest: str, start: int, text: str) -> int:
    """Index of the bracket closing the one at ``start`` (brackets nest)."""
    stack = []
    for i in range(start, len(rest)):
        c = rest[i]
        if c in _CLOSE:
            stack.append(_CLOSE[c])
        elif c in ")]":
            if not stack or c != stack[-1]:
                raise ValueError(f"stray {c!r} in {text!r}; brackets [..] and (..) must pair up")
            stack.pop()
            if not stack:
                return i
    raise ValueError(f"unclosed {rest[start]!r} in {text!r}; close it with {_CLOSE[rest[start]]!r}")


def _closing_quote(rest: str, start: int, text: str) -> int:
    quote, i = rest[start], start + 1
    while i < len(rest):
        if rest[i] == "\\":
            i += 2
            continue
        if rest[i] == quote:
            return i
        i += 1
    raise ValueError(f"unclosed quote {quote} in {text!r}")


def _after_group(rest: str, pos: int, separators: str, text: str) -> int:
    stop = _next_separator(rest, pos, separators)
    if rest[pos:stop].strip():
        raise ValueError(f"unexpected {rest[pos:stop].strip()!r} after a bracketed or quoted value in {text!r}; "
                         "expected ',' or the end")
    return stop


def parse_value(raw: str) -> Any:
    """A plain (unbracketed) value: a Python literal where ``raw`` is one (``inf`` / ``-inf`` as
    floats), else the text itself."""
    raw = raw.strip()
    if raw.lower() in ("inf", "+inf", "-inf"):
        return -math.inf if raw.startswith("-") else math.inf
    try:
        return _literal(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def _literal(text: str) -> Any:
    with warnings.catch_warnings():  # e.g. an invalid escape inside a quoted value: kept as typed
        warnings.simplefilter("ignore")
        return ast.literal_eval(text)


def format_value(value: Any) -> str:
    """The text of one option value, such that parsing it gives ``value`` back (for ``str``,
    ``int``, ``float``, ``bool`` and ``None``; a nested :class:`Spec` is written ``(...)``, a list
    or tuple ``[...]``; those come back as their text)."""
    if isinstance(value, Spec):
        return f"({value})"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if not isinstance(value, str):
        return repr(value)
    if value and value == value.strip() and value[0] not in "[('\"" and "," not in value \
            and type(parse_value(value)) is str and parse_value(value) == value:
        return value
    if "," in value and value == value.strip() and _balanced(value) and value[:1] not in _QUOTES:
        return f"({value})" if _SPEC_LIKE.match(value) else f"[{value}]"
    return repr(value)


def _balanced(value: str) -> bool:
    stack = []
    for c in value:
        if c in _CLOSE:
            stack.append(_CLOSE[c])
        elif c in ")]":
            if not stack or stack.pop() != c:
                return False
    return not stack
