"""Reproduce the papers' claims on the demo task; writes docs/reproduction.md and its plots.

    python -m aligndial.demo.reproduce                         # from scratch, one thread (time: docs/benchmarks.md)
    python -m aligndial.demo.reproduce --work /tmp/repro       # keep the extra models; a rerun skips them
    python -m aligndial.demo.reproduce --docs docs --problems 192

It starts from the bundled models (`aligndial demo build --seed 0`) and trains only what a claim
needs, with the same stage functions as the build, into `--work`:

(a) DeRa Fig. 2: pure DPO at β, β/0.5 and β/2; DeRa on (ref, DPO@β) at λ against the retrained model.
(b) CLM Table 1: adapter-only DPO against full DPO (the bundled aligned model), at λ=1.
(c) DeRa and InRa interpolation (0<λ<1) and extrapolation (λ>1, λ<0) on the bundled models.
(d) FR Table 1: TrRa students at several λ and TrRa-iter: tokens against accuracy.
(e) CLM Table 6: DPO of the bottom 1 or 2 layers only against the top 1 or 2 layers only.
(f) CLM Table 4: a different λ on the second turn of a two-turn conversation.

Every number is measured by `aligndial.demo.measure` on held-out problems (one sample per
problem from π_λ, temperature 1, the same seed at every λ). Verdicts are computed from the
numbers by the rules stated next to them, so the text cannot drift from the tables.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import date
from pathlib import Path

from aligndial.demo import task
from aligndial.demo.build import (BUNDLE, FULL, check_bundle, make_data, quiet_single_thread, set_fields, train_aligned,
                                  train_trra)
from aligndial.demo.measure import METRICS, measure, second_turn_accuracy, sweep

SEED = 0
SWEEP_LAMS = [-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
RETRAIN_LAMS = [0.5, 1.0, 2.0]  # DPO retrained at β/λ
TRRA_LAMS = [0.5, 1.0, 1.5, 2.0]
SCHEDULES = [(1.0, 1.0), (1.0, 0.5), (1.0, 0.0), (0.0, 0.0), (0.0, 1.0), (2.0, 2.0), (2.0, 0.0)]


def trained(out: Path, train) -> str:
    """Run `train()` unless `out` already holds a finished run (it has training_summary.json), and
    record how long training took in that summary, so a rerun that reuses the model reports it too."""
    summary = out / "training_summary.json"
    if not summary.is_file():
        started = time.perf_counter()
        train()
        set_fields(summary, seconds=round(time.perf_counter() - started, 1))
    return str(out)


def summary_of(path: str) -> dict:
    return json.loads((Path(path) / "training_summary.json").read_text())


def pair_of(ref_dir: str, model_dir: str):
    from aligndial.pair import RealignedPair

    return RealignedPair.from_pretrained(ref_dir, model_dir)


def dual_of(ref_dir: str, adapter_dir: str):
    from aligndial.dualpath import DualPathModel
    from aligndial.loading import load_causal_lm

    return DualPathModel.from_adapter(load_causal_lm(ref_dir), adapter_dir)


def alone(model, tok, problems) -> dict:
    """The metrics of the second member of a pair run alone (λ=1 is its fast path)."""
    return {k: v for k, v in measure(model, tok, problems, 1.0, SEED).items() if k in METRICS}


def table(rows: list[dict], first: list[str]) -> str:
    """A markdown table: the `first` columns as they are, then the metric columns present in the rows."""
    metrics = [c for c in METRICS if c in rows[0]]
    out = ["| " + " | ".join(first + metrics) + " |", "|" + "---|" * (len(first) + len(metrics))]
    for r in rows:
        cells = [f"{r[c]:g}" if isinstance(r[c], float) else str(r[c]) for c in first]
        cells += [f"{r[c]:.1f}" if c == "tokens" else f"{r[c]:.2f}" for c in metrics]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def monotone(values: list[float], slack: float = 0.0) -> bool:
    return all(b >= a - slack for a, b in zip(values, values[1:]))


# --- (a) DeRa against DPO retrained at β/λ -------------------------------------------------------

def section_a(ref: str, data: dict, work: Path, tok, problems) -> list[dict]:
    beta = FULL.dpo_beta
    runs = {lam: trained(work / f"dpo-pure-beta{beta / lam:g}", lambda lam=lam: train_aligned(
        ref, data["prefs"], work / f"dpo-pure-beta{beta / lam:g}", FULL, SEED, beta=beta / lam, nll=False))
        for lam in RETRAIN_LAMS}
    dera = pair_of(ref, runs[1.0])
    rows = []
    for lam in RETRAIN_LAMS:
        d = {k: v for k, v in measure(dera, tok, problems, lam, SEED).items() if k in METRICS}
        r = alone(pair_of(ref, runs[lam]), tok, problems)
        rows.append({"λ": lam, "model": f"DeRa λ={lam:g} on DPO β={beta:g}", **d})
        rows.append({"λ": lam, "model": f"DPO retrained at β/λ={beta / lam:g}", **r})
    return rows


# --- (b) adapter-only DPO against full DPO, at λ=1 -------------------------------------------------

def section_b(ref: str, data: dict, work: Path, tok, problems) -> list[dict]:
    adapter = trained(work / "dpo-adapter", lambda: train_aligned(ref, data["prefs"], work / "dpo-adapter", FULL, SEED,
                                                                  layers="adapter"))
    rows = []
    for name, model, path in (
        ("full DPO (bundled `aligned`)", pair_of(ref, str(BUNDLE / "aligned")), BUNDLE / "aligned"),
        ("adapter-only DPO", dual_of(ref, adapter), Path(adapter)),
        ("adapter-only SFT (bundled `adapter`)", dual_of(ref, str(BUNDLE / "adapter")), BUNDLE / "adapter"),
    ):
        s = summary_of(str(path))
        rows.append({"model": name, "trainable params": f"{s['trainable_params']:,}",
                     **{k: v for k, v in measure(model, tok, problems, 1.0, SEED).items() if k in METRICS}})
    return rows


# --- (c) interpolation and extrapolation -----------------------------------------------------------

def section_c(ref: str, tok, problems) -> dict[str, list[dict]]:
    return {
        "DeRa": sweep(pair_of(ref, str(BUNDLE / "aligned")), tok, problems, SWEEP_LAMS, SEED),
        "InRa": sweep(dual_of(ref, str(BUNDLE / "adapter")), tok, problems, SWEEP_LAMS, SEED),
    }


# --- (d) TrRa and TrRa-iter ------------------------------------------------------------------------

def section_d(ref: str, data: dict, work: Path, tok, problems) -> list[dict]:
    aligned = str(BUNDLE / "aligned")
    students = {}
    for lam in TRRA_LAMS:  # the bundled student is the one at FULL.trra_lam
        out = work / f"trra-{lam:g}"
        students[f"TrRa λ={lam:g}"] = str(BUNDLE / "trra") if lam == FULL.trra_lam else trained(
            out, lambda out=out, lam=lam: train_trra(ref, aligned, data["distill"], out, FULL, SEED, lam=lam))
    students["TrRa-iter (λ=2, 2 rounds)"] = trained(work / "trra-iter", lambda: train_trra(
        ref, aligned, data["distill"], work / "trra-iter", FULL, SEED, lam=2.0, iterations=2))
    rows = [{"model": "reference (λ=0)", **alone(pair_of(ref, ref), tok, problems)},
            {"model": "aligned (λ=1)", **alone(pair_of(ref, aligned), tok, problems)}]
    rows += [{"model": name, **alone(pair_of(ref, path), tok, problems)} for name, path in students.items()]
    return rows


# --- (e) bottom-k against top-k ---------------------------------------------------------------------

def section_e(ref: str, data: dict, work: Path, tok, problems) -> list[dict]:
    rows = []
    for layers in ("bottom:1", "top:1", "bottom:2", "top:2"):
        out = work / f"dpo-{layers.replace(':', '')}"
        path = trained(out, lambda out=out, layers=layers: train_aligned(ref, data["prefs"], out, FULL, SEED, layers=layers))
        rows.append({"layers trained": layers, "trainable params": f"{summary_of(path)['trainable_params']:,}",
                     **alone(pair_of(ref, path), tok, problems)})
    aligned = str(BUNDLE / "aligned")
    rows.append({"layers trained": "all (bundled `aligned`)", "trainable params": f"{summary_of(aligned)['trainable_params']:,}",
                 **alone(pair_of(ref, aligned), tok, problems)})
    return rows


# --- (f) per-turn λ ---------------------------------------------------------------------------------

def section_f(ref: str, tok, problems) -> list[dict]:
    rng = random.Random(f"follow-ups-{SEED}")
    follow_ups = [task.follow_up(p, rng) for p in problems]
    dera = pair_of(ref, str(BUNDLE / "aligned"))
    return [second_turn_accuracy(dera, tok, problems, follow_ups, a, b, SEED) for a, b in SCHEDULES]


# --- plots and the report ---------------------------------------------------------------------------

def plot_a(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, key, label in zip(axes, ("careful", "tokens", "accuracy"), ("step-by-step share", "tokens per reply", "accuracy")):
        for kind, marker in (("DeRa", "s"), ("DPO retrained", "^")):
            pts = [r for r in rows if r["model"].startswith(kind)]
            name = kind + (" on DPO β" if kind == "DeRa" else " at β/λ")
            ax.plot([r["λ"] for r in pts], [r[key] for r in pts], marker + "-", label=name)
        ax.set_xlabel("λ")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("(a) DeRa at λ against DPO retrained at β/λ (pure DPO, β=0.5)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_c(sweeps: dict[str, list[dict]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    for ax, key, label in zip(axes, ("careful", "accuracy", "tokens", "kl"),
                              ("step-by-step share", "accuracy", "tokens per reply", "KL to ref (nats)")):
        for method, style in (("DeRa", "o-"), ("InRa", "s--")):
            ax.plot([r["lam"] for r in sweeps[method]], [r[key] for r in sweeps[method]], style, label=method)
        for x in (0, 1):
            ax.axvline(x, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("λ")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("(c) interpolation (0<λ<1) and extrapolation (λ<0, λ>1) on the bundled models")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_d(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["tokens"], r["accuracy"], s=40)
        ax.annotate(r["model"], (r["tokens"], r["accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.margins(x=0.2)  # room for the labels
    ax.set_xlabel("tokens per reply")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.set_title("(d) TrRa and TrRa-iter: tokens against accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- verdicts: each a rule stated in the report, applied to the numbers -----------------------------

def verdict_a(rows: list[dict]) -> str:
    lines = []
    for lam in RETRAIN_LAMS:
        if lam == 1.0:
            continue
        d, r = [x for x in rows if x["λ"] == lam]
        close = (abs(d["careful"] - r["careful"]) <= 0.10 and abs(d["p_careful"] - r["p_careful"]) <= 0.10
                 and abs(d["accuracy"] - r["accuracy"]) <= 0.10 and abs(d["tokens"] - r["tokens"]) <= 0.15 * r["tokens"])
        lines.append(f"- λ={lam:g}: DeRa against retrained: step-by-step share {d['careful']:.2f} vs {r['careful']:.2f}, "
                     f"P(step by step) {d['p_careful']:.2f} vs {r['p_careful']:.2f}, tokens {d['tokens']:.1f} vs "
                     f"{r['tokens']:.1f}, accuracy {d['accuracy']:.2f} vs {r['accuracy']:.2f}, KL {d['kl']:.2f} vs "
                     f"{r['kl']:.2f}: **{'holds' if close else 'does not hold'}** at this scale.")
    return "\n".join(lines) + ("\n\n(Rule: shares, P(step by step) and accuracy within 0.10, tokens within 15%.)")


def verdict_b(rows: list[dict]) -> str:
    full, adapter = rows[0], rows[1]
    close = abs(full["careful"] - adapter["careful"]) <= 0.10 and abs(full["accuracy"] - adapter["accuracy"]) <= 0.05
    return (f"Adapter-only DPO reaches a step-by-step share of {adapter['careful']:.2f} against {full['careful']:.2f} for "
            f"full DPO, and accuracy {adapter['accuracy']:.2f} against {full['accuracy']:.2f}, training "
            f"{adapter['trainable params']} instead of {full['trainable params']} parameters: "
            f"**{'holds' if close else 'does not hold'}** at this scale (rule: share within 0.10 and accuracy within 0.05).")


def verdict_c(sweeps: dict[str, list[dict]]) -> str:
    lines = []
    for method, all_rows in sweeps.items():
        rows = [r for r in all_rows if r["lam"] <= 2]
        checks = {
            "P(step by step) rises with λ": monotone([r["p_careful"] for r in rows], slack=0.02),
            "sampled step-by-step share rises": monotone([r["careful"] for r in rows], slack=0.03),
            "tokens rise": monotone([r["tokens"] for r in rows], slack=0.5),
            "accuracy rises": monotone([r["accuracy"] for r in rows], slack=0.03),
        }
        at = {r["lam"]: r for r in all_rows}
        lines.append(f"- {method}: " + "; ".join(f"{k}: **{'yes' if v else 'no'}**" for k, v in checks.items())
                     + f". From λ=0 to λ=2 the share goes {at[0.0]['careful']:.2f} → {at[2.0]['careful']:.2f} and accuracy "
                     f"{at[0.0]['accuracy']:.2f} → {at[2.0]['accuracy']:.2f}; at λ=-1 they are {at[-1.0]['careful']:.2f} and "
                     f"{at[-1.0]['accuracy']:.2f}; at λ=3, {at[3.0]['careful']:.2f} and {at[3.0]['accuracy']:.2f}.")
    return "\n".join(lines) + ("\n\n(Rules: non-decreasing over λ from -1 to 2, with a slack of 0.02 for P(step by step), "
                              "and of 0.03 for shares and 0.5 for tokens, which are sampled. λ=3 is outside the claim: it "
                              "shows where extrapolation stops working at this scale.)")


def verdict_d(rows: list[dict]) -> str:
    at = {r["model"]: r for r in rows}
    students = [at[f"TrRa λ={lam:g}"] for lam in TRRA_LAMS]
    it, two = at["TrRa-iter (λ=2, 2 rounds)"], at["TrRa λ=2"]
    controls = monotone([s["tokens"] for s in students], slack=0.5)
    tokens = " → ".join(f"{s['tokens']:.1f}" for s in students)
    lams = ", ".join(f"{x:g}" for x in TRRA_LAMS)
    return (f"- λ sets the students' length: tokens {tokens} for λ = {lams}: "
            f"**{'holds' if controls else 'does not hold'}** (rule: non-decreasing, slack 0.5).\n"
            f"- TrRa-iter amplifies the pattern beyond λ=2: tokens {it['tokens']:.1f} vs {two['tokens']:.1f}, "
            f"step-by-step share {it['careful']:.2f} vs {two['careful']:.2f}: "
            f"**{'holds' if it['tokens'] > two['tokens'] else 'does not hold'}**.\n"
            f"- FR finds that iterating costs correctness. Here the second round's teacher mixes the reference with "
            f"the λ=2 student at λ=2, about π_ref^-3·π_aligned^4 (DeRa at λ≈4, past where extrapolation works in "
            f"(c)), and the student degrades: accuracy {it['accuracy']:.2f} vs {two['accuracy']:.2f} at λ=2, "
            f"KL to the reference {it['kl']:.2f} vs {two['kl']:.2f}.")


def verdict_e(rows: list[dict]) -> str:
    at = {r["layers trained"]: r for r in rows}
    lines = []
    for k in ("1", "2"):
        b, t = at[f"bottom:{k}"], at[f"top:{k}"]
        lines.append(f"- {k} layer(s): bottom against top: P(step by step) {b['p_careful']:.2f} vs {t['p_careful']:.2f}, "
                     f"step-by-step share {b['careful']:.2f} vs {t['careful']:.2f}, KL {b['kl']:.2f} vs {t['kl']:.2f}, "
                     f"accuracy {b['accuracy']:.2f} vs {t['accuracy']:.2f}: "
                     f"**{'holds' if b['p_careful'] > t['p_careful'] + 0.03 else 'does not hold'}**.")
    return "\n".join(lines) + "\n\n(Rule: bottom's P(step by step), which has no sampling noise, above top's by more than 0.03.)"


def verdict_f(rows: list[dict]) -> str:
    at = {(r["first_lam"], r["later_lam"]): r for r in rows}
    same, lowered = at[(1.0, 1.0)], max((at[(1.0, 0.5)], at[(1.0, 0.0)]), key=lambda r: r["turn2_accuracy"])
    helps = lowered["turn2_accuracy"] > same["turn2_accuracy"] + 0.03
    return (f"Second-turn accuracy with λ=1 on both turns: {same['turn2_accuracy']:.2f}; with λ lowered to "
            f"{lowered['later_lam']:g} on the second turn: {lowered['turn2_accuracy']:.2f}: "
            f"**{'holds' if helps else 'does not hold'}** at this scale (rule: better by more than 0.03).")


# --- the report -------------------------------------------------------------------------------------

def write_report(r: dict, docs: Path) -> Path:
    sweeps = r["c"]
    sweep_rows = [{"method": m, "λ": row["lam"], **{k: row[k] for k in METRICS}} for m, rows in sweeps.items() for row in rows]
    cfg, params = r["config"], r["ref_params"]
    schedule_rows = [{"λ turn 1": x["first_lam"], "λ turn 2": x["later_lam"],
                      "turn-1 accuracy": f"{x['turn1_accuracy']:.2f}", "turn-2 accuracy": f"{x['turn2_accuracy']:.2f}",
                      "turn-2 tokens": f"{x['turn2_tokens']:.1f}"} for x in r["f"]]
    text = f"""# Reproduction of the papers' claims on the demo task

Produced by

```bash
python -m aligndial.demo.reproduce --work {r['work']} --docs {r['docs']} --problems {r['problems']}  # needs: time (trains 12 models: docs/benchmarks.md)
```

on {r['date']}, on 2 CPU cores shared with other work, from the bundled models
(`{r['build']}`; see `src/aligndial/demo/models/manifest.json`) plus the extra models each section
trains into `--work` with the same stage functions (`aligndial.demo.build`). Training those
{r['n_trained']} models took {r['train_minutes']:.0f} minutes (one thread; times recorded when each was trained, and
a rerun reuses them); the run that wrote this file took {r['minutes']:.0f} minutes in all, including any
training it did. Plots are next to this file.

**Task** (`aligndial.demo.task`): arithmetic word problems with one to three operations, answered
directly ("The answer is 14.") or step by step ("Step 1: 12 + 5 = 17. Step 2: 17 - 3 = 14. The
answer is 14."). The reference (SFT) model mixes both styles; careful replies cost tokens and, for
a model this small, buy accuracy. Preferences favour the careful reply with probability 0.8
(a finite Bradley-Terry reward gap, so the DPO optimum is finite).

**Measurement** (`aligndial.demo.measure`): {r['problems']} held-out problems, one reply each sampled
from the policy at temperature 1, the same seed at every λ. accuracy = the final "The answer is N."
is right; careful = share of step-by-step replies; p_careful = the policy's probability of starting a
step-by-step reply (exact, no sampling noise); tokens = reply length; kl = Σ_t KL(π ‖ π_ref) over the
sampled reply, in nats. With {r['problems']} problems, a share has a standard error of about
{(0.25 / r['problems']) ** 0.5:.2f}.

Models: a Llama with {cfg['layers']} layers, hidden size {cfg['hidden']} ({params / 1e6:.2f} M parameters),
byte-level BPE with {cfg['vocab_size']} tokens. `aligned` is full DPO (β={cfg['dpo_beta']:g}) with an NLL term on
the chosen reply; `adapter` is a one-layer adapter trained alone by SFT on the chosen replies;
`trra` is a student distilled at λ={cfg['trra_lam']:g}.

## (a) DeRa at λ against DPO retrained at β/λ (DeRa Fig. 2)

Claim: sampling from softmax(λ·h_aligned + (1−λ)·h_ref) approximates the model retrained with KL
strength β/λ. Here with pure DPO (no NLL term), β=0.5: DeRa on (ref, DPO@0.5) at λ against DPO
retrained at 0.5/λ. λ=1 is the same model on both sides.

{table(r['a'], ['λ', 'model'])}

{verdict_a(r['a'])}

![DeRa against retrained DPO](reproduction-a.png)

Why the bundled `aligned` model adds an NLL term to DPO: in pure DPO the first-token gradients of
the chosen and the rejected reply cancel on every other token of the vocabulary, so nothing holds
down tokens that neither reply starts with, and the aligned model gives them a little more
probability than the reference does. Extrapolating squares that ratio: at λ=2 such tokens take
mass from "Step" (P(step by step) falls to the value above). With the NLL term (section c) DeRa at
λ=2 stays on the task.

## (b) Adapter-only DPO against full DPO at λ=1 (CLM Table 1)

Claim: training one inserted identity layer with DPO (everything else frozen) matches full DPO.
Both use DPO with the NLL term, β=0.5, the same data and steps; λ=1 is the aligned side alone.

{table(r['b'], ['model', 'trainable params'])}

{verdict_b(r['b'])}

## (c) Interpolation (0<λ<1) and extrapolation (λ>1, λ<0)

Claim (DeRa §4, CLM §5.2, FR §4.2): λ moves the behaviour smoothly between the reference and the
aligned model, and beyond it on both sides. Bundled models; DeRa = (ref, aligned) pair, InRa = ref
with its layer adapter in one batched forward.

{table(sweep_rows, ['method', 'λ'])}

{verdict_c(sweeps)}

![interpolation and extrapolation](reproduction-c.png)

## (d) TrRa and TrRa-iter: tokens against accuracy (FR Table 1)

Claim: a student distilled toward π_λ inherits λ's behaviour (FR: λ>1 shortens reasoning); iterating
(TrRa-iter, the next round's aligned model is this round's student) amplifies it further. Here the
aligned direction is *longer*, careful reasoning, so λ>1 should lengthen replies. Full students
initialised from the reference, off-policy on sequences in both styles.

{table(r['d'], ['model'])}

{verdict_d(r['d'])}

![TrRa tokens against accuracy](reproduction-d.png)

## (e) Bottom layers against top layers (CLM Table 6)

Claim: preference learning applied to the bottom layers aligns the model far more than the same
training on the top layers. DPO with the NLL term, β=0.5, only the named decoder layers trainable,
each model run alone (λ=1).

{table(r['e'], ['layers trained', 'trainable params'])}

{verdict_e(r['e'])}

## (f) Per-turn λ (CLM Table 4)

Claim: lowering λ on the second turn of a dialogue helps the model follow the context. Here the
second question builds on the first answer ("Then he buys 3 more. How many pens now?"); the first
reply is sampled at the first λ and fed back; the second reply is sampled at the second λ and is
right when it equals the true running total. DeRa pair (ref, aligned).

{table(schedule_rows, ['λ turn 1', 'λ turn 2', 'turn-1 accuracy', 'turn-2 accuracy', 'turn-2 tokens'])}

{verdict_f(r['f'])}

## Not covered

- Win rates and judged quality (AlpacaEval, MT-Bench, Arena-Hard): the demo's metrics are the ones a
  program can compute on this task.
- Scale: every claim above is tested on a {params / 1e6:.2f} M-parameter model and a synthetic task, one seed.
"""
    path = docs / "reproduction.md"
    path.write_text(text)
    return path


def run(work: Path, docs: Path, n_problems: int) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from aligndial.loading import load_tokenizer

    started = time.perf_counter()
    manifest = check_bundle(BUNDLE)
    work.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    data = {name: str(work / f"{name}.jsonl") for name in ("sft", "prefs", "chosen", "distill")}
    if not all(Path(p).is_file() for p in data.values()):
        data = make_data(work, FULL, SEED)
    ref = str(BUNDLE / "ref")
    tok = load_tokenizer(ref)
    problems = task.problems(n_problems, SEED, "eval")
    r = {"work": str(work), "docs": str(docs), "problems": n_problems, "build": manifest["command"],
         "config": manifest["config"], "ref_params": summary_of(ref)["total_params"], "date": date.today().isoformat()}
    steps = [
        ("a", lambda: section_a(ref, data, work, tok, problems)),
        ("b", lambda: section_b(ref, data, work, tok, problems)),
        ("c", lambda: section_c(ref, tok, problems)),
        ("d", lambda: section_d(ref, data, work, tok, problems)),
        ("e", lambda: section_e(ref, data, work, tok, problems)),
        ("f", lambda: section_f(ref, tok, problems)),
    ]
    for name, step in steps:
        t = time.perf_counter()
        r[name] = step()
        print(f"[reproduce] ({name}) done in {time.perf_counter() - t:.0f} s", flush=True)
    plot_a(r["a"], docs / "reproduction-a.png")
    plot_c(r["c"], docs / "reproduction-c.png")
    plot_d(r["d"], docs / "reproduction-d.png")
    extra = [summary_of(str(p)) for p in work.iterdir() if (p / "training_summary.json").is_file()]
    r["n_trained"], r["train_minutes"] = len(extra), sum(x.get("seconds", 0) for x in extra) / 60
    r["minutes"] = (time.perf_counter() - started) / 60
    (work / "results.json").write_text(json.dumps(r, indent=2, default=str))
    print(f"[reproduce] wrote {write_report(r, docs)}")
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aligndial.demo.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/aligndial-reproduce", help="where the extra models go (reused)")
    parser.add_argument("--docs", default="docs", help="where reproduction.md and its plots go")
    parser.add_argument("--problems", type=int, default=192, help="held-out problems per measurement")
    args = parser.parse_args(argv)
    with quiet_single_thread():
        run(Path(args.work), Path(args.docs), args.problems)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
