"""Adapter-only DPO step time ÷ full DPO step time on the same ~58M Llama, with the trainable
fraction and peak memory of each. Each mode runs in a fresh process (peak memory is that
process's VmHWM above its post-import baseline).

    python benchmarks/train_speed.py [--json]

Goal (issue 4): step-time ratio ≤ 0.6.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, statistics, sys, time, torch
from transformers import TrainerCallback
from aligndial.tiny import build_tokenizer, save
from aligndial.train.dpo import AdapterDPOConfig, train_dpo
from common import llama_50m
torch.set_num_threads(2)
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
root, mode = sys.argv[1], sys.argv[2]
tok = build_tokenizer()
if not os.path.exists(f"{root}/base"):
    save(llama_50m(0), tok, f"{root}/base")
base_mem = hwm()

class Timer(TrainerCallback):
    times = []
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): self.times.append(time.perf_counter() - self.t)

args = AdapterDPOConfig(output_dir=f"{root}/{mode}", max_steps=8, per_device_train_batch_size=4, learning_rate=1e-5,
                        save_strategy="no", logging_steps=100, seed=0, full=(mode == "full"))
timer = Timer()
out = train_dpo(f"{root}/base", f"{root}/prefs.jsonl", args, callbacks=[timer])
summary = json.load(open(f"{out}/training_summary.json"))
print(json.dumps({"step_s": statistics.median(timer.times[2:]), "peak_mib": (hwm() - base_mem) / 1024,
                  "trainable_fraction": summary["trainable_fraction"]}))
"""


def run(root: str, mode: str) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", CHILD, root, mode], capture_output=True, text=True, cwd=here,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        with open(f"{root}/prefs.jsonl", "w") as f:
            for i in range(64):
                prompt = f"Question {i}: the quick brown fox jumps over the lazy dog, is it careful? " * 2
                f.write(json.dumps({"prompt": prompt, "chosen": " Yes, step by step, carefully." * 2, "rejected": " No." * 4}) + "\n")
        run(root, "adapter")  # builds the base model once, and warms the file cache
        adapter, full = run(root, "adapter"), run(root, "full")
    result = {"adapter": adapter, "full": full, "step_time_ratio": round(adapter["step_s"] / full["step_s"], 3),
              "peak_memory_ratio": round(adapter["peak_mib"] / full["peak_mib"], 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print("DPO on a ~58M Llama, batch 4, median step time over steps 3-8")
        for mode in ("adapter", "full"):
            r = result[mode]
            print(f"  {mode:8s} step {r['step_s']:.3f} s  peak {r['peak_mib']:.0f} MiB  trainable {100 * r['trainable_fraction']:.2f}%")
        print(f"  adapter ÷ full: step time {result['step_time_ratio']}, peak memory {result['peak_memory_ratio']}")


if __name__ == "__main__":
    main()
