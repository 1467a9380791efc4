"""Fault injection: ``diffsample generate`` and ``diffsample sweep`` are killed with SIGKILL at
chosen moments of publishing and at moments spread over a whole run; ``--out`` must then hold the
complete old state or the complete new one (same file set and hashes), never a mix, and the next
start leaves no staging files behind.

The moments of publishing come from :mod:`diffsample.run.publish`'s test-only hook
(``DIFFSAMPLE_TEST_KILL_AT``: the process kills itself there; ``DIFFSAMPLE_TEST_NO_EXCHANGE``
forces the two-rename swap). To keep this fast, runs are forked from one helper process that has
imported torch, diffusers and the CLI once (it runs no numerics itself, so forking is safe), with
one torch thread.
"""

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffsample.run import publish

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")

ZYGOTE = r"""
import json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot, torch, diffusers, PIL.Image
from diffusers import UNet2DModel
import diffsample.cli.main, diffsample.run.generate, diffsample.run.sweep, diffsample.run.models
import diffsample.testbed.mnist
torch.set_num_threads(1)  # small runs on a shared machine: one thread is the fastest
from diffsample.cli.main import main
out = os.fdopen(os.dup(1), "w")
print("ready", file=out, flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(req["env"])
        try:
            main.main(args=req["args"], prog_name="diffsample")
        except SystemExit as exc:
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        except BaseException:
            os._exit(3)
        os._exit(0)
    print(pid, file=out, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, file=out, flush=True)
"""


class Zygote:
    """One helper process; each :meth:`run` forks a child that runs the CLI with ``args``."""

    def __init__(self, logs: Path):
        self.logs, self.count, self.buffer = logs, 0, b""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        assert self.readline(120) == "ready"

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError("the helper process did not answer")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise EOFError("the helper process ended")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()

    def run(self, args, env=None, kill_after: float | None = None, timeout: float = 60) -> tuple[int | None, float, str]:
        """Run ``diffsample ARGS``; SIGKILL it after ``kill_after`` seconds if given. Returns
        ``(exit code or None if killed, seconds, log text)``."""
        self.count += 1
        log = self.logs / f"run{self.count}.log"
        request = {"args": [str(a) for a in args], "env": env or {}, "log": str(log)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        start = time.monotonic()
        pid = int(self.readline(10))
        if kill_after is not None:
            time.sleep(max(0.0, kill_after - (time.monotonic() - start)))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = int(self.readline(timeout))
        elapsed = time.monotonic() - start
        code = os.waitstatus_to_exitcode(status)
        return (None if code == -signal.SIGKILL else code), elapsed, log.read_text()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("logs"))
    yield z
    z.close()


def digest(folder: Path) -> dict[str, str] | None:
    """File set and hashes under ``folder`` (``None`` if it does not exist); ``run.json`` without
    the fields that change on every run (date, wall time)."""
    if not folder.exists():
        return None
    result = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "run.json":
                record = json.loads(data)
                record.pop("date"), record.pop("wall_time_s")
                data = json.dumps(record, sort_keys=True).encode()
            result[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return result


def restore(backup: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(backup, out)


GENERATE = ["generate", "--steps", "2", "--num-samples", "8", "-q"]


def test_killed_generate_leaves_the_old_run_or_the_new_one(zygote, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    out, backup = work / "o", tmp_path / "old"
    code, _, log = zygote.run([*GENERATE, "--seed", "0", "--out", out])
    assert code == 0, log
    (out / "keep.txt").write_text("not a run output")
    shutil.copytree(out, backup)
    old = digest(out)
    new_args = [*GENERATE, "--seed", "100", "--out", out, "--overwrite"]
    code, full, log = zygote.run(new_args)
    assert code == 0, log
    new = digest(out)
    assert new != old and new["keep.txt"] == old["keep.txt"] and "sample_00000_seed100.png" in new
    assert set(old) & set(new) == {"keep.txt", "grid.png", "run.json"}  # a mix would show in the file set

    scenarios = [({publish.KILL_ENV: point}, None) for point in ("staged", "copied", "exchanged")]
    scenarios += [({publish.KILL_ENV: point, publish.NO_EXCHANGE_ENV: "1"}, None) for point in ("aside", "swapped")]
    scenarios += [({}, fraction * full) for fraction in (0.3, 0.6, 0.8, 0.9, 0.95, 1.0)]
    seen = set()
    for env, kill_after in scenarios:
        restore(backup, out)
        code, _, log = zygote.run(new_args, env=env, kill_after=kill_after)
        state = digest(out)
        two_rename_gap = env.get(publish.KILL_ENV) == "aside"
        assert state in (old, new) or (two_rename_gap and state is None), (env, kill_after, log)
        publish.recover(out)  # what the next start does
        state = digest(out)
        assert state in (old, new), (env, kill_after, log)
        assert [p.name for p in work.iterdir()] == ["o"], (env, kill_after)  # no staging left behind
        seen.add("new" if state == new else "old")
        if env:
            assert code is None, log  # the hook killed it
    assert seen == {"old", "new"}


def test_killed_sweep_leaves_the_old_results_md_or_the_new_one(zygote, tmp_path):
    out = tmp_path / "s"
    sweep = ["sweep", "--solver", "euler", "--num-samples", "8", "--batch-size", "8", "--metric", "none", "-q",
             "--out", out]
    code, _, log = zygote.run([*sweep, "--steps", "2"])
    assert code == 0, log
    old = {name: (out / name).read_bytes() for name in ("results.md", "fd_vs_nfe.png")}
    code, _, log = zygote.run([*sweep, "--steps", "2,3"])
    assert code == 0, log
    new = {name: (out / name).read_bytes() for name in ("results.md", "fd_vs_nfe.png")}
    rows = (out / "results.jsonl").read_bytes()
    assert old["results.md"] != new["results.md"]
    code, full, log = zygote.run([*sweep, "--steps", "2,3"])  # every cell resumed: summaries rewritten only
    assert code == 0, log

    seen = set()
    for env, kill_after in [({publish.KILL_ENV: "written"}, None)] + [({}, f * full) for f in (0.5, 0.8, 0.95)]:
        for name, data in old.items():
            (out / name).write_bytes(data)
        code, _, log = zygote.run([*sweep, "--steps", "2,3"], env=env, kill_after=kill_after)
        publish.recover(out / "results.md")
        publish.recover(out / "fd_vs_nfe.png")
        publish.recover(out / "xy_grid.png")
        publish.recover(out / "report.html")
        for name in old:
            data = (out / name).read_bytes()
            assert data in (old[name], new[name]), (name, env, kill_after, log)
            seen.add((name, "new" if data == new[name] else "old"))
        assert (out / "results.jsonl").read_bytes() == rows
        assert sorted(p.name for p in out.iterdir()) == ["cells", "fd_vs_nfe.png", "report.html", "results.jsonl", "results.md",
                                                        "xy_grid.png"]
    assert ("results.md", "old") in seen
