"""The metrics of a λ sweep, one per `--metric` spec:

    reward:module:function       a Python function (prompt, response) -> float
    reward-model:PATH            an HF sequence-classification reward model (one logit), safetensors
    kl                           Σ_t KL(π_λ ‖ π_ref) over the sampled response tokens, full vocabulary
    length                       generated tokens (EOS included when the model stopped)
    accuracy:REGEX               exact match of the last REGEX match (group 1 if any) with the prompt's `answer`
    judge:URL                    win rate against `judge_baseline_lam`, judged by an OpenAI-compatible endpoint
    pairwise-accuracy:DATA.jsonl DeRa Eq. 14 on {"prompt", "chosen", "rejected"} rows; needs no generation

KL is the regulariser whose strength λ rescales (β/λ in DeRa Eq. 1); reward against KL is the
trade-off DeRa sweeps along. The judge and pairwise accuracy are DeRa's evaluations (§5.4, App. D.3).

Row metrics are callables `metric(rows, scoring) -> [float | None]`, one value per sweep row
(None: undecided, left out of the mean). `PairwiseAccuracy` scores a fixed dataset per λ instead.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import random
import re
from dataclasses import dataclass, field

import torch

from aligndial.generation import render_prompts
from aligndial.prompts import as_text, read_jsonl, row_prompt
from aligndial.scoring import kl_to_ref, mean_logp, position_lams, response_logits, turn_lam

SPECS = "reward:module:function, reward-model:PATH, kl, length, accuracy:REGEX, judge:URL, pairwise-accuracy:DATA.jsonl"


@dataclass
class Scoring:
    """What row metrics need besides their rows: the mixed model, how prompts were rendered, and
    every row of the sweep (the judge compares each row with the baseline λ's row)."""

    model: object
    tokenizer: object
    chat: bool = False
    think_lam: float | None = None
    rows: list[dict] = field(default_factory=list)


def row_lam(row: dict) -> float:
    """The λ of a row's last generated turn."""
    return turn_lam(row["lam"], len(row.get("turns", [None])) - 1)


def parse_metric(spec: str, judge_baseline_lam: float = 1.0, judge_model: str | None = None, seed: int = 0):
    """A metric from its spec; loads what it needs now, so a bad spec fails before generation."""
    kind, _, arg = spec.partition(":")
    if spec == "kl":
        return KL()
    if spec == "length":
        return Length()
    if kind == "reward" and arg:
        return Reward(arg)
    if kind == "reward-model" and arg:
        return RewardModel(arg)
    if kind == "accuracy" and arg:
        return Accuracy(arg)
    if kind == "judge" and arg:
        return Judge(arg, judge_baseline_lam, judge_model, seed)
    if kind == "pairwise-accuracy" and arg:
        return PairwiseAccuracy(arg)
    raise ValueError(f"unknown metric {spec!r}; use one of: {SPECS}")


def check_metric(spec: str, chat: bool = False) -> None:
    """What can be checked of a metric spec before any model loads: its form, a reward function's
    import, a regex, a reward model's directory, and every row of a pairwise-accuracy file."""
    kind, _, arg = spec.partition(":")
    if kind in ("reward-model", "judge") and arg:
        if kind == "reward-model":
            from aligndial.cliargs import check_model

            check_model(f"--metric {kind}:", arg)
        return
    if kind == "pairwise-accuracy" and arg:
        PairwiseAccuracy(arg).check(chat)
        return
    parse_metric(spec)


class Length:
    name = "length"

    def __call__(self, rows: list[dict], scoring: Scoring) -> list[float]:
        return [float(len(r["token_ids"])) for r in rows]


class KL:
    """Σ_t KL(π_λt(·|x, y<t) ‖ π_ref(·|x, y<t)) on the row's own tokens y ~ π_λ, exactly 0 at λ=0.
    Its mean over samples estimates the sequence KL of DeRa Eq. 1 (chain rule)."""

    name = "kl"

    def __call__(self, rows: list[dict], scoring: Scoring) -> list[float]:
        tok = scoring.tokenizer
        kl = [0.0] * len(rows)  # an empty response has KL 0
        scored = [i for i, r in enumerate(rows) if r["token_ids"]]
        if not scored:
            return kl
        contexts = [tok(rows[i]["context"], add_special_tokens=not scoring.chat)["input_ids"] for i in scored]
        responses = [rows[i]["token_ids"] for i in scored]
        logits = response_logits(scoring.model, contexts, responses, tok.pad_token_id or 0)
        for i, c, r, (h_ref, h_aligned) in zip(scored, contexts, responses, logits):
            lams = position_lams(tok, c, r, row_lam(rows[i]), scoring.think_lam)
            kl[i] = kl_to_ref(h_ref, h_aligned, lams, getattr(scoring.model, "pad_from", None))  # padded ids masked
        return kl


@contextlib.contextmanager
def _cwd_importable():
    """The current directory importable while a reward module loads, as under `python -m`: a
    console script's sys.path starts at its own bin directory, not at the user's."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


class Reward:
    """`reward:module:function`: function(prompt, response) -> float. `prompt` is the file's
    prompt (text or messages); with several turns, the conversation the last reply answers."""

    name = "reward"

    def __init__(self, target: str):
        module, _, function = target.partition(":")
        if not module or not function:
            raise ValueError(f"`reward:{target}` must be reward:module:function, e.g. reward:my_rewards:helpfulness")
        try:
            with _cwd_importable():
                self.fn = getattr(importlib.import_module(module), function)
        except ImportError as e:
            raise ValueError(f"`reward:{target}`: cannot import module {module!r} ({e}); run from the directory "
                             "that holds it, or put that directory on PYTHONPATH") from None
        except AttributeError:
            raise ValueError(f"`reward:{target}`: module {module!r} has no function {function!r}") from None

    def __call__(self, rows: list[dict], scoring: Scoring) -> list[float]:
        return [float(self.fn(row_prompt(r), r["text"])) for r in rows]


class RewardModel:
    """`reward-model:PATH`: the single logit of an `AutoModelForSequenceClassification` on the
    conversation (its tokenizer's chat template) or, without a template, on context + response."""

    name = "reward-model"

    def __init__(self, path: str):
        from transformers import AutoModelForSequenceClassification

        from aligndial.loading import load_tokenizer

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
        except OSError as e:
            raise OSError(f"`reward-model:{path}`: {e}") from e
        if self.model.config.num_labels != 1:
            raise ValueError(f"`reward-model:{path}` has {self.model.config.num_labels} labels; a reward model has 1")
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "right"  # positions count from 0 in every row; pooling takes the last non-pad
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def text(self, row: dict) -> str:
        if self.tokenizer.chat_template is None:
            return row["context"] + row["text"]
        prompt = row_prompt(row)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row["text"]}], tokenize=False)

    @torch.no_grad()
    def __call__(self, rows: list[dict], scoring: Scoring) -> list[float]:
        self.model.to(scoring.model.device)
        enc = self.tokenizer([self.text(r) for r in rows], return_tensors="pt", padding=True).to(scoring.model.device)
        return self.model(**enc).logits[:, 0].float().tolist()


class Accuracy:
    """`accuracy:REGEX`: 1 if the last match of REGEX in the response (its group 1 if it has a
    group) equals the prompt's `answer` field, stripped; else 0 (also when nothing matches)."""

    name = "accuracy"

    def __init__(self, pattern: str):
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"`accuracy:{pattern}`: not a valid regular expression ({e})") from None

    def __call__(self, rows: list[dict], scoring: Scoring) -> list[float]:
        values = []
        for r in rows:
            if "answer" not in r:
                raise ValueError(
                    f"`accuracy:{self.regex.pattern}` needs an `answer` field in every prompt; "
                    f"prompt {r['prompt_index']} has none"
                )
            matches = list(self.regex.finditer(r["text"]))
            got = (matches[-1].group(1) if self.regex.groups else matches[-1].group(0)) if matches else None
            values.append(float(got is not None and got.strip() == str(r["answer"]).strip()))
        return values


JUDGE_PROMPT = (
    "You are an expert rater of assistant responses. Given a prompt and two of its possible responses, "
    "output 1 or 2 to indicate which response is better.\n"
    "Prompt - <prompt>{prompt}</prompt>\n"
    "Response 1 - <response1>{first}</response1>\n"
    "Response 2 - <response2>{second}</response2>\n"
    "Preferred Response -"
)


class Judge:
    """`judge:URL`: 1 if an OpenAI-compatible chat endpoint prefers the row's response to the
    baseline λ's response for the same prompt and sample, 0 if not, 0.5 for identical responses;
    the mean is the win rate (DeRa §5.4). As in DeRa App. D.3, the two responses are swapped
    with probability 0.5 (a seeded RNG per comparison, so reruns agree) and the verdict is
    swapped back. A reply without a 1 or 2 counts as None."""

    name = "judge"

    def __init__(self, url: str, baseline_lam: float, model: str | None = None, seed: int = 0):
        from openai import OpenAI

        self.client = OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
        self.baseline_lam, self.seed = float(baseline_lam), seed
        self.model = model or self._served_model(url)

    def _served_model(self, url: str) -> str:
        served = [m.id for m in self.client.models.list()]
        if not served:
            raise ValueError(f"`judge:{url}` serves no model; pass `--judge-model NAME`")
        return served[0]

    def __call__(self, rows: list[dict], scoring: Scoring) -> list[float | None]:
        baseline = {(r["prompt_index"], r["sample"]): r for r in scoring.rows if r["lam"] == self.baseline_lam}
        values = []
        for r in rows:
            base = baseline.get((r["prompt_index"], r["sample"]))
            if base is None:
                raise ValueError(f"the judge baseline λ={self.baseline_lam} was not swept; add it to `--lams`")
            values.append(0.5 if r["text"] == base["text"] else self.compare(as_text(row_prompt(r)), r, base))
        return values

    def compare(self, prompt: str, row: dict, base: dict) -> float | None:
        swap = random.Random(f"{self.seed}:{row['lam']}:{row['prompt_index']}:{row['sample']}").random() < 0.5
        first, second = (base, row) if swap else (row, base)
        content = JUDGE_PROMPT.format(prompt=prompt, first=first["text"], second=second["text"])
        reply = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}], temperature=0.0
        ).choices[0].message.content or ""
        verdict = re.search(r"[12]", reply)
        if verdict is None:
            return None
        return float(verdict.group(0) == ("2" if swap else "1"))


class PairwiseAccuracy:
    """`pairwise-accuracy:DATA.jsonl`: the share of pairs where the chosen response has the higher
    length-normalised log-likelihood under π_λ (DeRa Eq. 14). Scored per λ, not per sweep row."""

    name = "pairwise-accuracy"

    def __init__(self, path: str):
        self.path = path
        self.pairs = read_jsonl(path, required=("prompt", "chosen", "rejected"))

    def check(self, chat: bool) -> None:
        """Every row's fields, before any model loads: conversational rows need `chat`."""
        for n, p in enumerate(self.pairs, 1):
            _check_pair(p, chat, f"{self.path}: pair {n}")

    def __call__(self, lams: list[float], scoring: Scoring, batch_size: int = 8) -> dict[float, list[float]]:
        scores = pairwise_scores(scoring.model, scoring.tokenizer, self.pairs, lams, scoring.chat, scoring.think_lam,
                                 batch_size)
        return {lam: [s["correct"] for s in scores if s["lam"] == lam] for lam in lams}


def _conversational(pair: dict) -> bool:
    return any(isinstance(pair[k], list) for k in ("prompt", "chosen", "rejected"))


def _check_pair(pair: dict, chat: bool, where: str) -> None:
    for side in ("prompt", "chosen", "rejected"):
        if not isinstance(pair[side], (str, list)):
            raise ValueError(f"{where}: `{side}` must be a string or a list of messages; got {type(pair[side]).__name__}")
        if not pair[side]:
            raise ValueError(f"{where}: `{side}` is empty; Eq. 14 divides by the response's length")
    if _conversational(pair) and not chat:
        raise ValueError(f"{where} is conversational (lists of messages, as `train dpo` takes); add `--chat` to render "
                         "it with the chat template")


def pair_texts(tokenizer, pair: dict, chat: bool, n: int = 1) -> tuple[str, str, str]:
    """(context, chosen, rejected) as text. String rows: the rendered prompt and the responses as
    given. Conversational rows (TRL's preference format): the prompt rendered with the chat template
    and a generation prompt; each response is what the template adds after it when the reply is
    appended, end-of-turn tokens included, as TRL's DPO data processing splits it."""
    if not _conversational(pair):
        return render_prompts(tokenizer, [pair["prompt"]], chat)[0], pair["chosen"], pair["rejected"]
    prompt = pair["prompt"] if isinstance(pair["prompt"], list) else [{"role": "user", "content": pair["prompt"]}]
    context = render_prompts(tokenizer, [prompt], chat=True)[0]
    sides = []
    for side in ("chosen", "rejected"):
        reply = pair[side] if isinstance(pair[side], list) else [{"role": "assistant", "content": pair[side]}]
        full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
        if not full.startswith(context):
            raise ValueError(f"pair {n}: the chat template renders the prompt differently once the `{side}` reply "
                             "follows it, so the reply cannot be split off; give the pair as strings")
        sides.append(full[len(context):])
    return context, sides[0], sides[1]


def pairwise_scores(model, tokenizer, pairs: list[dict], lams: list[float], chat: bool = False,
                    think_lam: float | None = None, batch_size: int = 8) -> list[dict]:
    """One dict per (pair, λ): {"pair", "lam", "chosen", "rejected", "correct"}, where chosen and
    rejected are (1/|y|)·log π_λ(y|x) (DeRa Eq. 14). Two forwards per batch serve every λ."""
    out = []
    for n, p in enumerate(pairs, 1):
        _check_pair(p, chat, f"pair {n}")
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        texts = [pair_texts(tokenizer, p, chat, n) for n, p in enumerate(batch, start + 1)]
        contexts = [tokenizer(context, add_special_tokens=not chat)["input_ids"] for context, _, _ in texts]
        responses = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, *sides in texts for text in sides]
        logits = response_logits(model, [c for c in contexts for _ in range(2)], responses, tokenizer.pad_token_id or 0)
        for lam in lams:
            for j, p in enumerate(batch):
                logp = {}
                for k, side in enumerate(("chosen", "rejected")):
                    r = responses[2 * j + k]
                    lams_t = position_lams(tokenizer, contexts[j], r, lam, think_lam)
                    logp[side] = mean_logp(*logits[2 * j + k], lams_t, r)
                out.append({"pair": start + j, "lam": lam, **logp, "correct": float(logp["chosen"] > logp["rejected"])})
    return out
