"""Dual path on vLLM ÷ dual path on the HF engine: decode tokens/s at batch 4, and KV-cache
memory per token on vLLM ÷ the plain model's, on the ~58M Llama of common.py (fp32, CPU).

    python benchmarks/vllm_speed.py [--json] [--threads 2] [--rounds 3]

Goal (issue 7): tokens/s ratio ≥ 2. The two engines run alternately in one run (vLLM's engine
process idles while HF decodes), each round generating 128 tokens for the same 4 prompts at
λ = 0.5. vLLM's engine takes one core (its default on this machine); HF uses `--threads`.
KV memory per token is vLLM's own accounting: the cache space it was given
(VLLM_CPU_KVCACHE_SPACE GiB) ÷ the tokens it fits. The dual path keeps two caches over the
shared layers (base path and aligned path) plus the adapter's: (2L + n) / L of the plain model.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from aligndial.vllm.export import export_dual_path
from aligndial.tiny import build_tokenizer
from common import NEW_TOKENS, llama_50m, prompt_ids, table
from dualpath_speed import adapted

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
BATCH, LAM = 4, 0.5


def start(path: str):
    from vllm import LLM

    return LLM(path, dtype="float32", max_model_len=256, max_num_seqs=BATCH, skip_tokenizer_init=True, seed=0)


def kv_bytes_per_token(llm) -> float:
    cache = llm.llm_engine.vllm_config.cache_config
    return float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30 / (cache.num_gpu_blocks * cache.block_size)


def vllm_tok_s(llm, ids: torch.Tensor) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True, temperature=0,
                            detokenize=False, extra_args={"alignment_strength": LAM})
    start_time = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": row} for row in ids.tolist()], params, use_tqdm=False)
    elapsed = time.perf_counter() - start_time
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    return ids.shape[0] * NEW_TOKENS / elapsed


def hf_tok_s(model, ids: torch.Tensor) -> float:
    start_time = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, lam=LAM, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start_time
    assert out.shape[1] - ids.shape[1] == NEW_TOKENS
    return ids.shape[0] * NEW_TOKENS / elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the HF engine")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = prompt_ids(batch=BATCH)
    hf = adapted(torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir = os.path.join(tmp, "plain")
        llama_50m(0).save_pretrained(plain_dir)  # vLLM's plain Llama, for the KV-cache comparison
        plain = start(plain_dir)
        plain_kv = kv_bytes_per_token(plain)
        plain.llm_engine.engine_core.shutdown()
        del plain
        model = adapted(torch.float32).base  # the same weights as `hf` (seeded), with the adapter in place
        dual_dir = export_dual_path(model, build_tokenizer(), os.path.join(tmp, "dual"))
        llm = start(str(dual_dir))
        dual_kv = kv_bytes_per_token(llm)
        vllm_tok_s(llm, ids[:, :4])  # warm-up, both sides
        hf.generate(ids, lam=LAM, max_new_tokens=4, do_sample=False, pad_token_id=0)
        pairs = []
        for _ in range(args.rounds):
            pairs.append((hf_tok_s(hf, ids), vllm_tok_s(llm, ids)))
            print("measured", {"hf_tok_s": round(pairs[-1][0], 1), "vllm_tok_s": round(pairs[-1][1], 1)}, file=sys.stderr, flush=True)
        llm.llm_engine.engine_core.shutdown()
    hf_med, vllm_med = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    result = {
        "batch": BATCH, "lam": LAM, "new_tokens": NEW_TOKENS, "hf_threads": args.threads,
        "hf_tok_s": round(hf_med, 1), "vllm_tok_s": round(vllm_med, 1),
        "speed_ratio": round(statistics.median(v / h for h, v in pairs), 2),
        "plain_kv_bytes_per_token": round(plain_kv), "dual_kv_bytes_per_token": round(dual_kv),
        "kv_ratio": round(dual_kv / plain_kv, 3),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(table([("dual path tok/s, batch 4, λ=0.5", result["hf_tok_s"], result["vllm_tok_s"], result["speed_ratio"], "≥ 2"),
                 ("KV-cache bytes per token", f"{result['plain_kv_bytes_per_token']} (plain)",
                  result["dual_kv_bytes_per_token"], result["kv_ratio"], "(2L+n)/L")],
                ("what", "HF engine / plain", "vLLM", "ratio", "goal")))


if __name__ == "__main__":
    main()
