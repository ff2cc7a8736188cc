"""Training reliability (issues 17, 18, 19): no non-finite value reaches the weights or a checkpoint,
every data-file error is one line naming the file and line (1-based), adapter checkpoints hold
the adapter only and resume exactly, float32 master weights, defaults that learn, distillation
over real tokenizers and padded heads, and every recipe on the Qwen3-shaped replicas."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from aligndial.adapter import decoder_layers, load_adapter
from aligndial.tiny import build_model, build_tokenizer, save
from aligndial.train.common import DEFAULT_LEARNING_RATES, DPO_LEARNING_RATES, latest_checkpoint
from aligndial.train.data import read_data
from aligndial.train.distill import TrRaConfig, train_distill, trra_loss
from aligndial.train.dpo import AdapterDPOConfig, train_dpo
from aligndial.train.sft import AdapterSFTConfig, train_sft

pytestmark = pytest.mark.slow


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prompts = [f"Question {i}: is the fox quick?" for i in range(8)]
    return {
        "prefs": write_jsonl(root / "prefs.jsonl", [{"prompt": p, "chosen": " Yes, step by step.", "rejected": " No."} for p in prompts]),
        "sft": write_jsonl(root / "sft.jsonl", [{"prompt": p, "completion": " Yes, step by step."} for p in prompts]),
    }


class Capture(TrainerCallback):
    """The trained model, the loss history, and the dtypes of the trainable parameters mid-run."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.trainable_dtypes = {p.dtype for p in model.parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model, self.history = model, state.log_history


def losses(history):
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def args_for(out, **kw):
    return dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, logging_steps=1, save_steps=2, seed=0, **kw)


def all_finite(path) -> bool:
    """Every tensor of every safetensors file and of optimizer.pt under `path` is finite."""
    tensors = [t for f in os.listdir(path) if f.endswith(".safetensors") for t in load_file(os.path.join(path, f)).values()]
    opt = os.path.join(path, "optimizer.pt")
    if os.path.exists(opt):
        state = torch.load(opt, weights_only=True)["state"]
        tensors += [t for s in state.values() for t in s.values()]
    assert tensors
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


# ---- 1. No non-finite value reaches the weights or a checkpoint (issue 18 §3, RELIABILITY 31) ----


def test_huge_learning_rate_never_writes_a_nonfinite_checkpoint(tmp_path, capsys):
    """`train dpo --learning_rate 1e6 --save_steps 1` on the bundled demo reference (issue 18: its
    step 3 has a finite loss and a NaN gradient; checkpoint-3 held NaN in every adapter parameter):
    the run stops with one line (no traceback) naming the step and the tensor, and every
    checkpoint it wrote, the one `--resume` picks included, holds finite values only."""
    from aligndial.cli import main
    from aligndial.demo import task

    prefs = write_jsonl(tmp_path / "prefs.jsonl", task.preference_rows(8, 0))
    ref = os.path.join(os.path.dirname(task.__file__), "models", "ref")
    out = tmp_path / "lr1e6"
    argv = ["train", "dpo", "--model", ref, "--data", prefs, "--out", str(out), "--learning_rate", "1e6",
            "--save_steps", "1", "--max_steps", "8", "--per_device_train_batch_size", "2"]
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    errors = [x[x.index("aligndial train: error:"):] for x in stderr.splitlines() if "aligndial train: error:" in x]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert errors[0].startswith("aligndial train: error: step ") and "non-finite" in errors[0], errors[0]
    checkpoints = [out / d for d in os.listdir(out) if d.startswith("checkpoint-")]
    assert checkpoints, "the run should have saved some steps before it diverged"
    assert all(all_finite(c) for c in checkpoints)
    assert not os.path.exists(out / "adapter_model.safetensors")
    resumed = latest_checkpoint(str(out))
    assert resumed == str(max(checkpoints, key=lambda p: int(p.name.split("-")[1])))


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_finite_loss_with_nan_gradient_does_not_step(tmp_path, model_dirs, data, max_grad_norm):
    """A finite loss whose gradient is NaN: stopped before the optimizer step, naming the step and
    the parameter; the weights keep step 1's values. With clipping (checked before it) and
    without (checked right before `optimizer.step()`)."""

    class PoisonGrad(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model = model
            p = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
            p.register_hook(lambda g: g * float("nan") if state.global_step == 1 else g)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.after_step1 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    cb = PoisonGrad()
    with pytest.raises(FloatingPointError, match=r"^step 2: the gradient of model\.layers\.0\.mlp\.up_proj\.weight holds NaN"):
        args = AdapterSFTConfig(**args_for(tmp_path / "g", learning_rate=1e-3, max_grad_norm=max_grad_norm))
        train_sft(model_dirs["llama"][0], data["sft"], args, callbacks=[cb])
    now = {n: p for n, p in cb.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], cb.after_step1[n]) for n in now)


def test_resume_skips_a_nonfinite_checkpoint(tmp_path, model_dirs, data):
    out = tmp_path / "r"
    train_sft(model_dirs["llama"][0], data["sft"], AdapterSFTConfig(**args_for(out, learning_rate=1e-3)))
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    poisoned = {k: v * float("nan") for k, v in load_file(weights).items()}  # as an old, unguarded run left it
    save_file(poisoned, weights)
    with pytest.warns(UserWarning, match="skipping .*checkpoint-4 for resume: adapter_model.safetensors: .* holds NaN"):
        assert latest_checkpoint(str(out)).endswith("checkpoint-2")


# ---- 2. Data files: one line naming the file and the line, 1-based (issue 18 §4, RELIABILITY 25/32) ----


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", r"`--data .*empty.jsonl`: the file is empty"),
        ("empty.csv", b"", r"`--data .*empty.csv`: the file is empty"),
        ("latin1.csv", "prompt,chosen,rejected\nok,c,r\ncafé,c,r\n".encode("latin-1"),
         r"latin1.csv:3: not valid UTF-8 \(byte 0xe9 at column 4\); re-save the file as UTF-8"),
        ("latin1.jsonl", ('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "café", "chosen": "c", "rejected": "r"}\n').encode("latin-1"),
         r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9"),
        ("badjson.jsonl", b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n\n{"prompt": \n', r"badjson.jsonl:3: not valid JSON"),
    ],
)
def test_unreadable_data_files_are_named_with_their_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_data(str(path), "preference")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "", "chosen": "c", "rejected": "r"}, r"d.jsonl:3: field `prompt` is empty"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, r"d.jsonl:3: field `chosen` must be a string"),
        ({"prompt": "p", "rejected": "r"}, r"d.jsonl:3: field `chosen` is missing"),
    ],
)
def test_malformed_rows_are_named_by_their_1_based_line(tmp_path, row, message):
    """Line 1 is good, line 2 blank, line 3 bad: the error says line 3, as an editor would."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message):
        read_data(str(path), "preference")


def test_csv_rows_are_named_by_their_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\np,c,r\np,,r\n")
    with pytest.raises(ValueError, match=r"d.csv:3: field `chosen`"):
        read_data(str(path), "preference")


def test_prompt_files_name_file_and_line(tmp_path):
    from aligndial.prompts import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        load_prompts(path)
    path.write_text('{"prompt": "a"}\n\n{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:3: needs a non-empty `prompt`"):
        load_prompts(path)


def test_cli_data_errors_are_one_line(tmp_path, capsys):
    from aligndial.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code = main(["train", "sft", "--model", "m-does-not-matter", "--data", str(empty), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "empty.jsonl" in err, err


# ---- 3. distill checks tokenizers like generate (issue 18 §4, RELIABILITY 33) ----


def test_distill_refuses_mismatched_tokenizers_before_loading(tmp_path, model_dirs, data):
    ref = model_dirs["llama"][0]
    other_tok = build_tokenizer(["completely different text for another vocabulary " * 8], vocab_size=300)
    other = save(build_model("llama", other_tok, seed=1), other_tok, tmp_path / "other")
    with pytest.raises(ValueError, match="tokenizers of .* differ"):
        train_distill(ref, str(other), data["sft"], TrRaConfig(**args_for(tmp_path / "x")))
    assert not os.path.exists(tmp_path / "x" / "checkpoint-2")


# ---- 4. --save_total_limit rotates real checkpoints (RELIABILITY 34) ----


def test_save_total_limit_keeps_n_checkpoints(tmp_path, model_dirs, data):
    out = tmp_path / "rot"
    train_sft(model_dirs["llama"][0], data["sft"], AdapterSFTConfig(**{**args_for(out, learning_rate=1e-3), "save_steps": 1, "save_total_limit": 2}))
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-4"]


# ---- 5. The pickle refusal gives a fix a CLI user can run ----


def test_pickle_refusal_gives_a_runnable_fix(tmp_path, tok):
    from aligndial.adapter import insert_adapter, save_adapter

    model = build_model("llama", tok)
    insert_adapter(model)
    out = save_adapter(model, tmp_path / "a")
    weights = out / "adapter_model.safetensors"
    torch.save(load_file(weights), out / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(ValueError) as e:
        load_adapter(build_model("llama", tok), out)
    command = str(e.value).split("convert it once with: ")[1].split(" (in Python")[0]
    assert command.startswith("python -c ")
    subprocess.run(command.replace("python", sys.executable, 1), shell=True, check=True)
    load_adapter(build_model("llama", tok), out)  # loads now


# ---- 6. float32 master weights whatever the checkpoint's dtype (issue 17) ----


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tok):
    model = build_model("llama", tok, seed=0, dtype=torch.bfloat16)
    path = save(model, tok, tmp_path_factory.mktemp("bf16") / "llama-bf16")
    assert json.load(open(path / "config.json")).get("dtype", json.load(open(path / "config.json")).get("torch_dtype")) == "bfloat16"
    return str(path)


@pytest.mark.parametrize("autocast", [False, True])
def test_small_update_is_kept_on_a_bf16_checkpoint(tmp_path, bf16_dir, data, autocast):
    """AdamW's first step moves every weight with a non-zero gradient by ≈ lr = 5e-5. In bf16
    master weights that is below half an ulp for |w| ≥ 2^-6 (most of this model's weights, and
    the norms' 1.0) and is lost; in float32 it is kept. Frozen weights keep the checkpoint's values exactly."""
    cap = Capture()
    # init=copy: at the identity init only the zeroed projections get a gradient at step 1.
    args = AdapterSFTConfig(**{**args_for(tmp_path / "o", learning_rate=5e-5, bf16=autocast, init="copy"), "max_steps": 1})
    out = train_sft(bf16_dir, data["sft"], args, callbacks=[cap])
    assert cap.trainable_dtypes == {torch.float32}
    base = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype="auto")
    assert base.dtype == torch.bfloat16
    start = decoder_layers(base)[0].state_dict()
    for name, p in decoder_layers(cap.model)[0].named_parameters():
        init = start[name].float()
        changed = (p.detach() != init).float().mean().item()
        assert changed > 0.9, f"{name}: only {changed:.0%} of the elements moved"
    trained_base = {n: p for n, p in cap.model.named_parameters() if not p.requires_grad}
    for name, p in base.named_parameters():
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            name = name.replace(f".layers.{i}.", f".layers.{i + 1}.")
        assert torch.equal(trained_base[name], p.float()), name
    assert load_file(os.path.join(out, "adapter_model.safetensors"))  # written


# ---- 7. distill --student adapter honours --lora-rank and --init (issue 17) ----


def test_distill_adapter_student_with_lora_rank_and_init(tmp_path, model_dirs, data):
    ref, aligned, _ = model_dirs["llama"]
    args = TrRaConfig(**args_for(tmp_path / "lora", learning_rate=3e-3, student="adapter", lora_rank=4, init="copy"))
    out = train_distill(ref, aligned, data["sft"], args)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["lora_rank"] == 4 and cfg["init"] == "copy"
    keys = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any(k.endswith("lora_A") for k in keys)
    summary = json.load(open(os.path.join(out, "training_summary.json")))
    assert summary["mode"] == "adapter"
    with pytest.raises(ValueError, match="--lora-rank.*needs `--student adapter`"):
        TrRaConfig(**args_for(tmp_path / "y", student="full", lora_rank=4))


# ---- 8. TrRa over heads of different widths (issue 17) ----


def test_trra_loss_over_padded_heads_of_different_widths():
    """Student and reference head 10 wide, aligned 12, tokenizer 8: the KL is over the 8 real
    tokens, each distribution renormalised there (float64 hand computation)."""
    g = torch.Generator().manual_seed(0)
    student, ref, aligned = (torch.randn(2, 3, v, generator=g) * 3 for v in (10, 10, 12))
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    got = trra_loss(student, ref, aligned, 1.5, labels, n_tokens=8)
    log_s = torch.log_softmax(student[..., :8].double(), -1)
    log_t = torch.log_softmax(-0.5 * ref[..., :8].double() + 1.5 * aligned[..., :8].double(), -1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    assert torch.isfinite(got) and got.item() == pytest.approx(kl[labels != -100].mean().item(), rel=1e-5)


def test_distill_between_heads_of_different_widths(tmp_path, tok, data):
    """A reference whose head is padded to len(tok)+8 rows and an aligned one padded to +24:
    distillation runs, its loss is finite and falls."""
    root = tmp_path / "padded"
    dirs = [str(save(build_model("llama", tok, seed=s, vocab_size=len(tok) + pad), tok, root / f"m{s}")) for s, pad in ((0, 8), (1, 24))]
    cap = Capture()
    train_distill(*dirs, data["sft"], TrRaConfig(**args_for(tmp_path / "o", learning_rate=3e-3, lam=1.5)), callbacks=[cap])
    values = [v for _, v in losses(cap.history)]
    assert all(torch.isfinite(torch.tensor(values))) and values[-1] < values[0]


# ---- 9. Adapter checkpoints hold the adapter only; resume is exact (issue 19 §6) ----


def test_adapter_checkpoints_hold_only_the_adapter_and_resume_exactly(tmp_path, model_dirs, data):
    base_dir = model_dirs["llama"][0]
    full = Capture()
    train_sft(base_dir, data["sft"], AdapterSFTConfig(**{**args_for(tmp_path / "a", learning_rate=3e-3), "max_steps": 6}), callbacks=[full])
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert sorted(os.listdir(ckpt)) == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth",
                                        "scheduler.pt", "trainer_state.json"]
    n_trainable = sum(1 for p in full.model.parameters() if p.requires_grad)
    assert len(torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]) == n_trainable
    dual_ready = AutoModelForCausalLM.from_pretrained(base_dir)
    load_adapter(dual_ready, ckpt)  # a checkpoint is a loadable adapter directory

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("simulated kill")

    killed = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train_sft(base_dir, data["sft"], AdapterSFTConfig(**{**args_for(killed, learning_rate=3e-3), "max_steps": 6}), callbacks=[Kill()])
    # A save interrupted later would only ever leave a .tmp directory, which resume skips and removes.
    os.makedirs(killed / ".tmp-checkpoint-4" / "checkpoint-4")
    assert latest_checkpoint(str(killed)).endswith("checkpoint-2")
    assert not os.path.exists(killed / ".tmp-checkpoint-4")
    resumed = Capture()
    train_sft(base_dir, data["sft"], AdapterSFTConfig(**{**args_for(killed, learning_rate=3e-3, resume=True), "max_steps": 6}),
              callbacks=[resumed])
    assert losses(resumed.history)[-4:] == losses(full.history)[-4:]  # steps 3-6, bit for bit
    a, b = (dict(decoder_layers(c.model)[0].named_parameters()) for c in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- 10. Defaults that learn, printed, first and last step logged (issue 19 §7) ----


@pytest.mark.parametrize("mode", ["adapter", "lora"])
def test_default_learning_rate_learns_and_is_announced(tmp_path, model_dirs, data, mode, capfd):
    cap = Capture()
    kw = {"lora_rank": 8} if mode == "lora" else {}
    args = AdapterDPOConfig(output_dir=str(tmp_path / mode), max_steps=6, per_device_train_batch_size=4, seed=0, **kw)
    assert args.learning_rate == DPO_LEARNING_RATES[mode]
    train_dpo(model_dirs["llama"][0], data["prefs"], args, callbacks=[cap])
    line = [x for x in capfd.readouterr().err.splitlines() if x.startswith("aligndial train dpo:")]
    assert len(line) == 1 and f"learning_rate {DPO_LEARNING_RATES[mode]:g} (default for {mode})" in line[0]
    logged = losses(cap.history)
    assert [s for s, _ in logged] == [1, 6]  # logging_steps 10: still the first and the last step
    assert logged[-1][1] < logged[0][1] - 0.01  # learned (0.6931 = log 2 would mean nothing moved)
    summary = json.load(open(tmp_path / mode / "training_summary.json"))
    # DPO's own LoRA default (measured on the real model), the other recipes' table otherwise.
    assert DPO_LEARNING_RATES["lora"] == 4e-4 and AdapterSFTConfig(output_dir=str(tmp_path / "sft"), lora_rank=8).learning_rate == DEFAULT_LEARNING_RATES["lora"]
    assert summary["losses"] == [v for _, v in logged]


# ---- Every recipe on the Qwen3-shaped replicas: tied embeddings, bf16-saved, padded head ----


@pytest.fixture(scope="module")
def qwen_chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-data")
    rows = [(f"What is {i} + 1?", f"{i + 1}.", "I do not know.") for i in range(4)]
    return {
        "prefs": write_jsonl(root / "prefs.jsonl", [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
                                                      "rejected": [{"role": "assistant", "content": r}]} for q, c, r in rows]),
        "sft": write_jsonl(root / "sft.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c}]} for q, c, _ in rows]),
    }


@pytest.mark.parametrize("recipe", ["dpo-adapter", "dpo-lora", "sft-adapter", "distill-full", "distill-adapter"])
def test_every_recipe_on_qwen3_replicas(tmp_path, replicas, qwen_chat_data, recipe):
    base, instruct = replicas.qwen3("base"), replicas.qwen3("instruct")
    assert AutoModelForCausalLM.from_pretrained(base, dtype="auto").dtype == torch.bfloat16
    cap = Capture()
    common = dict(output_dir=str(tmp_path / recipe), max_steps=1, per_device_train_batch_size=2, save_steps=1, seed=0,
                  learning_rate=1e-3, max_length=48)
    if recipe.startswith("dpo"):
        kw = {"lora_rank": 4} if recipe == "dpo-lora" else {}
        out = train_dpo(instruct, qwen_chat_data["prefs"], AdapterDPOConfig(**common, **kw), callbacks=[cap])
    elif recipe == "sft-adapter":
        out = train_sft(instruct, qwen_chat_data["sft"], AdapterSFTConfig(**common), callbacks=[cap])
    else:
        student = recipe.split("-")[1]
        out = train_distill(base, instruct, qwen_chat_data["sft"], TrRaConfig(**common, lam=1.5, student=student), callbacks=[cap])
    assert cap.trainable_dtypes == {torch.float32}
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses(cap.history))
    assert all(all_finite(os.path.join(out, d)) for d in os.listdir(out) if d.startswith("checkpoint-"))
    start = AutoModelForCausalLM.from_pretrained(base if recipe.startswith("distill") else instruct, dtype=torch.float32)
    trained = cap.model.get_base_model() if recipe == "dpo-lora" else cap.model
    changed = [n for n, p in trained.named_parameters() if p.requires_grad]
    if recipe in ("dpo-adapter", "sft-adapter", "distill-adapter"):
        assert os.listdir(out).count("adapter_model.safetensors") == 1
        assert "model.safetensors" not in os.listdir(os.path.join(out, "checkpoint-1"))
        n = 1
        for i, layer in enumerate(decoder_layers(start)):  # every frozen base layer kept its values
            for name, p in layer.named_parameters():
                assert torch.equal(p, dict(decoder_layers(trained)[i + n].named_parameters())[name]), name
        # the tied embedding/head is frozen and still tied
        assert trained.get_output_embeddings().weight is trained.get_input_embeddings().weight
        assert torch.equal(trained.get_input_embeddings().weight, start.get_input_embeddings().weight)
    elif recipe == "distill-full":
        emb = trained.get_input_embeddings().weight
        assert trained.get_output_embeddings().weight is emb and not torch.equal(emb, start.get_input_embeddings().weight)
    else:  # LoRA: only lora_ parameters train
        assert changed and all("lora_" in n for n in changed)
