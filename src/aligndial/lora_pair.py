"""DeRa at the memory of one model: the aligned models are PEFT LoRA adapters on the reference.

A DeRa pair (`aligndial.pair`) holds two full models and runs them one after the other. When
the aligned model is the reference plus a LoRA adapter (TRL's DPO with `peft_config`, or
`aligndial train dpo --lora-rank`), both live in ONE base model: each decode step is one
forward of (K+1)·B rows, where rows [0, B) are the reference (adapters off) and rows
[k·B, (k+1)·B) are aligned model k (adapter k on). Every LoRA linear runs its base weight once
on all rows and adds adapter k's low-rank term to its own rows only (`_routed`). Then:

- if the head is a shared linear map, what the model does after it is affine (nothing, or a
  logit scale as Cohere's and Granite's: asked of the model, `mix_before_head`) and two row
  blocks are live, the final hidden states are mixed in front of the head (a pre-hook on it,
  inside the model's own forward, so every step after the head still runs) and the head runs
  once on B rows (W(Σ w_i·x_i) = Σ w_i·W x_i because the weights sum to one: DeRa Eq. 9 at
  the cost of one head), as the dual path does;
- otherwise (K ≥ 2 live adapters, a LoRA on the head, a soft-cap) the model runs on all rows
  and its logits are mixed (DeRa App. B).

Both mixes go through `aligndial.mixing`. Only sources with a non-zero weight in some row get
rows: λ=0 is the plain base (every LoRA layer returns its base layer's output, bit for bit),
λ=1 is B adapted rows, computed by exactly PEFT's operations (bit for bit PEFT's own forward;
the model made by `merge_and_unload` agrees to float rounding, since merging adds B·A into W).

Weak-to-strong steering (proxy-tuning / EFT) is the full-model pair with K=2 and weights
(λ, −λ); see docs/lora.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from aligndial.generation import MixedLM
from aligndial.fewrows import Router, few_rows_product, install_few_rows_linear
from aligndial.loading import load_causal_lm, load_tokenizer
from aligndial.mixing import LamLike, active_sources, mix_hidden, mix_logits
from aligndial.peft_dirs import check_lora_dir, lora_base
from aligndial.vocab import check_tokenizers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ROUTINGS = ("rows", "peft")
# The size of the head outputs `LoraPair._head_side_is_affine` probes with: far past where a
# soft-cap bends (Gemma caps at 30), far below where float16 overflows.
HEAD_PROBE_LOGIT = 1000.0


class LoraPairCache(DynamicCache):
    """A DynamicCache of R = n·B rows in every layer: row block i holds source `sources[i]`
    (0 the reference, k adapter k). The layout is fixed by the first forward."""

    def __init__(self, config):
        super().__init__(config=config)
        self.sources: list[int] | None = None

    @property
    def row_blocks(self) -> int:
        return len(self.sources) if self.sources else 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        n = beam_idx.shape[0]
        super().reorder_cache(torch.cat([beam_idx + i * n for i in range(self.row_blocks)]))


class _Rows:
    """Which rows each adapter owns in the current forward: `spans` of (adapter, start, stop).
    `spans` None means "not inside a LoraPair forward": PEFT's own forward runs.

    Also what the head's input becomes (`head_input`, the pre-hook on the head): with
    `head_mix` = (B, λ) the two row blocks of hidden states are mixed into B rows, so the head
    and whatever the model's own forward does after it (a logit scale, a soft-cap, …) run on the
    mix; with `head_probe` the rows are replaced by those probe rows. A bound method of this
    object, so `copy.deepcopy` of the model hooks the copy's own rows."""

    def __init__(self):
        self.spans: list[tuple[str, int, int]] | None = None
        self.peft_names: list[str] | None = None  # routing "peft": one adapter name per row
        self.head_mix: tuple[int, torch.Tensor] | None = None
        self.head_probe: torch.Tensor | None = None

    def head_input(self, module, args, kwargs):
        if self.head_mix is None and self.head_probe is None:
            return None
        hidden = args[0] if args else kwargs.pop("input")
        if self.head_probe is not None:
            hidden = self.head_probe
        else:
            b, lam = self.head_mix
            # Two live blocks [s0, s1]: the weight of s1 is its λ, and s0's is 1 − λ (Eq. 9).
            hidden = mix_hidden(hidden[:b], hidden[b:], lam)
        return (hidden, *args[1:]), kwargs


_ROUTED_CLASS: list[type] = []


def _routed_class() -> type:
    """PEFT's `lora.Linear` with each adapter's low-rank term added to its own rows only.

    A span covering every row runs exactly PEFT's operations for vanilla LoRA (cast x to the
    adapter's dtype, `result + lora_B(lora_A(dropout(x))) * scaling`, cast back), so it is bit for
    bit PEFT's forward, and no span is the base layer alone. A span of some rows (a mixed step)
    adds the same term to those rows in place (lora_B's bias too, with `lora_bias`), in two
    kernels when the module is in eval and x, the factors and the output share a dtype; PEFT's
    operations on the slice otherwise. A span of an adapter this layer does not hold leaves its
    rows as the base layer computed them, as PEFT does for a layer outside an adapter.
    A class (swapped in) rather than an instance `forward`, so copies of the model stay routed
    by their own `_Rows`."""
    if not _ROUTED_CLASS:
        from peft.tuners.lora import Linear as LoraLinear

        class RowRoutedLoraLinear(LoraLinear):
            def forward(self, x, *args, **kwargs):
                rows = self._aligndial_rows
                if rows.spans is None:  # not inside a LoraPair forward: PEFT's own
                    return super().forward(x, *args, **kwargs)
                if rows.peft_names is not None:
                    return super().forward(x, *args, adapter_names=rows.peft_names, **kwargs)
                result = self.base_layer(x, *args, **kwargs)
                for name, start, stop in rows.spans:
                    if name not in self.lora_A:  # adapter `name` does not cover this layer: its base here, as in PEFT
                        continue
                    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                    if start == 0 and stop == result.shape[0]:  # every row adapted: PEFT's own operations
                        xs = x.to(lora_a.weight.dtype)
                        part = result + lora_b(lora_a(self.lora_dropout[name](xs))) * self.scaling[name]
                        return part.to(result.dtype)
                    a, b = lora_a.weight, lora_b.weight
                    if self.training or not (x.dtype is a.dtype is b.dtype is result.dtype and result.is_contiguous()):
                        xs = x[start:stop].to(a.dtype)
                        part = result[start:stop] + lora_b(lora_a(self.lora_dropout[name](xs))) * self.scaling[name]
                        result[start:stop] = part.to(result.dtype)
                        continue
                    # Eval (dropout is the identity), one dtype: the same low-rank term in two
                    # kernels, added in place to this block's rows (a contiguous view of result).
                    out = result[start:stop].view(-1, result.shape[-1])
                    out.addmm_(torch.mm(x[start:stop].reshape(-1, x.shape[-1]), a.t()), b.t(), alpha=self.scaling[name])
                    if lora_b.bias is not None:  # LoraConfig(lora_bias=True): lora_B(·) adds its bias, scaled too
                        out.add_(lora_b.bias, alpha=self.scaling[name])
                return result

        _ROUTED_CLASS.append(RowRoutedLoraLinear)
    return _ROUTED_CLASS[0]


def _check_supported(model, names: list[str]) -> list[nn.Module]:
    """The PEFT LoRA layers of `model`; refuse what the row routing does not reproduce exactly."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = []
    for path, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            if type(module).__name__ in ("ModulesToSaveWrapper", "TrainableTokensWrapper"):
                raise ValueError(f"the adapter trains whole modules ({path}: `modules_to_save` or trainable tokens); "
                                 "only LoRA on linear layers is mixed in one model. Merge it and pass a full model.")
            continue
        if not isinstance(module, LoraLinear):
            raise ValueError(f"{path} is a {type(module).__name__}; only LoRA on linear layers is mixed in one model "
                             "(no LoRA on embeddings or convolutions). Merge it and pass a full model.")
        variants = [n for n in names if n in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(n)]
        if variants:
            raise ValueError(f"{path} uses a LoRA variant (DoRA or similar) in {variants}; only plain LoRA is mixed in "
                             "one model. Merge it and pass a full model.")
        layers.append(module)
    if not layers:
        raise ValueError("the adapter holds no LoRA layer")
    return layers


class _Source:
    """One source of a LoraPair as a causal LM callable (`members`): the base model with that
    source's adapter only (none for the reference). Not a module: it owns no weights."""

    def __init__(self, pair: "LoraPair", index: int):
        self.pair, self.index = pair, index
        self.config = pair.base.config

    def get_output_embeddings(self):
        return self.pair.base.get_output_embeddings()

    def __call__(self, input_ids=None, **kwargs):
        lam = [1.0 if k == self.index else 0.0 for k in range(1, self.pair.n_aligned + 1)]
        return self.pair(input_ids, lam=lam if len(lam) > 1 else lam[0], **kwargs)


class LoraPair(MixedLM):
    """A base model (the reference) + K LoRA adapters (the aligned models) in one forward.

    >>> pair = LoraPair.from_pretrained("sft-model", "dpo-lora/")      # or aligndial.mixed.load_pair
    >>> pair.generate(**pair.tokenizer(["Hi"], return_tensors="pt"), lam=0.5, max_new_tokens=20)

    `routing` "rows" (default) adds each adapter's term to its contiguous row block; "peft"
    uses PEFT's mixed-adapter batches (`adapter_names` with "__base__"), kept to measure the two
    side by side (benchmarks/lora_pair_speed.py)."""

    def __init__(self, model, adapter_names: list[str], tokenizer=None, names: list[str] | None = None,
                 routing: str = "rows"):
        if routing not in ROUTINGS:
            raise ValueError(f"`routing` must be one of {ROUTINGS}; got {routing!r}")
        super().__init__(model.config)
        self.base = model
        self.adapter_names = list(adapter_names)
        self.n_aligned = len(adapter_names)
        self.tokenizer = tokenizer
        self.names = names or ["ref"] + [f"aligned[{i}]" for i in range(self.n_aligned)]
        self.routing = routing
        self.generation_config = model.generation_config
        self._rows = _Rows()
        lora_layers = _check_supported(model, self.adapter_names)
        routed = _routed_class()
        for layer in lora_layers:
            layer.__class__ = routed
            layer._aligndial_rows = self._rows
        # The dual path's few-row product for the base linears, chosen at the first mixed forward:
        # every base weight multiplies (K+1)·B rows, which stock F.linear pays for nearly per row
        # on some CPUs (see aligndial.dualpath). Never on the single-source paths (λ=0 / λ=1).
        lora_parts = {id(m) for layer in lora_layers for d in (layer.lora_A, layer.lora_B) for m in d.values()}
        self._plain_linears = [m for m in model.base_model.modules() if type(m) is nn.Linear and id(m) not in lora_parts]
        self._few_rows = None  # the router the few-row linears read; None until decided
        # The head's input goes through `_Rows.head_input`, so a hidden-state mix runs inside the
        # model's own forward and every step it takes after the head still applies.
        model.get_output_embeddings().register_forward_pre_hook(self._rows.head_input, with_kwargs=True)
        self._mix_before_head: bool | None = None  # decided at first use (`mix_before_head`)

    @property
    def mix_before_head(self) -> bool:
        """Whether two row blocks are mixed as hidden states before the head, which runs once on
        B rows: exact only for one plain linear head (a LoRA on the head differs per source)
        whose model then does something affine with its output, which commutes with a mix whose
        weights sum to one (Cohere's logit scale: yes; Gemma's tanh soft-cap: no). Asked of the
        model itself (`_head_side_is_affine`), not of a list of config names."""
        if self._mix_before_head is None:
            self._mix_before_head = type(self.base.get_output_embeddings()) is nn.Linear and self._head_side_is_affine()
        return self._mix_before_head

    def _head_side_is_affine(self) -> bool:
        """Run the model on probe rows put in front of its head: x0, x1 and their mix at λ=2,
        scaled so the head's outputs reach ±HEAD_PROBE_LOGIT (where a soft-cap bends). The model's
        logits f(·) commute with the mix iff f(mix(x0, x1)) = mix(f(x0), f(x1)), to rounding."""
        head = self.base.get_output_embeddings()
        w = head.weight
        x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0))  # not the global RNG
        with torch.no_grad():
            y = head(x.to(w.device, w.dtype)).float().cpu()
            x = (x * (HEAD_PROBE_LOGIT / y.abs().amax(-1, keepdim=True))).to(w.device, w.dtype)
            self._rows.head_probe = torch.cat([x, mix_hidden(x[:1], x[1:], 2.0)])[:, None]  # (3, 1, H)
            ids = torch.zeros(3, 1, dtype=torch.long, device=self.base.get_input_embeddings().weight.device)
            try:
                logits = self.base(input_ids=ids, use_cache=False).logits[:, -1].float()
            finally:
                self._rows.head_probe = None
        expected = mix_logits(logits[:1], logits[1:2], 2.0)
        tol = max(1e-3, 32 * torch.finfo(w.dtype).eps) * expected.abs().max()
        return bool(((logits[2:] - expected).abs() <= tol).all())

    @classmethod
    def from_pretrained(cls, ref: str | None, aligned: str | list[str], dtype=None, device=None,
                        trust_remote_code: bool = False, routing: str = "rows") -> "LoraPair":
        """`ref` (None: the first adapter's `base_model_name_or_path`) with each LoRA directory of
        `aligned` loaded onto it through PEFT. Tokenizers saved with an adapter must match ref's."""
        aligned = [aligned] if isinstance(aligned, (str, Path)) else list(aligned)
        for path in aligned:
            check_lora_dir(path)
        ref = ref or lora_base(aligned[0])
        if not ref:
            raise ValueError(f"{aligned[0]} records no base_model_name_or_path; pass the base model as `--ref`")
        try:
            from peft import PeftModel
        except ImportError:
            raise ImportError("a LoRA adapter as the aligned model needs PEFT: pip install 'aligndial[train]'") from None
        tokenizer = load_tokenizer(ref, trust_remote_code)
        for path in aligned:
            if any((Path(path).expanduser() / f).is_file() for f in TOKENIZER_FILES):
                check_tokenizers(tokenizer, load_tokenizer(path, trust_remote_code), ref, path)
        model = load_causal_lm(ref, dtype, device, trust_remote_code)
        names = [f"aligned{k}" for k in range(len(aligned))]
        peft_model = PeftModel.from_pretrained(model, aligned[0], adapter_name=names[0], is_trainable=False)
        for name, path in zip(names[1:], aligned[1:]):
            peft_model.load_adapter(path, adapter_name=name, is_trainable=False)
        inner = peft_model.base_model.model  # the transformers model, LoRA layers in place
        return cls(inner.eval(), names, tokenizer, names=[ref, *map(str, aligned)], routing=routing).eval()

    @property
    def members(self) -> list[_Source]:
        """[ref, aligned_1, …] as separate callables, like `RealignedPair.members` (e.g. for a
        distillation loss that mixes the members' logits itself); each runs B rows."""
        return [_Source(self, i) for i in range(self.n_aligned + 1)]

    def new_cache(self) -> LoraPairCache:
        return LoraPairCache(self.base.config)

    def prepare_inputs_for_generation(self, input_ids, lam=None, lam_schedule=None, **kwargs):
        inputs = self.base.prepare_inputs_for_generation(input_ids, **kwargs)
        inputs["lam"], inputs["run_all"] = self.step_lam(input_ids, lam, lam_schedule)
        return inputs

    def _sources(self, lam: torch.Tensor, run_all: bool, cache: LoraPairCache | None) -> list[int]:
        """The sources that get rows: those with a non-zero weight (all with `run_all`), or the
        cache's layout once it has one (a superset: extra sources just get weight 0)."""
        wanted = list(range(self.n_aligned + 1)) if run_all else [i for i, on in enumerate(active_sources(lam)) if on]
        if cache is None or not isinstance(cache, LoraPairCache):
            return wanted
        if cache.sources is None:
            cache.sources = wanted
        elif not set(wanted) <= set(cache.sources):
            raise ValueError(f"this cache holds rows for sources {cache.sources} only, but λ gives weight to {wanted}; "
                             "start a new cache, or pass run_all=True from the first step")
        return cache.sources

    def _install_few_rows(self, device: torch.device) -> None:
        self._few_rows = Router(False)
        if not self._plain_linears:
            return
        dtype = self._plain_linears[0].weight.dtype
        choice = few_rows_product(dtype, device)
        if choice is None:
            return
        for module in self._plain_linears:
            if module.weight.dtype is dtype and module.weight.is_contiguous():
                install_few_rows_linear(module, self._few_rows, *choice, dtype)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LoraPairCache | None = None,
        lam: LamLike | None = None,
        logits_to_keep: int = 0,
        use_cache: bool | None = None,
        run_all: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Mixed logits (B, T, V). `run_all` gives every source its rows even where its weight
        is 0 (a λ schedule or a server's rows may change λ later, and need complete caches)."""
        b = input_ids.shape[0]
        lam = self.resolve_lam(lam, b)
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache()
        sources = self._sources(lam, run_all, past_key_values)
        n = len(sources)
        inputs = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                      use_cache=use_cache, **kwargs)
        if n > 1:
            inputs = {k: torch.cat([v] * n) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b else v
                      for k, v in inputs.items()}
            input_ids = torch.cat([input_ids] * n)
        hidden_mix = n == 2 and self.mix_before_head  # decided (a probe forward at first use) before routing rows
        self._rows.spans = [(self.adapter_names[s - 1], i * b, (i + 1) * b) for i, s in enumerate(sources) if s > 0]
        if self.routing == "peft":
            self._rows.peft_names = [
                "__base__" if s == 0 else self.adapter_names[s - 1] for s in sources for _ in range(b)
            ]
        try:
            if n == 1:  # λ=0 or λ=1 in every row: exactly the base model, or exactly the adapted one
                logits = self.base(input_ids=input_ids, logits_to_keep=logits_to_keep, **inputs).logits
            else:
                if self._few_rows is None:
                    self._install_few_rows(input_ids.device)
                self._few_rows.mode = "dual"
                if hidden_mix:
                    self._rows.head_mix = (b, lam[:, sources[1] - 1])  # mixed in front of the head
                    logits = self.base(input_ids=input_ids, logits_to_keep=logits_to_keep, **inputs).logits
                else:
                    both = self.base(input_ids=input_ids, logits_to_keep=logits_to_keep, **inputs).logits
                    per_source = [None] * (self.n_aligned + 1)
                    for i, s in enumerate(sources):
                        per_source[s] = both[i * b : (i + 1) * b]
                    logits = mix_logits(per_source[0], per_source[1:], lam.to(both.device))
        finally:
            self._rows.spans = self._rows.peft_names = self._rows.head_mix = None
            if self._few_rows is not None:
                self._few_rows.mode = "all"
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
