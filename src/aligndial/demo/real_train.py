"""One training recipe of the real-model demo, in a process of its own:

    python -m aligndial.demo.real_train SPEC.json

SPEC holds {"recipe": "dpo" | "distill", "model", "data", "aligned" (distill), "args": {config fields}}.
It runs the project's recipe (`aligndial.train.dpo.train_dpo` or `aligndial.train.distill.train_distill`,
TRL's trainers underneath) on one thread, and writes `recipe.json` into the output directory last:
the wall time of each optimizer step and this process's peak resident memory. A process per recipe
is what makes the peak memory that recipe's own.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

RECIPE_FILE = "recipe.json"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)


def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two fighting (see ENVIRONMENT)
    timer = StepTimer()
    started = time.perf_counter()
    if spec["recipe"] == "dpo":
        from aligndial.train.dpo import AdapterDPOConfig, train_dpo

        out = train_dpo(spec["model"], spec["data"], AdapterDPOConfig(**spec["args"]), callbacks=[timer])
    else:
        from aligndial.train.distill import TrRaConfig, train_distill

        out = train_distill(spec["model"], spec["aligned"], spec["data"], TrRaConfig(**spec["args"]), callbacks=[timer])
    steps = timer.seconds[1:] or timer.seconds  # the first step warms up allocators and caches
    result = {
        "seconds": round(time.perf_counter() - started, 1),
        "steps": len(timer.seconds),
        "step_seconds_median": round(statistics.median(steps), 3) if steps else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "load_avg_1min": round(os.getloadavg()[0], 1),  # how shared the machine was (step times depend on it)
        **json.loads((Path(out) / "training_summary.json").read_text()),
    }
    tmp = Path(out) / (RECIPE_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, Path(out) / RECIPE_FILE)
    return result


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
