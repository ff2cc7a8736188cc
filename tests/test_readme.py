"""The README runs as written: every shell line of its ```bash blocks and every ```python block,
in order, in one fresh directory, against the demo models (`aligndial demo tour` writes them, as
the README tells a newcomer to do). Also: docs/cli.md is the image of the current parser.

- A line that runs "until Ctrl-C" (a server) is started in the background; the next lines run once
  its /health answers, and it is stopped before the next server or at the end.
- Lines marked `# needs: X` (install, gpu, internet) are skipped BY NAME: the test prints them and
  checks that nothing else was skipped.
- SUBSTITUTIONS rewrites what cannot run as written here (the port, so parallel test runs do not
  collide); everything else runs verbatim.
- The README's vLLM section runs in its own test (vLLM's start-up dominates its time).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
NEEDS = re.compile(r"#\s*needs:\s*([\w-]+)")
SERVER = "runs until Ctrl-C"
VLLM_SECTION = "vLLM"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = free_port()
SUBSTITUTIONS = {"8000": str(PORT)}  # README text -> what runs here


def blocks(text: str) -> list[dict]:
    """Code blocks in order: {"section", "lang", "lines"}; bash lines with `\\` continuations joined
    and comment-only / blank lines dropped."""
    out, section = [], ""
    for m in re.finditer(r"^## ([^\n]+)$|^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if m.group(1):
            section = m.group(1).strip()
            continue
        lang, body = m.group(2), m.group(3)
        if lang == "bash":
            out.append({"section": section, "lang": lang, "lines": commands(body)})
        elif lang == "python":
            out.append({"section": section, "lang": lang, "lines": [body]})
    return out


def commands(body: str) -> list[str]:
    """Shell commands of a bash block as bash reads them: `\\` continuations joined, a quoted
    string may span lines, comment-only and blank lines dropped."""
    out, buf = [], ""
    for raw in body.splitlines():
        buf = f"{buf}\n{raw}" if buf else raw
        if buf.rstrip().endswith("\\"):
            continue
        try:
            shlex.split(buf, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        command = re.sub(r"\\\n\s*", " ", buf).strip()
        buf = ""
        if command and not command.startswith("#"):
            out.append(command)
    assert not buf, f"unterminated command in a README block: {buf!r}"
    return out


def substitute(line: str) -> str:
    for old, new in SUBSTITUTIONS.items():
        line = line.replace(old, new)
    return line


def env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}


class Runner:
    """Runs README blocks in one directory, remembering what ran, what failed and what was skipped."""

    def __init__(self, cwd: Path):
        self.cwd, self.ran, self.failed, self.skipped, self.server = cwd, [], [], [], None
        self.seconds = []  # (wall seconds, line) of each shell line: where the test's time goes

    def run_blocks(self, selected: list[dict]) -> None:
        try:
            for block in selected:
                for line in block["lines"]:
                    if block["lang"] == "python":
                        self.python(line)
                    elif NEEDS.search(line):
                        self.skipped.append((line, NEEDS.search(line).group(1)))
                    elif SERVER in line:
                        self.start_server(line)
                    else:
                        self.shell(line)
        finally:
            self.stop_server()

    def shell(self, line: str, timeout: float = 1800) -> None:
        start = time.monotonic()
        proc = subprocess.run(["bash", "-c", substitute(line)], cwd=self.cwd, env=env(), capture_output=True,
                              text=True, timeout=timeout)
        self.seconds.append((time.monotonic() - start, line))
        self.ran.append(line)
        if proc.returncode != 0:
            self.failed.append((line, proc.returncode, (proc.stdout + proc.stderr)[-3000:]))

    def python(self, code: str) -> None:
        proc = subprocess.run([sys.executable, "-c", substitute(code)], cwd=self.cwd, env=env(), capture_output=True,
                              text=True, timeout=1800)
        self.ran.append(code.splitlines()[0] + " …")
        if proc.returncode != 0:
            self.failed.append((code, proc.returncode, (proc.stdout + proc.stderr)[-3000:]))

    def start_server(self, line: str, timeout: float = 900) -> None:
        self.stop_server()
        log = open(self.cwd / f"server-{len(self.ran)}.log", "w")
        # No `exec`: a line may start with an assignment (`ALIGNDIAL_API_KEY=… aligndial serve`); the whole
        # session is stopped by its process group anyway.
        self.server = subprocess.Popen(["bash", "-c", substitute(line)], cwd=self.cwd, env=env(), stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.ran.append(line)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        log.flush()
        self.failed.append((line, self.server.poll(), Path(log.name).read_text()[-3000:]))
        self.stop_server()

    def stop_server(self) -> None:
        if self.server is not None:
            os.killpg(self.server.pid, signal.SIGTERM)  # the session it started: bash, the server, its workers
            try:
                self.server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
            self.server = None

    def report(self) -> str:
        skipped = "\n".join(f"  skipped ({why}): {line}" for line, why in self.skipped)
        failed = "\n\n".join(f"FAILED (exit {code}): {line}\n{out}" for line, code, out in self.failed)
        slowest = "\n".join(f"  {t:6.1f} s  {line[:100]}" for t, line in sorted(self.seconds, reverse=True)[:8])
        return f"ran {len(self.ran)}, skipped {len(self.skipped)}:\n{skipped}\nslowest lines:\n{slowest}\n{failed}"


def copy_tour(tour_dir: Path, dest: Path) -> None:
    """The session's `aligndial demo tour` files (conftest.py's `tour_dir`) into a test's own directory,
    as if the command had run there: a copy, so the lines that write there touch no other test's files."""
    shutil.copytree(tour_dir, dest, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory):
    """The README's main part (everything but the vLLM section), run once; returns the Runner."""
    runner = Runner(tmp_path_factory.mktemp("readme"))
    runner.run_blocks([b for b in blocks(README.read_text()) if b["section"] != VLLM_SECTION])
    return runner


@pytest.mark.slow
def test_every_readme_line_runs_as_written(readme_dir):
    print(readme_dir.report())
    assert not readme_dir.failed, readme_dir.report()
    assert {why for _, why in readme_dir.skipped} <= {"install", "gpu", "internet"}, readme_dir.report()
    installs = [line.split("#")[0].strip() for line, why in readme_dir.skipped if why == "install"]
    assert installs == ["make demo", "make test"], readme_dir.report()
    assert len(readme_dir.ran) >= 10  # the tour ran, not just its first block
    # What the lines promised is there.
    assert (readme_dir.cwd / "aligndial-demo.png").is_file()
    assert {"rows.jsonl", "summary.csv", "selection.json", "frontier.png"} <= {
        p.name for p in (readme_dir.cwd / "runs" / "sweep").iterdir()}
    assert (readme_dir.cwd / "dpo-adapter" / "adapter_config.json").is_file()


PREREQUISITES = ("aligndial demo tour", "aligndial adapter init --model sft-model")  # README lines the vLLM section builds on


@pytest.mark.slow
def test_readme_vllm_lines_run_as_written(tmp_path, tour_dir):
    """The vLLM section, after the README lines that make what it uses (the tour's models, `my-adapter/`).
    The tour line is the session's one run of `aligndial demo tour` (conftest.py's `tour_dir`), copied here."""
    found = blocks(README.read_text())
    setup = [line for b in found if b["section"] != VLLM_SECTION and b["lang"] == "bash" for line in b["lines"]
             if line.startswith(PREREQUISITES)]
    assert len(setup) == len(PREREQUISITES), setup
    assert setup[0].startswith(PREREQUISITES[0]), setup  # the tour comes first: the adapter line needs its sft-model/
    copy_tour(tour_dir, tmp_path)
    runner = Runner(tmp_path)
    runner.run_blocks([{"section": "setup", "lang": "bash", "lines": setup[1:]}])
    assert not runner.failed, runner.report()
    runner = Runner(tmp_path)
    runner.run_blocks([b for b in found if b["section"] == VLLM_SECTION])
    print(runner.report())
    assert not runner.failed and not runner.skipped and len(runner.ran) == 3, runner.report()


def test_readme_blocks_are_found_and_marked():
    """The extraction itself: continuations joined, servers and `needs:` marks recognised."""
    found = blocks(README.read_text())
    lines = [line for b in found if b["lang"] == "bash" for line in b["lines"]]
    assert any(line.startswith("aligndial sweep") and "--out runs/sweep" in line for line in lines)  # joined
    assert sum(SERVER in line for line in lines) == 2
    assert all(shlex.split(line, comments=True) for line in lines)  # every line is valid shell words
    assert len(README.read_text().splitlines()) < 300


def test_cli_docs_are_the_current_parser():
    """docs/cli.md is generated from the parser; regenerate with `python -m aligndial.clidocs > docs/cli.md`."""
    from aligndial.clidocs import render

    assert (ROOT / "docs" / "cli.md").read_text() == render(), "docs/cli.md is stale: python -m aligndial.clidocs > docs/cli.md"
