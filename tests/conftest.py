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
