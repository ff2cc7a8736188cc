"""Adapter-only SFT on TRL's SFTTrainer: how InRa injects a behaviour (e.g. short thinking,
FR §4.2) into a layer adapter while the base stays frozen.

    aligndial train sft --model M --data sft.jsonl --out adapter/ [--learning_rate 1e-4]

Data: `messages`, or `prompt` + `completion` (loss on the completion only), or `text`.
Baselines as for DPO: --full, --lora-rank R, --tune-layers bottom:K|top:K, --adapter-layers N.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from aligndial.train.common import RecipeArgs, RobustTrainerMixin, run_recipe
from aligndial.train.data import read_data


@dataclass
class AdapterSFTConfig(RecipeArgs, SFTConfig):
    """TRL's SFTConfig plus the adapter/baseline fields of `RecipeArgs`."""


class _SFTTrainer(RobustTrainerMixin, SFTTrainer):
    pass


def train_sft(model: str, data: str, args: AdapterSFTConfig, trust_remote_code: bool = False, callbacks=None) -> str:
    return run_recipe(_SFTTrainer, model, read_data(data, "sft"), args, trust_remote_code, callbacks,
                      recipe="sft")
