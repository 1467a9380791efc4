"""Reading files a user points the project at (Jeffrey targets, marginal caches, reward heads,
model-folder configs) without hanging, exhausting memory or recursing without bound.

A file is read only if it is a *regular* file (a symlink is followed; a FIFO, socket, device
such as ``/dev/zero`` or a directory is refused before it is opened) no larger than a size limit;
text must be UTF-8; JSON is parsed only after its nesting depth is found to be within a limit
(Python's parser recurses once per level). Every failure is one ``ValueError`` line naming the
file, what it was meant to be and what is wrong. The schema helpers (:func:`json_object`,
:func:`json_number`, ...) give the same one-line errors for the parsed values.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 16 << 20
"""Default size limit of a JSON file (16 MiB)."""
MAX_JSON_DEPTH = 64
"""Default nesting limit of a JSON file (objects and arrays)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def regular_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> Path:
    """``path`` (``~`` expanded) if it names a regular file (symlinks followed) of at most
    ``max_bytes`` bytes; nothing is opened.

    Raises:
        FileNotFoundError: nothing exists at ``path`` (callers that treat a missing file as
            "absent" catch it; it is an ``OSError``, not a ``ValueError``).
        ValueError: a directory, FIFO, socket or device (e.g. a link to ``/dev/zero``), a file
            larger than ``max_bytes``, or one that cannot be examined; naming ``what``.
    """
    p = Path(path).expanduser()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(p)!r} not found") from None
    except OSError as exc:
        raise ValueError(f"{what} {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {str(p)!r} is {_kind(st.st_mode)}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ValueError(f"{what} {str(p)!r} is {_size(st.st_size)}, more than the limit of {_size(max_bytes)}")
    return p


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The content of the regular file ``path`` (at most ``max_bytes`` bytes), read without
    blocking on a FIFO swapped in after the check.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: as :func:`regular_file`, or the file cannot be read.
    """
    p = regular_file(path, what, max_bytes)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(p)!r} not found") from None
    except OSError as exc:
        raise ValueError(f"{what} {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the check and the open
            raise ValueError(f"{what} {str(p)!r} is {_kind(st.st_mode)}, not a regular file")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise ValueError(f"{what} {str(p)!r} is larger than the limit of {_size(max_bytes)}")
    except OSError as exc:
        raise ValueError(f"{what} {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_text(path: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of the regular file ``path`` (a UTF-8 byte-order mark is dropped).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: as :func:`read_bytes`, or the content is not UTF-8 (binary, UTF-16, ...).
    """
    data = read_bytes(path, what, max_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {str(Path(path).expanduser())!r} is not UTF-8 text (byte {exc.start}: "
                         f"{data[exc.start:exc.start + 1]!r}); it may be binary or UTF-16") from None


def json_depth(text: str, limit: int | None = None) -> int:
    """Deepest nesting of objects / arrays in JSON ``text`` (brackets inside strings ignored);
    stops counting once ``limit`` is exceeded (returns a value ``> limit``)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if limit is not None and deepest > limit:
                    return deepest
        else:
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json(text: str, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``text`` parsed as strict JSON (no ``NaN`` / ``Infinity``) nested at most ``max_depth`` deep.

    Raises:
        ValueError: invalid JSON (with line and column) or deeper nesting, naming ``what``.
    """
    depth = json_depth(text, max_depth)
    if depth > max_depth:
        raise ValueError(f"{what} is nested more than {max_depth} levels deep (objects / arrays); refused")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None


def read_json(path: str | os.PathLike, what: str, *, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value in the regular UTF-8 file ``path`` (see the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a regular file, too large, not UTF-8, invalid JSON or nested too deep;
            one line naming ``what`` and the file.
    """
    text = read_text(path, what, max_bytes)
    return parse_json(text, f"{what} {str(Path(path).expanduser())!r}", max_depth)


# ---- schema helpers ------------------------------------------------------------------------------
def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (``object``, ``array``, ``string``, ``number``,
    ``boolean``, ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: Any, n: int = 60) -> str:
    """``value`` as JSON text, shortened to ``n`` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


def _found(value: Any) -> str:
    """What a schema error says it found: ``null``, ``true``, ``object {"a": 1}``, ..."""
    if value is None or isinstance(value, bool):
        return _show(value)
    return f"{json_type(value)} {_show(value)}"


def json_object(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object.

    Raises:
        ValueError: otherwise, naming ``what`` and the type found.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object {{...}}, got {_found(value)}")
    return value


def json_array(value: Any, what: str) -> list[Any]:
    """``value`` if it is a JSON array.

    Raises:
        ValueError: otherwise, naming ``what`` and the type found.
    """
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a JSON array [...], got {_found(value)}")
    return value


def json_number(value: Any, what: str) -> float:
    """``value`` as a float if it is a finite JSON number (``true`` / ``false`` are not numbers).

    Raises:
        ValueError: otherwise, naming ``what``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {_found(value)}")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError(f"{what} must be a finite number, got {_show(value)}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"{what} must be a finite number, got {_show(value)}")
    return out


def json_int(value: Any, what: str, lo: int | None = None) -> int:
    """``value`` if it is a JSON integer (not a boolean, not ``1.0``) ``>= lo``.

    Raises:
        ValueError: otherwise, naming ``what``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {_found(value)}")
    if lo is not None and value < lo:
        raise ValueError(f"{what} must be an integer >= {lo}, got {value}")
    return value


def json_numbers(value: Any, what: str) -> list[float]:
    """``value`` as a list of floats if it is a JSON array of finite numbers.

    Raises:
        ValueError: otherwise, naming ``what`` followed by the index of the first bad entry.
    """
    items = json_array(value, what)
    return [json_number(v, f"{what} {i}") for i, v in enumerate(items)]
