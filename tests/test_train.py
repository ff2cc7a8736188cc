"""Training recipes on TRL: what trains changes, what is frozen is bit-identical, and the runs
are robust (resume, NaN, bad data, seeds, accelerate)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from aligndial.adapter import decoder_layers, load_adapter
from aligndial.dualpath import DualPathModel
from aligndial.train.data import load_data, read_data, validate
from aligndial.train.distill import TrRaConfig, train_distill, trra_loss
from aligndial.train.dpo import AdapterDPOConfig, train_dpo
from aligndial.train.sft import AdapterSFTConfig, train_sft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prefs = root / "prefs.jsonl"
    sft = root / "sft.jsonl"
    with open(prefs, "w") as f, open(sft, "w") as g:
        for i in range(16):
            prompt = f"Question {i}: is the fox quick?"
            f.write(json.dumps({"prompt": prompt, "chosen": " Yes, step by step.", "rejected": " No."}) + "\n")
            g.write(json.dumps({"prompt": prompt, "completion": " Yes, step by step."}) + "\n")
    return {"prefs": str(prefs), "sft": str(sft)}


class Capture(TrainerCallback):
    """Keeps a handle on the trained model (callbacks receive it) and the loss history."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model, self.history = model, state.log_history


def base_params(path):
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


def split_changes(trained, base_dir, n_adapter):
    """({trained param name: changed?}, for the adapter) and ({base name: changed?}, for the base),
    mapping base layer i to trained layer i + n_adapter."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_layers, trained_layers = decoder_layers(base), decoder_layers(trained)
    base_changed = {}
    for i, layer in enumerate(base_layers):
        other = dict(trained_layers[i + n_adapter].named_parameters())
        for name, p in layer.named_parameters():
            base_changed[f"layers.{i}.{name}"] = not torch.equal(p, other[name])
    layer_ids = {id(p) for p in base_layers.parameters()}
    trained_named = dict(trained.named_parameters())
    for name, p in base.named_parameters():
        if id(p) not in layer_ids:
            base_changed[name] = not torch.equal(p, trained_named[name])
    return base_changed


def common_args(out, **kw):
    return dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, logging_steps=1, save_steps=2, seed=0, **kw)


def test_adapter_only_dpo(tmp_path, model_dirs, data, tok):
    base_dir = model_dirs["llama"][0]
    cap = Capture()
    out = train_dpo(base_dir, data["prefs"], AdapterDPOConfig(**common_args(tmp_path / "dpo", learning_rate=1e-3)), callbacks=[cap])
    adapter_params = dict(decoder_layers(cap.model)[0].named_parameters())
    initial = {k: v for k, v in AutoModelForCausalLM.from_pretrained(base_dir).named_parameters()}
    # Every adapter parameter changed from its identity init (a copy of layer 0, two projections zeroed).
    layer0 = dict(decoder_layers(AutoModelForCausalLM.from_pretrained(base_dir))[0].named_parameters())
    for name, p in adapter_params.items():
        start = torch.zeros_like(p) if name.endswith(("o_proj.weight", "down_proj.weight")) else layer0[name]
        assert not torch.equal(p, start), f"adapter parameter {name} did not change"
    assert not any(split_changes(cap.model, base_dir, 1).values()), "a frozen base parameter changed"
    assert initial  # loaded
    losses = [h["loss"] for h in cap.history if "loss" in h]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the identity init
    assert losses[-1] < 0.3 * losses[0]
    assert sorted(os.listdir(out))[:2] == ["adapter_config.json", "adapter_model.safetensors"]
    dual = DualPathModel.from_adapter(AutoModelForCausalLM.from_pretrained(base_dir), out)
    ids = tok(["Question 3: is the fox quick?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(dual(ids, lam=1.0).logits, cap.model(ids).logits)


def test_adapter_only_sft_and_two_adapter_layers(tmp_path, model_dirs, data):
    base_dir = model_dirs["qwen2"][0]
    cap = Capture()
    args = AdapterSFTConfig(**common_args(tmp_path / "sft", learning_rate=3e-3, adapter_layers=2))
    out = train_sft(base_dir, data["sft"], args, callbacks=[cap])
    layers = decoder_layers(cap.model)
    assert len(layers) == 4
    for layer in layers[:2]:
        for name, p in layer.named_parameters():
            assert p.abs().sum() > 0, name  # zeroed projections were trained away from zero
    assert not any(split_changes(cap.model, base_dir, 2).values())
    losses = [h["loss"] for h in cap.history if "loss" in h]
    assert losses[-1] < losses[0]
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    assert load_adapter(fresh, out).num_layers == 2


@pytest.mark.parametrize("flag, expect", [("full", "all"), ("tune_layers", "bottom:1"), ("lora_rank", 4)])
def test_baselines(tmp_path, model_dirs, data, flag, expect):
    base_dir = model_dirs["llama"][0]
    cap = Capture()
    kw = {"full": True} if flag == "full" else {flag: expect}
    out = train_dpo(base_dir, data["prefs"], AdapterDPOConfig(**common_args(tmp_path / flag, learning_rate=1e-3, **kw)), callbacks=[cap])
    summary = json.load(open(os.path.join(out, "training_summary.json")))
    if flag == "lora_rank":
        base = cap.model.get_base_model()
        trainable = {n: p for n, p in cap.model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        originals = base_params(base_dir)
        for name, p in base.named_parameters():
            if "lora_" not in name:
                key = name.replace("base_layer.", "")
                assert torch.equal(p, originals[key]), name
        assert os.path.exists(os.path.join(out, "adapter_config.json"))
        return
    changed = split_changes(cap.model, base_dir, 0)
    if flag == "full":
        assert all(changed.values()) and summary["trainable_fraction"] == 1.0
    else:
        assert all(v for k, v in changed.items() if k.startswith("layers.0."))
        assert not any(v for k, v in changed.items() if not k.startswith("layers.0."))


def test_trra_loss_matches_float64_hand_computation():
    """KL(π_s ‖ π_λ) = Σ_v π_s(v)(log π_s(v) − log π_λ(v)) per token, averaged over unmasked
    tokens, with π_λ ∝ exp((1 − λ)·h_ref + λ·h_aligned)."""
    g = torch.Generator().manual_seed(0)
    student, ref, aligned = (torch.randn(2, 4, 7, generator=g) * 3 for _ in range(3))
    labels = torch.tensor([[5, -100, 2, 3], [-100, -100, 1, -100]])
    for lam in (0.5, 2.0, -0.5, torch.tensor([1.25, -1.0])):
        got = trra_loss(student, ref, aligned, lam, labels)
        lam64 = lam.double().view(2, 1, 1) if isinstance(lam, torch.Tensor) else lam
        log_s = torch.log_softmax(student.double(), -1)
        log_t = torch.log_softmax((1 - lam64) * ref.double() + lam64 * aligned.double(), -1)
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)  # (B, T): summed over the vocabulary
        expected = kl[labels != -100].mean()
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_lowers_kl_and_iterates(tmp_path, model_dirs, data):
    ref_dir, aligned_dir, _ = model_dirs["llama"]
    cap = Capture()
    args = TrRaConfig(**common_args(tmp_path / "trra", learning_rate=3e-3, lam=1.5, iterations=2))
    out = train_distill(ref_dir, aligned_dir, data["sft"], args, callbacks=[cap])
    losses = [h["loss"] for h in cap.history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]  # the per-token KL to the teacher falls
    first = json.load(open(os.path.join(out, "round-1", "training_summary.json")))
    second = json.load(open(os.path.join(out, "training_summary.json")))
    assert first["teacher_aligned"] == aligned_dir and second["teacher_aligned"] == "round-1 student"
    assert second["round"] == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2  # a full student


def test_distill_adapter_student_measures_dual_path_agreement(tmp_path, model_dirs, data):
    ref_dir, aligned_dir, _ = model_dirs["gpt2"]
    args = TrRaConfig(**common_args(tmp_path / "trra-adapter", learning_rate=3e-3, lam=1.0, student="adapter"))
    out = train_distill(ref_dir, aligned_dir, data["sft"], args)
    summary = json.load(open(os.path.join(out, "training_summary.json")))
    assert summary["mode"] == "adapter" and set(summary["dual_path_kl_to_dera"]) == {"0.5", "1.0", "1.5"}
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))


def test_same_seed_same_losses(tmp_path, model_dirs, data):
    runs = []
    for name in ("x", "y"):
        cap = Capture()
        args = AdapterSFTConfig(**{**common_args(tmp_path / name, learning_rate=3e-3), "max_steps": 3, "save_steps": 10})
        train_sft(model_dirs["gpt2"][0], data["sft"], args, callbacks=[cap])
        runs.append([h["loss"] for h in cap.history if "loss" in h])
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_nan_loss_stops_training_cleanly(tmp_path, model_dirs, data):
    class InjectNaN(TrainerCallback):
        """From step 3 on, the last layer's hidden states become NaN (as a diverging run would)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            decoder_layers(model)[-1].register_forward_hook(
                lambda m, i, out: out * float("nan") if state.global_step >= 2 else out
            )

    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="^step 3: the loss is nan; stopped before the optimizer step"):
        train_sft(model_dirs["llama"][0], data["sft"], AdapterSFTConfig(**common_args(out, learning_rate=3e-3)), callbacks=[InjectNaN()])
    assert not os.path.exists(out / "adapter_model.safetensors")
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize(
    "row, kind, message",
    [
        ({"prompt": "p", "rejected": "r"}, "preference", "missing \\['chosen'\\]"),
        ({"prompt": "", "chosen": "c", "rejected": "r"}, "preference", "d.jsonl:2: field `prompt` is empty"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "preference", "d.jsonl:2: field `chosen` must be a string"),
        ({"messages": [{"role": "user"}]}, "sft", "d.jsonl:2: `messages\\[0\\]`"),
    ],
)
def test_malformed_rows_are_named(tmp_path, row, kind, message):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"} if kind == "preference" else {"messages": [{"role": "user", "content": "x"}]}
    path = tmp_path / "d.jsonl"
    if "chosen" not in row and kind == "preference":  # a missing column
        path.write_text(json.dumps(row) + "\n")
    else:
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message):
        read_data(str(path), kind)


def test_cli_train_dpo_json(tmp_path, model_dirs, data, capsys):
    from aligndial.cli import main

    code = main(["train", "dpo", "--model", model_dirs["llama"][0], "--data", data["prefs"], "--out", str(tmp_path / "o"),
                 "--max_steps", "2", "--per_device_train_batch_size", "4", "--beta", "0.2", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mode"] == "adapter"
    assert main(["train", "dpo", "--model", "m", "--data", data["prefs"], "--out", "o", "--full", "--lora-rank", "2"]) == 2


@pytest.mark.parametrize("recipe", [["sft"], ["dpo"], ["dpo", "--full"], ["distill"]], ids=" ".join)
def test_accelerate_two_cpu_processes(tmp_path, model_dirs, data, recipe):
    """Every recipe runs DDP under `accelerate launch` with 2 CPU processes (gloo). DPO precomputes the
    reference log-probs on each rank: that must not race on a datasets cache file."""
    exe = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cli = shutil.which("aligndial", path=os.path.dirname(sys.executable))
    out = tmp_path / "ddp"
    ref_dir, aligned_dir, _ = model_dirs["llama"]
    models = ["--ref", ref_dir, "--aligned", aligned_dir] if recipe[0] == "distill" else ["--model", ref_dir]
    data_file = data["prefs"] if recipe[0] == "dpo" else data["sft"]
    proc = subprocess.run(
        # --multi_gpu selects accelerate's torchrun launcher; with no GPU the Trainer runs DDP on gloo.
        [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", cli, "train", *recipe, *models,
         "--data", data_file, "--out", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
         "--ddp_backend", "gloo"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = "model.safetensors" if "--full" in recipe or recipe[0] == "distill" else "adapter_model.safetensors"
    assert os.path.exists(out / weights)
    summary = json.load(open(out / "training_summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 2


def test_sft_on_messages_trains_on_assistant_tokens_only(tmp_path, capsys):
    """`messages` rows: the loss is on the assistant's reply, not the user's turn: the first loss equals
    that of the same rows as prompt/completion, and `--assistant_only_loss false` (every token) is higher.
    The demo tokenizer's template has no generation markers, so the rows are split before the reply."""
    from aligndial.demo import task

    ref = os.path.join(os.path.dirname(task.__file__), "models", "ref")
    problems = task.problems(8, 0, "train")
    turns = [([{"role": "user", "content": p.prompt}], [{"role": "assistant", "content": task.reply(p, True)}])
             for p in problems]
    messages, pairs = tmp_path / "m.jsonl", tmp_path / "pc.jsonl"
    messages.write_text("".join(json.dumps({"messages": u + a}) + "\n" for u, a in turns))
    pairs.write_text("".join(json.dumps({"prompt": u, "completion": a}) + "\n" for u, a in turns))

    def first_loss(data, name, **kw):
        out = train_sft(ref, str(data), AdapterSFTConfig(**{**common_args(tmp_path / name), "max_steps": 1}, **kw))
        return json.load(open(os.path.join(out, "training_summary.json")))["losses"][0]

    assistant, completion = first_loss(messages, "m"), first_loss(pairs, "pc")
    settings = capsys.readouterr().err
    every = first_loss(messages, "all", assistant_only_loss=False)
    print(f"first loss: messages (assistant only) {assistant:.4f}, prompt/completion {completion:.4f}, "
          f"messages (every token) {every:.4f}")
    assert assistant == pytest.approx(completion, rel=1e-5)
    assert every > 2 * assistant
    assert "loss on each row's last assistant turn" in settings, settings


def test_on_policy_distillation_from_prompts_only(tmp_path, model_dirs):
    """--on-policy-fraction 1: completions are generated by the student (GKD lmbda=1)."""
    ref_dir, aligned_dir, _ = model_dirs["llama"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about fox {i}"}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match="on-policy"):
        train_distill(ref_dir, aligned_dir, str(prompts), TrRaConfig(**common_args(tmp_path / "x")))
    args = TrRaConfig(**{**common_args(tmp_path / "onp"), "max_steps": 2}, on_policy_fraction=1.0, max_new_tokens=6)
    out = train_distill(ref_dir, aligned_dir, str(prompts), args)
    assert json.load(open(os.path.join(out, "training_summary.json")))["steps"] == 2


def test_data_sources(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3
    ds = Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    for spec in ("d.csv", "d.parquet", "disk"):
        assert len(validate(load_data(str(tmp_path / spec)), "preference")) == 3
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_data(str(tmp_path / "missing.jsonl"))


def test_distill_keeps_trl_experimental_warning_behind_verbose(tmp_path, model_dirs, data):
    """Every `train distill` printed TRL's "You are importing from 'trl.experimental'" warning (GKD lives
    there); it is shown with `--verbose` only."""
    ref_dir, aligned_dir, _ = model_dirs["llama"]
    env = {k: v for k, v in os.environ.items() if k != "TRL_EXPERIMENTAL_SILENCE"}
    for verbose in ([], ["--verbose"]):
        out = tmp_path / f"d{len(verbose)}"
        proc = subprocess.run(
            [sys.executable, "-m", "aligndial.cli", "train", "distill", "--ref", ref_dir, "--aligned", aligned_dir,
             "--data", data["sft"], "--out", str(out), "--max_steps", "1", "--per_device_train_batch_size", "2", *verbose],
            capture_output=True, text=True, timeout=600, env={**env, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("trl.experimental" in proc.stderr) == bool(verbose), proc.stderr[-3000:]
