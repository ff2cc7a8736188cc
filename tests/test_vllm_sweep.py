"""`aligndial sweep --engine vllm` against `--engine hf`: the same rows, metrics, summary, plots and
choice of λ; and a stopped vLLM sweep resumes where it stopped.

The dual path of a tiny Llama with a perturbed adapter; greedy decoding, so both engines must
give the same text. KL and pairwise accuracy are scored on transformers in both (vLLM does
not return full-vocabulary log-probabilities), so they agree to float noise (1e-4).
"""

import csv
import json

import matplotlib.image
import pytest
from vllm_helpers import perturbed_adapter, tiny

from aligndial.cli import main
from aligndial.vllm.engine import VLLMBatchEngine

pytestmark = pytest.mark.slow

PROMPTS = [{"prompt": "The quick brown fox"}, {"prompt": "Hello"}, {"prompt": "Numbers such as 12 and 345 appear"}]
VALIDATION = [{"prompt": "Hello, how are you"}, {"prompt": "Once upon a time"}]
PAIRS = [{"prompt": "The quick brown", "chosen": " fox jumps", "rejected": " dog sleeps all day"},
         {"prompt": "Hello,", "chosen": " how are you", "rejected": " zebra"}]
LAMS = "-0.5,0,0.5,1,2"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-sweep")
    model = tiny("llama", tok, 0, root, "ref")
    (root / "toy_reward.py").write_text("def score(prompt, response):\n    return float(len(set(response)))\n")
    return {
        "root": root, "model": model, "adapter": perturbed_adapter(model, root),
        "prompts": write_jsonl(root / "p.jsonl", PROMPTS), "val": write_jsonl(root / "val.jsonl", VALIDATION),
        "pairs": write_jsonl(root / "pairs.jsonl", PAIRS),
    }


def sweep_argv(setup, out, engine: str) -> list[str]:
    return ["sweep", "--model", setup["model"], "--adapter", setup["adapter"], f"--lams={LAMS}", "--prompts",
            setup["prompts"], "--metric", "kl", "--metric", "length", "--metric", "reward:toy_reward:score",
            "--metric", f"pairwise-accuracy:{setup['pairs']}", "--max-new-tokens", "8", "--out", str(out),
            "--select", "reward", "--on", setup["val"], "--max-kl", "1e9", "--engine", engine, "--json",
            *(["--enforce-eager"] if engine == "vllm" else [])]  # compiled: test_vllm.py's servers


def read_rows(out):
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sweeps(setup, monkeypatch_module):
    monkeypatch_module.syspath_prepend(str(setup["root"]))
    outs = {}
    for engine in ("hf", "vllm"):
        outs[engine] = setup["root"] / f"sweep-{engine}"
        assert main(sweep_argv(setup, outs[engine], engine)) == 0
    return outs


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_vllm_sweep_equals_the_hf_sweep(sweeps):
    hf, vllm = (read_rows(sweeps[e]) for e in ("hf", "vllm"))
    assert len(hf) == len(vllm) == 5 * len(PROMPTS)
    for a, b in zip(hf, vllm):
        for key in ("lam", "prompt_index", "sample", "prompt", "context", "text", "token_ids", "length", "reward"):
            assert a[key] == b[key], (key, a, b)
        assert b["kl"] == pytest.approx(a["kl"], abs=1e-4)
    assert len({r["text"] for r in hf if r["prompt_index"] == 0}) >= 4  # λ changes the text
    assert max(r["kl"] for r in hf) > 0.1 and all(r["kl"] == 0 for r in hf if r["lam"] == 0)

    def summary(out):
        with open(out / "summary.csv") as f:
            return list(csv.DictReader(f))

    for a, b in zip(summary(sweeps["hf"]), summary(sweeps["vllm"])):
        assert a.keys() == b.keys() and a["lam"] == b["lam"]
        for key in a:
            if a[key] and key != "lam":
                assert float(b[key]) == pytest.approx(float(a[key]), abs=1e-4), key
    assert "pairwise-accuracy_mean" in summary(sweeps["vllm"])[0]
    for engine in ("hf", "vllm"):  # the plots and the choice of λ on the validation prompts
        for name in ("plot-kl", "plot-length", "plot-reward", "frontier"):
            assert matplotlib.image.imread(sweeps[engine] / f"{name}.png").std() > 0.01
    hf_sel, vllm_sel = (json.loads((sweeps[e] / "selection.json").read_text()) for e in ("hf", "vllm"))
    assert vllm_sel["lam"] == hf_sel["lam"] and vllm_sel["value"] == pytest.approx(hf_sel["value"])
    assert [r["text"] for r in read_rows(sweeps["vllm"] / "validation")] == \
        [r["text"] for r in read_rows(sweeps["hf"] / "validation")]


def test_a_stopped_vllm_sweep_resumes_where_it_stopped(setup, sweeps, tmp_path, monkeypatch):
    """rows.jsonl cut after 4 rows, the 5th half-written (a run stopped mid-write): the rerun
    generates the 11 missing rows only, keeps the 4 as they were, and ends where the full run did."""
    monkeypatch.syspath_prepend(str(setup["root"]))
    full = read_rows(sweeps["vllm"])
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "config.json").write_text((sweeps["vllm"] / "config.json").read_text())
    lines = (sweeps["vllm"] / "rows.jsonl").read_text().splitlines()
    kept = [json.loads(line) for line in lines[:4]]
    for r in kept:  # generated before the stop: unscored, with a marker the rerun must keep
        for m in ("kl", "length", "reward"):
            r.pop(m)
        r["tokens_per_second"] = -1.0
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + lines[4][:30])

    requested = []
    real_rows = VLLMBatchEngine.rows

    def counting_rows(self, texts, lams, settings):  # a spy: the real engine generates
        requested.append(len(texts))
        return real_rows(self, texts, lams, settings)

    monkeypatch.setattr(VLLMBatchEngine, "rows", counting_rows)
    argv = sweep_argv(setup, out, "vllm")
    i = argv.index("--select")
    assert main(argv[:i] + argv[i + 6:]) == 0  # without --select: one sweep
    assert requested == [len(full) - 4]
    rows = read_rows(out)
    assert [r["tokens_per_second"] for r in rows[:4]] == [-1.0] * 4
    for a, b in zip(full, rows):
        assert (a["text"], a["token_ids"], a["length"]) == (b["text"], b["token_ids"], b["length"])
        assert b["kl"] == pytest.approx(a["kl"], abs=1e-6)


def test_the_engine_has_room_for_a_whole_sweep_batch_whatever_its_first_call(setup):
    """The engine starts at its first call: a one-row first call (a warm-up, a resumed sweep's last
    row) must not leave vLLM one row per step for the 256-row batches after it."""
    import argparse

    from aligndial.engines import Settings
    from aligndial.vllm.run import MAX_NUM_SEQS

    args = argparse.Namespace(model=setup["model"], adapter=setup["adapter"], ref=None, aligned=None, dtype="float32",
                              trust_remote_code=False, seed=0, tensor_parallel_size=1, enforce_eager=True)
    engine = VLLMBatchEngine.from_args(args)
    try:
        assert len(engine.rows(["Hello"], [0.5], Settings(max_new_tokens=2))) == 1
        assert engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == MAX_NUM_SEQS
    finally:
        engine.close()
