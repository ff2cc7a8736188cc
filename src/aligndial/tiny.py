"""Tiny models and tokenizers built offline, for tests, benchmarks and the demo.

Nothing here touches the hub: tokenizers are trained on text we pass in, and models are built
from transformers configs with seeded random weights, then saved with `save_pretrained` so
that everything downstream goes through the real `from_pretrained` path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"]
# transformers 5 loads a saved tokenizer with the model type's own class (Qwen2Tokenizer adds
# <|endoftext|> when missing), so it is part of the vocabulary from the start.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# A minimal chat format our tiny tokenizers share: one role tag per turn, `</s>` closes a turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. A careful assistant answers questions "
    "step by step, checks its work, and says when it is unsure. Numbers such as 12, 345 and "
    "6789 appear in arithmetic: 2 + 3 = 5, 7 * 8 = 56. Hello, how are you today? I am fine, "
    "thank you. Once upon a time there was a small model that learned to speak."
)


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (any text can be encoded)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or [DEFAULT_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Per-architecture overrides on top of the shared small sizes (transformers 5.x config names).
_ARCH = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    "phi3": {},
    "phi": {},
    "olmo2": {},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "gpt_neox": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "falcon": {"new_decoder_architecture": False, "multi_query": True},
}
SUPPORTED_TINY = tuple(_ARCH)


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, **overrides):
    """A small, valid config for `arch` with explicit special-token ids (Phi3 defaults break small vocabs)."""
    if arch not in _ARCH:
        raise ValueError(f"no tiny config for {arch!r}; choose one of {', '.join(SUPPORTED_TINY)}")
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        # Wider than the usual 0.02, so random models have peaked (not near-uniform) next-token
        # distributions: greedy comparisons then test the maths, not float noise between near-ties.
        initializer_range=0.2,
    )
    if arch == "gpt2":
        kw = dict(vocab_size=vocab_size, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
        kw.update(initializer_range=0.2)
        kw.update(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256)
    else:
        kw.update({k: v for k, v in _ARCH[arch].items()})
        if arch == "gpt_neox":
            kw.pop("num_key_value_heads")
        if arch == "opt":
            kw.update(ffn_dim=2 * hidden, word_embed_proj_dim=hidden)
            kw.pop("intermediate_size")
            kw.pop("num_key_value_heads")
        if arch == "falcon":
            kw.pop("intermediate_size")
            kw.pop("num_key_value_heads")
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def build_model(arch: str, tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kw):
    """A randomly initialised causal LM for `arch`, seeded, sized to the tokenizer."""
    config = tiny_config(arch, vocab_size=config_kw.pop("vocab_size", len(tokenizer)), **config_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model.eval()


def save(model, tokenizer, path: str | Path) -> Path:
    """Save model and tokenizer as a standard HF directory (safetensors)."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
