"""λ per request, per row: a vLLM v1 logits processor that only keeps track of λ.

vLLM keeps a persistent batch: request i of a step is row i of that step's logits, and a
`BatchUpdate` before each step says which requests were added at which row, which were removed,
and which moved between rows. `AlignmentStrength` follows those updates and holds, for every
row, the request's λ from `SamplingParams.extra_args["alignment_strength"]` (or `"lam"`; what
the OpenAI server fills from `vllm_xargs`), or the model's default λ.

The mixing itself happens in the model's `compute_logits`, which runs after the update and
before sampling, and asks `rows(n)` for the (n, K) λ of that step's rows: so mixed-λ batches
are exact (each row is mixed with its own weights, by `aligndial.mixing`), and logprobs are
those of the mixed distribution. `apply` leaves the logits alone (argmax-invariant).

It is installed as a `vllm.logits_processors` entry point, so vLLM builds it in every engine
of an environment where aligndial is installed; for any model that is not one of ours it
does nothing. The model finds it through `active()`: one worker process runs one model, and
the most recently built processor belongs to the current input batch.
"""

from __future__ import annotations

import logging
import math

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from aligndial.mixing import LAM_LIMIT, check_lam
from aligndial.vllm import export
from aligndial.vllm.export import DUAL_PATH, PAIR

log = logging.getLogger("aligndial.vllm")
KEYS = ("alignment_strength", "lam")
_active: AlignmentStrength | None = None


def request_lam(params: SamplingParams) -> float | list[float] | None:
    """The λ a request asks for (None: the model's default). Raises ValueError on a bad value: not a
    finite number (or list of them), beyond ±LAM_LIMIT (where a mix overflows float32), or a list
    whose length is not the served model's number of aligned models (when this process knows it)."""
    args = params.extra_args or {}
    given = [k for k in KEYS if k in args]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError("give `alignment_strength` or `lam`, not both")
    key, value = given[0], args[given[0]]
    weights = value if isinstance(value, list) else [value]
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"`{key}` must be a finite number (or a list of them, one per aligned model); got {value!r}")
        check_lam(w, key)  # within ±LAM_LIMIT
    if len(export.LOADED_N_ALIGNED) == 1:  # the served model's K
        (k,) = export.LOADED_N_ALIGNED
        if len(weights) != k or (k > 1 and not isinstance(value, list)):
            raise ValueError(f"`{key}` needs {k} weight(s), one per aligned model of this export; got {value!r}")
    if params.prompt_logprobs is not None:
        raise ValueError(f"`{key}` cannot be combined with prompt_logprobs: the prompt's logits are not mixed")
    return value


# extra_args key under which `stop_on_members` keeps what the client itself asked for (a request's
# params may be validated more than once, e.g. one SamplingParams shared by several prompts).
_CLIENT_STOPS = "_aligndial_client_stops"


def stop_on_members(params: SamplingParams, lam) -> None:
    """Make a pair request stop on the EOS of the members its λ runs (`aligndial.pair.stop_ids`),
    as aligndial's own engines ask for it (`run.stop_kwargs`), when the members' EOS differ.

    Left alone, vLLM stops every row on the tokenizer's EOS and the export's generation config
    (the reference's), whatever its λ: a λ=1 row would run past the aligned model's EOS. vLLM
    calls this hook (from `validate_params`) on the request's own params before it adds the
    generation config's EOS, which it leaves out of the stops when `ignore_eos` is set; so the
    row gets `ignore_eos` and its members' EOS as `stop_token_ids`, after any ids the client gave.
    A client's own `ignore_eos` is kept (no EOS stops at all). The front end knows the served
    export from its config (`export.LOADED_MEMBER_EOS`); a process that has loaded several
    exports cannot tell which one a request is for, and leaves vLLM's stops (docs/vllm.md: a
    client there sends `stop_token_ids`)."""
    if len(export.LOADED_MEMBER_EOS) != 1:
        return
    ((member_eos, default),) = export.LOADED_MEMBER_EOS
    if member_eos is None or len(set(member_eos)) < 2:
        return  # every member stops on the same ids: vLLM's own stops are right
    args = dict(params.extra_args or {})
    client = args.get(_CLIENT_STOPS)
    if client is None:
        client = {"ignore_eos": params.ignore_eos, "stop_token_ids": list(params.stop_token_ids or [])}
    if client["ignore_eos"]:
        return
    from aligndial.pair import stop_ids

    weights = list(default) if lam is None else lam
    members = stop_ids([list(e) for e in member_eos], weights, len(default))
    params.extra_args = {**args, _CLIENT_STOPS: client}
    params.ignore_eos = True
    params.stop_token_ids = list(dict.fromkeys([*client["stop_token_ids"], *members]))
    params._all_stop_token_ids.update(params.stop_token_ids)  # what min_tokens holds back, as vLLM fills it


class AlignmentStrength(LogitsProcessor):
    """Per-row λ for the aligndial models; inert for every other model."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        try:  # a bad λ is a 400 at the API, never an engine error
            lam = request_lam(sampling_params)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter="alignment_strength") from None
        stop_on_members(sampling_params, lam)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        global _active
        hf_config = vllm_config.model_config.hf_config
        ours = bool({DUAL_PATH, PAIR} & set(getattr(hf_config, "architectures", None) or []))
        self.default: list[float] = list(hf_config.aligndial["default_lam"]) if ours else []
        self.n_aligned = len(self.default)
        # (max_num_seqs, K) on the CPU: λ of the request at each row of the persistent batch.
        self.lam = torch.zeros(vllm_config.scheduler_config.max_num_seqs, max(self.n_aligned, 1))
        self.batch_size = 0
        if ours:
            _active = self

    def is_argmax_invariant(self) -> bool:
        return True  # the mix already happened in compute_logits; nothing changes here

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not self.n_aligned or batch_update is None:
            return
        # Order matters (interface.py): removed, added, moved. Removed rows are simply overwritten later.
        for index, params, _, _ in batch_update.added:
            self.lam[index] = torch.tensor(self._weights(params))
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.lam[[a, b]] = self.lam[[b, a]]
            else:
                self.lam[b] = self.lam[a]
        self.batch_size = batch_update.batch_size

    def _weights(self, params: SamplingParams) -> list[float]:
        """The row's λ. Never raises: an exception here stops the engine core for every request.
        `validate_params` refused every bad value before scheduling; should one get here anyway
        (a process that loaded exports of different K cannot check the length up front), the row
        is clamped: a λ list of the wrong length runs at the export's default λ, and each weight
        is clamped to ±LAM_LIMIT. A warning says so."""
        try:
            lam = request_lam(params)
        except ValueError as e:
            lam = e
        weights = self.default if lam is None else None
        if lam is not None and not isinstance(lam, ValueError):
            weights = [float(x) for x in (lam if isinstance(lam, list) else [lam])]
        if weights is None or len(weights) != self.n_aligned or not all(map(math.isfinite, weights)):
            log.warning("aligndial: a request's λ %r cannot be used by this model (%d aligned); it runs at the default "
                        "λ %s", (params.extra_args or {}), self.n_aligned, self.default)
            return self.default
        return [min(max(w, -LAM_LIMIT), LAM_LIMIT) for w in weights]

    def rows(self, n: int) -> torch.Tensor:
        """(n, K) float32 λ for the n rows of this step's logits."""
        if self.batch_size == 0:
            # vLLM's warm-up and profiling runs: no request, any λ costs the same.
            return torch.tensor([self.default]).expand(n, -1)
        if n != self.batch_size:
            raise RuntimeError(
                f"aligndial: {n} logit rows for {self.batch_size} requests; per-request λ needs one sampled "
                "position per request (speculative decoding and prompt logprobs are not supported)"
            )
        return self.lam[:n].clone()


def active() -> AlignmentStrength:
    if _active is None:
        raise RuntimeError(
            "aligndial's logits processor is not loaded in this vLLM worker: install aligndial in the same environment "
            "(it registers the `vllm.logits_processors` entry point); speculative decoding is not supported"
        )
    return _active
