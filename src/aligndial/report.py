"""Reading a sweep: summary.csv, a table for the terminal, one plot per metric and a frontier.

A summary is a list of dicts, one per sweep point: {"lam", "n", "<metric>_mean", "<metric>_sem",
"<metric>_n", …}. `lam` is a number, or [first-turn λ, later-turn λ] for a per-turn schedule.
Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
from pathlib import Path

NOT_REWARDS = ("kl", "length")


def lam_label(lam) -> str:
    return ",".join(f"{x:g}" for x in lam) if isinstance(lam, (list, tuple)) else f"{lam:g}"


def metric_names(summary: list[dict]) -> list[str]:
    return [k[: -len("_mean")] for k in summary[0] if k.endswith("_mean")] if summary else []


def write_csv(summary: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        for entry in summary:
            writer.writerow({**entry, "lam": lam_label(entry["lam"])})
    return path


def _cell(mean, sem) -> str:
    if mean is None:
        return "—"
    return f"{mean:.4g}" if sem is None else f"{mean:.4g} ± {sem:.2g}"


def format_table(summary: list[dict]) -> str:
    """Mean ± standard error per λ and metric, aligned for a terminal."""
    names = metric_names(summary)
    table = [["λ", "n", *names]] + [
        [lam_label(e["lam"]), str(e["n"]), *(_cell(e[f"{m}_mean"], e[f"{m}_sem"]) for m in names)] for e in summary
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def _x(summary: list[dict]) -> tuple[list[float], list[str] | None]:
    """λ on the x axis, or positions with labels when some points are per-turn schedules."""
    if all(isinstance(e["lam"], (int, float)) for e in summary):
        return [e["lam"] for e in summary], None
    return list(range(len(summary))), [lam_label(e["lam"]) for e in summary]


def _errorbar(ax, xs, entries, name, **kw):
    pts = [(x, e[f"{name}_mean"], e[f"{name}_sem"] or 0.0) for x, e in zip(xs, entries) if e[f"{name}_mean"] is not None]
    if pts:
        x, y, err = zip(*pts)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, **kw)


def plot_metric(summary: list[dict], name: str, path: Path) -> Path:
    """`name` (mean ± standard error) against λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = summary if _x(summary)[1] else sorted(summary, key=lambda e: e["lam"])
    xs, labels = _x(entries)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    _errorbar(ax, xs, entries, name, linestyle="none" if labels else "-")
    if labels:
        ax.set_xticks(xs, labels)
    ax.set_xlabel("λ (first turn, later turns)" if labels else "λ")
    ax.set_ylabel(name)
    ax.set_title(f"{name} vs λ (mean ± s.e.)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_frontier(summary: list[dict], reward: str, path: Path) -> Path:
    """`reward` against KL(π_λ ‖ π_ref), one labelled point per λ: the trade-off DeRa tunes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [e for e in summary if e["kl_mean"] is not None and e[f"{reward}_mean"] is not None]
    pts.sort(key=lambda e: e["kl_mean"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([e["kl_mean"] for e in pts], [e[f"{reward}_mean"] for e in pts],
                xerr=[e["kl_sem"] or 0.0 for e in pts], yerr=[e[f"{reward}_sem"] or 0.0 for e in pts],
                marker="o", capsize=3)
    for e in pts:
        ax.annotate(f"λ={lam_label(e['lam'])}", (e["kl_mean"], e[f"{reward}_mean"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KL(π_λ ‖ π_ref) per response")
    ax.set_ylabel(reward)
    ax.set_title(f"{reward} vs KL frontier")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(summary: list[dict], out: Path, reward: str | None = None) -> list[Path]:
    """summary.csv, plot-<metric>.png for every metric, and frontier.png when KL and a reward-like
    metric (`reward`, or the first metric other than kl and length) were measured."""
    out = Path(out)
    paths = [write_csv(summary, out / "summary.csv")]
    names = metric_names(summary)
    paths += [plot_metric(summary, m, out / f"plot-{m}.png") for m in names]
    reward = reward or next((m for m in names if m not in NOT_REWARDS), None)
    if "kl" in names and reward in names and reward not in NOT_REWARDS:
        paths.append(plot_frontier(summary, reward, out / "frontier.png"))
    return paths
