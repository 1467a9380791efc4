"""Staging and atomic publishing of output folders and files (``generate --out``, ``sweep --out``).

A run is written into a hidden staging folder next to ``--out`` (same parent, so the same
filesystem), ``.<out-name>.diffsample-staging-<pid>-<random>``, and appears at once by rename:

* a new ``--out`` is the staging folder renamed into place (one ``rename``);
* with ``--overwrite`` an existing ``--out`` is exchanged with the staging folder in one atomic
  ``renameat2(RENAME_EXCHANGE)`` (Linux), then the old run (now under the staging name) is
  removed. Where the exchange is unavailable the old ``--out`` is renamed aside
  (``.<out-name>.diffsample-old-<pid>-<random>``), the staging folder renamed in, and the old one
  removed; a kill between those two renames leaves no ``--out``, and the next start renames the
  old one back (:func:`recover`).

``--overwrite`` replaces the whole old run or leaves it untouched: the old run's outputs
(``run.json``, ``grid.png``, ``sample_*.png`` -- see :func:`is_run_output`) go, every other entry
of the old ``--out`` (a user's ``notes.txt``, a subfolder) is kept: it is copied (hard-linked where
possible) into the staging folder before the swap, so the swap stays one rename pair.

Single files (a sweep's ``results.md``, ``fd_vs_nfe.png``) are written to a hidden temporary file
in the same folder and moved into place with ``os.replace`` (:func:`atomic_write`).

A killed run leaves its staging folder or temporary file behind; the next run into the same
``--out`` removes those whose process is no longer alive (:func:`recover`), and says so.

Test-only hook: with the environment variable ``DIFFSAMPLE_TEST_KILL_AT`` set to one of
:data:`KILL_POINTS` the process sends itself SIGKILL at that moment of publishing (the fault
injection tests use it); ``DIFFSAMPLE_TEST_NO_EXCHANGE=1`` turns off the atomic exchange so the
two-rename path can be tested. Neither is meant for users.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

STAGING, ASIDE = "diffsample-staging", "diffsample-old"
KILL_ENV, NO_EXCHANGE_ENV = "DIFFSAMPLE_TEST_KILL_AT", "DIFFSAMPLE_TEST_NO_EXCHANGE"
KILL_POINTS = ("staged", "copied", "exchanged", "aside", "swapped", "written")
"""Moments of publishing (in order): the staging folder is complete; the old ``--out``'s other
files are copied in; the exchange is done (old run under the staging name); the old ``--out`` is
renamed aside (two-rename path); the new one renamed in (two-rename path); a temporary file is
written (:func:`atomic_write`, before its ``os.replace``)."""
_RUN_OUTPUT = re.compile(r"^(run\.json|grid\.png|sample_\d+_seed\d+\.png)$")


def is_run_output(name: str) -> bool:
    """Whether ``name`` is a file ``generate`` writes (``run.json``, ``grid.png``,
    ``sample_<k>_seed<s>.png``): such files in an old ``--out`` belong to the old run."""
    return bool(_RUN_OUTPUT.match(name))


def _kill_point(point: str) -> None:
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _hidden_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _leftover_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(target.name)}\.({STAGING}|{ASIDE})-(\d+)-[0-9a-f]+$")


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def leftovers(target: str | os.PathLike) -> list[tuple[Path, str, int]]:
    """``(path, kind, pid)`` of staging / aside entries next to ``target`` (kind ``"staging"`` or
    ``"old"``), whatever their process's state."""
    target = Path(os.path.abspath(target))
    pattern = _leftover_pattern(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        m = pattern.match(name)
        if m:
            found.append((target.parent / name, "old" if m.group(1) == ASIDE else "staging", int(m.group(2))))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def recover(target: str | os.PathLike) -> list[str]:
    """Clean up after runs into ``target`` that were killed while publishing; return one line per
    action. An aside folder (the old ``--out`` of an interrupted two-rename swap) is renamed back
    when ``target`` is missing, else removed; staging folders and temporary files are removed.
    Entries of processes still alive (a concurrent run) are left alone."""
    target = Path(os.path.abspath(target))
    notes = []
    found = [f for f in leftovers(target) if not pid_alive(f[2])]
    for path, kind, pid in sorted(found, key=lambda f: f[1] != "old"):  # restore before removing
        try:
            if kind == "old" and not os.path.lexists(target):
                os.rename(path, target)
                notes.append(f"restored {target} from a run (process {pid}) killed while replacing it")
            else:
                _remove(path)
                notes.append(f"removed {path.name} left by a run (process {pid}) that was killed")
        except OSError as exc:
            notes.append(f"could not clean up {path} left by process {pid}: {exc.strerror or exc}")
    return notes


def make_staging(out: str | os.PathLike) -> Path:
    """Create and return an empty staging folder next to ``out`` (``out``'s parent is created if
    missing). The folder's mode follows the umask (an existing ``out``'s mode with
    :func:`publish`)."""
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = _hidden_name(out, STAGING)
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _copy_entry(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    system or filesystem cannot."""
    if os.environ.get(NO_EXCHANGE_ENV) or not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(staging: str | os.PathLike, out: str | os.PathLike,
            keep: Callable[[str], bool] = lambda name: not is_run_output(name)) -> None:
    """Make the complete folder ``staging`` (from :func:`make_staging`) appear as ``out``.

    A missing ``out`` is ``staging`` renamed. An existing ``out`` (the caller checked
    ``--overwrite``) is replaced as a whole: its entries for which ``keep(name)`` holds and that
    ``staging`` lacks are copied in first, the staging folder takes the old one's mode, then the
    two are exchanged atomically (or swapped by two renames, see the module docstring) and the
    old one is removed.

    Raises:
        OSError: a rename failed; ``out`` is then as it was and ``staging`` is removed.
    """
    staging, out = Path(staging), Path(os.path.abspath(out))
    try:
        _kill_point("staged")
        if not os.path.lexists(out):
            os.rename(staging, out)
            return
        for entry in sorted(out.iterdir()):
            if keep(entry.name) and not os.path.lexists(staging / entry.name):
                _copy_entry(entry, staging / entry.name)
        os.chmod(staging, stat.S_IMODE(out.stat().st_mode))
        _kill_point("copied")
        if _exchange(staging, out):
            _kill_point("exchanged")
            _remove(staging)  # the old run, under the staging name
            return
        aside = _hidden_name(out, ASIDE)
        os.rename(out, aside)
        _kill_point("aside")
        try:
            os.rename(staging, out)
        except OSError:
            os.rename(aside, out)
            raise
        _kill_point("swapped")
        _remove(aside)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write ``path`` at once: ``write(tmp)`` fills a hidden file next to it, which then replaces
    ``path`` (``os.replace``). On any error ``path`` is as it was and the temporary file is gone."""
    path = Path(os.path.abspath(path))
    tmp = _hidden_name(path, STAGING)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _kill_point("written")
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def check_out(out: str | os.PathLike, option: str = "--out", *, overwrite: bool | None = None,
              outputs: Iterable[str] = ()) -> None:
    """Refuse an output folder before any work, with one line naming ``option``.

    Refused: ``out`` exists and is not a folder; a part of the path above it is a file; the
    nearest existing folder cannot be written; ``out`` is the current directory or holds it (it
    would be swapped away); with ``overwrite`` given (generate): ``out`` holds files and
    ``overwrite`` is false, or its parent cannot be written (the swap renames there); any of
    ``outputs`` (names the run writes) exists in ``out`` and is not a regular file (a folder named
    ``grid.png``, a FIFO named ``results.jsonl``). ``overwrite=None`` (sweep): ``out`` is written
    in place, so it must be writable itself.

    Raises:
        ValueError: one of the above, naming ``option`` and the path.
    """
    shown = str(out)
    out = Path(os.path.abspath(out))
    if os.path.lexists(out) and not out.is_dir():
        raise ValueError(f"{option} {shown!r} exists and is not a directory")
    probe = Path(shown)  # as typed, so messages name what the user wrote
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{option} {shown!r} cannot be created: {str(probe)!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {shown!r} cannot be written (no write permission on {str(probe)!r})")
    if not out.is_dir():
        return
    cwd = Path(os.path.abspath(os.getcwd()))
    if overwrite is not None and (cwd == out.resolve() or out.resolve() in cwd.parents):
        raise ValueError(f"{option} {shown!r} is the current directory or holds it; choose a folder inside it")
    if not os.access(out, os.R_OK | os.X_OK):
        raise ValueError(f"{option} {shown!r} cannot be read (no permission)")
    if overwrite is not None:
        if any(out.iterdir()) and not overwrite:
            raise ValueError(f"{option} {shown!r} exists and holds files; pass --overwrite or choose another directory")
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {shown!r} cannot be replaced (no write permission on {str(out.parent)!r})")
    names = set(outputs)
    if overwrite is not None:  # generate: the old run's outputs go with it, whatever their names
        names |= {entry.name for entry in out.iterdir() if is_run_output(entry.name)}
    for name in sorted(names):
        entry = out / name
        if os.path.lexists(entry) and (entry.is_symlink() or not entry.is_file()):
            raise ValueError(f"{option} {shown!r} holds {name!r}, which is not a regular file; move it away")
