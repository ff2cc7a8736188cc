"""Measure a λ-mixed model on the demo task: accuracy, careful share, tokens, KL to the reference.

Every policy is measured as a `MixedLM` at some λ: the DeRa pair, the dual-path adapter model,
or any plain model `m` wrapped as `RealignedPair(ref, [m])` at λ=1 (the fast path gives exactly
m's logits). λ=0 of the same object is the reference, so the KL needs no second code path, and
the mixing itself is always the models' own forward (`aligndial.mixing`), never redone here.
λ may also be a list, one weight per aligned model (K > 1); its reference is then all zeros:
weak-to-strong steering is the pair (large, [aligned, ref]) at (λ, −λ), and its KL is to the
large model alone.

Per λ, on the same prompts and the same sampling seed (common random numbers across λ):

- `accuracy`:  share of replies whose final "The answer is N." is right;
- `careful`:   share of replies that work step by step;
- `p_careful`: mean probability π_λ gives to starting with "Step" (exact, no sampling noise);
- `tokens`:    mean reply length in tokens, end-of-turn token included;
- `kl`:        mean over replies of Σ_t KL(π_λ(·|y_<t) ‖ π_ref(·|y_<t)), a sample estimate of the
               sequence-level KL(π_λ ‖ π_ref) (DeRa's x-axis); 0 at λ=0 by construction.
"""

from __future__ import annotations

import torch

from aligndial.demo.task import Problem, careful_reply, score
from aligndial.generation import generate_rows

METRICS = ("accuracy", "careful", "p_careful", "tokens", "kl")


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def reference_lam(lam):
    """The λ of the same mixed model that is its reference alone: 0, or K zeros for a list."""
    return [0.0] * len(lam) if isinstance(lam, (list, tuple)) else 0.0


@torch.no_grad()
def score_replies(model, tokenizer, prompts: list[str], replies: list[list[int]], lam: float | list[float]) -> tuple[list[float], list[float]]:
    """(Σ_t KL(π_λ ‖ π_ref) over each reply, π_λ(first token = "Step")) per row.

    Sequences are right-padded, so positions are 0..T−1 for every real token without position ids."""
    step_id = tokenizer(careful_reply(1, (1,)), add_special_tokens=False)["input_ids"][0]  # "Step", or "S" in a small vocabulary
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    seqs = [p + r for p, r in zip(prompt_ids, replies)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    logps = torch.log_softmax(model(ids, attention_mask=mask, lam=lam).logits.float(), -1)  # (B, T, V)
    ref_lam = reference_lam(lam)
    ref_logps = logps if lam == ref_lam else torch.log_softmax(model(ids, attention_mask=mask, lam=ref_lam).logits.float(), -1)
    kl_tok = (logps.exp() * (logps - ref_logps)).sum(-1)  # (B, T): KL of the next-token distributions
    kls, firsts = [], []
    for i, (p, r) in enumerate(zip(prompt_ids, replies)):
        start = len(p) - 1  # the position that predicts the reply's first token
        kls.append(kl_tok[i, start : start + len(r)].sum().item())
        firsts.append(logps[i, start, step_id].exp().item())
    return kls, firsts


def sample_replies(model, tokenizer, texts: list[str], lam: float | list[float], seed: int, max_new_tokens: int = 64, greedy: bool = False):
    """One reply per rendered prompt from π_λ (temperature 1, no top-k/top-p: the policy itself)."""
    how = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    return generate_rows(model, tokenizer, texts, lam=lam, seed=seed, add_special_tokens=False,
                         max_new_tokens=max_new_tokens, **how)


def measure(model, tokenizer, problems: list[Problem], lam: float | list[float], seed: int = 0, greedy: bool = False) -> dict:
    """The metrics of `METRICS` at one λ, plus the replies themselves."""
    texts = [render(tokenizer, [{"role": "user", "content": p.prompt}]) for p in problems]
    rows = sample_replies(model, tokenizer, texts, lam, seed, greedy=greedy)
    kls, firsts = score_replies(model, tokenizer, texts, [r["token_ids"] for r in rows], lam)
    scores = [score(r["text"], p.answer) for r, p in zip(rows, problems)]
    n = len(problems)
    return {
        "lam": lam,
        "accuracy": sum(s["correct"] for s in scores) / n,
        "careful": sum(s["careful"] for s in scores) / n,
        "p_careful": sum(firsts) / n,
        "tokens": sum(len(r["token_ids"]) for r in rows) / n,
        "kl": sum(kls) / n,
        "replies": [r["text"] for r in rows],
    }


def sweep(model, tokenizer, problems: list[Problem], lams: list[float], seed: int = 0, greedy: bool = False) -> list[dict]:
    return [measure(model, tokenizer, problems, lam, seed, greedy) for lam in lams]


def second_turn_accuracy(model, tokenizer, problems: list[Problem], follow_ups: list[tuple[str, int]],
                         first_lam: float, later_lam: float, seed: int = 0) -> dict:
    """CLM Table 4 on the demo task: reply to turn 1 at `first_lam`, feed the reply back, ask the
    follow-up, reply at `later_lam`; score the second reply against the first turn's true answer
    plus the follow-up's step (the conversation is judged as a whole)."""
    first_texts = [render(tokenizer, [{"role": "user", "content": p.prompt}]) for p in problems]
    firsts = sample_replies(model, tokenizer, first_texts, first_lam, seed)
    second_texts = [
        render(tokenizer, [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": f["text"]},
                           {"role": "user", "content": q}])
        for p, f, (q, _) in zip(problems, firsts, follow_ups)
    ]
    seconds = sample_replies(model, tokenizer, second_texts, later_lam, seed + 1)
    first_ok = [score(f["text"], p.answer)["correct"] for f, p in zip(firsts, problems)]
    second_ok = [score(s["text"], p.answer + step)["correct"] for s, p, (_, step) in zip(seconds, problems, follow_ups)]
    n = len(problems)
    return {"first_lam": first_lam, "later_lam": later_lam, "turn1_accuracy": sum(first_ok) / n,
            "turn2_accuracy": sum(second_ok) / n, "turn2_tokens": sum(len(s["token_ids"]) for s in seconds) / n}

