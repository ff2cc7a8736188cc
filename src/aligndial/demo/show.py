"""`aligndial demo`: alignment strength as a dial, on the bundled tiny models, with no training.

    aligndial demo                       # table, replies side by side, aligndial-demo.png
    aligndial demo --json                # the same numbers as one JSON object
    aligndial demo --models DIR          # a bundle built with `aligndial demo build --out DIR`

The task (`aligndial.demo.task`): arithmetic word problems, answered directly or step by step.
The reference model mixes both styles; the aligned model (DPO) and the adapter prefer careful,
step-by-step replies, which cost tokens and buy accuracy. For each λ the demo samples one reply
per held-out problem from π_λ and reports what a program can check:

- DeRa: the pair (ref, aligned), logits mixed per token (DeRa Eq. 9);
- InRa: ref with its layer adapter, both paths in one batched forward (CLM / FR §3.2);
- TrRa: a single student distilled from DeRa at a fixed λ, run alone (FR §3.1);
- Steering (weak-to-strong, proxy-tuning / EFT): the bundle's larger reference steered by the
  small pair, logits = h_large + λ·(h_aligned − h_ref), i.e. the pair (large, [aligned, ref]) at
  weights (λ, −λ). λ=0 is the large model alone, and its KL is to the large model.

λ=0 is the reference, λ=1 the aligned model, λ=2 extrapolates past it and λ<0 goes the other way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aligndial.demo import task
from aligndial.demo.build import BUNDLE, check_bundle, quiet_single_thread
from aligndial.demo.measure import measure

LAMS = [-1.0, 0.0, 0.5, 1.0, 1.5, 2.0]
EXAMPLE_LAMS = [-1.0, 0.0, 1.0, 2.0]
STEER_LAMS = [0.0, 0.5, 1.0, 2.0]
N_PROBLEMS = 96  # held-out problems, 32 each with 1, 2 and 3 operations
SEED = 0


def steering_weights(lam: float) -> list[float]:
    """The weights (λ, −λ) of the pair (large, [aligned, ref]): h_large + λ·(h_aligned − h_ref)."""
    return [float(lam), -float(lam)] if lam else [0.0, 0.0]


def load_bundle(root: Path) -> dict:
    """The bundled models as λ-mixed models: {"manifest", "tokenizer", "DeRa", "InRa", "TrRa"},
    and "Steering" when the bundle has the `large` stage (bundles built before it do not)."""
    from aligndial.dualpath import DualPathModel
    from aligndial.loading import load_causal_lm
    from aligndial.pair import RealignedPair

    manifest = check_bundle(root)
    dera = RealignedPair.from_pretrained(str(root / "ref"), str(root / "aligned"))
    inra = DualPathModel.from_adapter(load_causal_lm(str(root / "ref")), str(root / "adapter"))
    # The student alone is the pair (ref, student) at λ=1; λ=0 of the same pair gives its KL to ref.
    trra = RealignedPair(dera.ref, [load_causal_lm(str(root / "trra"))], tokenizer=dera.tokenizer).eval()
    models = {"manifest": manifest, "tokenizer": dera.tokenizer, "DeRa": dera, "InRa": inra, "TrRa": trra}
    if "large/config.json" in manifest["files"]:
        # from_pretrained checks that the three models share one tokenizer, as steering needs.
        models["Steering"] = RealignedPair.from_pretrained(str(root / "large"), [str(root / "aligned"), str(root / "ref")])
    return models


def stage(desc: str, total: int):
    """One progress bar per stage on stderr (stdout carries the report or the JSON)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"[demo] {desc}", unit="step", file=sys.stderr, leave=True, dynamic_ncols=True)


def run(root: Path = BUNDLE, plot: str | None = "aligndial-demo.png", n_problems: int = N_PROBLEMS) -> dict:
    """Sweep λ for DeRa and InRa, measure the TrRa student, steer the large reference, greedy
    replies side by side, the plot. Each stage shows a progress bar on stderr."""
    with stage("loading the bundled models", 1) as bar:
        models = load_bundle(Path(root))
        bar.update()
    tok = models["tokenizer"]
    problems = task.problems(n_problems, SEED, "eval")
    trra_lam = models["manifest"]["config"]["trra_lam"]
    result = {"models": str(root), "build": models["manifest"]["command"], "problems": len(problems), "seed": SEED,
              "sweep": [], "trra": None, "steering": None, "examples": []}
    for method in ("DeRa", "InRa"):
        with stage(f"{method}: {len(problems)} problems at each λ", len(LAMS)) as bar:
            for lam in LAMS:
                row = measure(models[method], tok, problems, lam, SEED)
                result["sweep"].append({"method": method, **{k: v for k, v in row.items() if k != "replies"}})
                bar.update()
    with stage("TrRa student", 1) as bar:
        result["trra"] = {"distilled_at": trra_lam, **{k: v for k, v in measure(models["TrRa"], tok, problems, 1.0, SEED).items()
                                                        if k not in ("replies", "lam")}}
        bar.update()
    if "Steering" in models:
        result["steering"] = {**sizes(models["manifest"]), "rows": []}
        with stage(f"Steering: large ref + λ·(aligned − ref), {len(problems)} problems at each λ", len(STEER_LAMS)) as bar:
            result["steering"]["rows"] = steering_rows(models["Steering"], tok, problems, bar.update)
    shown = [next(p for p in problems if len(p.steps) == ops) for ops in (1, 2, 3)]
    with stage("greedy replies side by side", 2 * len(EXAMPLE_LAMS)) as bar:
        for method in ("DeRa", "InRa"):
            for lam in EXAMPLE_LAMS:
                replies = measure(models[method], tok, shown, lam, greedy=True)["replies"]
                for p, text in zip(shown, replies):
                    result["examples"].append({"method": method, "lam": lam, "prompt": p.prompt, "answer": p.answer,
                                               "reply": text, **task.score(text, p.answer)})
                bar.update()
    if plot:
        result["plot"] = write_plot(result, plot)
    return result


def steering_rows(pair, tokenizer, problems: list, step=lambda: None) -> list[dict]:
    """The metrics of the pair (large, [aligned, ref]) at each λ of `STEER_LAMS`, weights (λ, −λ)."""
    rows = []
    for lam in STEER_LAMS:
        row = measure(pair, tokenizer, problems, steering_weights(lam), SEED)
        rows.append({"lam": lam, "weights": row.pop("lam"), **{k: v for k, v in row.items() if k != "replies"}})
        step()
    return rows


def sizes(manifest: dict) -> dict:
    cfg = manifest["config"]
    return {"large": f"hidden {cfg['large_hidden']}, {cfg['large_layers']} layers",
            "small": f"hidden {cfg['hidden']}, {cfg['layers']} layers"}


def format_table(result: dict) -> str:
    head = f"{'method':<7}{'λ':>6}  {'accuracy':>8}  {'careful':>7}  {'p(careful)':>10}  {'tokens':>6}  {'KL to ref':>9}"
    lines = [head, "-" * len(head)]
    for r in result["sweep"]:
        lines.append(f"{r['method']:<7}{r['lam']:>6.1f}  {r['accuracy']:>8.2f}  {r['careful']:>7.2f}  "
                     f"{r['p_careful']:>10.2f}  {r['tokens']:>6.1f}  {r['kl']:>9.2f}")
        if r["lam"] == LAMS[-1] and r["method"] == "DeRa":
            lines.append("")
    t = result["trra"]
    lines += ["", f"TrRa student (distilled from DeRa at λ={t['distilled_at']:g}), run alone as one model:",
              f"{'TrRa':<7}{'—':>6}  {t['accuracy']:>8.2f}  {t['careful']:>7.2f}  {t['p_careful']:>10.2f}  "
              f"{t['tokens']:>6.1f}  {t['kl']:>9.2f}"]
    steering = result.get("steering")
    if steering:
        lines += ["", f"Weak-to-strong steering: a larger reference ({steering['large']}) steered by the small pair "
                  f"({steering['small']}),", "logits = h_large + λ·(h_aligned − h_ref); λ=0 is the large model alone, "
                  "and KL is to it:"]
        for r in steering["rows"]:
            lines.append(f"{'Steer':<7}{r['lam']:>6.1f}  {r['accuracy']:>8.2f}  {r['careful']:>7.2f}  "
                         f"{r['p_careful']:>10.2f}  {r['tokens']:>6.1f}  {r['kl']:>9.2f}")
    else:
        lines += ["", "No weak-to-strong steering row: this bundle has no `large` stage "
                  f"(add it with `aligndial demo build --stage large --out {result['models']}`)."]
    return "\n".join(lines)


def format_examples(result: dict) -> str:
    lines = []
    for prompt in dict.fromkeys(e["prompt"] for e in result["examples"]):
        rows = [e for e in result["examples"] if e["prompt"] == prompt]
        lines += ["", f"{prompt}  (answer: {rows[0]['answer']})"]
        for e in rows:
            mark = "right" if e["correct"] else "WRONG"
            lines.append(f"  {e['method']} λ={e['lam']:<4g} [{mark}] {e['reply']}")
    return "\n".join(lines)


def report(result: dict) -> str:
    return "\n".join([
        "aligndial demo: alignment strength as a dial (λ) on tiny models trained by `aligndial demo build`",
        f"Task: {result['problems']} held-out arithmetic word problems; one reply each sampled from π_λ "
        f"(temperature 1, seed {result['seed']}).",
        "λ=0 is the reference (mixed styles), λ=1 the aligned model (prefers careful step-by-step replies),",
        "λ=2 extrapolates past it, λ=-1 goes the other way. careful = share of step-by-step replies;",
        "p(careful) = π_λ's probability of starting one; KL = Σ_t KL(π_λ‖π_ref) over the reply, in nats.",
        "",
        format_table(result),
        "",
        "Greedy replies at several λ (DeRa: ref + aligned pair; InRa: ref + layer adapter, one forward):",
        format_examples(result),
        "",
        f"Plot: {result['plot']}" if result.get("plot") else "",
    ]).rstrip() + "\n"


def write_plot(result: dict, path: str) -> str:
    """Four panels against λ (careful share, accuracy, tokens, KL), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("careful", "step-by-step share"), ("accuracy", "accuracy"), ("tokens", "tokens per reply"),
              ("kl", "KL(π_λ ‖ π_ref), nats")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharex=True)
    t = result["trra"]
    for ax, (key, label) in zip(axes.flat, panels):
        for method, style, name in (("DeRa", "o-", "DeRa: ref + aligned model"), ("InRa", "s--", "InRa: ref + layer adapter")):
            rows = [r for r in result["sweep"] if r["method"] == method]
            ax.plot([r["lam"] for r in rows], [r[key] for r in rows], style, label=name)
        ax.plot([t["distilled_at"]], [t[key]], "*", markersize=13, color="tab:red",
                label=f"TrRa student (λ={t['distilled_at']:g})")
        if result.get("steering"):
            rows = result["steering"]["rows"]
            ax.plot([r["lam"] for r in rows], [r[key] for r in rows], "^-.", color="tab:green",
                    label="large ref + λ·(aligned − ref); KL to large")
        for x, name in ((0, "ref"), (1, "aligned")):
            ax.axvline(x, color="grey", lw=0.8, ls=":")
            ax.annotate(name, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10), textcoords="offset points",
                        fontsize=7, color="grey")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("λ (0 = reference, 1 = aligned)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"aligndial demo: λ as a dial ({result['problems']} held-out problems, one sample each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(models: str | None, plot: str | None, as_json: bool) -> int:
    with quiet_single_thread():  # tiny models: one thread is as fast, and never spins on a busy core
        result = run(Path(models) if models else BUNDLE, plot)
    print(json.dumps(result, indent=2) if as_json else report(result), end="" if not as_json else "\n")
    return 0
