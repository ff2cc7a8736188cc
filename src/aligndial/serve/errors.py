"""OpenAI error objects: every error leaves the server as

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

with the right HTTP status, never as FastAPI's default shapes. FastAPI's 422 for a body it cannot
validate becomes a 400 (as vLLM does), with a message that names the field and the value.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("aligndial.serve")


class APIError(Exception):
    """An error for the client: raise it anywhere in a route."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _show(value) -> str:
    """A short JSON rendering of a received value (NaN shows as NaN, long prompts are cut)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union in an error's location, e.g. `function-after[...]` or `list[str]`."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


def from_validation(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field and the value."""
    errors = exc.errors()
    # A union field (`str | list[str]`) reports one error per member; our own validators' messages
    # (value errors) say more than "Input should be a valid string" about the member that did not apply.
    err = next((e for e in errors if e["type"] == "value_error"), errors[0])
    loc = [str(x) for x in err["loc"] if x != "body" and not _is_union_tag(x)]
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
    if not loc:
        return APIError(400, f"the request body must be a JSON object; got {_show(err.get('input'))}")
    msg = err["msg"].removeprefix("Value error, ")
    if not msg.startswith("`"):  # our own validators already name the field and the value
        where = f" (at {'.'.join(loc)})" if len(loc) > 1 else ""
        msg = f"`{loc[0]}`{where}: {msg}; got {_show(err.get('input'))}"
    return APIError(400, msg, param=loc[0])


def _parse_problem(cause: BaseException) -> str:
    """Why json.loads refused a body, beyond JSONDecodeError (which FastAPI reports itself)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset {cause.start}: {cause.reason})"
    if isinstance(cause, RecursionError):
        return "it is nested too deeply"
    return f"{type(cause).__name__}: {str(cause)[:200]}"  # e.g. an integer with more than 4300 digits


def install_handlers(app: FastAPI, count_error: Callable[[str], None]) -> None:
    """Turn every exception into an OpenAI error object; `count_error(type)` feeds /metrics."""

    def reply(err: APIError) -> JSONResponse:
        count_error(err.type)
        return err.response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return reply(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return reply(from_validation(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown route, wrong method, unparsable body
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI: "There was an error parsing the body"
            return reply(APIError(400, f"the request body is not valid JSON: {_parse_problem(exc.__cause__)}"))
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return reply(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return reply(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))
