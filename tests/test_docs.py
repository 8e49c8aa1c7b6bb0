"""The front door stays accurate: a short README, links that resolve, and results.md as the benchmarks wrote it.

Fast and offline: reads markdown files and runs `benchmarks/make_results.py --check`, which needs only the
standard library.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def make_results():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "benchmarks" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in without_code_blocks(page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it to 200 and move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(without_code_blocks(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.relative_to(ROOT)} links to: " + "; ".join(broken)


def test_results_page_regenerates_byte_identical():
    run = subprocess.run(
        [sys.executable, "benchmarks/make_results.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr + "(run: python benchmarks/make_results.py)"


def test_every_benchmark_has_a_section():
    listed = {b.script for b in make_results().BENCHMARKS}
    scripts = {p.name for p in (ROOT / "benchmarks").glob("bench_*.py")} | {"gpu_check.py"}
    assert scripts <= listed, f"benchmarks missing from make_results.BENCHMARKS: {sorted(scripts - listed)}"


def test_results_folder_holds_canonical_files_only():
    try:
        run = subprocess.run(
            ["git", "ls-files", "benchmarks/results"], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    benchmarks = make_results().BENCHMARKS
    allowed = {f"{b.name}.{ext}" for b in benchmarks for ext in ("json", "md")}
    allowed |= {b.image for b in benchmarks if b.image} | {"demo-smiling-star.png"}
    tracked = {line.removeprefix("benchmarks/results/") for line in run.stdout.splitlines()}
    extra = sorted(tracked - allowed)
    assert not extra, (
        f"benchmarks/results/ keeps one result per benchmark, named by it; not canonical: {extra} "
        "(add the benchmark to benchmarks/make_results.py, or leave run variants uncommitted)"
    )
