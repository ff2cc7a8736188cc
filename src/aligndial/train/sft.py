"""Adapter-only SFT on TRL's SFTTrainer: how InRa injects a behaviour (e.g. short thinking,
FR §4.2) into a layer adapter while the base stays frozen.

    aligndial train sft --model M --data sft.jsonl --out adapter/ [--learning_rate 1e-4]

Data: `messages`, or `prompt` + `completion` (loss on the completion only), or `text`.
On `messages` rows the loss is on the assistant's tokens only, by default (a user turn is not
something to imitate): TRL's `assistant_only_loss` where the chat template marks them
(`{% generation %}`, or a template TRL knows how to patch); otherwise each row is split before its
last assistant turn into TRL's prompt/completion form, so the loss is on that turn. The
effective-settings line says which. `--assistant_only_loss false` trains on every token.
Baselines as for DPO: --full, --lora-rank R, --tune-layers bottom:K|top:K, --adapter-layers N.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from aligndial.train.common import RecipeArgs, RobustTrainerMixin, run_recipe
from aligndial.train.data import read_data


@dataclass
class AdapterSFTConfig(RecipeArgs, SFTConfig):
    """TRL's SFTConfig plus the adapter/baseline fields of `RecipeArgs`. Changed default:
    `assistant_only_loss` on for `messages` rows (see the module docstring)."""

    assistant_only_loss: bool | None = field(
        default=None, metadata={"help": "On `messages` rows, compute the loss on assistant tokens only "
                                "(default: on; false trains on every token)."})


class _SFTTrainer(RobustTrainerMixin, SFTTrainer):
    pass


def _template_marks_assistant(tokenizer) -> bool:
    """Whether TRL's `assistant_only_loss` can find the assistant tokens with this chat template."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    if has_generation_markers(template):
        return True
    try:
        get_training_chat_template(tokenizer)
    except ValueError:  # a template TRL cannot patch
        return False
    return True


def split_last_assistant_turn(dataset, source: str):
    """`messages` rows as TRL's conversational prompt/completion: everything before the last
    assistant message is the prompt, that message the completion (the loss is on it alone)."""
    for n, row in enumerate(dataset["messages"], 1):
        if row[-1]["role"] != "assistant":
            raise ValueError(f"{source}: row {n}: `messages` ends with a {row[-1]['role']!r} turn; end it with the "
                             "assistant reply to train on")

    def split(row):
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}

    return dataset.map(split, remove_columns=dataset.column_names)


def loss_tokens(dataset, args: AdapterSFTConfig, model: str, trust_remote_code: bool = False, source: str = "--data"):
    """Decide what the loss covers (see the module docstring); sets `args.loss_on` for the settings
    line and `args.assistant_only_loss`; returns the dataset to train on."""
    if "messages" not in dataset.column_names or args.assistant_only_loss is False:
        args.assistant_only_loss = False
        args.loss_on = "every token" if "messages" in dataset.column_names else None
        return dataset
    from aligndial.loading import load_tokenizer

    if _template_marks_assistant(load_tokenizer(model, trust_remote_code)):
        args.assistant_only_loss, args.loss_on = True, "assistant tokens"
        return dataset
    args.assistant_only_loss = False
    args.loss_on = "each row's last assistant turn (the chat template marks no assistant tokens)"
    return split_last_assistant_turn(dataset, source)


def train_sft(model: str, data: str, args: AdapterSFTConfig, trust_remote_code: bool = False, callbacks=None) -> str:
    dataset = loss_tokens(read_data(data, "sft"), args, model, trust_remote_code, source=data)
    return run_recipe(_SFTTrainer, model, dataset, args, trust_remote_code, callbacks, recipe="sft")
