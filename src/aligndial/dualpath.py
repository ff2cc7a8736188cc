"""Base model + layer adapter, both paths in ONE forward of 2B rows (CLM / InRa inference).

Rows [0, B) are the base path and rows [B, 2B) the aligned path. The adapter layers sit at
decoder indices 0..n−1; they are routed so that they transform only the aligned rows, and
every shared layer (n..L+n−1) processes all 2B rows in one batched call. Then:

- if the head is a shared linear map with no logit soft-capping, the final hidden states are
  mixed and the head runs once on B rows: W(Σ w_i·x_i) + b = Σ w_i·(W x_i + b) because the
  weights sum to one, so this is the logit mix of CLM Eq. 3 / DeRa Eq. 9, at the cost of one
  head;
- otherwise (Gemma2/3 soft-capping) the full model runs on 2B rows and the logits are mixed.

Both mixes go through `aligndial.mixing`. Fast paths: λ=0 in every row skips the adapter
(plain base cost), λ=1 runs only the adapter path on B rows (exactly the merged model).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from aligndial.adapter import decoder_layers, load_adapter
from aligndial.generation import MixedLM
from aligndial.fewrows import FewRowsLinear, Router, few_rows_product, install_few_rows_linear
from aligndial.mixing import LamLike, active_sources, mix_hidden, mix_logits

# Decoder layers that return (hidden_states, attn_weights) instead of a tensor (transformers 5.x).
_TUPLE_LAYERS = {"falcon"}


def _router_of(model) -> Router:
    router = model.__dict__.get("_aligndial_router")
    if router is None:
        router = Router(model.config.model_type in _TUPLE_LAYERS)
        model._aligndial_router = router  # a plain attribute: not a parameter, not saved
    return router


def _aligned_rows(x, batch: int):
    """The aligned half of every per-row argument (tensors with 2B rows, and tuples of them).
    1-D tensors are not per row (`cache_position` has one entry per position, and a prompt of
    2B tokens must not be cut)."""
    if isinstance(x, torch.Tensor) and x.ndim > 1 and x.shape[0] == 2 * batch:
        return x[batch:]
    if isinstance(x, tuple):
        return tuple(_aligned_rows(v, batch) for v in x)
    return x


_ROUTED: dict[type, type] = {}


def _routed_class(cls: type) -> type:
    """`cls` with a `__call__` that routes rows by the instance's `_aligndial_router`.

    Routing lives on the class's `__call__`, not in an instance `forward`, so whatever `forward`
    the instance has (accelerate's offload and device hooks set one) runs inside the routing,
    on the rows it should see; nothing is skipped because a `forward` attribute already exists.
    Same name as `cls`, so `_no_split_modules` device maps treat it alike."""
    if cls in _ROUTED.values():
        return cls
    if cls not in _ROUTED:
        call = cls.__call__

        def __call__(self, hidden_states, *args, **kwargs):
            router = self._aligndial_router
            if router.mode == "all":
                return call(self, hidden_states, *args, **kwargs)
            if router.mode == "skip":
                return (hidden_states, None) if router.returns_tuple else hidden_states
            b = router.batch
            out = call(
                self,
                hidden_states[b:],
                *(_aligned_rows(a, b) for a in args),
                **{k: _aligned_rows(v, b) for k, v in kwargs.items()},
            )
            h = torch.cat([hidden_states[:b], out[0] if router.returns_tuple else out], dim=0)
            return (h, *out[1:]) if router.returns_tuple else h

        _ROUTED[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _ROUTED[cls]


class DualPathCache(DynamicCache):
    """A DynamicCache whose first n layers (the adapter) may hold only the aligned rows, or
    nothing at all on the λ=0 path. Lengths and mask sizes are read from the first shared layer,
    which always runs; beam reordering maps beam indices onto both halves of a 2B-row layer."""

    def __init__(self, config, n_adapter: int):
        super().__init__(config=config)
        self.n_adapter = n_adapter

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(max(layer_idx, self.n_adapter))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, max(layer_idx, self.n_adapter))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        n = beam_idx.shape[0]
        both = torch.cat([beam_idx, beam_idx + n])
        for layer in self.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            layer.reorder_cache(both if keys.shape[0] == 2 * n else beam_idx)


class DualPathModel(MixedLM):
    """A causal LM with a layer adapter, generating at any λ (per call or per row).

    >>> model = DualPathModel.from_adapter(AutoModelForCausalLM.from_pretrained(base), "adapter/")
    >>> model.generate(**enc, lam=torch.tensor([0.0, 0.5, 2.0]), max_new_tokens=32)
    """

    def __init__(self, model):
        cfg = getattr(model, "aligndial_adapter", None)
        if cfg is None:
            raise ValueError("the model has no layer adapter; use `insert_adapter` or `DualPathModel.from_adapter`")
        super().__init__(model.config)
        self.base = model
        self.n_adapter = cfg.num_layers
        self.generation_config = model.generation_config
        # Per model instance: the router is the model's own, wrapping it again reuses it.
        self._router = _router_of(model)
        for layer in list(decoder_layers(model))[: self.n_adapter]:
            layer.__class__ = _routed_class(type(layer))
            layer._aligndial_router = self._router
        # Exactly nn.Linear: subclasses (our LoRALinear) add terms the few-row shortcut would drop.
        # The shortcut is installed at the first mixed-λ forward, so other models never pay for
        # the wrapper calls (60+ per decode step), and the bf16 kernel is built only when first needed.
        self._plain_linears = [m for m in decoder_layers(model).modules() if type(m) in (torch.nn.Linear, FewRowsLinear)]
        self._few_rows_decided = False
        # Mixing hidden states before the head is exact only for a plain linear head.
        self.mix_before_head = getattr(model.config, "final_logit_softcapping", None) is None and isinstance(
            model.get_output_embeddings(), torch.nn.Linear
        )

    def _install_few_rows(self, device: torch.device) -> None:
        """At the first mixed-λ forward (computing on `device`): give the shared linears the
        few-row product `few_rows_product` names for their dtype here, if any."""
        self._few_rows_decided = True  # decided, whichever way
        if not self._plain_linears:
            return
        dtype = self._plain_linears[0].weight.dtype
        choice = few_rows_product(dtype, device)
        if choice is None:
            return
        for module in self._plain_linears:
            if module.weight.dtype is dtype and module.weight.is_contiguous():
                install_few_rows_linear(module, self._router, *choice, dtype)

    @classmethod
    def from_adapter(cls, model, adapter_dir: str, allow_pickle: bool = False) -> "DualPathModel":
        load_adapter(model, adapter_dir, allow_pickle=allow_pickle)
        return cls(model).eval()

    def new_cache(self) -> DualPathCache:
        return DualPathCache(self.base.config, self.n_adapter)

    def prepare_inputs_for_generation(self, input_ids, lam=None, lam_schedule=None, lam_sources=None, **kwargs):
        inputs = self.base.prepare_inputs_for_generation(input_ids, **kwargs)
        inputs["lam"], inputs["run_all"] = self.step_lam(input_ids, lam, lam_schedule)
        inputs["lam_sources"] = lam_sources
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DualPathCache | None = None,
        lam: LamLike | None = None,
        logits_to_keep: int = 0,
        use_cache: bool | None = None,
        run_all: bool = False,
        lam_sources: tuple[bool, ...] | None = None,
        nan_rows: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Mixed logits (B, T, V). `run_all` forces the 2B-row forward even when λ is 0 or 1
        in every row (a λ schedule may leave those values later, and needs both caches).
        `lam_sources` (from `generate`, which checked λ once for the whole call) says which of
        [base, aligned] carry weight in some row; without it λ is checked here, on the host.
        `nan_rows` (the serving engine): a row whose hidden-state mix overflows the model's dtype
        comes back as NaN logits instead of raising for the whole batch (`mix_hidden`)."""
        b = input_ids.shape[0]
        if lam_sources is None:
            lam = self.resolve_lam(lam, b)
            lam_sources = active_sources(lam)
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache()
        inputs = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                      use_cache=use_cache, **kwargs)
        if not run_all and not all(lam_sources):  # λ = 0 in every row, or λ = 1 in every row
            self._router.mode = "all" if lam_sources[-1] else "skip"
            try:
                out = self.base(input_ids=input_ids, logits_to_keep=logits_to_keep, **inputs)
            finally:
                self._router.mode = "all"
            return CausalLMOutputWithPast(logits=out.logits, past_key_values=past_key_values)

        # Per-row inputs only, by the rule of `_aligned_rows`: a 1-D tensor is per position (and a
        # 0-d one is no row at all), whatever its length.
        doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 1 and v.shape[0] == b else v
                   for k, v in inputs.items()}
        if not self._few_rows_decided:
            self._install_few_rows(input_ids.device)
        self._router.mode, self._router.batch = "dual", b
        try:
            if self.mix_before_head:
                hidden = self.base.base_model(input_ids=torch.cat([input_ids, input_ids]), **doubled).last_hidden_state
                if logits_to_keep:
                    hidden = hidden[:, -logits_to_keep:]
                mixed = mix_hidden(hidden[:b], hidden[b:], lam, checked=True, nan_rows=nan_rows)
                logits = self.base.get_output_embeddings()(mixed)
            else:
                both = self.base(input_ids=torch.cat([input_ids, input_ids]), logits_to_keep=logits_to_keep, **doubled).logits
                logits = mix_logits(both[:b], both[b:], lam.to(both.device))
        finally:
            self._router.mode = "all"
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
