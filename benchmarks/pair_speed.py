"""DeRa pair decode speed ÷ one model's, at batch 1, fp32 and bf16, on a ~58M Llama.

    python benchmarks/pair_speed.py [--json]

Goals (issue 2): mixed λ ≥ 0.45 in fp32 (nothing beyond the second model's cost);
λ ∈ {0, 1} fast path ≥ 0.95.
"""

import argparse
import json

import torch

from aligndial.pair import RealignedPair
from common import lam_speed_rows, llama_50m, prompt_ids, table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 gives steadier numbers on a busy machine)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per ratio (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = prompt_ids()
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        ref, aligned = llama_50m(0, dtype), llama_50m(1, dtype)
        results += lam_speed_rows(ref, RealignedPair(ref, [aligned]).eval(), ids, dtype, repeats=args.rounds)
    if args.json:
        print(json.dumps(results))
    else:
        print("DeRa pair decode speed ÷ single model (batch 1, 128 new tokens, median of alternating rounds)")
        print(table([tuple(r.values()) for r in results], tuple(results[0])))


if __name__ == "__main__":
    main()
