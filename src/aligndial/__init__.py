"""aligndial: alignment strength as a dial (λ) for Hugging Face language models."""

from aligndial.mixing import lam_weights, mix_hidden, mix_logits, mixed_logps

__all__ = ["lam_weights", "mix_hidden", "mix_logits", "mixed_logps"]
