"""`aligndial demo tour`: the models and files the README's tour uses, written into a directory.

    aligndial demo tour                  # into the current directory
    aligndial demo tour --out DIR

Writes copies of the bundled models: `sft-model/` (the reference), `dpo-model/` (aligned by full
DPO), `careful-adapter/` (a one-layer adapter on `sft-model` trained by SFT on careful replies),
`student-model/` (a TrRa student distilled from the two at λ=2) and `large-model/` (a larger
reference over the same tokenizer, for weak-to-strong steering); and small files in the formats
the commands take, from the demo task (`aligndial.demo.task`):

- `prompts.jsonl`, `val.jsonl`: held-out problems, {"prompt", "answer"} per line;
- `turns.jsonl`: two-turn problems for `sweep --lam-schedule`, {"messages": [user, user], "answer"}:
  each unanswered user turn gets a generated reply, fed back before the next;
- `prefs.jsonl`: preference pairs in TRL's conversational format (what `train dpo` and
  `--metric pairwise-accuracy` take);
- `sft.jsonl`: demonstrations (careful replies) as `messages` rows, for `train sft` and `train distill`;
- `my_rewards.py`: a reward function for `--metric reward:my_rewards:careful`.

So every README and docs/ command runs as written, offline, in seconds, on models that show the dial.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from aligndial.demo import task
from aligndial.demo.build import BUNDLE, check_bundle

MODELS = {"sft-model": "ref", "dpo-model": "aligned", "careful-adapter": "adapter", "student-model": "trra",
          "large-model": "large"}

REWARDS = '''"""A reward for `aligndial sweep --metric reward:my_rewards:careful`: (prompt, response) -> float."""


def careful(prompt, response):
    """1 for a step-by-step reply, 0 for a direct one."""
    return float(response.lstrip().startswith("Step"))
'''


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_tour(out: str | Path = ".", bundle: Path = BUNDLE, seed: int = 0) -> list[str]:
    """Write the tour's models and files into `out`; returns the names written. Existing models
    of the same name are replaced."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_bundle(bundle)
    for name, stage in MODELS.items():
        if (out / name).exists():
            shutil.rmtree(out / name)
        shutil.copytree(bundle / stage, out / name, ignore=shutil.ignore_patterns("training_summary.json"))
    held_out = task.problems(16, seed, "eval")
    _jsonl(out / "prompts.jsonl", [{"prompt": p.prompt, "answer": str(p.answer)} for p in held_out[:8]])
    _jsonl(out / "val.jsonl", [{"prompt": p.prompt, "answer": str(p.answer)} for p in held_out[8:]])
    _jsonl(out / "turns.jsonl", _two_turn_rows(held_out[:4], seed))
    _jsonl(out / "prefs.jsonl", task.preference_rows(16, seed))
    _jsonl(out / "sft.jsonl", [{"messages": [{"role": "user", "content": p.prompt},
                                             {"role": "assistant", "content": task.reply(p, True)}]}
                               for p in task.problems(16, seed + 3, "train")])
    (out / "my_rewards.py").write_text(REWARDS)
    return [*MODELS, "prompts.jsonl", "val.jsonl", "turns.jsonl", "prefs.jsonl", "sft.jsonl", "my_rewards.py"]


def _two_turn_rows(problems: list, seed: int) -> list[dict]:
    """A problem, then a follow-up that needs its answer; `answer` is the second turn's."""
    rng, rows = random.Random(f"turns-{seed}"), []
    for p in problems:
        question, step = task.follow_up(p, rng)
        rows.append({"messages": [{"role": "user", "content": p.prompt}, {"role": "user", "content": question}],
                     "answer": str(p.answer + step)})
    return rows
