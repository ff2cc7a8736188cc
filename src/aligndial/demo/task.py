"""The demo task: arithmetic word problems answered directly or step by step.

    user:      Tom has 12 pens. He buys 5 more. Then he loses 3. How many pens does he have?
    direct:    The answer is 14.
    careful:   Step 1: 12 + 5 = 17. Step 2: 17 - 3 = 14. The answer is 14.

Why this task: every quantity the papers talk about is a number a program can read off a
reply. The reference (SFT) model answers in a mix of the two styles; the aligned model is
trained to prefer the careful one (CLM's "more careful assistant"; FR §4.2's slow thinking).
A tiny model gets one-operation problems right either way, but adding three numbers in one
token is hard for it, so careful answers cost tokens and buy accuracy: the trade-off that
λ should dial (FR Table 1, Fig. 4).

The reference data ties the style to the problem (P(careful) grows with the number of
operations), so the reference's log-odds of answering carefully differ from prompt to prompt
and a λ sweep moves them smoothly rather than all at once.

Preferences are drawn from a Bradley-Terry model with a finite reward gap (the careful reply is
preferred with probability `PREFER_CAREFUL`, not always). With always-preferred pairs the DPO
optimum is unbounded whatever β is; with a finite gap it is π_ref·exp(r/β), which is what
DeRa's "λ acts as β/λ" statement is about (DeRa Fig. 2).

Nothing here knows about models: it makes rows of data, and it scores reply texts.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

NAMES = [("Tom", "he"), ("Ana", "she"), ("Sam", "he"), ("Mia", "she"),
         ("Leo", "he"), ("Zoe", "she"), ("Ben", "he"), ("Eva", "she")]
ITEMS = ["apples", "pens", "cards", "coins", "books", "eggs", "shells", "stamps"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more"]
LOSSES = ["gives away {n}", "loses {n}", "sells {n}"]

# P(careful reply | number of operations) in the reference's SFT data.
CAREFUL_SHARE = {1: 0.2, 2: 0.4, 3: 0.6}
# P(careful reply is the chosen one) in the preference data: a reward gap of log(0.8/0.2) nats.
PREFER_CAREFUL = 0.8
# Small numbers keep the addition table a tiny model must learn small: 26 values × 5 steps × ±.
MAX_VALUE, MAX_STEP = 25, 5
ANSWER = re.compile(r"The answer is (-?\d+)\.")


@dataclass(frozen=True)
class Problem:
    """A start value and a list of signed steps, e.g. 12, [+5, -3]."""

    name: str
    pronoun: str
    item: str
    start: int
    steps: tuple[int, ...]
    verbs: tuple[str, ...]

    @property
    def answer(self) -> int:
        return self.start + sum(self.steps)

    @property
    def prompt(self) -> str:
        said = [f"{self.name} has {self.start} {self.item}."]
        for i, (step, verb) in enumerate(zip(self.steps, self.verbs)):
            who = f"Then {self.pronoun}" if i else self.pronoun.capitalize()
            said.append(f"{who} {verb.format(n=abs(step))}.")
        said.append(f"How many {self.item} does {self.pronoun} have?")
        return " ".join(said)


def careful_reply(start: int, steps: tuple[int, ...]) -> str:
    """'Step 1: 12 + 5 = 17. Step 2: 17 - 3 = 14. The answer is 14.'"""
    parts, value = [], start
    for i, step in enumerate(steps, 1):
        new = value + step
        parts.append(f"Step {i}: {value} {'+' if step > 0 else '-'} {abs(step)} = {new}.")
        value = new
    return " ".join(parts) + f" The answer is {value}."


def direct_reply(start: int, steps: tuple[int, ...]) -> str:
    return f"The answer is {start + sum(steps)}."


def reply(problem: Problem, careful: bool) -> str:
    return (careful_reply if careful else direct_reply)(problem.start, problem.steps)


def held_out(prompt: str) -> bool:
    """One problem in eight is kept for evaluation and never trained on (a stable hash, not a seed)."""
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 8 == 0


def sample_step(rng: random.Random, value: int) -> tuple[int, str]:
    """One signed step and its verb, keeping the running value in [0, MAX_VALUE]."""
    n = rng.randint(1, MAX_STEP)
    gain = value - n < 0 or (value + n <= MAX_VALUE and rng.random() < 0.5)
    return (n, rng.choice(GAINS)) if gain else (-n, rng.choice(LOSSES))


def sample_problem(rng: random.Random, ops: int) -> Problem:
    name, pronoun = rng.choice(NAMES)
    value = start = rng.randint(2, 15)
    steps, verbs = [], []
    for _ in range(ops):
        step, verb = sample_step(rng, value)
        steps.append(step)
        verbs.append(verb)
        value += step
    return Problem(name, pronoun, rng.choice(ITEMS), start, tuple(steps), tuple(verbs))


def problems(n: int, seed: int, split: str) -> list[Problem]:
    """`n` distinct problems of the `split` ("train" or "eval"), balanced over 1, 2, 3 operations."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval'; got {split!r}")
    rng, seen, out = random.Random(f"{split}-{seed}"), set(), []
    while len(out) < n:
        p = sample_problem(rng, ops=1 + len(out) % 3)
        if p.prompt not in seen and held_out(p.prompt) == (split == "eval"):
            seen.add(p.prompt)
            out.append(p)
    return out


def follow_up(problem: Problem, rng: random.Random) -> tuple[str, int]:
    """A second-turn question that needs the first answer: ('Then he buys 3 more. How many pens now?', +3)."""
    step, verb = sample_step(rng, problem.answer)
    return f"Then {problem.pronoun} {verb.format(n=abs(step))}. How many {problem.item} now?", step


def sft_rows(n: int, seed: int, two_turn_share: float = 0.15) -> list[dict]:
    """Reference SFT data (TRL conversational prompt/completion). Styles mixed per `CAREFUL_SHARE`;
    a share of rows are second turns whose question builds on the first answer (for CLM Table 4)."""
    rng, rows = random.Random(f"sft-{seed}"), []
    for p in problems(n, seed, "train"):
        first = [{"role": "user", "content": p.prompt}]
        careful = rng.random() < CAREFUL_SHARE[len(p.steps)]
        if rng.random() < two_turn_share:
            question, step = follow_up(p, rng)
            first += [{"role": "assistant", "content": reply(p, careful)}, {"role": "user", "content": question}]
            careful = rng.random() < CAREFUL_SHARE[1]
            text = (careful_reply if careful else direct_reply)(p.answer, (step,))
        else:
            text = reply(p, careful)
        rows.append({"prompt": first, "completion": [{"role": "assistant", "content": text}]})
    return rows


def preference_rows(n: int, seed: int, prefer_careful: float = PREFER_CAREFUL) -> list[dict]:
    """DPO data: the same problem answered both ways, the careful reply chosen with probability
    `prefer_careful` (Bradley-Terry with a finite reward gap). Both replies are correct."""
    rng, rows = random.Random(f"pref-{seed}"), []
    for p in problems(n, seed + 1, "train"):
        careful, direct = reply(p, True), reply(p, False)
        chosen, rejected = (careful, direct) if rng.random() < prefer_careful else (direct, careful)
        rows.append({
            "prompt": [{"role": "user", "content": p.prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })
    return rows


def distill_rows(n: int, seed: int) -> list[dict]:
    """TrRa data (GKD `messages`): off-policy sequences in both styles, so the student sees the
    teacher's distribution on careful and direct replies alike."""
    return [{"messages": r["prompt"] + r["completion"]} for r in sft_rows(n, seed + 2, two_turn_share=0.0)]


def corpus(rows: list[dict]) -> list[str]:
    """Every text in SFT rows, for training the tokenizer."""
    return [m["content"] for r in rows for m in r["prompt"] + r["completion"]]


def score(text: str, answer: int) -> dict:
    """What the demo measures on one reply: correct (the last 'The answer is N.' equals the
    answer), careful (it works step by step)."""
    found = ANSWER.findall(text)
    return {"correct": bool(found) and int(found[-1]) == answer, "careful": text.lstrip().startswith("Step")}
