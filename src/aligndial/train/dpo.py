"""Adapter-only DPO: the CLM method (CLM §4.2) on TRL's DPOTrainer.

    aligndial train dpo --model M --data prefs.jsonl --out adapter/ [--beta 0.1] [--learning_rate 5e-5]
    aligndial train dpo --model M --data prefs.jsonl --out full/ --full            # baseline
    aligndial train dpo --model M --data prefs.jsonl --out lora/ --lora-rank 8     # baseline
    aligndial train dpo --model M --data prefs.jsonl --out b2/ --tune-layers bottom:2

An identity adapter is inserted before layer 0 and everything else is frozen (embeddings and
head included). Because the adapter starts as an exact identity, the initial policy IS the
base model, so the DPO reference is the base exactly: its log-probabilities are precomputed
once (`precompute_ref_log_probs`) instead of keeping a second copy of the model in memory.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import ClassVar

from trl import DPOConfig, DPOTrainer

from aligndial.train.common import DPO_LEARNING_RATES, RecipeArgs, RobustTrainerMixin, run_recipe
from aligndial.train.data import read_data


@dataclass
class AdapterDPOConfig(RecipeArgs, DPOConfig):
    """TRL's DPOConfig (beta, learning_rate, num_train_epochs, per_device_train_batch_size,
    max_length, loss_type, ... under TRL's names) plus the adapter/baseline fields of
    `RecipeArgs`. Changed default: `precompute_ref_log_probs=True` (see the module docstring)."""

    precompute_ref_log_probs: bool = True
    default_learning_rates: ClassVar[dict] = DPO_LEARNING_RATES

    def __post_init__(self):
        if self.init != "identity" and self.precompute_ref_log_probs and not (self.full or self.lora_rank or self.tune_layers):
            raise ValueError(
                f"`--init {self.init}` does not start at the base model, so the initial policy is not the DPO "
                "reference; use --init identity (CLM's method)."
            )
        super().__post_init__()


class _DPOTrainer(RobustTrainerMixin, DPOTrainer):
    pass


def shared_between_processes(dataset, args: AdapterDPOConfig):
    """The dataset backed by files in a directory every process of a multi-process run reads, and that
    directory (None in one process, or when the dataset already has files).

    TRL writes the precomputed reference log-probs to a cache file named after the dataset's own files,
    on the main process only, and every process then opens that file. An in-memory dataset (what
    `read_data` returns for JSON lines) has no files, so each process would name a different file in
    its own temporary directory, and every process but the main one failed to open it."""
    if args.world_size == 1 or not args.precompute_ref_log_probs or dataset.cache_files:
        return dataset, None
    from datasets import load_from_disk

    shared = os.path.join(args.output_dir, ".tmp-data")
    with args.main_process_first(local=False, desc="writing the dataset for every process"):
        if args.process_index == 0:
            shutil.rmtree(shared, ignore_errors=True)
            dataset.save_to_disk(shared)
    return load_from_disk(shared), shared


def train_dpo(model: str, data: str, args: AdapterDPOConfig, trust_remote_code: bool = False, callbacks=None) -> str:
    dataset, shared = shared_between_processes(read_data(data, "preference"), args)
    try:
        return run_recipe(_DPOTrainer, model, dataset, args, trust_remote_code, callbacks, recipe="dpo")
    finally:
        if shared is not None and args.process_index == 0:
            shutil.rmtree(shared, ignore_errors=True)
