"""Tiny models built from transformers configs with seeded random weights, and a tokenizer
trained offline. Everything is saved to disk and loaded back through `from_pretrained`."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from aligndial.tiny import build_model, build_tokenizer, save  # noqa: E402
from replicas import Replicas  # noqa: E402

# One torch thread: the tests' models are tiny, and two threads on a 2-core machine that is doing anything
# else spin against each other (the suite's times both ways: docs/benchmarks.md, "Test suite"). The
# modules that send a server requests at once and assert they shared decode steps or streamed keep two
# threads, as CI has always run them: one thread made a tiny model's step short enough that staggered
# requests stopped overlapping.
THREADS, CONCURRENT_SERVING_THREADS = 1, 2
CONCURRENT_SERVING = {"test_serve", "test_serve_rows", "test_serve_stream", "test_serve_fuzz", "test_keys", "test_playground"}
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True, scope="module")
def torch_threads(request):
    """Two torch threads for the CONCURRENT_SERVING modules, one for the rest (see above)."""
    threads = CONCURRENT_SERVING_THREADS if request.module.__name__ in CONCURRENT_SERVING else THREADS
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(THREADS)


# The files that take minutes, longest first. `make test` runs two workers that each take whole files
# in the order collected (`--dist loadfile --no-loadscope-reorder`); handing out the long ones first
# lets the two finish together instead of one running the last long file alone. Per-file times:
# docs/benchmarks.md, "Test suite".
LONGEST_FIRST = ("test_docs.py", "test_vllm_tp.py", "test_vllm.py", "test_readme.py", "test_vllm_archs.py",
                 "test_train.py", "test_real_model.py")
_missing = [name for name in LONGEST_FIRST if not (Path(__file__).parent / name).exists()]
assert not _missing, f"LONGEST_FIRST in tests/conftest.py names {_missing}, which are gone: rename or drop them"


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays


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

