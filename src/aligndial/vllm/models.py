"""The vLLM model classes: the dual-path adapter model and the DeRa pair, generic over the base.

Both run every path at every step, for every token, whatever λ the rows have: prefix caching
shares KV blocks between requests, so each path's cache must be complete for every request.
`forward` returns the paths' final hidden states side by side, (T, P·H) with P paths; vLLM
picks the sampled positions, and `compute_logits` splits them again and mixes each row with
its own λ (from `strength.active().rows(n)`) through `aligndial.mixing`.

Neither class has a decoder layer of its own: each builds the base architecture's vLLM
`*ForCausalLM` (from vLLM's `ModelRegistry`, by the name in `export.NATIVE`) and runs it.

- **Dual path** (`AligndialDualPathForCausalLM`): the merged model, L+n decoder layers with the
  adapter at 0..n−1. The architecture's own model forward runs on a batch of 2T rows,
  [aligned; base], both starting from the embeddings. Two surgical changes make that the dual
  path: each adapter layer runs on the aligned rows only and hands the base rows on unchanged
  (`_AdapterRows`), and each shared layer's attention module (`self_attn.attn` or the like) is
  replaced by `SplitAttention`, which gives the aligned rows the layer's own `Attention` and the
  base rows a second one (prefix `base_path.layers.{i}.attn`) built with the same arguments: a
  second KV cache, the same projection weights. So every projection reads its weights once per
  step for both paths (decoding is weight-bound), as `aligndial.dualpath` does with 2B rows.
  Both paths end in the same head: without a final logit soft-cap the final hidden states are
  mixed and the head runs once (`mix_hidden`); with one (Gemma 2/3), the soft-capped logits are
  mixed (`mix_logits`), as in `aligndial.dualpath`.
- **Pair** (`AligndialPairForCausalLM`): one vLLM `*ForCausalLM` per member (`ref`,
  `aligned_a`, …), each with its own layers and caches; members whose weight is 0 in every row
  skip the head, and the logits are mixed with `mix_logits`.

With tensor parallelism every rank holds its shard of every path; `compute_logits` of the base
class gathers the vocab-parallel logits (padded rows dropped) before the mix, and ranks that
receive no logits (vLLM gathers to one rank) return none.
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import maybe_prefix

from aligndial.mixing import active_sources, mix_hidden, mix_logits
from aligndial.vllm import strength
from aligndial.vllm.export import NATIVE, check_model_type


def _causal_lm(vllm_config) -> type[nn.Module]:
    """The vLLM class of the export's base architecture; refuses what the classes below cannot run."""
    from vllm.model_executor.models.registry import ModelRegistry

    config = vllm_config.model_config.hf_config
    base = config.aligndial["base_model_type"]
    check_model_type(base)
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("aligndial's vLLM models do not support pipeline parallelism (a path's hidden states would "
                         "cross stages with its residual); use `--tensor-parallel-size` instead")
    try:
        cls, _ = ModelRegistry.resolve_model_cls(NATIVE[base], vllm_config.model_config)
    except ValueError:
        raise ValueError(f"this vLLM has no model class {NATIVE[base]!r} for {base!r}; upgrade vLLM") from None
    return cls


@contextmanager
def _recording_attention_args():
    """While building a model, remember on every `Attention` the arguments it was built with, so
    the base path's second attention per layer is built the same way (soft-cap, sliding window,
    scale, attention type: whatever the architecture passes).

    A private hook, scoped to the build and restored after: vLLM keeps no record of an
    Attention's constructor arguments, and rebuilding them from its attributes would drop the
    architecture-specific ones. tests/test_vllm_upstream.py fails, naming the change, if vLLM
    moves what this relies on."""
    original = Attention.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        if not hasattr(self, "_aligndial_args"):  # the outermost call (subclasses call super().__init__)
            bound = signature.bind(self, *args, **kwargs)
            self._aligndial_args = {k: v for k, v in bound.arguments.items() if k != "self"}
        original(self, *args, **kwargs)

    Attention.__init__ = init
    try:
        yield
    finally:
        Attention.__init__ = original


def _attention_of(layer: nn.Module, index: int) -> tuple[nn.Module, str, Attention]:
    """(parent module, attribute, the layer's one `Attention`)."""
    found = [(name, m) for name, m in layer.named_modules() if isinstance(m, Attention)]
    if len(found) != 1:
        raise ValueError(f"aligndial's dual path needs one vLLM Attention per decoder layer; layer {index} of "
                         f"{type(layer).__name__} has {len(found)}. Serve this model as a pair or with `--engine hf`")
    name, attn = found[0]
    if attn.kv_sharing_target_layer_name is not None:
        raise ValueError(f"layer {index} shares its KV cache with {attn.kv_sharing_target_layer_name}; the dual path "
                         "needs one cache per path and layer. Serve this model with `--engine hf`")
    parent_name, _, attr = name.rpartition(".")
    return layer.get_submodule(parent_name), attr, attn


class SplitAttention(nn.Module):
    """Attention over 2T rows [aligned; base]: each half with its own `Attention`, so its own KV cache."""

    def __init__(self, aligned: Attention, base: Attention):
        super().__init__()
        self.aligned, self.base = aligned, base

    def forward(self, query, key, value, output_shape=None, **kwargs):
        t = query.shape[0] // 2
        half = None if output_shape is None else torch.Size([t, *output_shape[1:]])
        kw = kwargs if half is None else {**kwargs, "output_shape": half}
        return torch.cat([self.aligned(query[:t], key[:t], value[:t], **kw),
                          self.base(query[t:], key[t:], value[t:], **kw)])


_ROW_ARGS = ("positions", "position_ids", "hidden_states", "residual")


@functools.cache
def _adapter_rows_class(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` whose forward runs on the first half of the rows (the aligned path) and passes the second
    half (the base path) through unchanged. The class is swapped on the instance, so the layer keeps
    its weights' names. Decoder layers return either the hidden states or (hidden, residual), whose
    sum the next layer reads; the base rows hand on (h, 0) or (h, residual), exactly their state."""
    names = list(inspect.signature(cls.forward).parameters)[1:]
    if "hidden_states" not in names:
        raise ValueError(f"{cls.__name__}.forward has no `hidden_states` argument; the dual path cannot route its rows")
    hidden_at = names.index("hidden_states")
    residual_at = names.index("residual") if "residual" in names else None

    def forward(self, *args, **kwargs):
        args = list(args)
        hidden = args[hidden_at] if hidden_at < len(args) else kwargs["hidden_states"]
        t = hidden.shape[0] // 2

        def first(value):
            return value[..., :t] if value.dim() == 1 else value[:t]

        sliced = [first(a) if i < len(names) and names[i] in _ROW_ARGS and isinstance(a, torch.Tensor) else a
                  for i, a in enumerate(args)]
        kw = {k: first(v) if k in _ROW_ARGS and isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = cls.forward(self, *sliced, **kw)
        if isinstance(out, torch.Tensor):
            return torch.cat([out, hidden[t:]])
        residual = None
        if residual_at is not None:
            residual = args[residual_at] if residual_at < len(args) else kwargs.get("residual")
        base_residual = torch.zeros_like(hidden[t:]) if residual is None else residual[t:]
        h, r = out[0], out[1]
        return (torch.cat([h, hidden[t:]]), torch.cat([r, base_residual]), *out[2:])

    return type(f"AdapterRows{cls.__name__}", (cls,), {"forward": forward})


def _decoder(lm: nn.Module) -> nn.Module:
    """The inner model (the one with `.layers` or `.h`, and `embed_input_ids`)."""
    for name in ("model", "transformer", "gpt_neox"):
        inner = getattr(lm, name, None)
        if inner is not None:
            return inner
    raise ValueError(f"{type(lm).__name__} has no inner model the dual path knows (model, transformer)")


def _layers(model: nn.Module) -> nn.ModuleList:
    for name in ("layers", "h"):
        if isinstance(getattr(model, name, None), nn.ModuleList):
            return getattr(model, name)
    decoder = getattr(model, "decoder", None)  # OPT
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    raise ValueError(f"{type(model).__name__} has no decoder layer list the dual path knows")


def _logits_softcap(vllm_config) -> bool:
    return getattr(vllm_config.model_config.hf_config, "final_logit_softcapping", None) is not None


def _gathered(logits: list) -> bool:
    """False on a tensor-parallel rank that vLLM gave no logits (it gathers them to one rank)."""
    return all(x is not None for x in logits)


class AligndialDualPathForCausalLM(nn.Module):
    """Base model + layer adapter; λ mixes the base path (λ=0) and the adapter path (λ=1)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        cls = _causal_lm(vllm_config)
        with _recording_attention_args():
            self.lm = cls(vllm_config=vllm_config, prefix=prefix)
        self.n_adapter = vllm_config.model_config.hf_config.aligndial["adapter_layers"]
        self.softcapped = _logits_softcap(vllm_config)
        layers = _layers(_decoder(self.lm))
        if self.n_adapter >= len(layers):
            raise ValueError(f"the export has {self.n_adapter} adapter layers of {len(layers)}: no base layers left")
        for i, layer in enumerate(layers):
            parent, attr, attn = _attention_of(layer, i)
            if i < self.n_adapter:
                layer.__class__ = _adapter_rows_class(type(layer))
                continue
            # The base path's own attention (and KV cache) for this shared layer; projections stay shared.
            args = {**attn._aligndial_args, "prefix": f"{maybe_prefix(prefix, 'base_path')}.layers.{i}.attn"}
            setattr(parent, attr, SplitAttention(attn, type(attn)(**args)))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.lm.embed_input_ids(input_ids)  # (T, H)
        t = h.shape[0]
        # The architecture's own forward (compiled by vLLM as for the plain model) on [aligned; base].
        out = _decoder(self.lm)(None, torch.cat([positions, positions], dim=-1), intermediate_tensors,
                                inputs_embeds=torch.cat([h, h]), **kwargs)
        return torch.cat([out[t:], out[:t]], dim=-1)  # (T, 2H): base, aligned

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        base, aligned = hidden_states.chunk(2, dim=-1)  # (R, H) each
        lam = strength.active().rows(hidden_states.shape[0])  # on the host: the mix copies it over once
        if not self.softcapped:
            # A row whose λ makes the hidden-state mix overflow the model's dtype (float16 at a
            # large |λ|) comes back NaN (`nan_rows`). Never raise on a row's values (that stops the
            # engine core for every request): that row alone is mixed as the two paths' logits in
            # float32, the same distribution (the head is linear and the weights sum to one), which
            # cannot overflow for |λ| ≤ LAM_LIMIT; the other rows keep the mix they get alone.
            mixed = mix_hidden(base, aligned, lam, nan_rows=True)
            bad = torch.isnan(mixed).flatten(1).any(-1)  # the same on every tensor-parallel rank
            logits = self.lm.compute_logits(mixed)
            if not bool(bad.any()):
                return logits
            rows = bad.cpu()
            parts = [self.lm.compute_logits(base[bad]), self.lm.compute_logits(aligned[bad])]
            if logits is None or not _gathered(parts):
                return None
            out = logits.float()
            out[bad] = mix_logits(parts[0], parts[1:], lam[rows])
            return out
        logits = [self.lm.compute_logits(base), self.lm.compute_logits(aligned)]  # soft-capped: mix after the cap
        return mix_logits(logits[0], logits[1:], lam) if _gathered(logits) else None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return {f"lm.{name}" for name in self.lm.load_weights(weights)}


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

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        if inputs_embeds is not None:
            raise ValueError("the aligndial pair takes token ids, not prompt embeddings (each member embeds its own)")
        return torch.cat([m(input_ids, positions, intermediate_tensors, **kwargs) for m in self.members], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        hidden = hidden_states.chunk(len(self.names), dim=-1)
        lam = strength.active().rows(hidden_states.shape[0])  # on the host: the mix copies it over once
        runs = active_sources(lam)
        logits = [m.compute_logits(h) if run else None for m, h, run in zip(self.members, hidden, runs)]
        ran = [x for x, run in zip(logits, runs) if run]
        return mix_logits(logits[0], logits[1:], lam) if _gathered(ran) else None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        by_member = defaultdict(list)
        for name, tensor in weights:
            member, _, rest = name.partition(".")
            if member not in self.names:
                raise ValueError(f"checkpoint key {name!r} belongs to no member of this pair ({', '.join(self.names)})")
            by_member[member].append((rest, tensor))
        return {f"{m}.{n}" for m, ws in by_member.items() for n in getattr(self, m).load_weights(ws)}
