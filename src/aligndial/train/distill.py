"""TrRa: distil a student toward the λ-mixed teacher (FR §3.1, Eq. 6), on TRL's GKD.

    aligndial train distill --ref R --aligned A --lam 1.5 --data prompts.jsonl --out student/
    aligndial train distill --ref R --aligned A --lam 1 --student adapter --data D --out adapter/
    aligndial train distill --ref R --aligned A --lam 2 --iterations 2 --data D --out iter/

The loss is KL(π_student ‖ π_λ) per token over the whole vocabulary, averaged over completion
tokens only, where π_λ = softmax((1 − λ)·h_ref + λ·h_aligned) comes from `aligndial.mixing`.
TRL's GKD fits exactly: with beta=1 its generalised JSD is this reverse KL, normalised per
token over the vocabulary axis (the authors' public code normalises over the wrong axis), its
collator masks prompt tokens, and `lmbda` is the on-policy fraction. GKD only calls
`teacher(input_ids=, attention_mask=).logits`, so the teacher is the pair at a fixed λ.

`--student full` starts from the reference; `--student adapter` trains a layer adapter on the
reference instead, which turns the (ref, aligned) pair into ONE model whose dual path at μ
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
from aligndial.mixing import check_lam, mix_logits
from aligndial.pair import RealignedPair
from aligndial.train.common import RecipeArgs, RobustTrainerMixin, resume_point, save_result
from aligndial.train.data import load_data, to_messages, validate


def trra_loss(student_logits, ref_logits, aligned_logits, lam, labels) -> torch.Tensor:
    """KL(π_student ‖ π_λ) per token, summed over the vocabulary and averaged over positions
    whose label is not −100. Shapes: logits (B, T, V) already aligned with labels (B, T)."""
    teacher_logits = mix_logits(ref_logits, aligned_logits, lam)
    return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=1.0)


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
        if self.student == "adapter":
            self.full = False
        else:
            self.full = True
        self.lmbda = self.on_policy_fraction
        super().__post_init__()


class _TrRaTrainer(RobustTrainerMixin, GKDTrainer):
    pass


def _student(ref: str, args: TrRaConfig, trust_remote_code: bool):
    model = load_causal_lm(ref, trust_remote_code=trust_remote_code)
    if args.student == "adapter":
        insert_adapter(model, num_layers=args.adapter_layers, init="identity", base_model=ref)
        freeze_base(model)
    return model


@torch.no_grad()
def dual_path_agreement(student, pair: RealignedPair, tokenizer, texts: list[str], teacher_lam: float) -> dict:
    """Mean per-token KL(dual path at μ ‖ DeRa at μ·λ) on `texts`, for a few μ."""
    from aligndial.dualpath import DualPathModel

    dual = DualPathModel(student).eval()
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()
    result = {}
    for mu in (0.5, 1.0, 1.5):
        p = torch.log_softmax(dual(**enc, lam=mu).logits.float(), -1)
        q = torch.log_softmax(pair(**enc, lam=mu * teacher_lam).logits.float(), -1)
        kl = (p.exp() * (p - q)).sum(-1)
        result[str(mu)] = round(kl[mask].mean().item(), 6)
    return result


def train_distill(
    ref: str, aligned: str, data: str, args: TrRaConfig, trust_remote_code: bool = False, callbacks=None
) -> str:
    dataset = to_messages(validate(load_data(data), "prompts"))
    if args.on_policy_fraction < 1.0 and any(m[-1]["role"] != "assistant" or not m[-1]["content"] for m in dataset["messages"]):
        raise ValueError("rows without a completion need on-policy training: pass `--on-policy-fraction 1`")
    tokenizer = load_tokenizer(ref, trust_remote_code)
    final_out = args.output_dir
    teacher_aligned = load_causal_lm(aligned, trust_remote_code=trust_remote_code)
    for round_ in range(1, args.iterations + 1):
        args.output_dir = final_out if round_ == args.iterations else os.path.join(final_out, f"round-{round_}")
        pair = RealignedPair(load_causal_lm(ref, trust_remote_code=trust_remote_code), [teacher_aligned], tokenizer).eval()
        student = _student(ref, args, trust_remote_code)
        trainer = _TrRaTrainer(
            model=student, teacher_model=MixedTeacher(pair, args.lam), args=args,
            train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks,
        )
        trainer.train(resume_from_checkpoint=resume_point(args) if round_ == args.iterations else None)
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
