"""`aligndial serve`: an OpenAI-compatible server where every request sets its own alignment
strength λ, and concurrent requests with different λ share forward passes.

    aligndial serve --ref sft-model --aligned dpo-model --port 8000
    aligndial serve --model M --adapter my-adapter/ --lam-range=-2,4 --api-key "$KEY"
    aligndial serve --engine vllm --model M --adapter my-adapter/      # the same app on vLLM
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "dpo-model", "prompt": "Hi", "max_tokens": 16, "alignment_strength": 0.5}'

Files: protocol.py (request bodies and their bounds), limits.py (every request limit: default,
flag, check), errors.py (OpenAI error objects), guards.py (body size/type/time and header
timeouts, before any route), keys.py (λ policy per API key: `--keys`), app.py (routes,
`create_app(engine, settings)`), static/ (the playground page at /). This module turns the
command's flags into those pieces. The engine is the verbs' own (`aligndial.engines.load_engine`,
which states the interface), served through its `continuous()` shape: `HFEngine` on transformers
(`aligndial.continuous`), `VLLMEngine` on vLLM (`aligndial.vllm.engine`).

`aligndial.serve.limits` imports only the standard library, and the names below load the server
(FastAPI, torch) only when first used, so the command line can declare the flags cheaply.
"""

from __future__ import annotations

import ipaddress
import logging
import os

from aligndial.mixing import check_lam
from aligndial.serve import limits

__all__ = ["HFEngine", "ServerSettings", "create_app", "serve_from_args", "settings_from_args", "uvicorn_config"]

log = logging.getLogger("aligndial.serve")


def __getattr__(name: str):
    if name in ("ServerSettings", "create_app"):
        from aligndial.serve import app

        return getattr(app, name)
    if name == "HFEngine":
        from aligndial.continuous import HFEngine

        return HFEngine
    if name == "uvicorn_config":
        from aligndial.serve.guards import uvicorn_config

        return uvicorn_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lam_range(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"`--lam-range` takes two numbers, LO,HI (write it `--lam-range=-5,10`); got {text!r}")
    lo, hi = (check_lam(x.strip(), "--lam-range") for x in parts)
    if lo > hi:
        raise ValueError(f"`--lam-range` must be LO,HI with LO ≤ HI; got {text!r}")
    return lo, hi


def _default_lam(text: str | None, n_aligned: int, lo: float, hi: float) -> float | list[float] | None:
    if n_aligned == 0:
        if text is not None:
            raise ValueError("`--default-lam` needs a mix: add `--adapter` (with `--model`) or use `--ref R --aligned A`")
        return None
    if text is None:
        if n_aligned > 1:
            raise ValueError(f"with {n_aligned} aligned models, give `--default-lam` as {n_aligned} comma-separated "
                             f"weights, e.g. --default-lam {','.join(['0.5'] * n_aligned)}")
        text = "1.0"
    weights = [check_lam(x.strip(), "--default-lam") for x in text.split(",")]
    if len(weights) != n_aligned:
        raise ValueError(f"`--default-lam {text}` has {len(weights)} weight(s) but there are {n_aligned} aligned models")
    if not all(lo <= w <= hi for w in weights):
        raise ValueError(f"`--default-lam {text}` is outside `--lam-range` [{lo}, {hi}]")
    return weights[0] if n_aligned == 1 else weights


def _keys(args, api_key: str | None, lam_range: tuple[float, float], n_aligned: int):
    """`--keys FILE`: the policies, read and checked now (one line if the file is bad)."""
    path = getattr(args, "keys", None)
    if path is None:
        return None
    if api_key:
        where = "`--api-key`" if args.api_key else "ALIGNDIAL_API_KEY (in the environment)"
        raise ValueError(f"`--keys` and {where} exclude each other: give each application a key in {path} "
                         "(`aligndial keys add`), or use the single key without --keys")
    from aligndial.serve.keys import PolicyStore

    return PolicyStore(path, lam_range, n_aligned)


def _usage_log(path: str | None) -> str | None:
    """`--usage-log FILE.jsonl`: must be appendable now, before a model loads."""
    if path is not None:
        try:
            open(path, "a").close()
        except OSError as e:
            raise ValueError(f"`--usage-log {path}`: cannot append to it: {e.strerror}") from None
    return path


def settings_from_args(args):
    """Check the server's flags before any model loads; returns the `ServerSettings`. (The model
    and engine flags are checked in `aligndial.cliargs`: `check_models`, and `check_engine`, which
    `load_engine` runs before it loads anything.)"""
    from aligndial.serve.app import ServerSettings

    from aligndial.cliargs import n_aligned as flags_n_aligned

    n_aligned = flags_n_aligned(args)
    lo, hi = _lam_range(args.lam_range)
    api_key = _api_key(args.api_key)
    return ServerSettings(
        model_name=args.model if args.model else "+".join(args.aligned or []),
        default_lam=_default_lam(args.default_lam, n_aligned, lo, hi),
        lam_range=(lo, hi),
        api_key=api_key,
        keys=_keys(args, api_key, (lo, hi), n_aligned),
        usage_log=_usage_log(getattr(args, "usage_log", None)),
        host=args.host,
        port=args.port,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        **limits.from_args(args),
    )


def serve_from_args(args, settings) -> int:
    """`aligndial serve`: the engine `load_engine` gives every verb, served through its `continuous()`
    shape behind the same app, routes and validation on both engines; closed when the server stops."""
    from aligndial.engines import load_engine

    engine = load_engine(args, settings.default_lam)
    try:
        return _serve(engine.continuous(settings.max_concurrency, settings.max_queue), settings)
    finally:
        engine.close()


def _api_key(flag: str | None) -> str | None:
    """`--api-key`, else ALIGNDIAL_API_KEY, else None (an open server). An empty `--api-key` is refused:
    it is what `--api-key "$KEY"` gives with KEY unset, and it meant to require a key. An empty
    ALIGNDIAL_API_KEY serves without a key, with a warning whatever the host."""
    if flag is not None:
        if not flag.strip():
            raise ValueError(f"`--api-key {flag!r}` is empty (an unset shell variable?); give the key, set "
                             "ALIGNDIAL_API_KEY instead, or drop `--api-key` to serve without one")
        return flag
    env = os.environ.get("ALIGNDIAL_API_KEY")
    if env is not None and not env.strip():
        log.warning("ALIGNDIAL_API_KEY is set but empty: serving WITHOUT an API key; anyone who can reach "
                    "the server can use it")
    return env if env and env.strip() else None


def _serve(engine, settings) -> int:
    import uvicorn

    from aligndial.serve.app import create_app
    from aligndial.serve.guards import uvicorn_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    log.info("%s", startup_line(settings, engine.context_length))
    if not settings.api_key and not settings.keys and not _is_loopback(settings.host):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", settings.host)
    uvicorn.Server(uvicorn_config(create_app(engine, settings), settings)).run()
    return 0


def startup_line(settings, context_length: int) -> str:
    """What the server logs when it starts: the model, what λ it takes, the context, the key."""
    if settings.default_lam is None:
        lam = "a plain model: requests that set λ are refused"
    else:
        lam = f"λ default {settings.default_lam}, range {list(settings.lam_range)}"
    key = (", API key required" if settings.api_key else
           f", {len(settings.keys.policy.keys)} key(s) from {settings.keys.path}" if settings.keys else "")
    return f"serving {settings.model_name!r} ({lam}, context {context_length} tokens{key})"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
