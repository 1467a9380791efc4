"""Every document the repository refers to is in the repository.

Scans every ``.py``, ``.md`` and ``.ipynb`` file of the repository (git's list of tracked and
untracked, not ignored files; a directory walk without git) and fails when one

* names a ``.md`` file, or a path under ``docs/`` (file or folder), that does not exist (a path is looked up from the
  repository root and from the referring file's folder; a bare file name anywhere in the
  repository; ``*`` is a glob);
* links to ``FILE.md#anchor`` where ``FILE.md`` has no heading with that anchor (GitHub's rule:
  lower case, punctuation dropped, spaces to hyphens);
* carries a source tag of an outside reference document: a capital letter or ``?`` in square
  brackets standing alone in prose (``S``, ``D``, ``P``, ``C``, ``T``, ``A``, ``B``, ``?``).

URLs are not documents of the repository and are skipped. The failure message lists
``file:line: reference`` for each problem.
"""

from __future__ import annotations

import json
import re
import subprocess
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".ipynb")
SKIP_DIRS = {".git", "__pycache__", "build", "dist", ".venv", "out", "sweeps", "node_modules"}

# A path token: not glued to a preceding word, dot or slash (so URLs and dotted names are skipped).
_START = r"(?<![\w./:-])"
MD_REF = re.compile(_START + r"((?:\.\.?/)*(?:[\w*.-]+/)*[\w*-][\w*.-]*\.md)(#[\w-]+)?(?![\w/])")
DOCS_REF = re.compile(_START + r"(docs/[\w*./-]*[\w*])(#[\w-]+)?")
TAG = re.compile(r"(?<![\w(\[\]'\"])\[(?:[SDPCTAB]|\?)\](?![\w(=\[\]'\":])")


def repo_files() -> list[Path]:
    """Repository files with a scanned suffix."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        paths = [ROOT / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if p.is_file()]
    keep = []
    for p in paths:
        rel = p.relative_to(ROOT)
        if p.suffix in SUFFIXES and p.is_file() and not any(
                part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            keep.append(p)
    return sorted(keep)


@lru_cache(maxsize=1)
def all_names() -> frozenset[str]:
    """Base names of every file in the repository (any suffix)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return frozenset(Path(line).name for line in out.splitlines() if line)
    except (OSError, subprocess.CalledProcessError):
        return frozenset(p.name for p in ROOT.rglob("*") if p.is_file())


def lines_of(path: Path) -> list[str]:
    """The text lines a reader sees: notebook cell sources, or the file's lines."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return text.splitlines()
    lines: list[str] = []
    for cell in json.loads(text).get("cells", []):
        source = cell.get("source", [])
        lines += ("".join(source) if isinstance(source, list) else source).splitlines()
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """Anchors of the headings of a markdown file (code blocks skipped)."""
    found, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.add(slug(line.lstrip("#")))
    return frozenset(found)


def resolve(ref: str, where: Path) -> list[Path]:
    """Files ``ref`` may name from a file in folder ``where`` (empty if none exists)."""
    hits: list[Path] = []
    for base in (ROOT, where):
        try:
            hits += list(base.glob(ref)) if "*" in ref else ([base / ref] if (base / ref).exists() else [])
        except (ValueError, NotImplementedError):  # a pattern glob cannot take (e.g. leading "..")
            continue
    if not hits and "/" not in ref:
        pattern = re.compile(re.escape(ref).replace(r"\*", ".*") + "$")
        hits = [ROOT / name for name in all_names() if pattern.match(name)]
    return hits


def problems_in(lines: list[str], where: Path, label: str) -> list[str]:
    """``label:line: problem`` for every reference in ``lines`` (text of a file in folder ``where``)."""
    out = []
    for n, line in enumerate(lines, 1):
        refs = [(m.group(1), m.group(2)) for m in MD_REF.finditer(line)]
        refs += [(m.group(1), m.group(2)) for m in DOCS_REF.finditer(line) if not m.group(1).endswith(".md")]
        for ref, anchor in refs:
            hits = resolve(ref, where)
            if not hits:
                out.append(f"{label}:{n}: {ref} does not exist in the repository")
            elif anchor and ref.endswith(".md") and hits[0].is_file() and anchor[1:] not in anchors(hits[0]):
                out.append(f"{label}:{n}: {ref}{anchor}: no such heading in {hits[0].relative_to(ROOT)}")
        out += [f"{label}:{n}: outside-document tag {m.group(0)}" for m in TAG.finditer(line)]
    return out


def test_checker_catches_what_it_should():
    here = ROOT / "tests"
    bad = ["see NOT_HERE.md section 2", "docs/nowhere.md", "docs/design.md#no-such-heading",
           "derived [" + "D]", "from a secondary source [" + "S])", "../outside/GUIDE.md"]
    good = ["README.md", "docs/design.md#layers", "https://github.com/a/b/blob/main/OTHER.md",
            "x = torch.tensor([S])", "y = table[S]", "benchmarks/results/stein_*.md", "`results.md`"]
    assert len(problems_in(bad, here, "t")) == len(bad), problems_in(bad, here, "t")
    assert problems_in(good, here, "t") == []
    assert slug("## Twisted SMC (`jeffrey:particles=K`)".lstrip("#")) == "twisted-smc-jeffreyparticlesk"
    assert slug(" nfe and model_evals") == "nfe-and-model_evals"


def test_every_referenced_document_exists():
    files = repo_files()
    assert any(p.name == "design.md" for p in files), "docs/design.md is missing"
    problems = []
    for path in files:
        if path == Path(__file__).resolve():
            continue
        problems += problems_in(lines_of(path), path.parent, str(path.relative_to(ROOT)))
    assert not problems, "references to documents that are not in the repository:\n" + "\n".join(problems)
