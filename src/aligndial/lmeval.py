"""The lm-evaluation-harness model type `aligndial`: any harness task run under the λ-mixture.

    aligndial lm-eval --model aligndial --model_args ref=R,aligned=A,lam=0.5 --tasks gsm8k
    aligndial lm-eval --model aligndial --model_args model=M,adapter=DIR,lam=1.5 --tasks mmlu --device cuda

CLM §5.3 and FR §4 measure the alignment tax this way (MMLU, GSM8K, TruthfulQA at each λ).
lm-eval 0.4 finds models only in its own registry, filled by imports (it reads no entry
points), so `aligndial lm-eval` imports this module, which registers `aligndial`, then hands
its arguments to lm-eval's own command line. From Python: `import aligndial.lmeval`, then
`lm_eval.simple_evaluate(model="aligndial", model_args="ref=R,aligned=A,lam=0.5", ...)`.

`AligndialLM` is lm-eval's `HFLM` given our mixed model: HFLM's batching, tokenisation, rolling
windows and stop sequences are used as they are; the two calls that reach the model pass λ, so
loglikelihood, loglikelihood_rolling and generate_until all score or sample π_λ.
"""

from __future__ import annotations

import logging
import sys

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from aligndial.mixing import check_lam

eval_logger = logging.getLogger(__name__)


@register_model("aligndial")
class AligndialLM(HFLM):
    """`ref` + `aligned` (a DeRa pair) or `model` + `adapter` (a layer adapter), at `lam`. Other
    keyword arguments (batch_size, max_length, …) are HFLM's."""

    def __init__(self, ref: str | None = None, aligned: str | None = None, model: str | None = None,
                 adapter: str | None = None, lam: float = 1.0, dtype: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False, **kwargs):
        from aligndial.loading import load_causal_lm, load_tokenizer

        if not ((ref and aligned and not (model or adapter)) or (model and adapter and not (ref or aligned))):
            raise ValueError(
                "--model_args needs ref=R,aligned=A (DeRa pair) or model=M,adapter=DIR (layer adapter); "
                f"got ref={ref!r}, aligned={aligned!r}, model={model!r}, adapter={adapter!r}"
            )
        self.lam = check_lam(lam, "lam")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes device="cuda:0" unless told otherwise; HFLM falls back to the CPU too.
            eval_logger.warning("CUDA is not available; running on the CPU (pass --device to choose)")
            device = "cpu"
        if ref:
            from aligndial.mixed import load_pair

            mixed = load_pair(ref, aligned, dtype, device, trust_remote_code)
            tokenizer = mixed.tokenizer
        else:
            from aligndial.dualpath import DualPathModel

            tokenizer = load_tokenizer(model, trust_remote_code)
            mixed = DualPathModel.from_adapter(load_causal_lm(model, dtype, device, trust_remote_code), adapter)
        super().__init__(pretrained=mixed, tokenizer=tokenizer, **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """(B, T, V) logits of π_λ for right-padded rows (HFLM's loglikelihood batches)."""
        with torch.no_grad():
            return self.model(inps, lam=self.lam).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        return super()._model_generate(context, max_length, stop, lam=self.lam, **generation_kwargs)


def main(argv: list[str]) -> int:
    """lm-eval's command line with `aligndial` registered: `aligndial lm-eval ARGS` = `lm-eval ARGS`."""
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
