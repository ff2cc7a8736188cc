"""The embedded demo: the task's scoring, the bundled models against their manifest, `aligndial demo`
on them (the dial moves the numbers the right way), and a smoke build of every stage."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from aligndial.adapter import load_adapter
from aligndial.cli import main
from aligndial.demo import task
from aligndial.demo.build import BUNDLE, STAGES, check_bundle


def test_replies_and_scoring():
    p = task.Problem("Tom", "he", "pens", 12, (5, -3), ("buys {n} more", "loses {n}"))
    assert p.prompt == "Tom has 12 pens. He buys 5 more. Then he loses 3. How many pens does he have?"
    careful, direct = task.reply(p, True), task.reply(p, False)
    assert careful == "Step 1: 12 + 5 = 17. Step 2: 17 - 3 = 14. The answer is 14."
    assert direct == "The answer is 14."
    assert task.score(careful, 14) == {"correct": True, "careful": True}
    assert task.score(direct, 15) == {"correct": False, "careful": False}
    assert task.score("Step 1: 12 + 5 = 17.", 17) == {"correct": False, "careful": True}  # no final answer


def test_evaluation_problems_are_never_trained_on():
    train = {p.prompt for p in task.problems(3000, 0, "train")}
    held_out = task.problems(192, 0, "eval")
    assert not train & {p.prompt for p in held_out}
    assert all(0 <= p.start + sum(p.steps[:i]) <= task.MAX_VALUE for p in held_out for i in range(len(p.steps) + 1))
    prefs = task.preference_rows(500, 0)
    share = sum(r["chosen"][0]["content"].startswith("Step") for r in prefs) / len(prefs)
    assert abs(share - task.PREFER_CAREFUL) < 0.06


def test_bundled_files_match_their_manifest():
    manifest = check_bundle(BUNDLE)
    assert set(STAGES) <= {name.split("/")[0] for name in manifest["files"]}
    assert sum(f["bytes"] for f in manifest["files"].values()) < 20e6
    assert manifest["command"].startswith("aligndial demo build")


def test_a_changed_or_missing_bundle_is_refused(tmp_path, capsys):
    copy = tmp_path / "models"
    shutil.copytree(BUNDLE, copy)
    weights = copy / "aligned" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"aligned/model.safetensors: sha256 differs.*aligndial demo build"):
        check_bundle(copy)
    assert main(["demo", "--models", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert "manifest.json is missing" in err and "aligndial demo build --out" in err


def test_flags_of_the_other_action_are_refused(capsys):
    assert main(["demo", "--small"]) == 2
    assert "apply to `aligndial demo build`" in capsys.readouterr().err
    assert main(["demo", "build", "--json"]) == 2
    assert "not to `aligndial demo build`" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_on_the_bundled_models_turns_the_dial(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    assert main(["demo", "--json", "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("DeRa", "InRa"):
        at = {r["lam"]: r for r in result["sweep"] if r["method"] == method}
        assert sorted(at) == [-1.0, 0.0, 0.5, 1.0, 1.5, 2.0]
        # π_λ's probability of answering step by step rises with λ (exact: no sampling noise; between
        # 1.5 and 2 it saturates near 0.9 and may dip, as tokens neither model starts with grow too) ...
        p = [at[x]["p_careful"] for x in (-1.0, 0.0, 0.5, 1.0, 2.0)]
        assert all(a < b for a, b in zip(p, p[1:])), (method, p)
        # ... and so do the sampled replies' step-by-step share, length and accuracy, end to end.
        assert at[-1.0]["careful"] < at[0.0]["careful"] < at[1.0]["careful"] <= at[2.0]["careful"], method
        assert at[-1.0]["tokens"] < at[0.0]["tokens"] < at[2.0]["tokens"], method
        assert at[2.0]["accuracy"] > at[0.0]["accuracy"] > at[-1.0]["accuracy"], method
        # KL to the reference: zero at λ=0, growing away from it on both sides.
        assert at[0.0]["kl"] == 0.0 and at[2.0]["kl"] > at[1.0]["kl"] > at[0.5]["kl"] > 0 and at[-1.0]["kl"] > 0
    trra = result["trra"]
    dera2 = next(r for r in result["sweep"] if r["method"] == "DeRa" and r["lam"] == trra["distilled_at"])
    assert abs(trra["careful"] - dera2["careful"]) < 0.15  # one model does what DeRa at λ=2 does
    assert {e["lam"] for e in result["examples"]} == {-1.0, 0.0, 1.0, 2.0}


@pytest.mark.slow
def test_small_build_trains_every_stage_loadably_and_deterministically(tmp_path):
    # In fresh processes, through the console entry point, as a user runs it.
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        subprocess.run([sys.executable, "-m", "aligndial.cli", "demo", "build", "--small", "--seed", "3", "--out", str(out)],
                       check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    manifests = [check_bundle(out) for out in outs]
    assert manifests[0]["command"] == "aligndial demo build --seed 3 --small"
    # Same seed, byte-identical files (the adapter's too: save_adapter writes one metadata key).
    assert manifests[0]["files"] == manifests[1]["files"], "the same seed gave different files"
    out = outs[0]
    ref = AutoModelForCausalLM.from_pretrained(out / "ref")
    for stage in ("aligned", "trra"):
        model = AutoModelForCausalLM.from_pretrained(out / stage)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, ref.get_parameter(n))]
        assert changed, f"{stage} is still the reference"
    cfg = load_adapter(AutoModelForCausalLM.from_pretrained(out / "ref"), out / "adapter")
    assert cfg.num_layers == 1 and cfg.base_model == "ref"
    for stage in STAGES:
        summary = json.loads((out / stage / "training_summary.json").read_text())
        assert summary["steps"] >= 1, stage
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training_summary.json"]


def test_demo_shows_a_progress_bar_per_stage(capsys):
    """`aligndial demo` takes tens of seconds: every stage reports progress on stderr (stdout stays
    the report or the JSON)."""
    from aligndial.demo.show import LAMS, run

    result = run(BUNDLE, plot=None, n_problems=6)
    out, err = capsys.readouterr()
    assert out == "" and result["problems"] == 6
    for desc, total in (("loading the bundled models", 1), ("DeRa: 6 problems at each λ", len(LAMS)),
                        ("InRa: 6 problems at each λ", len(LAMS)), ("TrRa student", 1), ("greedy replies side by side", 8)):
        assert f"[demo] {desc}: 100%" in err and f"{total}/{total}" in err, (desc, err)


def test_demo_build_says_when_a_mismatch_comes_from_library_versions():
    """A rebuild compares itself with the manifest it replaces: other library versions explain
    different bytes, the same versions do not."""
    from aligndial.demo.build import compare_manifests, versions

    bundled = check_bundle(BUNDLE)
    assert {"torch", "transformers", "trl", "tokenizers"} <= set(bundled["versions"])
    assert {"accelerate", "safetensors", "numpy"} <= set(versions())  # recorded by new builds
    rebuilt = json.loads(json.dumps(bundled))
    assert compare_manifests(bundled, rebuilt).startswith("every file matches")
    rebuilt["files"]["aligned/model.safetensors"]["sha256"] = "0" * 64
    rebuilt["versions"]["transformers"] = "5.19.0"
    line = compare_manifests(bundled, rebuilt)
    assert line.startswith("1 of ") and "aligned/model.safetensors" in line
    assert f"transformers {bundled['versions']['transformers']} there, 5.19.0 here" in line
    rebuilt["versions"] = bundled["versions"]
    assert "library versions match" in compare_manifests(bundled, rebuilt)
    rebuilt["seed"] = 1
    assert "built with other settings" in compare_manifests(bundled, rebuilt)
