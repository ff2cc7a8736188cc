"""Tiny models built from transformers configs with seeded random weights, and a tokenizer
trained offline. Everything is saved to disk and loaded back through `from_pretrained`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from aligndial.tiny import build_model, build_tokenizer, save  # noqa: E402
from replicas import Replicas  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tok):
    """{arch: (ref_dir, aligned_dir, aligned2_dir)} for the oracle architectures."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for arch in ("llama", "qwen2", "gpt2"):
        dirs[arch] = tuple(
            str(save(build_model(arch, tok, seed=seed), tok, root / f"{arch}-{name}"))
            for seed, name in ((0, "ref"), (1, "aligned"), (2, "aligned2"))
        )
    return dirs


@pytest.fixture(scope="session")
def replicas(tmp_path_factory) -> Replicas:
    """Checkpoints shaped like the real families behind real tokenizers (tests/replicas.py),
    each built on first use and shared by the whole session:
    `replicas.qwen3("base" | "instruct", dtype="bfloat16")`, `replicas.llama3(...)`, `replicas.gemma(...)`."""
    return Replicas(tmp_path_factory.mktemp("replicas"))


@pytest.fixture
def prompts():
    # Different lengths, so batches are left-padded.
    return ["The quick brown fox", "Hello", "Numbers such as 12 and 345 appear"]


@pytest.fixture(scope="session")
def tour_dir(tmp_path_factory):
    """One `aligndial demo tour` directory for the session, made by the command itself as a README line
    runs (tests/test_readme.py's Runner). The docs pages and the README's vLLM section build on it:
    each copies it (test_readme.copy_tour) before its lines write there, so no test sees another's files."""
    from test_readme import Runner

    runner = Runner(tmp_path_factory.mktemp("tour"))
    runner.run_blocks([{"section": "setup", "lang": "bash", "lines": ["aligndial demo tour"]}])
    assert not runner.failed and runner.ran == ["aligndial demo tour"], runner.report()
    return runner.cwd

