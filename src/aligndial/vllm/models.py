"""The vLLM model classes: the dual-path adapter model and the DeRa pair, for Llama and Qwen2.

Both run every path at every step, for every token, whatever λ the rows have: prefix caching
shares KV blocks between requests, so each path's cache must be complete for every request.
`forward` returns the paths' final hidden states side by side, (T, P·H) with P paths; vLLM
picks the sampled positions, and `compute_logits` splits them again and mixes each row with
its own λ (from `strength.active().rows(n)`) through `aligndial.mixing`.

- **Dual path** (`AligndialDualPathForCausalLM`): the merged model, L+n decoder layers with the
  adapter at 0..n−1. The aligned path runs all of them; the base path starts at layer n with a
  second `Attention` per shared layer (prefix `base_path.layers.{i}.attn`), which owns a second
  KV cache and shares the layer's projection weights. Through the shared layers the two paths
  travel as one batch of 2T rows (as `aligndial.dualpath` does with 2B rows), split only for
  attention. Both paths end in the same linear head,
  so the final hidden states are mixed and the head runs once (`mix_hidden`, as in
  `aligndial.dualpath`).
- **Pair** (`AligndialPairForCausalLM`): one vLLM `*ForCausalLM` per member (`ref`,
  `aligned_a`, …), each with its own layers and caches; members whose weight is 0 in every row
  skip the head, and the logits are mixed with `mix_logits`.

The decoder layers are vLLM's own (`LlamaDecoderLayer`, `Qwen2DecoderLayer`: same structure);
`_layer` runs one with a given attention module, so the two paths share one code path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import maybe_prefix

from aligndial.mixing import active_sources, mix_hidden, mix_logits
from aligndial.vllm import strength

CAUSAL_LMS = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}


def _causal_lm(vllm_config) -> type[nn.Module]:
    config = vllm_config.model_config.hf_config
    base = config.aligndial["base_model_type"]
    if base not in CAUSAL_LMS:
        raise ValueError(f"aligndial's vLLM models support {', '.join(CAUSAL_LMS)}; this export is {base!r}")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("aligndial's vLLM models do not support pipeline parallelism; use tensor parallelism")
    if getattr(config, "dual_chunk_attention_config", None) or getattr(config, "qk_norm", False):
        raise ValueError("aligndial's vLLM models do not support dual-chunk attention or qk-norm")
    return CAUSAL_LMS[base]


def _layer(layer, attn, positions, h, residual):
    """vLLM's Llama/Qwen2 decoder layer, with `attn` (and so its KV cache) as the attention kernel."""
    if residual is None:
        residual, h = h, layer.input_layernorm(h)
    else:
        h, residual = layer.input_layernorm(h, residual)
    sa = layer.self_attn
    qkv, _ = sa.qkv_proj(h)
    q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
    q, k = sa.rotary_emb(positions, q, k)
    h, _ = sa.o_proj(attn(q, k, v))
    h, residual = layer.post_attention_layernorm(h, residual)
    return layer.mlp(h), residual


def _split_attention(aligned_attn, base_attn, t: int):
    """Attention over 2T rows [aligned; base]: each half with its own module, so its own KV cache."""

    def attn(q, k, v):
        return torch.cat([aligned_attn(q[:t], k[:t], v[:t]), base_attn(q[t:], k[t:], v[t:])])

    return attn


def _stack(layers, attns, positions, h, residual=None):
    """Run `layers` (with `attns`) from (h, residual); returns (h, residual), before the final norm."""
    for layer, attn in zip(layers, attns):
        h, residual = _layer(layer, attn, positions, h, residual)
    return h, residual


def _embed(model, input_ids, inputs_embeds):
    return inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)


# vLLM compiles `forward` (every path, every layer), as it compiles its own models; `compute_logits`,
# where each row's λ comes in, stays eager. `--enforce-eager` turns compilation off.
_compiled = support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0})


@_compiled
class AligndialDualPathForCausalLM(nn.Module):
    """Base model + layer adapter; λ mixes the base path (λ=0) and the adapter path (λ=1)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        self.lm = _causal_lm(vllm_config)(vllm_config=vllm_config, prefix=prefix)
        self.n_adapter = vllm_config.model_config.hf_config.aligndial["adapter_layers"]
        layers = self.lm.model.layers
        # The base path's own attention (and KV cache) for every shared layer; projections stay shared.
        self.base_attn = nn.ModuleList(
            Attention(
                layer.self_attn.attn.num_heads,
                layer.self_attn.attn.head_size,
                layer.self_attn.scaling,
                num_kv_heads=layer.self_attn.attn.num_kv_heads,
                cache_config=vllm_config.cache_config,
                quant_config=vllm_config.quant_config,
                per_layer_sliding_window=layer.self_attn.attn.sliding_window,
                prefix=f"{maybe_prefix(prefix, 'base_path')}.layers.{i}.attn",
            )
            for i, layer in enumerate(layers)
            if i >= self.n_adapter
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        model, n = self.lm.model, self.n_adapter
        layers = list(model.layers)
        h = _embed(model, input_ids, inputs_embeds)  # (T, H)
        adapted, residual = _stack(layers[:n], [x.self_attn.attn for x in layers[:n]], positions, h)
        # The shared layers run both paths as one batch of 2T rows, [aligned; base], so each projection
        # reads its weights once per step (decoding is weight-bound); only attention is split, each half
        # with its own KV cache. The base path enters layer n with a zero residual: x + 0 is exactly x,
        # so it computes what the plain model's layer 0 computes.
        t = h.shape[0]
        both, residual = torch.cat([adapted, h]), torch.cat([residual, torch.zeros_like(h)])
        both_positions = torch.cat([positions, positions])
        for layer, base_attn in zip(layers[n:], self.base_attn):
            attn = _split_attention(layer.self_attn.attn, base_attn, t)
            both, residual = _layer(layer, attn, both_positions, both, residual)
        out = model.norm(both, residual)[0]
        return torch.cat([out[t:], out[:t]], dim=-1)  # (T, 2H): base, aligned

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        base, aligned = hidden_states.chunk(2, dim=-1)  # (R, H) each
        lam = strength.active().rows(hidden_states.shape[0]).to(hidden_states.device)
        return self.lm.compute_logits(mix_hidden(base, aligned, lam))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return {f"lm.{name}" for name in self.lm.load_weights(weights)}


@_compiled
class AligndialPairForCausalLM(nn.Module):
    """A reference model and K aligned models (DeRa), each with its own KV caches."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        cls = _causal_lm(vllm_config)
        self.names = list(vllm_config.model_config.hf_config.aligndial["members"])
        for name in self.names:  # module path == attention prefix == checkpoint key prefix
            self.add_module(name, cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, name)))

    @property
    def members(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.names]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.members[0].embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        if inputs_embeds is not None:
            raise ValueError("the aligndial pair takes token ids, not prompt embeddings (each member embeds its own)")
        out = []
        for member in self.members:
            model = member.model
            h, residual = _stack(model.layers, [x.self_attn.attn for x in model.layers], positions,
                                 model.embed_input_ids(input_ids))
            out.append(model.norm(h, residual)[0])
        return torch.cat(out, dim=-1)  # (T, (1+K)·H)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states.chunk(len(self.names), dim=-1)
        lam = strength.active().rows(hidden_states.shape[0]).to(hidden_states.device)
        logits = [m.compute_logits(h) if run else None for m, h, run in zip(self.members, hidden, active_sources(lam))]
        return mix_logits(logits[0], logits[1:], lam)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        by_member = defaultdict(list)
        for name, tensor in weights:
            member, _, rest = name.partition(".")
            if member not in self.names:
                raise ValueError(f"checkpoint key {name!r} belongs to no member of this pair ({', '.join(self.names)})")
            by_member[member].append((rest, tensor))
        return {f"{m}.{n}" for m, ws in by_member.items() for n in getattr(self, m).load_weights(ws)}
