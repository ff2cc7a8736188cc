"""What makes λ-mixed models work with Hugging Face `generate()`.

`MixedLM` is a `PreTrainedModel` whose forward returns λ-mixed logits. Subclasses (the DeRa
pair, the dual-path adapter model) implement three things:

- `new_cache()`: the cache object(s) generation threads through the steps;
- `prepare_inputs_for_generation(...)`: usually by delegating to the wrapped HF model(s), so
  positions, masks and cache slicing are exactly what plain transformers would do;
- `forward(..., lam=...)`: returns `CausalLMOutputWithPast(logits=mixed, past_key_values=cache)`.

Everything else (greedy, sampling, beam search, stopping criteria, streamers, padding) is the
stock transformers generation stack. λ travels as a model kwarg holding a (B, K) float32 tensor,
so `generate` expands it with the batch for beams and `num_return_sequences`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import torch
from transformers import GenerationMixin, PreTrainedModel

from aligndial.mixing import LamLike, active_sources, lam_weights


class MixedLM(PreTrainedModel, GenerationMixin):
    """Base class: a causal LM whose next-token distribution is a λ-mixture."""

    main_input_name = "input_ids"
    n_aligned: int = 1
    # The wrapper runs no attention of its own; the wrapped models use whatever they loaded with.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(copy.deepcopy(config))

    def new_cache(self):
        raise NotImplementedError

    # generate() asks for a cache here; we hand it the subclass's own (per-member / 2B-row) cache.
    # A private transformers hook: a PairCache is no transformers `Cache`, so it cannot go in as
    # `past_key_values`. tests/test_upstream.py fails, naming the change, if transformers moves it.
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = self.new_cache()

    def generate(self, inputs: torch.Tensor | None = None, lam: LamLike | LamSchedule = 1.0, **kwargs):
        """`transformers` generate, with `lam`:

        - a number, a list (one weight per aligned model), or a tensor with one row per prompt;
        - or a schedule: a callable `f(input_ids) -> lam` called before every step on the full
          sequences so far, so λ can change inside the response (per token, e.g. inside a
          `<think>` span) or per turn. With a schedule every source runs at every step, because
          a source skipped early would have no cache to continue from.

        Default 1.0: the aligned model."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("generate needs `input_ids` (prompt embeddings are not supported by mixed models)")
        if callable(lam):
            kwargs["lam_schedule"] = lam
            lam = lam(input_ids)
        # Checked once per call, on the host: the steps reuse it as is (`step_lam`), so a decode
        # step on an accelerator never waits to copy λ back. A forward that takes `lam_sources`
        # also gets, once, which sources carry weight (it picks the λ=0 / λ=1 fast paths from it).
        lam = lam_weights(lam, input_ids.shape[0], self.n_aligned)
        if "lam_schedule" not in kwargs and "lam_sources" in inspect.signature(self.forward).parameters:
            kwargs["lam_sources"] = tuple(active_sources(lam))
        return super().generate(inputs, lam=lam.to(input_ids.device), **kwargs)

    def resolve_lam(self, lam: LamLike | None, batch_size: int) -> torch.Tensor:
        return lam_weights(1.0 if lam is None else lam, batch_size, self.n_aligned)

    def step_lam(self, input_ids: torch.Tensor, lam, lam_schedule) -> tuple[torch.Tensor, bool]:
        """λ for the next step and whether every source must run (a schedule is active).
        Without a schedule `lam` is the tensor `generate` checked, expanded with the batch."""
        if lam_schedule is None:
            return lam, False
        return self.resolve_lam(lam_schedule(input_ids), input_ids.shape[0]), True


LamSchedule = Callable[[torch.Tensor], LamLike]


def span_schedule(tokenizer, inside: float, outside: float, open_tag: str = "<think>", close_tag: str = "</think>"):
    """A per-token schedule: λ = `inside` while a row is inside an open `open_tag … close_tag`
    span of its sequence so far, `outside` otherwise. Works on the decoded text, so tags that
    span several tokens are found. Pass it as `generate(..., lam=span_schedule(tok, 1.0, 0.0))`."""

    def schedule(input_ids: torch.Tensor) -> torch.Tensor:
        texts = tokenizer.batch_decode(input_ids, skip_special_tokens=False)
        return torch.tensor([inside if t.rfind(open_tag) > t.rfind(close_tag) else outside for t in texts])

    return schedule


def render_prompts(tokenizer, prompts: list, chat: bool) -> list[str]:
    """Prompts as text. With `chat`, a string becomes one user turn and a list of messages is
    used as is; the chat template is the (reference) tokenizer's."""
    if not chat:
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"a prompt given as messages needs `--chat`; got {bad[0]!r}")
        return prompts
    if tokenizer.chat_template is None:
        raise ValueError("`--chat` needs a tokenizer with a chat template; this one has none. Drop `--chat`.")
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}] if isinstance(p, str) else p, tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def generate_rows(
    model, tokenizer, prompts: list[str], lam=None, seed: int | None = None, add_special_tokens: bool = True, **gen_kwargs
) -> list[dict]:
    """Generate for a batch of rendered prompts and return one row per prompt:
    {"text", "token_ids" (generated ids only, up to and including EOS), "tokens_per_second"}.

    `model` is a plain HF causal LM (then `lam` must be None) or a `MixedLM`. Rendered chat
    prompts already hold their special tokens, so pass `add_special_tokens=False` for them."""
    import time

    from transformers import set_seed

    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(model.device)
    if seed is not None:
        set_seed(seed)
    extra = {} if lam is None else {"lam": lam}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **extra, pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
    elapsed = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    if hasattr(model, "eos_token_ids"):  # a pair: the EOS ids of the members this λ runs (aligndial.pair)
        eos = set(model.eos_token_ids(lam, len(prompts)))
    else:
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    rows = []
    for ids in new:
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        ids = ids[:cut]
        rows.append(
            {
                "text": tokenizer.decode(ids, skip_special_tokens=True),
                "token_ids": ids,
                "tokens_per_second": round(len(ids) / elapsed, 2) if elapsed > 0 else None,
            }
        )
    return rows
