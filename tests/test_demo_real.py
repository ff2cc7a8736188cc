"""`aligndial demo real`: the whole staged pipeline end to end on a tiny random model (--quick),
its resume, its fail-fast checks, and the task's data (prompts, pairs, distinct-2)."""

import json

import pytest

from aligndial.cli import main
from aligndial.demo import real_task
from aligndial.tiny import build_model, build_tokenizer, save


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    tok = build_tokenizer()
    return str(save(build_model("llama", tok, seed=0), tok, tmp_path_factory.mktemp("real") / "ref"))


@pytest.mark.slow
def test_quick_run_writes_every_claim_and_a_rerun_resumes(tiny_ref, tmp_path, capsys):
    out, docs = tmp_path / "run", tmp_path / "docs"
    argv = ["demo", "real", "--quick", "--model", tiny_ref, "--out", str(out), "--docs", str(docs), "--json"]
    assert main(argv) == 0
    first = capsys.readouterr()
    summary = json.loads(first.out)
    assert set(summary["claims"]) == {"a", "b", "c", "d", "e"}
    assert summary["stages_missing"] == []
    assert all(c["verdict"].startswith(("holds", "does not hold", "measured")) for c in summary["claims"].values())
    results = json.loads((docs / "real-model.json").read_text())
    assert results["claims"] == summary["claims"]
    for name in ("dera-0", "dera-1", "dera-2", "adapter-1", "lora-1", "alone-dpo-full-lam0.5", "alone-trra-lam2",
                 "adapter-lr0.00003-1"):
        e = results["evals"][name]
        assert -1 <= e["reward"] <= 1 and e["n"] == 4
    assert results["evals"]["dera-0"]["kl"] == 0.0  # λ=0 is the reference itself
    # Claim d's decode cost: the three policies timed side by side, every median positive.
    assert set(results["speed"]["seconds_fastest"]) == {"reference", "mix", "student"}
    assert all(t > 0 for t in results["speed"]["seconds_fastest"].values())
    assert results["claims"]["d"]["decode_cost_vs_reference"] > 0
    assert results["recipes"]["dpo-adapter"]["trainable_params"] < results["recipes"]["dpo-full"]["trainable_params"]
    for f in ("real-model.md", "real-model-frontier.png", "real-model-lambda.png"):
        assert (docs / f).stat().st_size > 0
    assert "not measured yet" not in (docs / "real-model.md").read_text()
    assert "running" in first.err
    # The learning-rate variant trained at its own rate, and is reported beside the default, not in the λ sweep.
    spec = json.loads((out / "models" / "dpo-adapter-lr0.00003.spec.json").read_text())
    assert spec["args"]["learning_rate"] == 3e-5 and "learning_rate" not in json.loads((out / "models" / "dpo-adapter.spec.json").read_text())["args"]
    assert "3e-05" in json.dumps(results["claims"]["c"]) or results["claims"]["c"]["verdict"] == "holds"
    assert "--learning_rate 3e-05), λ = 1" in (docs / "real-model.md").read_text()
    # A section written by hand after a run survives the report being rewritten.
    with open(docs / "real-model.md", "a") as f:
        f.write("\n## Reading the numbers\n\nwritten by hand\n")

    assert main(argv) == 0
    second = capsys.readouterr()
    assert ": running" not in second.err
    assert second.err.count("skipped") == len([line for line in first.err.splitlines() if line.endswith(": running")])
    assert json.loads(second.out)["claims"] == summary["claims"]
    assert (docs / "real-model.md").read_text().count("written by hand") == 1


def test_a_run_dir_refuses_other_settings_before_loading(tiny_ref, tmp_path, capsys):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "settings.json").write_text(json.dumps({"model": "elsewhere", "config": {}}))
    assert main(["demo", "real", "--quick", "--model", tiny_ref, "--out", str(out)]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["demo", "real", "--quick", "--eval-prompts", "0"], "`--eval-prompts` must be ≥ 1; got 0"),
    (["demo", "real", "--quick", "--samples-per-prompt", "1"], "`--samples-per-prompt` must be ≥ 2"),
    (["demo", "real", "--quick", "--train-prompts", "100000"], "train prompts must be between 1 and"),
    (["demo", "real", "--model", "/no/such/model.gguf"], "`--model /no/such/model.gguf`: no such file"),
    (["demo", "real", "--plot", "x.png"], "do not apply to `aligndial demo real`"),
    (["demo", "--quick"], "`--quick` applies to `aligndial demo real` only"),
])
def test_bad_arguments_fail_fast_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_prompts_are_deterministic_and_held_out_items_never_train():
    train, held_out = real_task.prompts(300, 100, seed=0)
    assert (train, held_out) == real_task.prompts(300, 100, seed=0)
    assert len(set(train)) == 300 and len(set(held_out)) == 100
    items = [item for names in real_task.ITEMS.values() for item in names]
    train_items = {i for i in items if any(i.removeprefix("the ") in p for p in train)}
    held_items = {i for i in items if any(i.removeprefix("the ") in p for p in held_out)}
    assert train_items and held_items and not train_items & held_items


def test_pairs_are_best_against_worst_and_ties_are_dropped():
    samples = [{"prompt": "a", "text": t, "reward": r} for t, r in (("ok", 0.1), ("great", 0.9), ("bad", -0.5))]
    samples += [{"prompt": "b", "text": t, "reward": 0.3} for t in ("x", "y")]
    pairs = real_task.preference_pairs(samples, min_gap=0.1)
    assert len(pairs) == 1
    assert pairs[0]["chosen"][0]["content"] == "great" and pairs[0]["rejected"][0]["content"] == "bad"
    assert pairs[0]["prompt"][-1] == {"role": "user", "content": "a"}


def test_distinct_2_counts_unique_bigrams_over_all_bigrams():
    assert real_task.distinct_2([[1, 2, 3], [1, 2, 4]]) == 3 / 4
    assert real_task.distinct_2([[5]]) == 0.0


def test_a_stage_another_live_process_holds_is_skipped_and_a_dead_ones_is_taken_over(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from aligndial.demo.real import QUICK, Run, stage_lock

    run = Run("unused", tmp_path, QUICK)
    (tmp_path / "locks").mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "locks" / "eval-dera-1.lock").write_text(str(other.pid))
        with stage_lock(run, "eval dera-1", Path("evals/dera-1.json")) as mine:
            assert mine is False
    finally:
        other.kill()
        other.wait()
    # The holder is gone (its pid no longer runs): this process takes the stage over, and frees it after.
    with stage_lock(run, "eval dera-1", Path("evals/dera-1.json")) as mine:
        assert mine is True
        assert (tmp_path / "locks" / "eval-dera-1.lock").read_text() == str(os.getpid())
    assert not (tmp_path / "locks" / "eval-dera-1.lock").exists()
