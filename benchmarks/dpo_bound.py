"""What a bottom-layer adapter can save per DPO policy step, without TRL: a bare PyTorch loop.

    python benchmarks/dpo_bound.py [--json] [--rounds 4]

Same ~58M Llama and batch shape as `train_speed.py` (4 preference pairs → 8 rows, 150-token
prompts, 40-token completions). One policy step is forward (completion log-probs), backward
and AdamW; the adapter and full models alternate step by step. Why it bounds issue 4's ratio:

- the adapter sits below every frozen layer, so its gradient needs activation gradients
  through all L of them and the head (about one forward's work) plus its own layer's;
- full fine-tuning adds the weight gradients of all L layers (another forward's work) and the
  optimizer step over every parameter;

so adapter ÷ full ≈ (2L + 3n) / (3L + optimizer) ≥ about 2/3 for n = 1 adapter layer. TRL adds
the same data collation and log-prob head to both sides, which moves its ratio closer to 1.
"""

import argparse
import json
import statistics
import time

import torch

from aligndial.adapter import freeze_base, insert_adapter
from common import llama_50m

ROWS, PROMPT, COMPLETION = 8, 150, 40


def completion_logps(model, ids: torch.Tensor) -> torch.Tensor:
    hidden = model.model(input_ids=ids).last_hidden_state[:, PROMPT - 1 : -1]
    logits = model.lm_head(hidden).float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, PROMPT:].unsqueeze(-1)).squeeze(-1).sum(-1)


def policy(mode: str):
    model = llama_50m(0).train()
    if mode == "adapter":
        insert_adapter(model)
        freeze_base(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    return model, optimizer


def timed_step(model, optimizer, ids) -> tuple[float, float, float]:
    """Seconds of forward, backward and optimizer step."""
    t0 = time.perf_counter()
    loss = -completion_logps(model, ids).mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=int, default=4, help="alternating steps per mode (median)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(10, 32000, (ROWS, PROMPT + COMPLETION), generator=torch.Generator().manual_seed(0))
    models = {mode: policy(mode) for mode in ("adapter", "full")}
    for model, optimizer in models.values():  # warm-up
        timed_step(model, optimizer, ids)
    steps = {mode: [] for mode in models}
    for _ in range(args.rounds):
        for mode, (model, optimizer) in models.items():
            steps[mode].append(timed_step(model, optimizer, ids))
    result = {
        mode: {part: round(statistics.median(s[i] for s in v), 3) for i, part in enumerate(("forward_s", "backward_s", "optimizer_s"))}
        for mode, v in steps.items()
    }
    result["adapter÷full"] = round(statistics.median(sum(a) / sum(f) for a, f in zip(steps["adapter"], steps["full"])), 3)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"Bare DPO policy step (no TRL), ~58M Llama, {ROWS} rows, median of {args.rounds} alternating steps")
        for mode in models:
            r = result[mode]
            print(f"  {mode:8s} forward {r['forward_s']:.3f} s  backward {r['backward_s']:.3f} s  optimizer {r['optimizer_s']:.3f} s")
        print(f"  adapter ÷ full: {result['adapter÷full']}")


if __name__ == "__main__":
    main()
