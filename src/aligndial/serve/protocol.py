"""Request bodies of the OpenAI-compatible API, with their bounds (pydantic lives only here, at the
HTTP boundary).

Every number is checked before a request reaches the engine (RELIABILITY.md, cases 2 and 4):
floats are finite (`allow_inf_nan=False`: NaN slips through `x < 0` tests, and the JSON parser
reads 1e400 as inf), integers are real JSON integers (1.5 and "10" are refused), and the bounds
are OpenAI's. Checks that depend on the server (the λ range, the model name, the context length)
are made in `app.py`. Unknown fields are ignored, as OpenAI-compatible servers usually do.

Fields that are not part of OpenAI's API are in the marked "extra" section; the official client
sends them through `extra_body={"alignment_strength": 0.5}`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, ValidationInfo, field_validator

from aligndial.mixing import check_lam


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: StrictInt = Field(1, ge=1)
    seed: StrictInt | None = None
    stop: str | list[str] | None = Field(default_factory=list)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    # --- extra: not part of OpenAI's API -----------------------------------------------------------
    alignment_strength: float | list[float] | None = Field(
        None, description="λ: 0 = reference, 1 = aligned, >1 extrapolates; a list gives one weight per aligned model"
    )
    lam: float | list[float] | None = Field(None, description="the same as `alignment_strength`")
    top_k: StrictInt = Field(0, ge=0, description="keep the k most likely tokens; 0 = off")
    return_token_ids: StrictBool = Field(False, description="add each choice's generated `token_ids` (as vLLM does)")

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

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if any(s == "" for s in stops):
            raise ValueError("`stop` strings must not be empty")
        return stops

    def strength(self) -> tuple[str, float | list[float] | None]:
        """(the field the client used, its value); both fields given must agree."""
        if self.alignment_strength is not None and self.lam is not None and self.alignment_strength != self.lam:
            raise ValueError(
                f"`alignment_strength` ({self.alignment_strength}) and `lam` ({self.lam}) disagree; send only one"
            )
        if self.lam is not None and self.alignment_strength is None:
            return "lam", self.lam
        return "alignment_strength", self.alignment_strength


class CompletionRequest(_Sampling):
    prompt: str


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart]

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="the newer name of `max_tokens`")

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
