"""What every recipe shares: which parameters train (the adapter, or a baseline), defaults that
learn, float32 master weights, atomic adapter-only checkpoints, a guard that stops before any
non-finite value reaches the weights or a checkpoint, and resume."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import SaveStrategy

from aligndial.adapter import ATTR, WEIGHTS_NAME, decoder_layers, freeze_base, insert_adapter, save_adapter

# Learning rates for a run that gives no --learning_rate, by what trains. TRL's DPO default (1e-6)
# suits full fine-tuning of large models; a new layer or a LoRA starts from zero and
# barely moves at that rate (a LoRA DPO run at 1e-6 ended at loss 0.6931 = log 2, the start).
DEFAULT_LEARNING_RATES = {"adapter": 1e-4, "lora": 2e-4, "layers": 1e-5, "full": 1e-5}
# DPO with LoRA: on a real model (SmolLM2-135M, docs/real-model.md, issue 25 part 4) 2e-4 moved
# held-out reward by less than two standard errors, 4e-4 by more, landing on the DeRa frontier.
DPO_LEARNING_RATES = {**DEFAULT_LEARNING_RATES, "lora": 4e-4}


class NonFiniteError(FloatingPointError):
    """Training stopped before a non-finite value could reach the weights or a checkpoint."""


@dataclass
class RecipeArgs:
    """Fields our recipes add to TRL's configs, and the defaults we change for CPU use."""

    adapter_layers: int = field(default=1, metadata={"help": "Adapter layers inserted before layer 0 (CLM §6.4)."})
    init: str = field(default="identity", metadata={"help": "Adapter init: identity, kaiming or copy (FR Table 4)."})
    full: bool = field(default=False, metadata={"help": "Baseline: full fine-tuning, no adapter."})
    lora_rank: int | None = field(default=None, metadata={"help": "Baseline: LoRA of this rank through PEFT, no adapter."})
    tune_layers: str | None = field(
        default=None, metadata={"help": "Baseline: train only `bottom:K` or `top:K` decoder layers (CLM §6.2)."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the newest complete checkpoint in the output dir."})
    # Defaults changed from TRL's: these recipes must run on a CPU-only machine out of the box, and
    # learn on the README's examples without tuning.
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate; default by what trains: "
                  + ", ".join(f"{k} {v:g}" + (f" (DPO {DPO_LEARNING_RATES[k]:g})" if DPO_LEARNING_RATES[k] != v else "")
                              for k, v in DEFAULT_LEARNING_RATES.items()) + "."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast over float32 master weights; default: on when CUDA is available."},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Where to report metrics."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (the first and last are always logged)."})
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step's loss."})
    save_strategy: SaveStrategy | str = field(default="steps", metadata={"help": "When to checkpoint."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every N steps."})

    default_learning_rates: ClassVar[dict] = DEFAULT_LEARNING_RATES  # the recipe's own, when it has one

    def __post_init__(self):
        modes = [name for name, on in (("--full", self.full), ("--lora-rank", self.lora_rank), ("--tune-layers", self.tune_layers)) if on]
        if len(modes) > 1:
            raise ValueError(f"Can't combine {' and '.join(modes)}. Choose one baseline (or none, for the adapter).")
        if self.adapter_layers < 1:
            raise ValueError(f"`--adapter-layers` must be ≥ 1; got {self.adapter_layers}")
        if self.tune_layers is not None and not re.fullmatch(r"(bottom|top):[1-9]\d*", self.tune_layers):
            raise ValueError(f"`--tune-layers` must look like bottom:K or top:K; got {self.tune_layers!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"`--lora-rank` must be ≥ 1; got {self.lora_rank}")
        if not torch.cuda.is_available():
            self.use_cpu = True
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available()
        self.learning_rate_is_default = self.learning_rate is None
        if self.learning_rate is None:
            self.learning_rate = self.default_learning_rates[self.mode]
        if not (self.learning_rate > 0 and self.learning_rate < float("inf")):
            raise ValueError(f"`--learning_rate` must be a positive finite number; got {self.learning_rate}")
        super().__post_init__()

    @property
    def mode(self) -> str:
        return "full" if self.full else "lora" if self.lora_rank else "layers" if self.tune_layers else "adapter"


def prepare_trainable(model, args: RecipeArgs):
    """Set which parameters train. Returns a PEFT config for the LoRA baseline, else None."""
    if args.mode == "lora":
        from peft import LoraConfig

        return LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear", task_type="CAUSAL_LM")
    if args.mode == "full":
        model.requires_grad_(True)
    elif args.mode == "layers":
        where, k = args.tune_layers.split(":")
        layers = list(decoder_layers(model))
        if int(k) > len(layers):
            raise ValueError(f"`--tune-layers {args.tune_layers}`: the model has only {len(layers)} layers")
        model.requires_grad_(False)
        for layer in layers[: int(k)] if where == "bottom" else layers[-int(k) :]:
            layer.requires_grad_(True)
    else:
        insert_adapter(model, num_layers=args.adapter_layers, init=args.init, base_model=model.name_or_path)
        freeze_base(model)
    return None


def trainable_summary(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_fraction": round(trainable / total, 6)}


def save_result(trainer, model, tokenizer, args: RecipeArgs, extra: dict | None = None) -> str:
    """Write what the run produced to args.output_dir: the adapter files only for the adapter,
    a PEFT adapter for LoRA, a full model otherwise; plus training_summary.json."""
    out = args.output_dir
    if not trainer.is_world_process_zero():
        return out
    if args.mode == "adapter":
        save_adapter(model, out)
    elif args.mode == "lora":
        trainer.save_model(out)
    else:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {"mode": args.mode, "learning_rate": args.learning_rate, **trainable_summary(model), "steps": trainer.state.global_step,
               "world_size": trainer.args.world_size, "losses": losses, **(extra or {})}
    with open(os.path.join(out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return out


def _finite_problem(tensors) -> str | None:
    """The first (name, kind) of a non-finite tensor among `(name, tensor)` pairs, as text."""
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            return f"{name} holds {'NaN' if torch.isnan(t).any() else 'inf'}"
    return None


def _checkpoint_problem(path: str) -> str | None:
    """Why a saved checkpoint must not be resumed from (a non-finite or unreadable tensor), or None."""
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        try:
            bad = _finite_problem(load_file(f).items())
        except (SafetensorError, OSError) as e:
            return f"{os.path.basename(f)} is unreadable ({e})"
        if bad:
            return f"{os.path.basename(f)}: {bad}"
    opt = os.path.join(path, "optimizer.pt")
    if os.path.isfile(opt):
        try:
            state = torch.load(opt, map_location="cpu", weights_only=True).get("state", {})
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            return f"optimizer.pt is unreadable ({e})"
        bad = _finite_problem((f"state[{k}].{n}", t) for k, s in state.items() for n, t in s.items())
        if bad:
            return f"optimizer.pt: {bad}"
    return None


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint whose tensors are all finite.

    Incomplete ones (a run killed while saving) only ever exist as `.tmp-checkpoint-*`, which are
    removed here. A checkpoint holding NaN or inf (written before this guard existed, or edited
    by hand) is skipped with a warning, so resume never restarts from a diverged state.
    """
    for tmp in glob.glob(os.path.join(output_dir, ".tmp-checkpoint-*")):
        shutil.rmtree(tmp, ignore_errors=True)
    found = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*")) if os.path.isfile(os.path.join(p, "trainer_state.json"))]
    for path in sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]), reverse=True):
        problem = _checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"skipping {path} for resume: {problem}", stacklevel=2)
    return None


def _adapter_layers(model) -> torch.nn.ModuleList:
    return decoder_layers(model)[: getattr(model, ATTR).num_layers]


def _check_gradients(model, step: int) -> None:
    """Raise NonFiniteError if any gradient is NaN or inf; one device sync in the common case."""
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not grads or torch.stack([torch.isfinite(g).all() for _, g in grads]).all():
        return
    bad = [(n, g) for n, g in grads if not torch.isfinite(g).all()]
    name, g = bad[0]
    raise NonFiniteError(
        f"step {step}: the gradient of {name} holds {'NaN' if torch.isnan(g).any() else 'inf'} "
        f"({len(bad)} of {len(grads)} gradient tensors are non-finite) though the loss was finite; "
        "stopped before the optimizer step, so no non-finite value reached the weights or a checkpoint. "
        "Lower --learning_rate or check the data."
    )


class _Guard(TrainerCallback):
    """The last line of defence before `optimizer.step()` (the gradients are final here, after
    clipping and, in multi-process runs, after the all-reduce, so every process agrees), and a
    log entry for the last step whatever `logging_steps` is."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        _check_gradients(model, state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True


class RobustTrainerMixin:
    """Mix in before a transformers/TRL Trainer class.

    - Nothing non-finite reaches the weights: a non-finite loss raises after the backward pass, a
      non-finite gradient or gradient norm raises before the optimizer step (`NonFiniteError`,
      one line naming the step and the tensor), and the trainable parameters and optimizer state
      are checked again before each checkpoint is written.
    - Checkpoints are written to `.tmp-checkpoint-N` and renamed into place (`os.replace`), so a
      run killed mid-save never leaves a directory that resume would pick; `save_total_limit`
      then rotates the real checkpoints.
    - In adapter mode a checkpoint holds the adapter (`adapter_model.safetensors` +
      `adapter_config.json`, a directory `--adapter` loads) and the optimizer, scheduler and RNG
      state, never a copy of the frozen base; resume loads the adapter back in place.
    - The first and the last step are always logged.
    """

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.add_callback(_Guard())

    def _adapter_only(self) -> bool:
        return getattr(self.args, "mode", None) == "adapter"

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteError(
                f"step {self.state.global_step + 1}: the loss is {loss.item()}; stopped before the optimizer step, "
                "so no non-finite value reached the weights or a checkpoint. Lower --learning_rate or check the data."
            )
        return loss

    def _clip_grad_norm(self, model):
        # Before clipping, the first non-finite gradient is still the one that caused it (clipping
        # by a NaN norm makes every gradient NaN). transformers' private hook: if it is renamed,
        # _Guard still stops the step, naming a tensor less precisely.
        step = self.state.global_step + 1
        _check_gradients(model, step)
        norm = super()._clip_grad_norm(model)
        if norm is not None and not torch.isfinite(torch.as_tensor(norm)).all():
            raise NonFiniteError(
                f"step {step}: the gradient norm is {float(norm)} though every gradient is finite (it overflows "
                "float32); stopped before the optimizer step. Lower --learning_rate or check the data."
            )
        return norm

    def _get_grad_norm(self, model, grad_norm=None):
        # Without clipping (max_grad_norm 0) transformers measures the norm by "clipping" at inf,
        # which also multiplies every gradient by a NaN coefficient: check before that too.
        if grad_norm is None:
            _check_gradients(model, self.state.global_step + 1)
        return super()._get_grad_norm(model, grad_norm)

    def _save(self, output_dir=None, state_dict=None):
        if not self._adapter_only():
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            save_adapter(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not (self._adapter_only() and os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME))):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        tensors = load_file(os.path.join(resume_from_checkpoint, WEIGHTS_NAME))
        _adapter_layers(model).load_state_dict({k.removeprefix("layers."): v for k, v in tensors.items()}, strict=True)

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        unwrapped = self.accelerator.unwrap_model(self.model)
        bad = _finite_problem((n, p) for n, p in unwrapped.named_parameters() if p.requires_grad)
        if bad is None and self.optimizer is not None:
            bad = _finite_problem((f"optimizer state {n}", t) for s in self.optimizer.state.values() for n, t in s.items())
        if bad:
            raise NonFiniteError(f"step {step}: {bad}; checkpoint-{step} was not written. Lower --learning_rate or check the data.")
        name = f"checkpoint-{step}"
        final_dir = self.args.output_dir
        staging = os.path.join(final_dir, f".tmp-{name}")
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = final_dir
        if not self.args.should_save:  # only the main process writes (multi-process runs)
            return
        target = os.path.join(final_dir, name)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
        shutil.rmtree(staging, ignore_errors=True)
        self.state.best_model_checkpoint = None
        # The parent rotated inside the staging directory, where only this checkpoint exists.
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=final_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)


def resume_point(args: RecipeArgs) -> str | None:
    if not args.resume:
        return None
    ckpt = latest_checkpoint(args.output_dir)
    if ckpt is None:
        raise ValueError(f"`--resume`: no complete checkpoint in {args.output_dir}; run without --resume to start fresh")
    return ckpt


def score_completions_only() -> None:
    """Make TRL's fused log-prob head score only the labelled (completion) positions on CPU too.

    TRL 1.16 drops the masked positions before its chunked head on Triton devices only, and
    scores every position elsewhere, so that tile shapes stay static for compilers such as
    Neuron's. On CPU, in eager mode, nothing recompiles, and the prompt positions were most of
    the head's cost, and the head a large share of an adapter-DPO step on a small model
    (benchmarks/train_speed.py). The log-probs are the same rows either way (TRL itself zeroes the masked ones).
    TRL has no public setting for this: `trl.trainer.utils._use_triton` is the private switch its
    chunked head reads, so we wrap it (tests/test_upstream.py fails, naming the change, if TRL moves it).
    """
    import trl.trainer.utils as trl_utils

    upstream = trl_utils._use_triton
    if getattr(upstream, "aligndial", False):
        return

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or upstream(device)

    compact.aligndial = True
    trl_utils._use_triton = compact


def describe(recipe: str, args: RecipeArgs) -> str:
    """One line with the settings that decide what a run learns, defaults marked as such."""
    lr = f"learning_rate {args.learning_rate:g}" + (f" (default for {args.mode})" if getattr(args, "learning_rate_is_default", False) else "")
    length = f"max_steps {args.max_steps}" if args.max_steps > 0 else f"{args.num_train_epochs:g} epoch(s)"
    precision = "float32 weights" + (", bf16 autocast" if args.bf16 else ", fp16 autocast" if args.fp16 else "")
    keys = {"dpo": ("beta",), "distill": ("lam", "student", "on_policy_fraction")}.get(recipe, ())
    extra = "".join(f", {k} {getattr(args, k)}" for k in keys)
    if getattr(args, "loss_on", None):
        extra += f", loss on {args.loss_on}"
    return (f"aligndial train {recipe}: {args.mode}, {lr}, {length}, batch {args.per_device_train_batch_size}"
            f"x{args.gradient_accumulation_steps}{extra}, {precision}, seed {args.seed}, "
            f"log first/last/every {args.logging_steps:g} steps, checkpoints every {args.save_steps:g} steps -> {args.output_dir}")


def announce(recipe: str, args: RecipeArgs) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(describe(recipe, args), file=sys.stderr, flush=True)


def load_policy(name: str, trust_remote_code: bool = False):
    """The model that trains, in float32 whatever the checkpoint's dtype (as TRL loads its policy):
    an AdamW step of 5e-5 on a weight of 0.03 is below half a bf16 ulp and would be lost.
    `--bf16`/`--fp16` autocast the forward pass over these float32 master weights."""
    from aligndial.loading import load_causal_lm

    return load_causal_lm(name, dtype="float32", trust_remote_code=trust_remote_code)


def run_recipe(trainer_class, model: str, dataset, args: RecipeArgs, trust_remote_code: bool = False, callbacks=None,
               recipe: str = "") -> str:
    """Load the policy, set what trains (adapter or baseline), train, save. Returns the output dir."""
    from aligndial.loading import load_tokenizer

    resume = resume_point(args)  # before loading anything: a missing checkpoint fails fast
    announce(recipe, args)
    tokenizer = load_tokenizer(model, trust_remote_code)
    policy = load_policy(model, trust_remote_code)
    peft_config = prepare_trainable(policy, args)
    score_completions_only()
    trainer = trainer_class(
        model=policy, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return save_result(trainer, trainer.model if args.mode == "lora" else policy, tokenizer, args)
