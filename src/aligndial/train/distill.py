"""TrRa: distil a student toward the λ-mixed teacher (FR §3.1, Eq. 6), on TRL's GKD.

    aligndial train distill --ref R --aligned A --lam 1.5 --data prompts.jsonl --out student/
    aligndial train distill --ref R --aligned A --lam 1 --student adapter --data D --out adapter/
    aligndial train distill --ref R --aligned A --lam 2 --iterations 2 --data D --out iter/

The loss is KL(π_student ‖ π_λ) per token over the tokenizer's real tokens, averaged over
completion tokens only, where π_λ = softmax((1 − λ)·h_ref + λ·h_aligned); both the mix and the KL
are `aligndial.mixing.mixed_kl`, chunked over positions. Heads padded past the tokenizer (Qwen:
151936 or 152064 rows over 151669 tokens) are cut to the real tokens, so members whose heads
have different widths distil without a shape error or an infinite KL.
TRL's GKD fits: with beta=1 its generalised JSD is this reverse KL, normalised per token over
the vocabulary axis (the authors' public code normalises over the wrong axis), its collator
masks prompt tokens, and `lmbda` is the on-policy fraction. Only the loss is ours
(`compute_loss`): it scores the completion positions alone, from the members' own logits.

`--student full` starts from the reference; `--student adapter` trains a layer adapter on the
reference instead (`--init`, `--adapter-layers`, and `--lora-rank R` for the adapter layer in LoRA
form, FR §3.2), which turns the (ref, aligned) pair into ONE model whose dual path at μ
approximates DeRa at μ·λ. The agreement is measured after training and written to
training_summary.json. `--iterations K` is TrRa-iter: round k+1 distils from (ref, student_k).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from trl.experimental.gkd import GKDConfig, GKDTrainer

from aligndial.adapter import freeze_base, insert_adapter, merge_adapter
from aligndial.loading import load_causal_lm, load_tokenizer
from aligndial.mixing import check_lam, mixed_kl
from aligndial.lora_pair import LoraPair
from aligndial.pair import RealignedPair, head_width
from aligndial.peft_dirs import is_lora_dir
from aligndial.vocab import check_tokenizers
from aligndial.train.common import RecipeArgs, RobustTrainerMixin, announce, load_policy, resume_point, save_result
from aligndial.train.data import read_data, to_messages


def trra_loss(student_logits, ref_logits, aligned_logits, lam, labels, n_tokens=None, num_items_in_batch=None) -> torch.Tensor:
    """KL(π_student ‖ π_λ) per token (FR Eq. 6), summed over the vocabulary (ids < `n_tokens`
    when given: the tokenizer's real tokens) and averaged over positions whose label is not −100
    (or divided by `num_items_in_batch`, GKD's gradient-accumulation-correct normaliser).
    Shapes: logits (B, T, V_i), widths may differ when `n_tokens` is given, aligned with labels
    (B, T); `lam` a number or one λ per row (B,). Only the labelled positions are computed."""
    mask = labels != -100  # (B, T)
    if isinstance(lam, torch.Tensor) and lam.ndim > 0:
        lam = lam.reshape(-1, 1).expand(mask.shape)[mask]  # one λ per scored position
    kl = mixed_kl(student_logits[mask], (ref_logits[mask], aligned_logits[mask], lam), n_tokens)  # (N,)
    if num_items_in_batch is not None:
        return kl.sum() / torch.as_tensor(num_items_in_batch, device=kl.device)
    return kl.sum() / mask.sum().clamp_min(1)


class MixedTeacher(nn.Module):
    """π_λ at a fixed λ, callable the way GKD calls a teacher."""

    def __init__(self, pair: RealignedPair, lam: float):
        super().__init__()
        self.pair, self.lam, self.config = pair, lam, pair.config

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.pair(input_ids=input_ids, attention_mask=attention_mask, lam=self.lam, use_cache=False)


@dataclass
class TrRaConfig(RecipeArgs, GKDConfig):
    """TRL's GKDConfig plus TrRa's fields. `beta` is fixed to 1 (reverse KL); `lmbda` is set from
    `on_policy_fraction`."""

    lam: float = field(default=1.0, metadata={"help": "λ of the teacher π_λ (FR uses 1.25 and 2)."})
    lora_rank: int | None = field(
        default=None, metadata={"help": "With --student adapter: train the adapter layer in LoRA form of this rank (FR §3.2)."}
    )
    student: str = field(default="full", metadata={"help": "full (initialised from the reference) or adapter."})
    iterations: int = field(default=1, metadata={"help": "TrRa-iter rounds (FR §3.1)."})
    on_policy_fraction: float = field(default=0.0, metadata={"help": "Fraction of student-generated batches (GKD lmbda)."})
    beta: float = 1.0

    def __post_init__(self):
        self.lam = check_lam(self.lam, "--lam")
        if self.student not in ("full", "adapter"):
            raise ValueError(f"`--student` must be full or adapter; got {self.student!r}")
        if self.iterations < 1:
            raise ValueError(f"`--iterations` must be ≥ 1; got {self.iterations}")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"`--on-policy-fraction` must be in [0, 1]; got {self.on_policy_fraction}")
        if self.beta != 1.0:
            raise ValueError(f"TrRa minimises KL(student‖teacher), which is GKD beta=1; got beta={self.beta}")
        if self.student == "full" and (self.lora_rank is not None or self.init != "identity"):
            flag = "--lora-rank" if self.lora_rank is not None else f"--init {self.init}"
            raise ValueError(f"`{flag}` shapes the adapter: it needs `--student adapter`; the full student starts from the reference")
        if self.tune_layers is not None:
            raise ValueError("`--tune-layers` is a DPO/SFT baseline; distill trains --student full or adapter")
        self.full = self.student == "full"
        self.lmbda = self.on_policy_fraction
        lora_rank, self.lora_rank = self.lora_rank, None  # not RecipeArgs' PEFT baseline
        try:
            super().__post_init__()
        finally:
            self.lora_rank = lora_rank

    @property
    def mode(self) -> str:
        return "adapter" if self.student == "adapter" else "full"


class _TrRaTrainer(RobustTrainerMixin, GKDTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """GKD's loss with beta=1, from the members' logits: the mix, the cut to the tokenizer's
        real tokens and the KL all happen in `mixed_kl`, on the completion positions only."""
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        pair = self.teacher_model.pair
        pair.eval()
        with torch.no_grad():
            ref_logits, aligned_logits = (
                m(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
                for m in pair.members[:2]
            )
        # Standard causal shift: logits at position i predict the token at i + 1.
        loss = trra_loss(
            student_outputs.logits[:, :-1], ref_logits[:, :-1], aligned_logits[:, :-1], self.teacher_model.lam,
            inputs["labels"][:, 1:], self.n_tokens, num_items_in_batch,
        )
        return (loss, student_outputs) if return_outputs else loss


def _student(ref: str, args: TrRaConfig, trust_remote_code: bool):
    model = load_policy(ref, trust_remote_code)
    if args.student == "adapter":
        insert_adapter(model, num_layers=args.adapter_layers, init=args.init, lora_rank=args.lora_rank,
                       seed=args.seed, base_model=ref)
        freeze_base(model)
    return model


def real_tokens(tokenizer, models) -> int | None:
    """How many ids the KL covers: the tokenizer's, when a head is wider (padded), else all."""
    n, widths = len(tokenizer), [head_width(m) for m in models]
    if n > min(widths):
        raise ValueError(f"the tokenizer has {n} tokens but a head has only {min(widths)} rows")
    return n if n < max(widths) else None


@torch.no_grad()
def dual_path_agreement(student, pair: RealignedPair, tokenizer, texts: list[str], teacher_lam: float) -> dict:
    """Mean per-token KL(dual path at μ ‖ DeRa at μ·λ) on `texts`, for a few μ."""
    from aligndial.dualpath import DualPathModel

    dual = DualPathModel(student).eval()
    # The texts are rendered chat templates, which already hold any BOS: add no second one.
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc["attention_mask"].bool()
    ref_logits, aligned_logits = (m(**enc, use_cache=False).logits[mask] for m in pair.members[:2])
    n_tokens = real_tokens(tokenizer, [student, *pair.members[:2]])
    result = {}
    for mu in (0.5, 1.0, 1.5):
        kl = mixed_kl(dual(**enc, lam=mu).logits[mask], (ref_logits, aligned_logits, mu * teacher_lam), n_tokens)
        result[str(mu)] = round(kl.mean().item(), 6)
    return result


def teacher_pair(ref: str, aligned: str, tokenizer, trust_remote_code: bool = False):
    """The first round's teacher: ONE base model with the adapter when `aligned` is a PEFT LoRA
    directory (`aligndial.lora_pair.LoraPair`), else the reference and the aligned model."""
    if is_lora_dir(aligned):
        return LoraPair.from_pretrained(ref, [aligned], trust_remote_code=trust_remote_code)
    models = [load_causal_lm(n, trust_remote_code=trust_remote_code) for n in (ref, aligned)]
    return RealignedPair(models[0], models[1:], tokenizer).eval()


def train_distill(
    ref: str, aligned: str, data: str, args: TrRaConfig, trust_remote_code: bool = False, callbacks=None
) -> str:
    dataset = to_messages(read_data(data, "prompts"))
    if args.on_policy_fraction < 1.0 and any(m[-1]["role"] != "assistant" or not m[-1]["content"] for m in dataset["messages"]):
        raise ValueError("rows without a completion need on-policy training: pass `--on-policy-fraction 1`")
    resume = resume_point(args)  # the last round's (it writes to the output dir itself)
    # Refused like generate refuses the pair (EOS/BOS/pad-only differences warn there): checked
    # before any model loads.
    tokenizer = load_tokenizer(ref, trust_remote_code)
    lora_teacher = is_lora_dir(aligned)  # a LoRA adapter on ref: the teacher is one model (LoraPair checks it)
    if not lora_teacher:
        check_tokenizers(tokenizer, load_tokenizer(aligned, trust_remote_code), ref, aligned)
    announce("distill", args)
    final_out = args.output_dir
    teacher_aligned = None if lora_teacher else load_causal_lm(aligned, trust_remote_code=trust_remote_code)
    for round_ in range(1, args.iterations + 1):
        args.output_dir = final_out if round_ == args.iterations else os.path.join(final_out, f"round-{round_}")
        if teacher_aligned is None:
            pair = teacher_pair(ref, aligned, tokenizer, trust_remote_code)
        else:
            pair = RealignedPair(load_causal_lm(ref, trust_remote_code=trust_remote_code), [teacher_aligned], tokenizer).eval()
        student = _student(ref, args, trust_remote_code)
        trainer = _TrRaTrainer(
            model=student, teacher_model=MixedTeacher(pair, args.lam), args=args,
            train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks,
        )
        trainer.n_tokens = real_tokens(tokenizer, [student, *pair.members])
        trainer.train(resume_from_checkpoint=resume if round_ == args.iterations else None)
        extra = {"round": round_, "lam": args.lam, "teacher_aligned": aligned if round_ == 1 else f"round-{round_ - 1} student"}
        if args.student == "adapter":
            texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in dataset["messages"][:16]]
            extra["dual_path_kl_to_dera"] = dual_path_agreement(student, pair, tokenizer, texts, args.lam)
        save_result(trainer, student, tokenizer, args, extra)
        # TrRa-iter: the next round's aligned model is this round's student (as a plain model).
        teacher_aligned = merge_adapter(copy.deepcopy(student)) if args.student == "adapter" else student
        teacher_aligned.eval().requires_grad_(False)
    args.output_dir = final_out
    return final_out
