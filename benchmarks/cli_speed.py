"""Mixed ÷ plain decode speed in process and through `aligndial generate --json`, side by side in one run.

    python benchmarks/cli_speed.py [--rounds 3] [--threads 1] [--json]

Issue 27: the path from the CLI must cost nothing measurable, i.e. each CLI ratio within 3% of
the in-process one. fp32, the ~58M Llama of `common.llama_50m`, batch 1, 128 new tokens, λ=0.5,
for the DeRa pair (`--ref/--aligned`) and the dual path (`--model/--adapter`). The models are
saved once and every side loads those same directories. Three ways of timing each model:

- `in process`: `model.generate` on a warm model loaded as the CLI loads it (`load_engine`),
  timed as `common.compare_speed` times it (16 random prompt ids, every token forced);
- `CLI code, warm`: the CLI's own code path in process (`engine.rows`, its `tokens_per_second`),
  after one warm-up call: everything the CLI does per token, nothing it does once per process;
- `CLI, end to end`: `aligndial generate ... --json` in a fresh process, its `tokens_per_second`:
  one `generate` call, so it also holds that process's first-call costs and the prefill.

Every round runs every side once, in a fresh random order (the CLI sides as subprocesses), and
each ratio is the median of the per-round ratios, so load on a shared machine hits both sides
of a ratio alike. The CLI processes get `OMP_NUM_THREADS=--threads`, the same torch threads as
this process: on a loaded 2-core machine two threads per process decode several times slower
than one (docs/benchmarks.md), which would swamp the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from common import NEW_TOKENS, llama_50m, prompt_ids, table

PROMPT = "The quick brown fox"
KINDS = {"pair": "DeRa pair", "dual": "dual path"}


def build(root: str) -> dict[str, list[str]]:
    """Saved plain/aligned models and an adapter under `root`; the `generate` flags of each side."""
    from aligndial.adapter import save_adapter
    from aligndial.tiny import build_tokenizer
    from dualpath_speed import with_adapter

    tok = build_tokenizer()
    for name, seed in (("ref", 0), ("aligned", 1)):
        llama_50m(seed).save_pretrained(os.path.join(root, name))
        tok.save_pretrained(os.path.join(root, name))
    save_adapter(with_adapter(torch.float32), os.path.join(root, "adapter"))
    ref = os.path.join(root, "ref")
    return {"plain": ["--model", ref],
            "pair": ["--ref", ref, "--aligned", os.path.join(root, "aligned"), "--lam", "0.5"],
            "dual": ["--model", ref, "--adapter", os.path.join(root, "adapter"), "--lam", "0.5"]}


def load_average() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def cpu_name() -> str:
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in info]
    return f"{name} ({', '.join(flags)}; {os.cpu_count()} CPUs)"


def sides(flags: dict[str, list[str]], threads: int) -> dict[tuple[str, str], object]:
    """(way, model) -> a callable returning tokens/s of one 128-token generation."""
    from aligndial.cli import make_parser
    from aligndial.engines import Settings, load_engine

    ids, settings = prompt_ids(), Settings(max_new_tokens=NEW_TOKENS)
    aligndial = os.path.join(os.path.dirname(sys.executable), "aligndial")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    out = {}
    for name, argv in flags.items():
        cmd = ["generate", *argv, "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--json"]
        engine = load_engine(make_parser().parse_args(cmd))
        lam = None if name == "plain" else 0.5

        def in_process(model=engine.model, lam=lam):
            kw = {} if lam is None else {"lam": lam}
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0, **kw)
            elapsed = time.perf_counter() - start
            assert out.shape[1] - ids.shape[1] == NEW_TOKENS
            return NEW_TOKENS / elapsed

        def cli_code(engine=engine, lam=lam):
            row = engine.rows([PROMPT], [lam], settings)[0]
            assert len(row["token_ids"]) == NEW_TOKENS, f"stopped after {len(row['token_ids'])} tokens"
            return row["tokens_per_second"]

        def cli(cmd=cmd):
            res = subprocess.run([aligndial, *cmd], capture_output=True, text=True, check=True, env=env)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            assert len(row["token_ids"]) == NEW_TOKENS, f"stopped after {len(row['token_ids'])} tokens"
            return row["tokens_per_second"]

        with torch.no_grad():
            in_process(), cli_code()  # warm-up: these two ways time warm models
        out.update({("in process", name): in_process, ("CLI code, warm", name): cli_code,
                    ("CLI, end to end", name): cli})
    return out


def measure(flags, rounds: int, threads: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    timed, rng = sides(flags, threads), random.Random(seed)
    speeds = {key: [] for key in timed}
    loads = [load_average()]
    with torch.no_grad():
        for r in range(rounds):
            order = list(timed)
            rng.shuffle(order)
            for key in order:
                speeds[key].append(timed[key]())
            loads.append(load_average())
            print(f"round {r + 1}/{rounds}, load average {loads[-1]}:",
                  {f"{w}/{n}": round(v[-1], 1) for (w, n), v in speeds.items()}, file=sys.stderr, flush=True)
    rows = []
    for kind in KINDS:
        for way in ("in process", "CLI code, warm", "CLI, end to end"):
            plain, mixed = speeds[(way, "plain")], speeds[(way, kind)]
            rows.append({"model": KINDS[kind], "timed": way, "plain_tok_s": round(statistics.median(plain), 1),
                         "mixed_tok_s": round(statistics.median(mixed), 1),
                         "ratio": round(statistics.median(m / p for p, m in zip(plain, mixed)), 3)})
        base = rows[-3]["ratio"]
        for row in rows[-3:]:
            row["÷ in process"] = round(row["ratio"] / base, 3)
    return rows, loads


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median of per-round ratios)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in every CLI process")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="aligndial-cli-speed-") as root:
        rows, loads = measure(build(root), args.rounds, args.threads)
    if args.json:
        print(json.dumps({"rows": rows, "load_average": loads, "cpu": cpu_name(), "threads": args.threads}))
        return
    print(f"CPU: {cpu_name()}; torch threads {args.threads}; load average (1, 5, 15 min) per round: {'; '.join(loads)}")
    print(f"fp32, batch 1, {NEW_TOKENS} new tokens, λ=0.5, median of {args.rounds} interleaved rounds")
    print(table([tuple(r.values()) for r in rows], tuple(rows[0])))


if __name__ == "__main__":
    main()
