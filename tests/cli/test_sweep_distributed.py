"""``torchrun --nproc_per_node=2 -m diffsample.cli.main sweep`` on CPU (gloo): the batches of each
cell are dealt to the ranks, rank 0 gathers and scores; the rows are those of one process (same
samples bit for bit, same MNIST-FD), and a sweep whose rank is killed resumes without losing a
finished cell."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffsample.run import sweep
from diffsample.run.models import load_model

ARGS = ["--solver", "euler", "--steps", "2,3", "--num-samples", "6", "--batch-size", "2", "-q"]


def _torchrun(out, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != sweep.KILL_RANK_ENV}
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "diffsample.cli.main", "sweep", *ARGS, "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_sweep_matches_one_process_and_resumes_after_a_killed_rank(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    try:
        reference = sweep.run_sweep(load_model("mnist"), tmp_path / "one", solvers=["euler"], schedules=["karras"],
                                    steps=[2, 3], num_samples=6, batch_size=2, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "two"
    killed = _torchrun(out, {sweep.KILL_RANK_ENV: "1:1"})  # rank 1 dies before its second cell
    assert killed.returncode != 0
    first = (out / "results.jsonl").read_text().splitlines()
    assert len(first) == 1 and json.loads(first[0])["steps"] == 2  # the finished cell is kept
    resumed = _torchrun(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(out)
    assert (out / "results.jsonl").read_text().splitlines()[0] == first[0]  # not rerun
    assert [r["steps"] for r in rows] == [2, 3] and all(r["world_size"] == 2 for r in rows)
    for one, two in zip(reference, rows):
        assert two["samples_sha256"] == one["samples_sha256"]
        assert abs(two["mnist_fd"] - one["mnist_fd"]) <= 1e-6
        assert two["class_accuracy"] == one["class_accuracy"] and two["nfe"] == one["nfe"]
        assert sweep.cell_key(two) == sweep.cell_key(one)
    assert (out / "report.html").is_file() and (out / "xy_grid.png").is_file()
