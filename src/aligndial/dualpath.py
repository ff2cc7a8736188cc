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

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from aligndial.adapter import decoder_layers, load_adapter
from aligndial.generation import MixedLM
from aligndial.kernels import MAX_ROWS, few_rows_bf16
from aligndial.mixing import LamLike, mix_hidden, mix_logits

# Decoder layers that return (hidden_states, attn_weights) instead of a tensor (transformers 5.x).
_TUPLE_LAYERS = {"falcon"}


class _Router:
    """Which rows the adapter layers transform in the current forward."""

    def __init__(self):
        self.mode = "all"  # "all" rows, "skip" the adapter, or "dual": only rows [batch, 2·batch)
        self.batch = 0


def _aligned_rows(x, batch: int):
    """The aligned half of every per-row argument (tensors with 2B rows, and tuples of them)."""
    if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == 2 * batch:
        return x[batch:]
    if isinstance(x, tuple):
        return tuple(_aligned_rows(v, batch) for v in x)
    return x


def _routed(layer_forward, router: _Router, returns_tuple: bool):
    def forward(hidden_states, *args, **kwargs):
        if router.mode == "all":
            return layer_forward(hidden_states, *args, **kwargs)
        if router.mode == "skip":
            return (hidden_states, None) if returns_tuple else hidden_states
        b = router.batch
        out = layer_forward(
            hidden_states[b:],
            *(_aligned_rows(a, b) for a in args),
            **{k: _aligned_rows(v, b) for k, v in kwargs.items()},
        )
        h = torch.cat([hidden_states[:b], out[0] if returns_tuple else out], dim=0)
        return (h, *out[1:]) if returns_tuple else h

    return forward


# A decode step of the dual path multiplies each shared weight by 2B rows. On some CPUs stock
# F.linear pays nearly once per row for a few rows, and another form is much cheaper:
# - fp32 on the AMD EPYC machines we measured: MKL's small-M GEMM took 1.5-2x its one-row
#   product; W @ xᵀ with a row-contiguous x cost about one row's (8 layers, 2 rows: 3.3 ms
#   against 9.2 ms);
# - bf16 (see aligndial.kernels): without native bf16 our kernel widens each weight once for all
#   rows; on an Intel Sapphire Rapids its AVX512-BF16 loop took 2.7-3.1 ms for 8 layers at 2
#   rows against oneDNN's 5.5-7.7 ms (which is no cheaper at 1 row).
# On other CPUs the same forms lose: on that Sapphire Rapids, fp32 W @ xᵀ at 2 rows took
# 10.1 ms against stock's 4.2 ms, and λ=0.5 decoding fell to 0.56 of the plain model. So the first
# mixed-λ forward times both on the model's own weights and installs the shortcut only where it
# wins (`_beats_stock`). Used only in the dual forward: the λ=0 / λ=1 fast paths stay stock, so
# they remain bit-exact with plain transformers.
SMALL_ROWS = 8


def _few_rows_product(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The candidate `f(x, w) -> x @ w.T` for contiguous x of a few rows, or None."""
    if dtype == torch.float32:
        return lambda x, w: (w @ x.T).T
    return few_rows_bf16() if dtype == torch.bfloat16 else None


def _beats_stock(product, weights: list[torch.Tensor], rows: int, budget_bytes: int = 64 << 20) -> bool:
    """Whether `product` multiplies `rows` rows by these weights (up to `budget_bytes` of them,
    so that they stream from memory as in decoding) at least 10% faster than stock F.linear.
    Best of 3 alternating passes; a few tens of ms, once per model."""
    chosen, total = [], 0
    for w in weights:
        if total >= budget_bytes:
            break
        chosen.append(w)
        total += w.numel() * w.element_size()
    # Constant inputs: the global RNG must not move, or a seeded generate() would sample
    # differently on a model's first call than on its later ones.
    xs = {w.shape[1]: torch.full((rows, w.shape[1]), 0.5, dtype=w.dtype) for w in chosen}

    def seconds(f) -> float:
        start = time.perf_counter()
        for w in chosen:
            f(xs[w.shape[1]], w)
        return time.perf_counter() - start

    with torch.no_grad():
        stock, candidate = zip(*[(seconds(F.linear), seconds(product)) for _ in range(3)])
    return min(candidate) < 0.9 * min(stock)


def _few_rows_linear(linear: torch.nn.Linear, router: _Router, product, dtype: torch.dtype):
    forward, params = linear.forward, linear._parameters
    max_rows = MAX_ROWS if dtype == torch.bfloat16 else SMALL_ROWS  # our bf16 kernel takes up to MAX_ROWS
    max_numel, out_features = max_rows * linear.in_features, linear.out_features

    # This runs ~60 times per decode step, and each µs here is ~0.5% of a step of the benchmark
    # model: hence `params[...]` rather than nn.Module.__getattr__, and dtype checks by identity.
    def few_rows_forward(x):
        w = params["weight"]
        # A model cast to another dtype or moved off the CPU after installing steps aside to stock F.linear.
        if router.mode != "dual" or x.numel() > max_numel or x.dtype is not dtype or w.dtype is not dtype or not x.is_cpu:
            return forward(x)
        y = product(x.reshape(-1, x.shape[-1]).contiguous(), w).view(*x.shape[:-1], out_features)
        bias = params["bias"]
        return y if bias is None else y + bias

    return few_rows_forward


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
        self._router = _Router()
        returns_tuple = model.config.model_type in _TUPLE_LAYERS
        for layer in list(decoder_layers(model))[: self.n_adapter]:
            if "forward" not in layer.__dict__:  # route once, even if wrapped twice
                layer.forward = _routed(layer.forward, self._router, returns_tuple)
        # Exactly nn.Linear: subclasses (our LoRALinear) add terms the few-row shortcut would drop.
        # The shortcut is decided at the first mixed-λ forward (fp32, or bf16 where our kernel
        # applies, and only if it beats stock on this CPU), so other models never pay for the
        # wrapper calls (~2 µs each, 60+ per decode step), and the bf16 kernel is built only when
        # first needed.
        self._plain_linears = [m for m in decoder_layers(model).modules() if type(m) is torch.nn.Linear]
        self._few_rows_decided = False
        # Mixing hidden states before the head is exact only for a plain linear head.
        self.mix_before_head = getattr(model.config, "final_logit_softcapping", None) is None and isinstance(
            model.get_output_embeddings(), torch.nn.Linear
        )

    def _install_few_rows(self, rows: int) -> None:
        """Decide once, at the first mixed-λ forward (2B = `rows` rows), whether the shared
        linears use the few-row product; install it only where it beats stock here."""
        self._few_rows_decided = True  # decided, whichever way
        weight = self._plain_linears[0].weight if self._plain_linears else None
        if weight is None or weight.device.type != "cpu" or rows > SMALL_ROWS:
            return
        product = _few_rows_product(weight.dtype)
        if product is None or not _beats_stock(product, [m.weight for m in self._plain_linears], rows):
            return
        for module in self._plain_linears:
            if "forward" not in module.__dict__ and module.weight.is_contiguous():
                module.forward = _few_rows_linear(module, self._router, product, weight.dtype)

    @classmethod
    def from_adapter(cls, model, adapter_dir: str, allow_pickle: bool = False) -> "DualPathModel":
        load_adapter(model, adapter_dir, allow_pickle=allow_pickle)
        return cls(model).eval()

    def new_cache(self) -> DualPathCache:
        return DualPathCache(self.base.config, self.n_adapter)

    def prepare_inputs_for_generation(self, input_ids, lam=None, lam_schedule=None, **kwargs):
        inputs = self.base.prepare_inputs_for_generation(input_ids, **kwargs)
        inputs["lam"], inputs["run_all"] = self.step_lam(input_ids, lam, lam_schedule)
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
        return_dict: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Mixed logits (B, T, V). `run_all` forces the 2B-row forward even when λ is 0 or 1
        in every row (a λ schedule may leave those values later, and needs both caches)."""
        b = input_ids.shape[0]
        lam = self.resolve_lam(lam, b)
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache()
        inputs = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                      use_cache=use_cache, **kwargs)
        values = lam.view(-1).tolist()  # (B,) on the CPU: cheaper than tensor comparisons in a decode step
        if not run_all and (set(values) == {0.0} or set(values) == {1.0}):
            self._router.mode = "skip" if values[0] == 0 else "all"
            try:
                out = self.base(input_ids=input_ids, logits_to_keep=logits_to_keep, **inputs)
            finally:
                self._router.mode = "all"
            return CausalLMOutputWithPast(logits=out.logits, past_key_values=past_key_values)

        doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.shape[0] == b else v for k, v in inputs.items()}
        if not self._few_rows_decided:
            self._install_few_rows(2 * b)
        self._router.mode, self._router.batch = "dual", b
        try:
            if self.mix_before_head:
                hidden = self.base.base_model(input_ids=torch.cat([input_ids, input_ids]), **doubled).last_hidden_state
                if logits_to_keep:
                    hidden = hidden[:, -logits_to_keep:]
                logits = self.base.get_output_embeddings()(mix_hidden(hidden[:b], hidden[b:], lam))
            else:
                both = self.base(input_ids=torch.cat([input_ids, input_ids]), logits_to_keep=logits_to_keep, **doubled).logits
                logits = mix_logits(both[:b], both[b:], lam.to(both.device))
        finally:
            self._router.mode = "all"
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
