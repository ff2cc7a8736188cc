"""vLLM's private API aligndial relies on (see test_upstream.py for why these tests exist).
Importing vLLM is slow, so these live apart from the fast loop."""
from __future__ import annotations

import inspect

import pytest

pytestmark = pytest.mark.slow


def test_attention_init_still_takes_what_the_dual_path_rebuilds():
    """aligndial.vllm.models._recording_attention_args wraps `Attention.__init__` while the model
    is built (restored after) to record each attention's arguments, and builds the base path's
    second attention from them: vLLM keeps no record of them, and rebuilding from attributes would
    drop architecture-specific ones (soft-cap, sliding window, attention type)."""
    import vllm
    from vllm.model_executor.layers.attention import Attention

    params = inspect.signature(Attention.__init__).parameters
    for name in ("prefix", "kv_sharing_target_layer_name"):
        assert name in params, f"vLLM {vllm.__version__}'s Attention.__init__ no longer takes `{name}`"
    assert "__init__" in vars(Attention), f"vLLM {vllm.__version__}'s Attention inherits __init__; patch the class that defines it"
