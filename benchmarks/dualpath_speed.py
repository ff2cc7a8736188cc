"""Dual-path adapter model decode speed and peak memory ÷ the plain model, on a ~58M Llama.

    python benchmarks/dualpath_speed.py [--json]

Goals (issue 3): mixed λ ≥ 0.80 in fp32 and ≥ 0.90 in bf16 (two sequential passes reach about
0.50; the ceiling measured on this CPU is about 0.84 / 0.92); peak memory ≤ 1.15× plain.
The `merged` and `plain, 2 rows` rows measure what bounds the mixed-λ ratio (see `ceiling_rows`);
every tok/s column counts steps of one sequence. The second table measures per decode forward
with the sides taking turns at every step, which is far less noisy than alternating whole
generations (those rounds moved ±5% here); `generate` adds the same ~1.3 ms of Python per step
to both sides, which the per-step table leaves out. It also divides by a like-for-like
baseline: the plain model with the few-row product the dual path installs on this CPU (our
bf16 kernel beats stock torch at one row too on some CPUs), with that baseline's own bounds.
Memory is measured in fresh subprocesses (peak RSS of the generation, minus the RSS after
imports, so the interpreter and libraries do not dilute the ratio).
"""

import argparse
import json
import os
import subprocess
import sys

import torch

from aligndial.adapter import decoder_layers, insert_adapter, merge_adapter
from aligndial.dualpath import DualPathModel
from common import NEW_TOKENS, Decoder, interleaved_steps, lam_speed_rows, llama_50m, prompt_ids, speed_row, table


def with_adapter(dtype):
    model = llama_50m(0, dtype)
    insert_adapter(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking (non-identity) adapter
        for p in decoder_layers(model)[0].parameters():
            p.add_(torch.randn(p.shape, generator=g).to(dtype) * 0.02)
    return model


def adapted(dtype):
    return DualPathModel(with_adapter(dtype)).eval()


def ceiling_rows(plain, dtype, ids, rounds) -> list[dict]:
    """What bounds the mixed-λ ratio, measured side by side against the same plain model:

    - `merged`: λ=1 as plain transformers with L+1 layers (the cost of the adapter layer);
    - `plain, 2 rows`: the plain model decoding the prompt twice, one step time ÷ another
      (the cost of a second row through every layer in stock transformers).

    The dual path at mixed λ runs the first plus a second row through the shared layers."""
    merged = merge_adapter(with_adapter(dtype))
    two_rows = lambda x, **kw: plain.generate(torch.cat([x, x]), **kw)  # noqa: E731
    return [
        speed_row("merged", plain.generate, merged.generate, ids, dtype, rounds),
        speed_row("plain, 2 rows", plain.generate, two_rows, ids, dtype, rounds),
    ]


def few_rows_wins(dtype) -> bool:
    """Whether the dual path installs its few-row product on this CPU (`few_rows_product`'s rule)."""
    from aligndial.fewrows import few_rows_product

    return few_rows_product(dtype, torch.device("cpu")) is not None


def with_few_rows(model, dtype):
    """`model` (stock transformers) with the dual path's few-row product in its decoder linears
    wherever the dual path installs it here: the like-for-like baseline. Our bf16 kernel beats
    stock at one row too on some CPUs, so a ratio against stock plain would credit the dual path
    with a kernel the plain model could also use."""
    from aligndial.fewrows import Router, few_rows_product, install_few_rows_linear

    choice = few_rows_product(dtype, torch.device("cpu"))
    if choice is not None:
        router = Router(returns_tuple=False)
        router.mode = "dual"  # always on: every few-row forward of this model takes the product
        for m in decoder_layers(model).modules():
            if type(m) is torch.nn.Linear:
                install_few_rows_linear(m, router, *choice, dtype)
    return model


def cli_rows(rounds: int, dtypes) -> list[dict]:
    """What a user sees: `aligndial generate --max-new-tokens 128 --json`, batch 1, λ=0.5 on the
    dual path against the plain model (`--model` alone), `tokens_per_second` from its output,
    best of `rounds` fresh processes per side, the sides alternating. Each run must produce
    all 128 tokens (a random model that emits EOS early would time fewer). Separate processes
    at separate times, default threads: for the CLI ratio against the in-process one, measured
    interleaved in one run with the same threads on both sides, use `cli_speed.py`."""
    import tempfile

    from aligndial.adapter import save_adapter
    from aligndial.tiny import build_tokenizer

    root = tempfile.mkdtemp(prefix="aligndial-bench-")
    plain_dir, adapter_dir = os.path.join(root, "plain"), os.path.join(root, "adapter")
    llama_50m(0).save_pretrained(plain_dir)
    build_tokenizer().save_pretrained(plain_dir)
    save_adapter(with_adapter(torch.float32), adapter_dir)
    aligndial = os.path.join(os.path.dirname(sys.executable), "aligndial")
    rows = []
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        base = [aligndial, "generate", "--model", plain_dir, "--prompt", "The quick brown fox", "--max-new-tokens",
                str(NEW_TOKENS), "--dtype", name, "--json"]
        sides = {"plain": base, "dual": base + ["--adapter", adapter_dir, "--lam", "0.5"]}
        best = {k: 0.0 for k in sides}
        for _ in range(rounds):
            for side, cmd in sides.items():
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                row = json.loads(out.stdout.strip().splitlines()[-1])
                assert len(row["token_ids"]) == NEW_TOKENS, f"{side} stopped after {len(row['token_ids'])} tokens"
                best[side] = max(best[side], row["tokens_per_second"])
        row = {"dtype": name, "lam": 0.5, "plain_tok_s": best["plain"], "mixed_tok_s": best["dual"],
               "ratio": round(best["dual"] / best["plain"], 3)}
        print("measured CLI", row, file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def step_rows(dtype, ids, rounds, instances) -> list[dict]:
    """Per decode forward, every side taking turns at every step (`common.interleaved_steps`):
    the less noisy measure of what the dual path costs per token. Each side has `instances`
    model instances of its own, so no side finds another's weights in cache and no one
    instance's luck decides a ratio. `ratio` divides by stock plain transformers;
    `like_for_like` by the plain model with the dual path's few-row product (`with_few_rows`),
    and the `+ product` sides are the like-for-like bounds (see `ceiling_rows`)."""
    lam = lambda x: torch.tensor([[x]])  # noqa: E731
    sides = {
        "plain": lambda: Decoder(llama_50m(0, dtype)),
        "plain + product": lambda: Decoder(with_few_rows(llama_50m(0, dtype), dtype)),
        "plain + product, 2 rows": lambda: Decoder(with_few_rows(llama_50m(0, dtype), dtype), rows=2),
        "merged + product": lambda: Decoder(with_few_rows(merge_adapter(with_adapter(dtype)), dtype)),
        # strictly more work than a dual step (the adapter layer and the head on 2 rows too)
        "merged + product, 2 rows": lambda: Decoder(with_few_rows(merge_adapter(with_adapter(dtype)), dtype), rows=2),
        **{x: lambda x=x: Decoder(adapted(dtype), lam=lam(x)) for x in (0.5, 0.0, 1.0)},
    }
    built = {name: [] for name in sides}
    for _ in range(instances):  # round-robin, so no side gets all the first-built (slower here) instances
        for name, build in sides.items():
            built[name].append(build())
    step = interleaved_steps(built, ids, rounds)
    like = step["plain + product"]
    return [
        {"dtype": str(dtype).removeprefix("torch."), "lam": name, "plain_tok_s": round(1 / step["plain"], 1),
         "mixed_tok_s": round(1 / t, 1), "ratio": round(step["plain"] / t, 3), "like_for_like": round(like / t, 3)}
        for name, t in step.items() if name != "plain"
    ]


def peak_memory(kind: str) -> float:
    """MiB of peak RSS above the post-import baseline, for one generation in a fresh process."""
    code = f"""
import torch
import dualpath_speed as b
from common import prompt_ids, llama_50m
torch.set_num_threads(2)
# VmHWM (peak RSS of this process image), not ru_maxrss, which a child inherits from its parent.
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
m = llama_50m(0) if {kind!r} == "plain" else b.adapted(torch.float32)
kw = dict(lam=0.5) if {kind!r} == "dual" else {{}}
with torch.no_grad():
    m.generate(prompt_ids(), max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0, **kw)
print((hwm() - base) / 1024)
"""
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=here)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 gives steadier numbers on a busy machine)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per ratio (median)")
    parser.add_argument("--instances", type=int, default=3, help="model instances per side in the per-step table")
    parser.add_argument("--cli-rounds", type=int, default=2, help="CLI processes per side (best of)")
    parser.add_argument("--only", choices=["all", "cli", "steps", "generate"], default="all",
                        help="run one part: the CLI-level ratio, the per-step table, or whole generations")
    parser.add_argument("--dtype", choices=["both", "float32", "bfloat16"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    ids = prompt_ids()
    rows, steps, cli, memory = [], [], [], None
    if args.only in ("all", "cli"):
        cli = cli_rows(args.cli_rounds, dtypes)
    for dtype in dtypes:
        if args.only in ("all", "steps"):
            steps += step_rows(dtype, ids, args.rounds, args.instances)
            print("measured per step", steps[-7:], file=sys.stderr, flush=True)
        if args.only in ("all", "generate"):
            plain = llama_50m(0, dtype)
            rows += lam_speed_rows(plain, adapted(dtype), ids, dtype, repeats=args.rounds)
            rows += ceiling_rows(plain, dtype, ids, args.rounds)
    if args.only == "all":
        plain_mib, dual_mib = peak_memory("plain"), peak_memory("dual")
        memory = {"plain_mib": round(plain_mib, 1), "dual_mib": round(dual_mib, 1), "ratio": round(dual_mib / plain_mib, 3)}
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"cli": cli, "speed": rows, "speed_per_step": steps, "memory_fp32": memory, "loadavg": load}))
        return
    print(f"load average at the end: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) on {os.cpu_count()} CPUs")
    if cli:
        print(f"\nThrough the CLI: `aligndial generate --max-new-tokens {NEW_TOKENS} --json`, batch 1, "
              f"tokens_per_second, best of {args.cli_rounds} processes per side")
        print(table([tuple(r.values()) for r in cli], tuple(cli[0])))
    if rows:
        print("\nDual-path decode speed ÷ plain model (batch 1, 128 new tokens, median of alternating rounds)")
        print(table([tuple(r.values()) for r in rows], tuple(rows[0])))
    if steps:
        print("\nPer decode step, the sides taking turns at every step (median step; tok/s = 1 / step;"
              " like_for_like: ÷ plain + the dual path's few-row product)")
        print(table([tuple(r.values()) for r in steps], tuple(steps[0])))
    if memory:
        print(f"\nPeak memory (fp32, λ=0.5): plain {memory['plain_mib']} MiB, dual path {memory['dual_mib']} MiB, ratio {memory['ratio']}")


if __name__ == "__main__":
    main()
