"""What the product says to its users: links that resolve, no references to the team's private tracker or to
paths outside the repository, and benchmark results small enough to live in git."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINARY = {".png", ".jpg", ".jpeg", ".gif", ".whl", ".gz", ".tgz", ".zip", ".pt", ".pt2", ".onnx"}
SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".benchmarks"}

# A tracker number after the word for a tracker entry, or a bare "#" and digits, means nothing to a user.
# (triton#NNNN, pytorch#NNNN) are fine; a bare #NNNN is the tracker's.
TRACKER = re.compile(r"\bissues? ?#?[0-9]+|(?<![A-Za-z0-9_/&])#[0-9]+\b", re.IGNORECASE)
UPSTREAM = re.compile(r"\b(?:triton|pytorch)#[0-9]+", re.IGNORECASE)
# The team's notes live beside the repository, not in it: users do not have them.
OUTSIDE = re.compile(r"\.\./shared\b|(?<![\w.])shared/(?:design|measurements|notes)\b")
# "the seed block": seed means a random seed to a reader; the block is the reference block.
SEED_BLOCK = re.compile(r"\bseed(?:'s|[\s_-]+block|[\s_-]+form|\s+example)\b", re.IGNORECASE)
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MAX_RESULT_LINES = 10_000


def product_files() -> list[Path]:
    """Every file of the repository a user gets or reads: what git tracks or would track (not what it ignores)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
        files = [ROOT / name for name in listed if name]
    except (OSError, subprocess.SubprocessError):  # a copy without git: every file but caches and environments
        files = [p for p in ROOT.rglob("*") if p.is_file() and not (set(p.relative_to(ROOT).parts[:-1]) & SKIP_DIRS)
                 and not p.relative_to(ROOT).parts[0].startswith(".venv")]
    return [p for p in files if p.is_file() and p.suffix.lower() not in BINARY]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def findings(pattern: re.Pattern, allowed: re.Pattern | None = None) -> list[str]:
    found = []
    for path in product_files():
        text = None if path.resolve() == Path(__file__).resolve() else text_of(path)  # not its own examples
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            checked = allowed.sub("", line) if allowed is not None else line
            for match in pattern.finditer(checked):
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()[:100]!r}")
    return found


def test_no_references_to_the_private_tracker():
    assert not findings(TRACKER, UPSTREAM), "\n".join(findings(TRACKER, UPSTREAM))


def test_no_paths_outside_the_repository():
    assert not findings(OUTSIDE), "\n".join(findings(OUTSIDE))


def test_the_reference_block_is_not_called_the_seed_block():
    assert not findings(SEED_BLOCK), "\n".join(findings(SEED_BLOCK))


def test_the_patterns_catch_what_they_are_for():
    word = "Iss" + "ue"  # spelled in two parts, so that this file holds no tracker reference itself
    assert TRACKER.search(f"see {word} 9's targets") and TRACKER.search("fixed in #12")
    assert not TRACKER.search(UPSTREAM.sub("", "a workaround for triton#4321"))
    assert OUTSIDE.search("(../shared/measurements/h200.md)") and not OUTSIDE.search("shared memory")
    assert SEED_BLOCK.search("the seed block") and not SEED_BLOCK.search("a seed gives identical parameters")
    assert SEED_BLOCK.search("seed-form blocks") and SEED_BLOCK.search("SEED_FORM")


def markdown_files() -> list[Path]:
    return [p for p in product_files() if p.suffix == ".md"]


def test_every_relative_link_in_the_readme_and_docs_resolves_inside_the_repository():
    pages = markdown_files()
    assert ROOT / "README.md" in pages and any(p.parent == ROOT / "docs" for p in pages)
    broken = []
    for page in pages:
        for target in MARKDOWN_LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            resolved = (page.parent / target.split("#", 1)[0]).resolve()
            if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def test_the_link_checker_sees_links_and_images():
    text = 'See [the docs](docs/install.md#cpu) and ![plot](a/b.png "title"), not [x](https://example.org).'
    assert MARKDOWN_LINK.findall(text) == ["docs/install.md#cpu", "a/b.png", "https://example.org"]


def tracked(under: str) -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", under], cwd=ROOT, capture_output=True, check=True,
                                timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        pytest.skip("needs git to know what is tracked")
    return [ROOT / name for name in listed if name]


def test_benchmark_results_in_git_are_compact():
    files = tracked("benchmarks/results")
    if not files:
        pytest.skip("no tracked results (not a git checkout of the project)")
    lines = sum(path.read_bytes().count(b"\n") for path in files if path.is_file())
    assert lines <= MAX_RESULT_LINES, f"{lines} tracked lines under benchmarks/results/"
    dumps = [p for p in files if p.name.startswith("pytest-benchmark") or "raw" in p.relative_to(ROOT).parts]
    assert not dumps, dumps
