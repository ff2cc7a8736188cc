"""The float64 oracle shared by the pair and dual-path tests."""

import torch

from aligndial.tiny import EOS_ID


def float64_greedy(ref, aligned, input_ids, lam, steps, eos=(EOS_ID,)):
    """Greedy tokens of softmax((1 − λ)·h_ref + λ·h_aligned), recomputing both models' full
    logits every step (no cache) and mixing in float64. `lam` may be a function of the step.
    Stops after the first id in `eos`, as generate does."""
    ids = input_ids
    for step in range(steps):
        lam_t = lam(step) if callable(lam) else lam
        with torch.no_grad():
            h_ref, h_aligned = ref(ids).logits[:, -1].double(), aligned(ids).logits[:, -1].double()
        width = min(h_ref.shape[-1], h_aligned.shape[-1])
        mixed = (1 - lam_t) * h_ref[:, :width] + lam_t * h_aligned[:, :width]
        ids = torch.cat([ids, mixed.argmax(-1, keepdim=True)], dim=-1)
        if int(ids[0, -1]) in eos:  # generate stops at EOS too
            break
    return ids[:, input_ids.shape[1] :]


def float64_logps(ref, aligned, enc, lam):
    """log softmax((1 − λ)·h_ref + λ·h_aligned) at every position of the batch `enc`, from both
    models' logits mixed in float64: (B, T, V)."""
    with torch.no_grad():
        h_ref, h_aligned = ref(**enc).logits.double(), aligned(**enc).logits.double()
    width = min(h_ref.shape[-1], h_aligned.shape[-1])
    return torch.log_softmax((1 - lam) * h_ref[..., :width] + lam * h_aligned[..., :width], dim=-1)


# Heads with a step after the linear map, which a mix must not skip: Cohere multiplies the logits
# by `logit_scale`, Granite divides them by `logits_scaling`, Gemma 2 soft-caps them (tanh), and
# multimodal Gemma 3 soft-caps them with the cap kept in `text_config`.
HEAD_SIDE = ("cohere", "granite", "gemma2", "gemma3")


def head_side_config(kind: str, vocab_size: int):
    """A tiny config of `kind` (HEAD_SIDE), with explicit special ids and peaked random weights."""
    from transformers import AutoConfig

    from aligndial.tiny import BOS_ID, EOS_ID, PAD_ID, tiny_config

    ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, **ids)
    if kind == "cohere":  # logit_scale 0.0625 by default, tied head
        return AutoConfig.for_model("cohere", **text)
    if kind == "granite":
        return AutoConfig.for_model("granite", logits_scaling=8.0, **text)
    if kind == "gemma2":  # final_logit_softcapping 30 at the top level
        return tiny_config("gemma2", vocab_size)
    if kind == "gemma3":  # Gemma3ForConditionalGeneration: the soft-cap lives in text_config
        gemma = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=30.0)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return AutoConfig.for_model("gemma3", text_config={**text, **gemma}, vision_config=vision, mm_tokens_per_image=4,
                                    **ids)
    raise ValueError(f"no head-side config for {kind!r}; choose one of {HEAD_SIDE}")
