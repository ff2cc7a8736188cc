"""Adapter-only SFT on TRL's SFTTrainer: how InRa injects a behaviour (e.g. short thinking,
FR §4.2) into a layer adapter while the base stays frozen.

    aligndial train sft --model M --data sft.jsonl --out adapter/ [--learning_rate 1e-4]

Data: `messages`, or `prompt` + `completion` (loss on the completion only), or `text`.
Baselines as for DPO: --full, --lora-rank R, --tune-layers bottom:K|top:K, --adapter-layers N.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from aligndial.loading import load_causal_lm, load_tokenizer
from aligndial.train.common import RecipeArgs, RobustTrainerMixin, prepare_trainable, resume_point, save_result
from aligndial.train.data import load_data, validate


@dataclass
class AdapterSFTConfig(RecipeArgs, SFTConfig):
    """TRL's SFTConfig plus the adapter/baseline fields of `RecipeArgs`."""


class _SFTTrainer(RobustTrainerMixin, SFTTrainer):
    pass


def train_sft(model: str, data: str, args: AdapterSFTConfig, trust_remote_code: bool = False, callbacks=None) -> str:
    dataset = validate(load_data(data), "sft")
    tokenizer = load_tokenizer(model, trust_remote_code)
    policy = load_causal_lm(model, trust_remote_code=trust_remote_code)
    peft_config = prepare_trainable(policy, args)
    trainer = _SFTTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=callbacks,)
    trainer.train(resume_from_checkpoint=resume_point(args))
    return save_result(trainer, trainer.model if args.mode == "lora" else policy, tokenizer, args)
