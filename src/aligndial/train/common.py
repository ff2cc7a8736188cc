"""What every recipe shares: which parameters train (the adapter, or a baseline), CPU-friendly
defaults for TRL's configs, atomic checkpoints, a stop on non-finite loss, and resume."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import dataclass, field

import torch
from transformers.trainer_utils import SaveStrategy

from aligndial.adapter import decoder_layers, freeze_base, insert_adapter, save_adapter


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
    # Defaults changed from TRL's: these recipes must run on a CPU-only machine out of the box.
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; default: on when CUDA is available."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Where to report metrics."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_strategy: SaveStrategy | str = field(default="steps", metadata={"help": "When to checkpoint."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every N steps."})

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
    summary = {"mode": args.mode, **trainable_summary(model), "steps": trainer.state.global_step,
               "world_size": trainer.args.world_size, "losses": losses, **(extra or {})}
    with open(os.path.join(out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return out


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint. Incomplete ones (a run killed while saving) only ever
    exist as `.tmp-checkpoint-*`, which are removed here."""
    for tmp in glob.glob(os.path.join(output_dir, ".tmp-checkpoint-*")):
        shutil.rmtree(tmp, ignore_errors=True)
    found = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*")) if os.path.isfile(os.path.join(p, "trainer_state.json"))]
    return max(found, key=lambda p: int(p.rsplit("-", 1)[1]), default=None)


class RobustTrainerMixin:
    """Mix in before a transformers/TRL Trainer class.

    - Checkpoints are written to `.tmp-checkpoint-N` and renamed into place (`os.replace`), so a
      run killed mid-save never leaves a directory that resume would pick.
    - A non-finite loss raises before the optimizer step, so no NaN reaches the weights.
    """

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}; training stopped before the "
                "optimizer step, so no NaN reached the weights. Lower the learning rate or check the data."
            )
        return loss

    def _save_checkpoint(self, model, trial):
        name = f"checkpoint-{self.state.global_step}"
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
    the head's cost: the head was 60% of an adapter-DPO step on a 58M Llama with 150-token
    prompts. The log-probs are the same rows either way (TRL itself zeroes the masked ones).
    """
    import trl.trainer.utils as trl_utils

    upstream = trl_utils._use_triton
    if getattr(upstream, "aligndial", False):
        return

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or upstream(device)

    compact.aligndial = True
    trl_utils._use_triton = compact


def run_recipe(trainer_class, model: str, dataset, args: RecipeArgs, trust_remote_code: bool = False, callbacks=None) -> str:
    """Load the policy, set what trains (adapter or baseline), train, save. Returns the output dir."""
    from aligndial.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model, trust_remote_code)
    policy = load_causal_lm(model, trust_remote_code=trust_remote_code)
    peft_config = prepare_trainable(policy, args)
    score_completions_only()
    trainer = trainer_class(
        model=policy, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume_point(args))
    return save_result(trainer, trainer.model if args.mode == "lora" else policy, tokenizer, args)
