"""aligndial on vLLM: a plugin, no fork.

Entry points (pyproject.toml):
- `vllm.general_plugins`: `register()` below, which vLLM runs in every process before it reads
  a model's config. It registers our config classes with transformers (`aligndial_llama`,
  `aligndial_qwen3`, … one per base in `export.NATIVE`) and our model classes with vLLM's `ModelRegistry` under our own
  architecture names, `AligndialDualPathForCausalLM` and `AligndialPairForCausalLM`.
- `vllm.logits_processors`: `strength.AlignmentStrength`, which tracks each request's λ
  (`SamplingParams.extra_args["alignment_strength"]`, i.e. `vllm_xargs` over HTTP) row by row.

Files: export.py (the directories `vllm serve` loads; no vLLM import), strength.py (per-row λ),
models.py (the model classes, generic over the base architecture). Supported bases: the
model types in `export.NATIVE` (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3: each
tested against the HF engine); anything else is refused by name, with the reason, at export and at load.

    aligndial adapter merge --model M --adapter A --out DIR --for-vllm
    aligndial export-vllm --ref R --aligned A --out DIR
    vllm serve DIR
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "DIR", "prompt": "Hi", "max_tokens": 16, "vllm_xargs": {"alignment_strength": 0.5}}'
"""

from __future__ import annotations

from aligndial.vllm.export import CONFIGS, DUAL_PATH, PAIR


def register() -> None:
    """The general plugin: safe to call many times, in any process."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    for config_class in CONFIGS.values():
        try:
            AutoConfig.register(config_class.model_type, config_class)
        except ValueError:  # already registered in this process
            pass
    for arch in (DUAL_PATH, PAIR):
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"aligndial.vllm.models:{arch}")
