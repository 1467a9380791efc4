"""The README's Python examples run as pasted.

Every fenced ``python`` block of README.md runs on its own, in a fresh interpreter, in an empty
temporary folder, offline (no hub access). A block fails the test when it raises or prints nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_examples_and_stays_short():
    assert len(python_blocks()) >= 3
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block_runs_as_pasted(index, tmp_path):
    code = python_blocks()[index]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFSAMPLE_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    first = code.strip().splitlines()[0]
    assert run.returncode == 0, f"README python block {index} ({first!r}) failed:\n{run.stderr[-3000:]}"
    assert run.stdout.strip(), f"README python block {index} ({first!r}) printed nothing"
