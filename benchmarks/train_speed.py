"""Adapter-only DPO step time ÷ full DPO step time on the same ~58M Llama, with the trainable
fraction and peak memory of each. Each run is a fresh process (peak memory is that process's
VmHWM above its post-import baseline); the modes alternate, round after round, so load on the
machine hits them alike, and the ratios are medians over rounds.

    python benchmarks/train_speed.py [--json] [--rounds 3] [--threads 2]

Modes:
- `adapter`: the CLM recipe; the reference log-probs are precomputed once (the identity
  adapter makes the base the reference), so a step is the policy's forward and backward;
- `full`: full fine-tuning with the reference precomputed the same way (the like-for-like
  baseline);
- `full-ref`: full fine-tuning as TRL runs it by default, with a reference model's forward in
  every step (`precompute_ref_log_probs=False`).

Goal (issue 4): step-time ratio ≤ 0.6.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, statistics, sys, time, torch
from transformers import TrainerCallback
from aligndial.tiny import build_tokenizer, save
from aligndial.train.dpo import AdapterDPOConfig, train_dpo
from common import llama_50m
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
root, mode, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
tok = build_tokenizer()
if not os.path.exists(f"{root}/base"):
    save(llama_50m(0), tok, f"{root}/base")
base_mem = hwm()

class Timer(TrainerCallback):
    times = []
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): self.times.append(time.perf_counter() - self.t)

args = AdapterDPOConfig(output_dir=f"{root}/{mode}", max_steps=8, per_device_train_batch_size=4, learning_rate=1e-5,
                        save_strategy="no", logging_steps=100, seed=0, full=mode.startswith("full"),
                        precompute_ref_log_probs=(mode != "full-ref"))
timer = Timer()
out = train_dpo(f"{root}/base", f"{root}/prefs.jsonl", args, callbacks=[timer])
summary = json.load(open(f"{out}/training_summary.json"))
print(json.dumps({"step_s": statistics.median(timer.times[2:]), "peak_mib": (hwm() - base_mem) / 1024,
                  "trainable_fraction": summary["trainable_fraction"]}))
"""


MODES = ("adapter", "full", "full-ref")


def run(root: str, mode: str, threads: int) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", CHILD, root, mode, str(threads)], capture_output=True, text=True, cwd=here,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        with open(f"{root}/prefs.jsonl", "w") as f:
            for i in range(64):
                prompt = f"Question {i}: the quick brown fox jumps over the lazy dog, is it careful? " * 2
                f.write(json.dumps({"prompt": prompt, "chosen": " Yes, step by step, carefully." * 2, "rejected": " No." * 4}) + "\n")
        run(root, "adapter", args.threads)  # builds the base model once, and warms the file cache
        rounds = []
        for _ in range(args.rounds):
            rounds.append({mode: run(root, mode, args.threads) for mode in MODES})
            print("measured", {m: round(r["step_s"], 3) for m, r in rounds[-1].items()}, file=sys.stderr, flush=True)
    result = {mode: {key: statistics.median(r[mode][key] for r in rounds) for key in rounds[0][mode]} for mode in MODES}
    for base in ("full", "full-ref"):
        result[f"adapter÷{base}"] = {
            "step_time": round(statistics.median(r["adapter"]["step_s"] / r[base]["step_s"] for r in rounds), 3),
            "peak_memory": round(statistics.median(r["adapter"]["peak_mib"] / r[base]["peak_mib"] for r in rounds), 3),
        }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"DPO on a ~58M Llama, batch 4, median step time over steps 3-8, median of {args.rounds} alternating rounds")
        for mode in MODES:
            r = result[mode]
            print(f"  {mode:8s} step {r['step_s']:.3f} s  peak {r['peak_mib']:.0f} MiB  trainable {100 * r['trainable_fraction']:.2f}%")
        for base in ("full", "full-ref"):
            r = result[f"adapter÷{base}"]
            print(f"  adapter ÷ {base}: step time {r['step_time']}, peak memory {r['peak_memory']}")


if __name__ == "__main__":
    main()
