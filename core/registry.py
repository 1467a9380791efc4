"""Name -> factory registries (one per concept) over the spec syntax of :mod:`diffsample.core.spec`.

A registry entry is a factory -- a callable, or a ``"module:attribute"`` string imported on first
use, so that checking a name imports nothing heavy -- plus a one-line summary, aliases, preset
option values and a one-line meaning per option. Its options are read from the factory's
signature: each keyword parameter is an option, with the preset or the signature's default, typed
by that default (or by the annotation where the default is ``None``). Parameters the calling code
supplies (``resources`` for guidance terms) are the registry's ``context`` and are not options.

``REG.create("name:key=value,...")`` (or a :class:`~diffsample.core.spec.Spec`) builds an
instance. Every problem is one ``ValueError`` line: an unknown name lists the valid names, an
unknown option lists the valid options with their defaults, a value of the wrong type names the
option and its type. Values are converted to the option's type: ``bool`` from
``true/false/1/0`` (case-insensitive); ``int`` from integral, finite numbers within 64 bits; ``float``
from any number but NaN (``inf`` included).

Names are snake_case (``[a-z][a-z0-9_]*``); older spellings stay as aliases
(``stein-dpm`` -> ``stein_dpm``). :class:`~diffsample.core.spec.Spec` keeps a name as typed;
:meth:`Registry.canonical` maps it to the registered name.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from diffsample.core.spec import Spec, format_value

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_INT_LIMIT = 2**63
_TRUE = ("true", "1")
_FALSE = ("false", "0")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def parse_spec(spec: "str | Spec") -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, options)``; :meth:`Spec.parse` as a tuple, kept for
    older callers (grammar: :mod:`diffsample.core.spec`).

    Raises:
        ValueError: malformed options (the message names the bad item), a key given twice.
    """
    parsed = Spec.parse(spec)
    return parsed.name, dict(parsed.options)


@dataclass(frozen=True)
class Option:
    """One option of a registry entry.

    Attributes:
        name: the key in a spec.
        default: the value used when the spec omits it (:data:`REQUIRED` if it must be given).
        kind: ``"bool"``, ``"int"``, ``"float"``, ``"str"`` or ``"any"`` (passed through).
        nullable: whether ``None`` is accepted.
        choices: the accepted strings of a ``Literal`` annotation, else ``()``.
        meaning: one line on what it does.
    """

    name: str
    default: Any
    kind: str = "any"
    nullable: bool = True
    choices: tuple[str, ...] = ()
    meaning: str = ""

    def __str__(self) -> str:
        return f"{self.name}={'(required)' if self.default is REQUIRED else format_value(self.default)}"


@dataclass
class Entry(Generic[T]):
    """A registered name: its factory (callable or ``"module:attribute"``), summary, preset option
    values, aliases and option meanings."""

    name: str
    target: Callable[..., T] | str
    summary: str
    defaults: dict[str, Any]
    aliases: tuple[str, ...] = ()
    meanings: dict[str, str] = field(default_factory=dict)
    _factory: Callable[..., T] | None = field(default=None, repr=False)
    _options: dict[str, Option] | None = field(default=None, repr=False)
    _var_keyword: bool = field(default=False, repr=False)

    @property
    def factory(self) -> Callable[..., T]:
        """The factory, imported on first use for a ``"module:attribute"`` target."""
        if self._factory is None:
            if isinstance(self.target, str):
                module, _, attr = self.target.partition(":")
                obj: Any = importlib.import_module(module)
                for part in attr.split("."):
                    obj = getattr(obj, part)
                self._factory = obj
            else:
                self._factory = self.target
        return self._factory


class Registry(Generic[T]):
    """An ordered mapping of snake_case names (plus aliases) to factories with one-line summaries
    and introspectable options (module docstring; spec grammar: :mod:`diffsample.core.spec`).

    Args:
        kind: what the entries are, for messages (``"solver"``, ``"guidance"``).
        context: factory parameters the calling code passes (``resources``); not spec options.
    """

    def __init__(self, kind: str, context: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.context = tuple(context)
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    # ---- registration ---------------------------------------------------------------------------

    def add(self, name: str, factory: Callable[..., T] | str, summary: str, *, aliases: tuple[str, ...] = (),
            meanings: dict[str, str] | None = None, **defaults: Any) -> None:
        """Register ``name``.

        Args:
            name: snake_case name (``[a-z][a-z0-9_]*``).
            factory: a callable, or ``"module:attribute"`` imported on first use.
            summary: one line for ``diffsample list``.
            aliases: other spellings accepted for ``name`` (older names).
            meanings: one line per option; options not given here take the ``Args:`` line of the
                factory's docstring.
            **defaults: preset option values (override the factory's defaults).

        Raises:
            ValueError: a name that is not snake_case, or a name or alias already taken.
        """
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} is not snake_case ([a-z][a-z0-9_]*)")
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered")
        self._entries[name] = Entry(name, factory, summary, dict(defaults), tuple(aliases), dict(meanings or {}))
        for alias in aliases:
            self._aliases[alias] = name

    # ---- names ----------------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        """The registered (canonical) names, in registration order; aliases are left out."""
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """The registered (canonical) names, in registration order."""
        return list(self._entries)

    def canonical(self, name: "str | Spec") -> str:
        """The registered name for ``name`` (itself, or the name an alias stands for).

        Raises:
            ValueError: an unknown name (listing the valid ones).
        """
        return self._entry(Spec.parse(name).name).name

    def aliases(self, name: str) -> tuple[str, ...]:
        """The aliases of ``name`` (a name or an alias)."""
        return self._entry(name).aliases

    def summary(self, name: str) -> str:
        """The one-line summary of ``name`` (a name or an alias)."""
        return self._entry(name).summary

    def _entry(self, name: str) -> Entry[T]:
        name = str(name).strip()
        entry = self._entries.get(self._aliases.get(name, name))
        if entry is None:
            names = [*self._entries, *self._aliases]
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}"
                             f"{did_you_mean(name, names)}")
        return entry

    # ---- options --------------------------------------------------------------------------------

    def options(self, name: str) -> list[Option]:
        """The options of ``name`` (a name or an alias), in signature order, with defaults
        (presets applied), types and meanings. Imports a lazy factory."""
        return list(self._options(self._entry(name)).values())

    def _options(self, entry: Entry[T]) -> dict[str, Option]:
        if entry._options is None:
            factory = entry.factory
            signature = inspect.signature(factory)
            documented = _docstring_args(factory)
            options: dict[str, Option] = {}
            for p in signature.parameters.values():
                if p.kind is p.VAR_KEYWORD:
                    entry._var_keyword = True
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) or p.name in self.context \
                        or p.name == "self":
                    continue
                default = entry.defaults.get(p.name, REQUIRED if p.default is p.empty else p.default)
                kind, nullable, choices = _option_type(p.default, p.annotation)
                meaning = entry.meanings.get(p.name) or documented.get(p.name, "")
                options[p.name] = Option(p.name, default, kind, nullable, choices, meaning)
            unknown = set(entry.defaults) - set(options)
            if unknown and not entry._var_keyword:
                raise ValueError(f"{self.kind} {entry.name!r}: presets {sorted(unknown)} are not options of its "
                                 "factory")
            entry._options = options
        return entry._options

    def accepts(self, spec: "str | Spec", parameter: str) -> bool:
        """Whether the factory of ``spec``'s name takes a keyword ``parameter`` (an option or a
        context parameter)."""
        entry = self._entry(Spec.parse(spec).name)
        return parameter in inspect.signature(entry.factory).parameters

    # ---- checking and building ------------------------------------------------------------------

    def check(self, spec: "str | Spec") -> str:
        """Validate ``spec`` without building it: its name, and (when it has options) their keys
        and types. Returns the name as given. Only a spec with options imports a lazy factory.

        Raises:
            ValueError: one line: malformed spec, unknown name (listing the valid ones), unknown
                option (listing the valid ones with defaults), a value of the wrong type.
        """
        parsed = Spec.parse(spec)
        entry = self._entry(parsed.name)
        if parsed.options:
            self._kwargs(entry, parsed.name, parsed.options)
        return parsed.name

    def create(self, spec: "str | Spec", **overrides: Any) -> T:
        """Instantiate ``"name[:key=value,...]"`` (or a :class:`Spec`); ``overrides`` (context
        parameters such as ``resources``, or options set by code) win over the spec's options and
        are passed as given.

        Raises:
            ValueError: as :meth:`check`, plus the factory's own ``ValueError`` for bad values; a
                ``TypeError`` from the factory becomes one ``ValueError`` line naming the options.
        """
        parsed = Spec.parse(spec)
        entry = self._entry(parsed.name)
        kwargs = self._kwargs(entry, parsed.name, parsed.options)
        for key in overrides:
            if key not in self.context:
                self._option(entry, parsed.name, key)
        kwargs.update(overrides)
        missing = [k for k, v in kwargs.items() if v is REQUIRED]
        if missing:
            raise ValueError(f"{self.kind} {parsed.name!r} needs option {missing[0]!r}; "
                             f"e.g. {parsed.name}:{missing[0]}=...")
        try:
            return entry.factory(**kwargs)
        except TypeError as exc:
            message = re.sub(r"^[\w.<>]+\(\)\s*", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise ValueError(f"bad options for {self.kind} {parsed.name!r} ({message}); valid: "
                             f"{self._valid(entry)}") from None

    def _kwargs(self, entry: Entry[T], name: str, options: dict[str, Any]) -> dict[str, Any]:
        known = self._options(entry)
        kwargs = {k: o.default for k, o in known.items()}
        for key, value in options.items():
            option = self._option(entry, name, key)
            kwargs[key] = value if option is None else self._coerce(option, name, value)
        return kwargs

    def _option(self, entry: Entry[T], name: str, key: str) -> Option | None:
        known = self._options(entry)
        if key in known:
            return known[key]
        if entry._var_keyword:
            return None
        raise ValueError(f"unknown option {key!r} for {self.kind} {name!r}; valid: {self._valid(entry)}")

    def _valid(self, entry: Entry[T]) -> str:
        options = self._options(entry).values()
        return ", ".join(str(o) for o in options) if options else "(none: it takes no options)"

    def _coerce(self, option: Option, name: str, value: Any) -> Any:
        """``value`` converted to ``option``'s type (objects other than text, numbers, booleans and
        ``None`` pass as they are)."""
        if not isinstance(value, (str, int, float, type(None))):
            return value
        where = f"option {option.name!r} of {self.kind} {name!r}"
        text = value.strip() if isinstance(value, str) else None
        if value is None or (text is not None and text.lower() == "none" and option.kind != "str"):
            if option.nullable:
                return None
            raise ValueError(f"{where} must be {_kind_words(option)}, got None")
        if option.kind == "bool":
            if isinstance(value, bool):
                return value
            word = text.lower() if text is not None else (str(value) if value in (0, 1) else "")
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise ValueError(f"{where} must be true or false (or 1/0), got {format_value(value)}")
        if option.kind == "int":
            number = _number(value, text)
            if number is None or isinstance(value, bool):
                raise ValueError(f"{where} must be an integer, got {format_value(value)}")
            if isinstance(number, float) and not math.isfinite(number):
                raise ValueError(f"{where} must be a finite integer, got {format_value(value)}")
            if isinstance(number, float) and not number.is_integer():
                raise ValueError(f"{where} must be an integer, got {format_value(value)}")
            if abs(number) >= _INT_LIMIT:
                raise ValueError(f"{where} is out of range (|value| < 2**63), got {format_value(value)}")
            return int(number)
        if option.kind == "float":
            number = _number(value, text)
            if number is None or isinstance(value, bool) or (isinstance(number, float) and math.isnan(number)):
                raise ValueError(f"{where} must be a number, got {format_value(value)}")
            try:
                return float(number)
            except OverflowError:
                raise ValueError(f"{where} is out of range for a float, got {format_value(value)}") from None
        if option.kind == "str":
            out = value if isinstance(value, str) else format_value(value)
            if option.choices and out not in option.choices:
                raise ValueError(f"{where} must be one of {', '.join(option.choices)}; got {format_value(value)}")
            return out
        return value


def _number(value: Any, text: str | None) -> int | float | None:
    if text is None:
        return value
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def _kind_words(option: Option) -> str:
    return {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text"}.get(option.kind,
                                                                                                "a value")


def _option_type(default: Any, annotation: Any) -> tuple[str, bool, tuple[str, ...]]:
    """``(kind, nullable, choices)`` of an option from its annotation (where it names one of
    ``bool``, ``int``, ``float``, ``str`` or a ``Literal`` of strings) or, unannotated, from the
    type of its default. Unannotated options and ``... | None`` / ``None`` defaults accept ``None``."""
    if annotation is inspect.Parameter.empty:
        text = ""
    elif isinstance(annotation, str):
        text = annotation
    else:
        text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else str(annotation)
    choices = tuple(re.findall(r"'([^']*)'", text.partition("Literal[")[2].partition("]")[0])) \
        if "Literal[" in text else ()
    words = set(re.findall(r"[A-Za-z_]\w*", re.sub(r"'[^']*'", "", text)))
    nullable = not text or bool(words & {"None", "Optional"}) or default is None
    words -= {"None", "Optional", "typing"}
    basic = {"bool": bool, "int": int, "float": float, "str": str}
    if choices and words <= {"Literal"}:
        return "str", nullable, choices
    if len(words) == 1 and next(iter(words)) in basic:
        return next(iter(words)), nullable, choices
    if not text:
        for kind, cls in basic.items():
            if type(default) is cls:
                return kind, True, ()
    return "any", True, choices


def _docstring_args(factory: Callable[..., Any]) -> dict[str, str]:
    """``{name: first line}`` from the ``Args:`` section of ``factory``'s docstring (a class: its
    own docstring)."""
    doc = inspect.getdoc(factory) or ""
    lines = doc.splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() in ("Args:", "Arguments:", "Parameters:"))
    except StopIteration:
        return out
    indent = None
    current = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        match = re.match(r"^\s*(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
        if width == indent and match:
            current = match.group(1)
            out[current] = match.group(3).strip()
        elif current is not None and width > indent:
            out[current] = (out[current] + " " + line.strip()).strip()
    return out


def did_you_mean(name: str, choices: list[str]) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the choices closest to a misspelt ``name`` (difflib ratio
    >= 0.6, at most three), or ``""``. Appended at the END of an error line, it survives the CLI's
    cut of long messages, which keeps the head and the tail."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
