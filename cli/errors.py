"""How the ``diffsample`` command line ends: every exception becomes one line on stderr.

* A user's mistake -> ``Error: <message>`` and exit code 2: click usage errors (bad option
  values, unknown names), ``ValueError`` (the project's validation errors, ``ModelLoadError``,
  ``RewardError`` ...), :class:`~diffsample.samplers.sampler.NonFiniteError` (the model output
  went NaN / inf; the message names the step and sigma) and every other exception type defined
  in ``diffsample`` itself (e.g. ``NotDifferentiableError``).
* Anything else (an internal error, a full disk) -> ``Error: internal error (<type>: <message>)``
  and exit code 1; the traceback is printed only with ``diffsample --debug <command> ...``.
* Ctrl-C -> ``Aborted!`` and exit code 130.

Messages are folded onto one line and cut to :data:`MAX_MESSAGE` characters.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click

MAX_MESSAGE = 600
"""Longest message printed (characters); a longer one is cut in the middle."""
DEBUG_FLAG = "--debug"
USER_ERROR, INTERNAL_ERROR, INTERRUPTED = 2, 1, 130


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` with every run of whitespace (newlines included) folded into one space, cut in
    the middle to at most ``limit`` characters."""
    text = " ".join(str(message).split())
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports bad input (exit code 2) rather than an internal failure (exit code 1)."""
    if isinstance(exc, click.ClickException):
        return exc.exit_code == USER_ERROR
    if isinstance(exc, ValueError):
        return True
    # NonFiniteError and the project's other error types (no import: a usage error loads no torch).
    return any(cls.__module__.split(".")[0] == "diffsample" for cls in type(exc).__mro__)


def user_message(exc: BaseException) -> str:
    """The one-line text for a user's mistake."""
    if isinstance(exc, click.ClickException):
        return one_line(exc.format_message())
    text = str(exc) or type(exc).__name__
    # The Python API's escape hatch is no option of the command line.
    text = text.replace("; pass allow_nonfinite=True to continue", "")
    return one_line(text)


def debug_requested(argv: list[str]) -> bool:
    """Whether ``--debug`` is among the group's options (before the command name)."""
    for arg in argv:
        if arg == DEBUG_FLAG:
            return True
        if not arg.startswith("-"):
            return False
    return False


class DiffsampleGroup(click.Group):
    """A click group whose ``main`` turns every exception into one line and an exit code (see the
    module docstring). ``standalone_mode=False`` keeps click's behaviour (exceptions propagate)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        debug = debug_requested(argv)
        try:
            rv = super().main(argv, prog_name, complete_var, False, **extra)
        except click.exceptions.Exit as exc:  # pragma: no cover - click returns the code instead
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt, EOFError):
            click.echo("Aborted!", err=True)
            sys.exit(INTERRUPTED)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - the command line's last word on every error
            sys.exit(report(exc, debug))
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def report(exc: BaseException, debug: bool) -> int:
    """Print ``exc`` as one line on stderr (the traceback first with ``debug``); return the exit code."""
    no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", ())
    if no_args_help and isinstance(exc, no_args_help):  # bare ``diffsample``: the help, as click prints it
        exc.show()
        return exc.exit_code
    if debug and not isinstance(exc, click.ClickException):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if is_user_error(exc):
        click.echo(f"Error: {user_message(exc)}", err=True)
        return USER_ERROR
    if isinstance(exc, click.ClickException):
        click.echo(f"Error: {one_line(exc.format_message())}", err=True)
        return exc.exit_code
    hint = "" if debug else f"; rerun as 'diffsample {DEBUG_FLAG} ...' for the traceback"
    detail = one_line(str(exc), MAX_MESSAGE // 2)
    click.echo(f"Error: internal error ({type(exc).__name__}{': ' + detail if detail else ''}){hint}", err=True)
    return INTERNAL_ERROR
