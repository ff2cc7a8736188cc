"""λ sweeps: generate at every λ for every prompt, measure, summarise, choose λ.

DeRa's main use is to find a good regularisation strength β/λ without retraining: sweep λ,
evaluate on validation prompts, pick (DeRa §5.4, App. D.5); CLM §5.2 and FR §4 sweep the same
dial and report reward, win rate, tokens and accuracy, and CLM Table 4 uses one λ on the first
turn and another on later turns. Python:

    from aligndial.evaluate import SweepConfig, select_lam, sweep
    from aligndial.prompts import load_prompts

    config = SweepConfig(lams=[0, 0.5, 1, 2], metrics=["kl", "reward:my_rewards:score"])
    rows, summary = sweep(pair, pair.tokenizer, load_prompts("val.jsonl"), config, out="runs/val")
    choice = select_lam(summary, "reward", max_kl=5)      # {"lam", "value", "sem", "reason", …}

Files in `out`: rows.jsonl (one row per (λ, prompt, sample) with the text and every metric;
appended batch by batch, so a sweep that stops resumes where it stopped and extra λ or metrics
are added to finished rows), config.json (the generation settings a resume must match),
summary.csv and the plots of `aligndial.report`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aligndial.generation import render_prompts
from aligndial.cliargs import check_file, check_prompts
from aligndial.metrics import PairwiseAccuracy, Scoring, check_metric, parse_metric
from aligndial.mixing import check_lam
from aligndial.prompts import conversation, load_prompts, n_turns, prompt_of
from aligndial.report import format_table, lam_label, write_report
from aligndial.scoring import turn_lam

# Metrics that read the mixed model's distributions (the engine's transformers `scorer()`).
SCORED_BY_MODEL = ("kl", "pairwise-accuracy", "reward-model")
# config.json keys: a resumed sweep must generate exactly as the rows it keeps were generated.
GENERATION_KEYS = ("model_id", "chat", "think_lam", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed")


@dataclass
class SweepConfig:
    """What a sweep generates and measures.

    Sweep points: `lams` (one λ on every turn) and `lam_schedules` ((first-turn λ, later-turn λ),
    CLM Table 4); `think_lam` is used inside `<think>…</think>` at every point.
    Generation: `samples` per prompt, `max_new_tokens`, `do_sample`, `temperature`, `top_p`,
    `top_k`, `seed`, `chat`, `batch_size` (rows per generate call; rows of neighbouring λ share a
    batch with a per-row λ). Metrics: `metrics` specs (see `aligndial.metrics`),
    `judge_baseline_lam`, `judge_model`.
    """

    lams: list[float] = field(default_factory=list, metadata={"help": "λ values, each used on every turn"})
    lam_schedules: list[tuple[float, float]] = field(
        default_factory=list, metadata={"help": "(first-turn λ, later-turn λ) pairs for multi-turn prompts"})
    think_lam: float | None = field(default=None, metadata={"help": "λ inside <think>…</think> spans"})
    metrics: list[str] = field(default_factory=lambda: ["length"], metadata={"help": "metric specs"})
    samples: int = field(default=1, metadata={"help": "responses per prompt and λ (needs do_sample above 1)"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per reply"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    seed: int = field(default=0, metadata={"help": "seeds sampling and the judge's order swaps"})
    chat: bool = field(default=False, metadata={"help": "render prompts with the tokenizer's chat template"})
    batch_size: int = field(default=8, metadata={"help": "rows per generate call and per scoring forward"})
    judge_baseline_lam: float = field(default=1.0, metadata={"help": "the λ the judge compares against"})
    judge_model: str | None = field(default=None, metadata={"help": "judge model name (default: the first served)"})
    model_id: str = field(default="", metadata={"help": "names the model in config.json, so a resume cannot mix models"})

    def __post_init__(self):
        self.lams = [check_lam(x, "lams") for x in self.lams]
        for s in self.lam_schedules:
            if len(s) != 2:
                raise ValueError(f"a λ schedule is (first-turn λ, later-turn λ); got {s!r}")
        self.lam_schedules = [(check_lam(a, "lam-schedule"), check_lam(b, "lam-schedule")) for a, b in self.lam_schedules]
        if not self.points:
            raise ValueError("a sweep needs at least one λ (`--lams 0,0.5,1`) or `--lam-schedule L1,L2`")
        labels = [lam_label(p) for p in self.points]
        if len(set(labels)) != len(labels):
            raise ValueError(f"each λ may appear once; got {', '.join(labels)}")
        if self.think_lam is not None:
            self.think_lam = check_lam(self.think_lam, "think-lam")
        if self.samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"samples, max_new_tokens and batch_size must be ≥ 1; got "
                             f"{self.samples}, {self.max_new_tokens}, {self.batch_size}")
        if self.samples > 1 and not self.do_sample:
            raise ValueError(f"`--samples {self.samples}` with greedy decoding repeats one response; add `--do-sample`")

    @property
    def points(self) -> list:
        return [*self.lams, *self.lam_schedules]

    def settings(self, seed: int | None = None):
        """`aligndial.engines.Settings` for one generate call of this sweep."""
        from aligndial.engines import Settings

        return Settings(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, temperature=self.temperature,
                        top_p=self.top_p, top_k=self.top_k, seed=seed, think_lam=self.think_lam,
                        add_special_tokens=not self.chat)

    def generation_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


def _jsonable(point):
    return list(point) if isinstance(point, tuple) else point


class Progress:
    """Progress over (prompt, λ) rows on stderr: a bar on a terminal; piped or logged, one line per
    finished batch (a redrawn bar would arrive as one line at the end, or as nothing)."""

    def __init__(self, total: int, desc: str, file=None):
        self.file, self.total, self.desc, self.done, self.start = file or sys.stderr, total, desc, 0, time.monotonic()
        self.bar = None
        if self.file.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="row", file=self.file)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total:
            print(f"{self.desc}: {self.done}/{self.total} rows ({100 * self.done // self.total}%), "
                  f"{time.monotonic() - self.start:.1f} s", file=self.file, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _key(lam, prompt_index: int, sample: int) -> tuple:
    return lam_label(lam), prompt_index, sample


def generate_batch(engine, tokenizer, items: list[tuple], prompts: list[dict], config: SweepConfig) -> list[dict]:
    """Rows for (point, prompt index, sample) items in one batch with a per-row λ, from an
    `aligndial.engines` engine. Multi-turn prompts reply turn by turn, each turn's rows batched
    together, replies fed back."""
    turns = [[] for _ in items]
    counts = [n_turns(prompt_of(prompts[i])) for _, i, _ in items]
    seed = config.seed + zlib.crc32(repr(_key(*items[0])).encode()) % 2**31  # batches differ in their draws
    for k in range(max(counts)):
        live = [j for j, n in enumerate(counts) if n > k]
        convs = [conversation(prompt_of(prompts[items[j][1]]), [t["text"] for t in turns[j]]) for j in live]
        contexts = render_prompts(tokenizer, convs, config.chat)
        lams = [turn_lam(items[j][0], k) for j in live]
        outs = engine.rows(contexts, lams, config.settings(seed))
        for j, context, out, lam_j in zip(live, contexts, outs, lams):
            turns[j].append({"lam": lam_j, "context": context, **out})
    rows = []
    for (point, i, s), ts in zip(items, turns):
        last = ts[-1]
        row = {"lam": _jsonable(point), "prompt_index": i, "sample": s, "prompt": prompt_of(prompts[i]),
               "context": last["context"], "text": last["text"], "token_ids": last["token_ids"],
               "tokens_per_second": last["tokens_per_second"]}
        if "answer" in prompts[i]:
            row["answer"] = prompts[i]["answer"]
        if len(ts) > 1:
            row["turns"] = [{k: t[k] for k in ("lam", "text", "token_ids")} for t in ts]
        rows.append(row)
    return rows


def sweep(model, tokenizer, prompts: list[dict], config: SweepConfig, out: str | Path | None = None):
    """Generate for every prompt at every sweep point, measure, and return (rows, summary).

    `model` is a mixed model with one aligned source (`RealignedPair`, `DualPathModel`), or an
    engine of `aligndial.engines` (e.g. vLLM's, which generates; metrics that need the full
    distribution, KL and pairwise accuracy, score on its transformers `scorer()`);
    `prompts` are rows of a prompt file (`prompts.load_prompts`). With `out`, rows are written
    as they finish and finished rows are skipped on a rerun."""
    from tqdm.auto import tqdm

    from aligndial.engines import as_engine

    engine = as_engine(model, tokenizer)

    metrics = [parse_metric(s, config.judge_baseline_lam, config.judge_model, config.seed) for s in config.metrics]
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ValueError(f"give each kind of metric once; got {config.metrics}")
    if "judge" in names and config.judge_baseline_lam not in config.lams:
        raise ValueError(f"the judge baseline λ={config.judge_baseline_lam} is not among the swept λ {config.lams}; "
                         "add it to `--lams` or set `--judge-baseline-lam`")
    unanswered = [i for i, p in enumerate(prompts) if "answer" not in p]
    if "accuracy" in names and unanswered:
        raise ValueError(f"`--metric accuracy:…` needs an `answer` field in every prompt; "
                         f"prompt(s) {unanswered} have none")
    done = _resume(Path(out), config, prompts) if out is not None else {}
    # Render every prompt's first turn now: a prompt the settings cannot render (messages without
    # `chat`, no chat template) fails here, before `out` holds anything a corrected rerun would refuse.
    render_prompts(tokenizer, [conversation(prompt_of(p), []) for p in prompts], config.chat)
    if out is not None:
        _write_settings(Path(out), config)
    todo = [(p, i, s) for p in config.points for i in range(len(prompts)) for s in range(config.samples)
            if _key(p, i, s) not in done]
    with Progress(len(todo), "generating") as bar:
        step = engine.batch_rows(config.batch_size)
        for start in range(0, len(todo), step):
            new = generate_batch(engine, tokenizer, todo[start : start + step], prompts, config)
            done.update({_key(r["lam"], r["prompt_index"], r["sample"]): r for r in new})
            if out is not None:
                _append_rows(Path(out) / "rows.jsonl", new)
            bar.update(len(new))
    rows = [done[_key(p, i, s)] for p in config.points for i in range(len(prompts)) for s in range(config.samples)]

    scored = any(m.name in SCORED_BY_MODEL and (isinstance(m, PairwiseAccuracy) or any(m.name not in r for r in rows))
                 for m in metrics)
    scoring = Scoring(engine.scorer() if scored else None, tokenizer, config.chat, config.think_lam, rows)
    per_point = {}
    for m in metrics:
        if isinstance(m, PairwiseAccuracy):
            values = m([turn_lam(p, 0) for p in config.points], scoring, config.batch_size)
            per_point[m.name] = {lam_label(p): values[turn_lam(p, 0)] for p in config.points}
            continue
        need = [r for r in rows if m.name not in r]
        for start in tqdm(range(0, len(need), config.batch_size), desc=m.name, disable=None):
            chunk = need[start : start + config.batch_size]
            for r, v in zip(chunk, m(chunk, scoring)):
                r[m.name] = v
    summary = summarize(rows, config.points, names, per_point)
    if out is not None:
        _rewrite(Path(out) / "rows.jsonl", list(done.values()))
        write_report(summary, Path(out))
    return rows, summary


def _settings(config: SweepConfig) -> dict:
    return {k: asdict(config)[k] for k in GENERATION_KEYS}


def _write_settings(out: Path, config: SweepConfig) -> None:
    """config.json, written once everything was checked (`_resume` only reads)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_settings(config), indent=1) + "\n")


def _resume(out: Path, config: SweepConfig, prompts: list[dict]) -> dict:
    """Finished rows of `out` by key, after checking they were generated the same way. Writes nothing."""
    saved = out / "config.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in _settings(config).items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{out} holds a sweep generated with other settings ({'; '.join(diff)}); "
                             "use a new `--out` or the same settings")
    path = out / "rows.jsonl"
    if not path.exists():
        return {}
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}:{n}: not valid JSON; fix or delete that line") from None
            warnings.warn(f"{path}:{n}: dropped a row cut off mid-write (the run was stopped); it is generated again",
                          stacklevel=2)
    if text and not text.endswith("\n"):
        # A stop between a row and its newline leaves a line the next append would run into,
        # so the file is rewritten whole-line before anything is appended.
        _rewrite(path, rows)
    for r in rows:
        i = r["prompt_index"]
        if i < len(prompts) and r["prompt"] != prompt_of(prompts[i]):
            raise ValueError(f"{path}: prompt {i} differs from the prompt file's; use a new `--out` for new prompts")
    return {_key(r["lam"], r["prompt_index"], r["sample"]): r for r in rows}


def _append_rows(path: Path, rows: list[dict]) -> None:
    """Each row as one write of its whole line, flushed: a stop mid-run tears at most the last line."""
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            f.flush()


def _rewrite(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def summarize(rows: list[dict], points: list, names: list[str], per_point: dict | None = None) -> list[dict]:
    """One dict per point: {"lam", "n" (rows; pairs when nothing was generated), "<m>_mean", "<m>_sem" (standard error: sample
    std / √n), "<m>_n"} for every metric; None values are left out. `per_point[m][label]` gives
    the values of metrics not stored in rows (pairwise accuracy: one per pair)."""
    per_point = per_point or {}
    summary = []
    for p in points:
        mine = [r for r in rows if lam_label(r["lam"]) == lam_label(p)]
        # n counts what was scored at this λ: its rows, or without generation the pairs scored.
        n = len(mine) or max((len(per_point[m][lam_label(p)]) for m in per_point), default=0)
        entry = {"lam": _jsonable(p), "n": n}
        for m in names:
            values = per_point[m][lam_label(p)] if m in per_point else [r.get(m) for r in mine]
            values = [v for v in values if v is not None]
            mean = statistics.fmean(values) if values else None
            sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
            entry.update({f"{m}_mean": mean, f"{m}_sem": sem, f"{m}_n": len(values)})
        summary.append(entry)
    return summary


def select_lam(summary: list[dict], metric: str, max_kl: float | None = None) -> dict:
    """The point with the highest mean `metric`, among those with mean KL ≤ `max_kl` when given;
    returns {"lam", "metric", "value", "sem", "reason"}. Raises when no point qualifies."""
    if metric == "kl":
        raise ValueError("KL is a constraint (`--max-kl`), not something to maximise; select another metric")
    if not summary or f"{metric}_mean" not in summary[0]:
        raise ValueError(f"`--select {metric}` was not measured; add `--metric {metric}…` (measured: "
                         f"{', '.join(k[:-5] for k in (summary[0] if summary else {}) if k.endswith('_mean'))})")
    if max_kl is not None and "kl_mean" not in summary[0]:
        raise ValueError("`--max-kl` needs the KL metric; add `--metric kl`")
    measured = [e for e in summary if e[f"{metric}_mean"] is not None]
    allowed = [e for e in measured if max_kl is None or (e["kl_mean"] is not None and e["kl_mean"] <= max_kl)]
    if not allowed:
        closest = min((e for e in measured if e["kl_mean"] is not None), key=lambda e: e["kl_mean"], default=None)
        hint = f" (smallest: KL {closest['kl_mean']:.3g} at λ={lam_label(closest['lam'])})" if closest else ""
        raise ValueError(f"no λ has {metric} measured and KL ≤ {max_kl}{hint}; raise `--max-kl` or sweep smaller λ")
    ranked = sorted(allowed, key=lambda e: e[f"{metric}_mean"], reverse=True)
    best = ranked[0]
    reason = (f"λ={lam_label(best['lam'])} has the highest mean {metric}, {_pm(best, metric)}, "
              f"among {len(allowed)} of {len(summary)} λ")
    if max_kl is not None:
        excluded = [e for e in measured if e not in allowed]
        reason += f" with KL ≤ {max_kl:g}"
        if excluded:
            reason += " (over it: " + ", ".join(f"λ={lam_label(e['lam'])} KL {e['kl_mean']:.3g}" for e in excluded) + ")"
    if len(ranked) > 1:
        second = ranked[1]
        gap = best[f"{metric}_mean"] - second[f"{metric}_mean"]
        within = best[f"{metric}_sem"] is not None and gap <= best[f"{metric}_sem"]
        reason += (f"; runner-up λ={lam_label(second['lam'])} at {_pm(second, metric)}"
                   + (", within one standard error" if within else ""))
    return {"lam": best["lam"], "metric": metric, "value": best[f"{metric}_mean"], "sem": best[f"{metric}_sem"],
            "reason": reason + "."}


def _pm(entry: dict, metric: str) -> str:
    mean, sem, n = entry[f"{metric}_mean"], entry[f"{metric}_sem"], entry[f"{metric}_n"]
    return f"{mean:.4g}" + (f" ± {sem:.2g}" if sem is not None else "") + f" (n={n})"


def _floats(text: str, flag: str) -> list[float]:
    return [check_lam(x.strip(), flag) for x in text.split(",") if x.strip()]


def config_from_args(args) -> SweepConfig:
    """The `aligndial sweep` flags as a SweepConfig, every flag checked before a model loads."""
    if bool(args.select) != bool(args.on):
        raise ValueError("`--select METRIC` and `--on VALIDATION.jsonl` go together; give both")
    if args.max_kl is not None and not args.select:
        raise ValueError("`--max-kl` constrains `--select`; add `--select METRIC --on VALIDATION.jsonl`")
    schedules = []
    for text in args.lam_schedule or []:
        pair = _floats(text, "--lam-schedule")
        if len(pair) != 2:
            raise ValueError(f"`--lam-schedule {text}` needs two λ: first turn, later turns (e.g. 1.0,0.3)")
        schedules.append(tuple(pair))
    config = SweepConfig(
        lams=_floats(args.lams, "--lams") if args.lams else [], lam_schedules=schedules, think_lam=args.think_lam,
        metrics=args.metric or ["length"], samples=args.samples, max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        chat=args.chat, batch_size=args.batch_size, judge_baseline_lam=args.judge_baseline_lam,
        judge_model=args.judge_model,
        model_id=" ".join(f"{k}={getattr(args, k)}" for k in ("ref", "aligned", "model", "adapter") if getattr(args, k)),
    )
    if args.prompts is None and any(not m.startswith("pairwise-accuracy:") for m in config.metrics):
        raise ValueError(f"metrics other than pairwise-accuracy score generated responses; add `--prompts F.jsonl` "
                         f"(metrics: {', '.join(config.metrics)})")
    for flag, path in (("--prompts", args.prompts), ("--on", args.on)):
        if path is not None:
            check_file(flag, path)
            check_prompts([prompt_of(r) for r in load_prompts(path)], config.chat, path)
    for spec in config.metrics:
        check_metric(spec, config.chat)
    return config


def main(args, config: SweepConfig, model, tokenizer) -> int:
    """`aligndial sweep`: the sweep on `--prompts`, then with `--select` a sweep on `--on` and the
    choice of λ. Prints the summary table (or JSON with `--json`)."""
    prompts = load_prompts(args.prompts) if args.prompts else []
    validation = load_prompts(args.on) if args.on else None
    _, summary = sweep(model, tokenizer, prompts, config, out=args.out)
    result = {"summary": summary}
    if validation is not None:
        _, val_summary = sweep(model, tokenizer, validation, config, out=Path(args.out) / "validation")
        result["selection"] = select_lam(val_summary, args.select, args.max_kl)
        (Path(args.out) / "selection.json").write_text(json.dumps(result["selection"], indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_table(summary))
    print(f"\nwrote {args.out}/rows.jsonl, summary.csv and plots")
    if "selection" in result:
        print(f"selected on {args.on}: {result['selection']['reason']}")
    return 0
