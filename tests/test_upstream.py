"""Private upstream APIs aligndial relies on, each because no public one serves (the reason
stands beside each use). When an upgrade moves one, these fail first, naming the change, instead
of a wrong result somewhere downstream. vLLM's are in test_vllm_upstream.py (importing vLLM is slow).
"""
from __future__ import annotations

import inspect

import transformers
from transformers import GenerationMixin, Trainer


def test_generate_still_asks_prepare_cache_for_generation_for_its_cache():
    """aligndial.generation.MixedLM overrides it to hand `generate` a pair's per-member cache
    (PairCache is no transformers `Cache`, so it cannot be passed as `past_key_values`)."""
    assert hasattr(GenerationMixin, "_prepare_cache_for_generation"), (
        f"transformers {transformers.__version__} removed GenerationMixin._prepare_cache_for_generation: "
        "MixedLM.generate must hand its cache to generate another way")
    params = list(inspect.signature(GenerationMixin._prepare_cache_for_generation).parameters)
    assert params[:3] == ["self", "generation_config", "model_kwargs"], (
        f"transformers {transformers.__version__} changed _prepare_cache_for_generation's signature to {params}")
    assert "self._prepare_cache_for_generation(" in inspect.getsource(GenerationMixin.generate), (
        f"transformers {transformers.__version__}'s generate no longer calls _prepare_cache_for_generation")


def test_trainer_still_calls_the_hooks_the_recipes_override():
    """aligndial.train.common.RobustTrainerMixin checks gradients in `_clip_grad_norm` /
    `_get_grad_norm` (before clipping makes every gradient NaN) and saves adapters only in `_save`,
    `_save_checkpoint`, `_load_from_checkpoint`: Trainer has no public hook at those points."""
    source = inspect.getsource(Trainer)
    for hook in ("_clip_grad_norm", "_get_grad_norm", "_save", "_save_checkpoint", "_load_from_checkpoint"):
        assert hasattr(Trainer, hook), f"transformers {transformers.__version__} removed Trainer.{hook}"
        assert f"self.{hook}(" in source, f"transformers {transformers.__version__}'s Trainer no longer calls {hook}"


def test_uvicorn_h11_protocol_still_has_what_the_header_deadline_uses():
    """aligndial.serve.guards subclasses uvicorn's H11Protocol (uvicorn has no public setting for
    a deadline on the request head) and uses its `conn`, `loop`, `transport` and
    `on_response_complete`."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    source = inspect.getsource(H11Protocol)
    for name in ("self.conn =", "self.loop =", "self.transport =", "def on_response_complete(",
                 "def data_received(", "def connection_lost("):
        assert name in source, f"uvicorn {uvicorn.__version__}'s H11Protocol has no `{name}` any more"


def test_argparse_still_has_what_clidocs_walks():
    """aligndial.clidocs renders docs/cli.md by walking the parser's `_actions` and its
    `_SubParsersAction`: argparse has no public way to list a parser's subcommands and flags."""
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers().add_parser("verb", help="h")
    sub.add_argument("--flag")
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1 and [a.dest for a in actions[0]._choices_actions] == ["verb"], (
        "argparse changed _actions / _SubParsersAction / _choices_actions, which aligndial.clidocs walks")


def test_trl_chunked_head_still_asks_use_triton_whether_to_drop_masked_positions():
    """aligndial.train.common.score_completions_only wraps `trl.trainer.utils._use_triton` so that
    TRL's chunked log-prob head drops the prompt positions on CPU too: TRL has no public setting
    for it, and the head reads that module-level name at call time."""
    import trl
    import trl.trainer.utils as trl_utils

    assert callable(getattr(trl_utils, "_use_triton", None)), (
        f"trl {trl.__version__} has no trl.trainer.utils._use_triton: score_completions_only patches nothing")
    params = list(inspect.signature(trl_utils._use_triton).parameters)
    assert len(params) == 1, f"trl {trl.__version__} changed _use_triton's signature to {params} (we pass a device)"
    assert "_use_triton(hidden_states.device)" in inspect.getsource(trl_utils), (
        f"trl {trl.__version__}'s chunked head no longer calls _use_triton(hidden_states.device) from trl.trainer.utils")
