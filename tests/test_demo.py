"""The embedded demo: the task's scoring, the bundled models against their manifest, `aligndial demo`
on them (the dial moves the numbers the right way), weak-to-strong steering of the bundled larger
reference by the small pair, and a smoke build of every stage (and of one stage into a bundle)."""

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


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_a_changed_or_missing_bundle_is_refused(tmp_path, capsys):
    copy = tmp_path / "models"
    shutil.copytree(BUNDLE, copy)
    flip_last_byte(copy / "aligned" / "model.safetensors")
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
    # Weak-to-strong: the small pair's difference moves the larger reference the same way it moves ref.
    steer = {r["lam"]: r for r in result["steering"]["rows"]}
    assert sorted(steer) == [0.0, 0.5, 1.0, 2.0]
    p = [steer[x]["p_careful"] for x in sorted(steer)]
    assert all(a < b for a, b in zip(p, p[1:])), p
    assert steer[0.0]["careful"] < steer[1.0]["careful"] <= steer[2.0]["careful"]
    assert steer[0.0]["tokens"] < steer[2.0]["tokens"] and steer[0.0]["accuracy"] < steer[1.0]["accuracy"]
    assert steer[0.0]["kl"] == 0.0 and steer[2.0]["kl"] > steer[1.0]["kl"] > steer[0.5]["kl"] > 0


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory):
    """Two `aligndial demo build --small --seed 3` bundles, built in fresh processes through the console
    entry point, as a user runs it; the module's builds (tests copy a bundle before changing it)."""
    root = tmp_path_factory.mktemp("small-builds")
    outs = [root / "a", root / "b"]
    for out in outs:
        subprocess.run([sys.executable, "-m", "aligndial.cli", "demo", "build", "--small", "--seed", "3", "--out", str(out)],
                       check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return outs


@pytest.mark.slow
def test_small_build_trains_every_stage_loadably_and_deterministically(small_builds):
    outs = small_builds
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
    """`aligndial demo` takes more than a couple of seconds: every stage reports progress on stderr (stdout stays
    the report or the JSON)."""
    from aligndial.demo.build import quiet_single_thread
    from aligndial.demo.show import LAMS, STEER_LAMS, run

    with quiet_single_thread():  # as `aligndial demo` runs: two threads on a busy 2-core machine crawl
        result = run(BUNDLE, plot=None, n_problems=6)
    out, err = capsys.readouterr()
    assert out == "" and result["problems"] == 6
    for desc, total in (("loading the bundled models", 1), ("DeRa: 6 problems at each λ", len(LAMS)),
                        ("InRa: 6 problems at each λ", len(LAMS)), ("TrRa student", 1),
                        ("Steering: large ref + λ·(aligned − ref), 6 problems at each λ", len(STEER_LAMS)),
                        ("greedy replies side by side", 8)):
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


# --- weak-to-strong steering: the bundled larger reference steered by the small pair --------------------


def _plain(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _chat_ids(tokenizer, problems):
    from aligndial.demo.measure import render

    texts = [render(tokenizer, [{"role": "user", "content": p.prompt}]) for p in problems]
    return [tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def bundle():
    """The bundled models as `aligndial demo` loads them (`show.load_bundle`), once for the steering tests."""
    from aligndial.demo.show import load_bundle

    return load_bundle(BUNDLE)


@pytest.fixture
def as_the_demo_runs():
    """One torch thread, as `aligndial demo` computes the steering rows (`quiet_single_thread`): two
    threads on a busy 2-core machine crawl."""
    from aligndial.demo.build import quiet_single_thread

    with quiet_single_thread():
        yield


def test_steering_at_lam_0_is_the_large_model_alone(bundle, as_the_demo_runs):
    """The demo's steering pair (large, [aligned, ref]) at weights (0, 0) generates the large model's
    own greedy tokens; at (1, −1) it does not (the small pair moves it)."""
    from aligndial.demo.show import steering_weights

    pair = bundle["Steering"]
    large = _plain(BUNDLE / "large")
    moved = 0
    for ids in _chat_ids(pair.tokenizer, task.problems(6, 0, "eval")):
        alone = large.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=pair.tokenizer.pad_token_id)
        steered0 = pair.generate(ids, lam=steering_weights(0.0), max_new_tokens=24, do_sample=False)
        steered1 = pair.generate(ids, lam=steering_weights(1.0), max_new_tokens=24, do_sample=False)
        assert torch.equal(steered0, alone)
        moved += not torch.equal(steered1[:, : alone.shape[1]], alone)
    assert moved > 0, "λ=1 left every reply as the large model's"


def test_steering_rows_come_from_the_large_model_and_the_small_pair(bundle, as_the_demo_runs):
    """Each steering row's p(careful) is the mean probability of "Step" as the first reply token under
    h_large + λ·(h_aligned − h_ref), recomputed here in float64 from the three plain models; λ=0 is the
    large model's own (not the small reference's), and only λ=0 has zero KL to it."""
    from aligndial.demo.show import STEER_LAMS, sizes, steering_rows

    n = 6
    models = bundle
    rows = {r["lam"]: r for r in steering_rows(models["Steering"], models["tokenizer"], task.problems(n, 0, "eval"))}
    assert sorted(rows) == STEER_LAMS
    large, aligned, ref = (_plain(BUNDLE / name) for name in ("large", "aligned", "ref"))
    tokenizer = models["tokenizer"]
    step_id = tokenizer(task.careful_reply(1, (1,)), add_special_tokens=False)["input_ids"][0]
    first = []
    with torch.no_grad():
        for ids in _chat_ids(tokenizer, task.problems(n, 0, "eval")):
            first.append([m(ids).logits[0, -1].double() for m in (large, aligned, ref)])
    for lam, row in rows.items():
        assert row["weights"] == [lam, -lam] if lam else row["weights"] == [0.0, 0.0]
        p = sum(torch.softmax(h + lam * (a - r), -1)[step_id].item() for h, a, r in first) / n
        assert abs(row["p_careful"] - p) < 1e-5, (lam, row["p_careful"], p)
        assert (row["kl"] == 0.0) == (lam == 0.0), (lam, row["kl"])
        assert {"accuracy", "careful", "tokens"} <= set(row) and row["tokens"] > 0
    small_ref = sum(torch.softmax(r, -1)[step_id].item() for _, _, r in first) / n
    assert abs(rows[0.0]["p_careful"] - small_ref) > 1e-3  # the large model's, not the small reference's
    assert sizes(models["manifest"]) == {"large": "hidden 192, 6 layers", "small": "hidden 128, 4 layers"}


@pytest.mark.slow
def test_large_stage_builds_into_an_existing_bundle(small_builds, tmp_path, capsys):
    """`aligndial demo build --stage large --out DIR` adds the larger reference to a bundle built
    without it (as the bundled one was): the same bytes a full build of that seed writes, every
    other file untouched, the manifest covering the new files, and a pair that passes the
    tokenizer check. SMALL config, so it is quick; the full build is the module's (`small_builds`),
    copied before anything changes."""
    from aligndial.demo.build import SMALL
    from aligndial.pair import RealignedPair
    from aligndial.tiny import build_model

    full, added = small_builds[0], tmp_path / "added"
    shutil.copytree(full, added)
    shutil.rmtree(added / "large")
    manifest = json.loads((added / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("large/")}
    for key in ("stages", "seconds"):
        del manifest[key]["large"]
    for key in ("large_hidden", "large_layers", "large_heads"):
        del manifest["config"][key]
    (added / "manifest.json").write_text(json.dumps(manifest))  # a bundle from before the large stage
    check_bundle(added)
    before = {k: v for k, v in manifest["files"].items()}

    assert main(["demo", "build", "--stage", "large", "--out", str(added)]) == 0
    capsys.readouterr()
    got, want = check_bundle(added), check_bundle(full)
    assert got["files"] == want["files"], "the stage alone wrote other bytes than the full build"
    assert {k: v for k, v in got["files"].items() if not k.startswith("large/")} == before
    assert {"large/model.safetensors", "large/config.json", "large/tokenizer.json"} <= set(got["files"])
    assert got["config"] == want["config"] and got["stages"]["large"] == want["stages"]["large"]
    assert got["seconds"]["large"] > 0 and got["stage_builds"]["large"]["command"].startswith("aligndial demo build --stage large")

    large = AutoModelForCausalLM.from_pretrained(added / "large")
    assert (large.config.hidden_size, large.config.num_hidden_layers) == (SMALL.large_hidden, SMALL.large_layers)
    # Full SFT from a random init: every parameter is trainable and every one moved.
    from transformers import AutoTokenizer

    init = build_model("llama", AutoTokenizer.from_pretrained(added / "ref"), seed=3, hidden=SMALL.large_hidden,
                       layers=SMALL.large_layers, heads=SMALL.large_heads, initializer_range=0.02)
    unchanged = [n for n, p in large.named_parameters() if torch.equal(p, init.get_parameter(n))]
    assert not unchanged, unchanged
    assert json.loads((added / "large" / "training_summary.json").read_text())["trainable_fraction"] == 1.0
    pair = RealignedPair.from_pretrained(str(added / "large"), [str(added / "aligned"), str(added / "ref")])
    assert pair.n_aligned == 2

    # The manifest now guards the new files like the old ones.
    flip_last_byte(added / "large" / "model.safetensors")
    with pytest.raises(ValueError, match=r"large/model.safetensors: sha256 differs"):
        check_bundle(added)
    (added / "large" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"large/config.json: missing"):
        check_bundle(added)


def test_stage_flag_is_checked_before_any_training(tmp_path, capsys):
    assert main(["demo", "build", "--stage", "huge", "--out", str(BUNDLE)]) == 2
    assert "--stage 'huge' is not a demo stage; choose one of ref, aligned, adapter, trra, large" in capsys.readouterr().err
    assert main(["demo", "build", "--stage", "large", "--small"]) == 2
    assert "drop `--seed`/`--small`" in capsys.readouterr().err
    assert main(["demo", "build", "--stage", "large", "--out", str(tmp_path / "none")]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    assert main(["demo", "--stage", "large"]) == 2
    assert "apply to `aligndial demo build`" in capsys.readouterr().err
