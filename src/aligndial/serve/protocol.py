"""Request bodies of the OpenAI-compatible API, with their bounds (pydantic lives only here, at the
HTTP boundary).

Every number is checked before a request reaches the engine (docs/reliability.md, cases 2 and 4):
floats are finite (`allow_inf_nan=False`: NaN slips through `x < 0` tests, and the JSON parser
reads 1e400 as inf), integers are real JSON integers (1.5 and "10" are refused), and the bounds
are OpenAI's. Checks that depend on the server (the λ range, the model name, the context length)
are made in `app.py`. Unknown fields are ignored, as OpenAI-compatible servers usually do.

Fields that are not part of OpenAI's API are in the marked "extra" section; the official client
sends them through `extra_body={"alignment_strength": 0.5}`.

Hostile inputs (docs/reliability.md, cases 26–28): a seed must lie in [0, 2**63) (limits.SEED_LIMIT),
every string must be valid Unicode (JSON's "\ud800" escape decodes to a lone surrogate, which
no tokenizer can encode), and OpenAI fields this server does not implement (`logprobs`, `echo`,
`best_of`, `logit_bias`, `tools`, ...) are refused when set to anything but their "off" value,
instead of being silently ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StrictBool, StrictFloat, StrictInt, ValidationInfo, field_validator

from aligndial.mixing import check_lam
from aligndial.serve.limits import MAX_STOP_STRINGS, SEED_LIMIT


def _valid_unicode(text: str) -> str:
    """Refuse lone surrogates: JSON can carry them ("a\\ud800b") but UTF-8 cannot, so the
    tokenizer (or the JSON response quoting it) would fail later with a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate ({text[e.start]!r} at character {e.start}), which is not valid "
                         "Unicode; send UTF-8 text (in JSON, surrogates only come in high+low pairs)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


def _same(value, off) -> bool:
    """value equals an "off" value of the same JSON type (False is not 0 here; 0 and 0.0 are)."""
    if isinstance(off, bool) or off is None:
        return value is off
    if isinstance(off, (int, float)):
        return type(value) in (int, float) and value == off
    return type(value) is type(off) and value == off


# OpenAI fields this server does not implement, with the values that ask for nothing (clients often
# send the defaults explicitly). Anything else is refused: ignoring it would return an answer the
# client did not ask for.
_OFF = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "logit_bias": (None, {}), "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True), "response_format": (None, {"type": "text"}),
}


class _Named:
    """A stand-in for pydantic's ValidationInfo where a validator checks a nested value by name."""

    def __init__(self, field_name: str):
        self.field_name = field_name


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model: Text | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: StrictInt = Field(1, ge=1)
    seed: StrictInt | None = None
    stop: Text | list[Text] | None = Field(default_factory=list)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    # --- extra: not part of OpenAI's API -----------------------------------------------------------
    alignment_strength: float | list[float] | None = Field(
        None, description="λ: 0 = reference, 1 = aligned, >1 extrapolates; a list gives one weight per aligned model"
    )
    lam: float | list[float] | None = Field(None, description="the same as `alignment_strength`")
    vllm_xargs: dict[str, Any] | None = Field(
        None, description="as sent to `vllm serve`: only `alignment_strength` (or `lam`), the same field again")
    top_k: StrictInt = Field(0, ge=0, description="keep the k most likely tokens; 0 = off")
    return_token_ids: StrictBool = Field(False, description="add each choice's generated `token_ids` (as vLLM does)")

    # --- OpenAI fields that are refused unless "off" (see _OFF) ----------------------------------------
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    logit_bias: Any = None
    suffix: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None

    @field_validator(*_OFF, mode="before")
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        if not any(_same(value, off) for off in _OFF[info.field_name]):
            raise ValueError(f"`{info.field_name}` is not supported by aligndial serve; leave it out "
                             f"(got {json.dumps(value)[:80]})")
        return value

    @field_validator("alignment_strength", "lam", mode="before")
    @classmethod
    def _finite_strength(cls, value, info: ValidationInfo):
        """λ is a number or a list of numbers, each finite (NaN, ±inf and strings are refused)."""
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        if not items or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in items):
            raise ValueError(
                f"`{info.field_name}` must be a number, or a list with one number per aligned model; got {value!r}"
            )
        checked = [check_lam(x, info.field_name) for x in items]
        return checked if isinstance(value, list) else checked[0]

    @field_validator("vllm_xargs", mode="before")
    @classmethod
    def _xargs(cls, value):
        """vLLM's per-request extension dict: λ given there (as to `vllm serve` with the aligndial
        plugin) is checked like the top-level field; any other key is refused, never ignored."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"`vllm_xargs` must be an object such as {{\"alignment_strength\": 0.5}}; got {value!r}")
        unknown = sorted(set(value) - {"alignment_strength", "lam"})
        if unknown:
            raise ValueError(f"`vllm_xargs` takes only `alignment_strength` (or `lam`) on aligndial serve; got {unknown}")
        return {k: cls._finite_strength(v, _Named(k)) for k, v in value.items()}

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value):
        if value is not None and not 0 <= value < SEED_LIMIT:
            raise ValueError(f"`seed` must be an integer in [0, 2**63), i.e. 0 to {SEED_LIMIT - 1}; got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if any(s == "" for s in stops):
            raise ValueError("`stop` strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"`stop` takes at most {MAX_STOP_STRINGS} strings; got {len(stops)}")
        return stops

    def strength(self) -> tuple[str, float | list[float] | None]:
        """(the field the client used, its value); every field given (`alignment_strength`, `lam`,
        and either inside `vllm_xargs`) must agree."""
        given = [(name, value) for name, value in (("alignment_strength", self.alignment_strength), ("lam", self.lam),
                                                     *((f"vllm_xargs.{k}", v) for k, v in (self.vllm_xargs or {}).items()))
                 if value is not None]
        for name, value in given[1:]:
            if value != given[0][1]:
                raise ValueError(f"`{given[0][0]}` ({given[0][1]}) and `{name}` ({value}) disagree; send only one")
        if not given:
            return "alignment_strength", None
        name, value = given[0]
        return name.removeprefix("vllm_xargs."), value


class CompletionRequest(_Sampling):
    prompt: Text


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(BaseModel):
    role: Text
    content: Text | list[TextPart]

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="the newer name of `max_tokens`")

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
