"""LoRA pair (one base model, 2B rows per step) against the full pair (base + the merged
model, one after the other), on the ~58M benchmark Llama with a rank-16 LoRA on every linear.

    python benchmarks/lora_pair_speed.py [--json] [--rounds 3]

Goals (issue 21): tokens/s at λ=0.5 ≥ 1.6× the full pair (≥ 0.8× one plain model); peak RSS
≤ 0.6× the full pair.

- Per decode step: every side takes its turn at every step in a random order (`interleaved_steps`),
  so load on this shared machine hits all sides alike. Sides: the plain base model, the full pair,
  the LoRA pair with our row routing and with PEFT's mixed-adapter batches (`routing="peft"`),
  and the LoRA pair at λ=0 and λ=1. Two sides bound λ=0.5 from either side: the plain model on
  2 rows with the few-row product the LoRA pair installs for its base weights (what λ=0.5 would
  cost if the low-rank terms were free), and λ=1 on 2 rows (the low-rank terms on both rows
  instead of one, by PEFT's operations: strictly more work).
- Whole generations (`--tokens` new tokens, 128 by default), full pair and LoRA pair alternating.
- Peak RSS: each side loads from disk (`aligndial.mixed.load_pair`) and generates in its own
  fresh process; the number is VmHWM after generating minus VmHWM after imports.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

import common
from common import Decoder, compare_speed, interleaved_steps, llama_50m, prompt_ids, table
from dualpath_speed import with_few_rows

RANK = 16


def with_lora(seed: int = 1):
    """A PeftModel over the benchmark model: rank-16 LoRA on every linear, trained-looking
    (random B, not PEFT's zero init), small enough to keep the model's outputs sensible."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(llama_50m(0), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    return model.eval()


def lora_pair(routing: str = "rows"):
    from aligndial.lora_pair import LoraPair

    return LoraPair(with_lora().base_model.model, ["default"], routing=routing).eval()


def full_pair():
    from aligndial.pair import RealignedPair

    return RealignedPair(llama_50m(0), [with_lora().merge_and_unload()]).eval()


def step_table(ids, rounds: int, instances: int) -> list[dict]:
    lam = lambda x: torch.tensor([[x]])  # noqa: E731
    sides = {
        "plain": lambda: Decoder(llama_50m(0)),
        # the bound if the low-rank terms were free: the base weights on 2 rows, with the few-row
        # product the LoRA pair installs for them on this CPU (if any)
        "plain + product, 2 rows": lambda: Decoder(with_few_rows(llama_50m(0), torch.float32), rows=2),
        "full pair λ=0.5": lambda: Decoder(full_pair(), lam=lam(0.5)),
        "LoRA pair λ=0.5": lambda: Decoder(lora_pair(), lam=lam(0.5)),
        "LoRA pair (PEFT mixed batch) λ=0.5": lambda: Decoder(lora_pair("peft"), lam=lam(0.5)),
        "LoRA pair λ=0": lambda: Decoder(lora_pair(), lam=lam(0.0)),
        "LoRA pair λ=1": lambda: Decoder(lora_pair(), lam=lam(1.0)),
        # strictly more work than λ=0.5: the low-rank terms on both rows (PEFT's operations)
        "LoRA pair λ=1, 2 rows": lambda: Decoder(lora_pair(), rows=2, lam=1.0),
    }
    built = {name: [] for name in sides}
    for _ in range(instances):
        for name, build in sides.items():
            built[name].append(build())
    step = interleaved_steps(built, ids, rounds)
    full = step["full pair λ=0.5"]
    return [{"side": name, "tok_s": round(1 / t, 1), "÷ plain": round(step["plain"] / t, 3), "÷ full pair": round(full / t, 3)}
            for name, t in step.items()]


def peak_rss(kind: str, root: str) -> float:
    """MiB of peak RSS above the post-import baseline: load the pair from disk, generate 32 tokens."""
    code = f"""
import torch
from aligndial.mixed import load_pair
from common import prompt_ids
torch.set_num_threads(2)
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
aligned = {root!r} + ("/lora" if {kind!r} == "lora" else "/merged")
pair = load_pair({root!r} + "/base", aligned)
with torch.no_grad():
    pair.generate(prompt_ids(), lam=0.5, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
print(type(pair).__name__, (hwm() - base) / 1024)
"""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=here, env=env)
    name, mib = out.stdout.strip().splitlines()[-1].split()
    assert name == ("LoraPair" if kind == "lora" else "RealignedPair"), name
    return float(mib)


def save_models(root: str) -> None:
    from aligndial.tiny import build_tokenizer

    tok = build_tokenizer()
    base = llama_50m(0)
    base.save_pretrained(f"{root}/base")
    tok.save_pretrained(f"{root}/base")
    lora = with_lora()
    lora.save_pretrained(f"{root}/lora")
    lora.merge_and_unload().save_pretrained(f"{root}/merged")
    tok.save_pretrained(f"{root}/merged")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 128 steps per side (median step)")
    parser.add_argument("--instances", type=int, default=1, help="model instances per side in the per-step table")
    parser.add_argument("--tokens", type=int, default=common.NEW_TOKENS,
                        help="new tokens per generation / steps per round (fewer on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common.NEW_TOKENS = args.tokens
    load_before = os.getloadavg()
    ids = prompt_ids()
    steps = step_table(ids, args.rounds, args.instances)
    print("measured per step", steps, "load", os.getloadavg(), file=sys.stderr, flush=True)
    full, lora = full_pair(), lora_pair()
    full_tps, lora_tps, ratio = compare_speed(lambda x, **kw: full.generate(x, lam=0.5, **kw),
                                              lambda x, **kw: lora.generate(x, lam=0.5, **kw), ids, args.rounds)
    generate = {"full_pair_tok_s": round(full_tps, 1), "lora_pair_tok_s": round(lora_tps, 1), "ratio": round(ratio, 3)}
    print("measured generate", generate, "load", os.getloadavg(), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as root:
        save_models(root)
        full_mib, lora_mib = peak_rss("full", root), peak_rss("lora", root)
    memory = {"full_pair_mib": round(full_mib, 1), "lora_pair_mib": round(lora_mib, 1), "ratio": round(lora_mib / full_mib, 3)}
    load = {"loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        print(json.dumps({"per_step": steps, "generate_lam_0.5": generate, "peak_rss_fp32": memory, **load}))
        return
    print(f"LoRA pair vs full pair, fp32, 58M Llama, rank-{RANK} LoRA on every linear, batch 1, {args.tokens} new tokens")
    print("\nPer decode step, sides taking turns at every step (median; tok/s = 1 / step):")
    print(table([tuple(r.values()) for r in steps], tuple(steps[0])))
    print(f"\nWhole generate at λ=0.5, alternating: full pair {generate['full_pair_tok_s']} tok/s, "
          f"LoRA pair {generate['lora_pair_tok_s']} tok/s, ratio {generate['ratio']}")
    print(f"Peak RSS (λ=0.5, each in its own process): full pair {memory['full_pair_mib']} MiB, "
          f"LoRA pair {memory['lora_pair_mib']} MiB, ratio {memory['ratio']}")
    print(f"Load average (1, 5, 15 min) before {load['loadavg_before']}, after {load['loadavg_after']}")


if __name__ == "__main__":
    main()
