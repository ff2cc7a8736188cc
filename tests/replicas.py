"""Replicas of the checkpoints people load: tiny random weights behind real tokenizers, with the
configs, special tokens, generation configs and dtypes of the real families.

Everything is saved with `save_pretrained` and loaded back through `from_pretrained`, offline.

- **Qwen3** (the real tokenizer, vendored in tests/fixtures/tokenizers/qwen3): 151,669 tokens
  under a 151,936-row head (152,064 for the Qwen2.5-7B-style width); tied embeddings; bf16
  weights. Base: EOS `<|endoftext|>` (151643). Instruct: EOS `<|im_end|>` (151645), and a
  generation_config that lists both EOS ids and samples by default, as Qwen publishes it.
- **Llama-3-like**: a byte-level BPE tokenizer built here with Llama 3's special tokens, BOS
  added by the tokenizer, no pad token, and a chat template that writes BOS itself (so rendering
  a chat and then tokenizing with special tokens gives two BOS). Base EOS `<|end_of_text|>`,
  instruct EOS `<|eot_id|>` with both in generation_config.
- **Gemma-like**: Gemma 2 with a final logit soft-cap, `add_bos_token`, left padding, tied
  embeddings; instruct EOS `<end_of_turn>`.

Real instruct checkpoints end their replies with their EOS. Random weights almost never pick
one id out of 150k, so each instruct replica is calibrated at build time (seeded, deterministic)
to emit its EOS a few tokens into a chat reply: its EOS row of the (tied) embedding is scaled
until greedy decoding of a canned chat prompt stops within 3 to 20 tokens. Padded head rows
are zero, as in real checkpoints, where they are never chosen.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from aligndial.tiny import DEFAULT_TEXT

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"

QWEN3_TOKENS = 151669  # len(tokenizer)
QWEN3_HEAD_ROWS = 151936  # Qwen3 0.6B-32B; Qwen2.5-7B and up use 152064
QWEN3_ENDOFTEXT, QWEN3_IM_START, QWEN3_IM_END = 151643, 151644, 151645

CHAT_PROBE = [{"role": "user", "content": "What is 2 + 3? Answer briefly."}]

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _write_qwen3_tokenizer(out: Path, variant: str) -> None:
    src = FIXTURES / "qwen3"
    with gzip.open(src / "tokenizer.json.gz", "rb") as f, open(out / "tokenizer.json", "wb") as g:
        shutil.copyfileobj(f, g)
    config = json.loads((src / "tokenizer_config.json").read_text())
    if variant == "base":
        config["eos_token"] = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _byte_bpe(special: list[str], bos: str, vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE tokenizer whose post-processor adds `bos` (as Llama 3's and Gemma's do)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([DEFAULT_TEXT] * 4, trainer=trainer)
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return tok


def _save_tokenizer(tok: Tokenizer, out: Path, template: str, **special) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **special)
    fast.chat_template = template
    fast.save_pretrained(out)
    return fast


def _calibrate_eos(model, tokenizer, eos_id: int, seed: int) -> None:
    """Point the EOS row of the output embedding along the final hidden state a few tokens into
    a greedy chat reply, and scale it up until the reply ends there, after 3 to 20 tokens (see
    the module docstring). Deterministic for a given model."""
    head = model.get_output_embeddings().weight
    ids = tokenizer.apply_chat_template(CHAT_PROBE, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    n = ids.shape[1]

    def reply(max_new_tokens: int) -> torch.Tensor:
        return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                              pad_token_id=eos_id)[0]

    with torch.no_grad():
        initial = head[eos_id].float().clone()
        head[eos_id] = 0.0
        full = reply(12)
        hidden = model(full[None], output_hidden_states=True).hidden_states[-1][0]  # after the final norm
        # The hidden states that predict reply tokens 6..11, then the row's own random direction
        # (a random model that repeats one token has the same hidden state at every step).
        for direction in [*hidden[n + 4 : n + 10].float(), initial]:
            direction = direction / direction.norm()
            for scale in [1.25 ** k for k in range(4, 30)]:
                head[eos_id] = (scale * direction).to(head.dtype)
                out = reply(20)[n:].tolist()
                if eos_id in out:
                    if 3 <= out.index(eos_id) + 1 <= 20:
                        return
                    break  # too eager along this direction: try the next one
    raise RuntimeError(f"could not calibrate EOS {eos_id} for this replica (seed {seed})")


class Replicas:
    """Builds replica checkpoints on demand under `root`, once each (see the module docstring).

    Every method returns a directory for `from_pretrained`. `variant` is "base" or "instruct";
    base and instruct differ in weights (seeds 0 and 1 unless given) and in EOS, as real pairs do.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._built: dict[tuple, str] = {}

    def _once(self, key: tuple, build) -> str:
        if key not in self._built:
            out = self.root / "-".join(str(k) for k in key)
            out.mkdir(parents=True, exist_ok=True)
            build(out)
            self._built[key] = str(out)
        return self._built[key]

    def qwen3(self, variant: str = "instruct", dtype: str = "bfloat16", seed: int | None = None,
              head_rows: int = QWEN3_HEAD_ROWS, layers: int = 2, head_dim: int = 16) -> str:
        """Qwen3-shaped: tied 151936-row head (or `head_rows`) over the real 151669-token tokenizer.
        `head_dim` 32 or more for vLLM's CPU attention (fewer, wider heads of the same hidden size)."""
        seed = (0 if variant == "base" else 1) if seed is None else seed

        def build(out: Path) -> None:
            _write_qwen3_tokenizer(out, variant)
            tok = AutoTokenizer.from_pretrained(out)
            eos = QWEN3_ENDOFTEXT if variant == "base" else QWEN3_IM_END
            config = AutoConfig.for_model(
                "qwen3", vocab_size=head_rows, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=64 // head_dim, num_key_value_heads=max(1, 32 // head_dim), head_dim=head_dim,
                max_position_embeddings=1024,
                tie_word_embeddings=True, bos_token_id=QWEN3_ENDOFTEXT, eos_token_id=eos, rope_theta=1e6,
                rms_norm_eps=1e-6, initializer_range=0.2,
            )
            model = self._init(config, seed)
            with torch.no_grad():
                model.get_output_embeddings().weight[QWEN3_TOKENS:] = 0.0  # padded rows, as in real checkpoints
            if variant == "instruct":
                _calibrate_eos(model, tok, QWEN3_IM_END, seed)
                model.generation_config = GenerationConfig(
                    bos_token_id=QWEN3_ENDOFTEXT, pad_token_id=QWEN3_ENDOFTEXT, eos_token_id=[QWEN3_IM_END, QWEN3_ENDOFTEXT],
                    do_sample=True, temperature=0.6, top_k=20, top_p=0.95,
                )
            else:
                model.generation_config = GenerationConfig(bos_token_id=QWEN3_ENDOFTEXT, eos_token_id=QWEN3_ENDOFTEXT)
            model.to(getattr(torch, dtype)).save_pretrained(out)

        return self._once(("qwen3", variant, dtype, seed, head_rows, layers, head_dim), build)

    def llama3(self, variant: str = "instruct", dtype: str = "float32", seed: int | None = None) -> str:
        """Llama-3-like: BOS added by the tokenizer and written by the chat template; no pad token."""
        seed = (0 if variant == "base" else 1) if seed is None else seed

        def build(out: Path) -> None:
            fast = _save_tokenizer(
                _byte_bpe(LLAMA3_SPECIAL, "<|begin_of_text|>"), out, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                eos_token="<|end_of_text|>" if variant == "base" else "<|eot_id|>",
            )
            ids = {t: fast.convert_tokens_to_ids(t) for t in LLAMA3_SPECIAL}
            eos = ids["<|end_of_text|>"] if variant == "base" else ids["<|eot_id|>"]
            config = AutoConfig.for_model(
                "llama", vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos, initializer_range=0.2,
            )
            model = self._init(config, seed)
            if variant == "instruct":
                _calibrate_eos(model, fast, eos, seed)
                eos = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
            model.generation_config = GenerationConfig(bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos)
            model.to(getattr(torch, dtype)).save_pretrained(out)

        return self._once(("llama3", variant, dtype, seed), build)

    def gemma(self, variant: str = "instruct", dtype: str = "float32", seed: int | None = None) -> str:
        """Gemma-like (Gemma 2): final logit soft-cap, `add_bos_token`, left padding, tied head."""
        seed = (0 if variant == "base" else 1) if seed is None else seed

        def build(out: Path) -> None:
            fast = _save_tokenizer(
                _byte_bpe(GEMMA_SPECIAL, "<bos>"), out, GEMMA_TEMPLATE, bos_token="<bos>", eos_token="<eos>",
                pad_token="<pad>", unk_token="<unk>",
            )
            cfg_file = out / "tokenizer_config.json"
            tok_config = json.loads(cfg_file.read_text())
            tok_config["add_bos_token"] = True
            cfg_file.write_text(json.dumps(tok_config, indent=2))
            ids = {t: fast.convert_tokens_to_ids(t) for t in GEMMA_SPECIAL}
            config = AutoConfig.for_model(
                "gemma2", vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                max_position_embeddings=512, sliding_window=512, final_logit_softcapping=30.0,
                attn_logit_softcapping=50.0, tie_word_embeddings=True, pad_token_id=ids["<pad>"],
                bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], initializer_range=0.2,
            )
            model = self._init(config, seed)
            eos = ids["<eos>"]
            if variant == "instruct":
                _calibrate_eos(model, fast, ids["<end_of_turn>"], seed)
                eos = [ids["<eos>"], ids["<end_of_turn>"]]
            model.generation_config = GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"], eos_token_id=eos)
            model.to(getattr(torch, dtype)).save_pretrained(out)

        return self._once(("gemma", variant, dtype, seed), build)

    @staticmethod
    def _init(config, seed: int):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
