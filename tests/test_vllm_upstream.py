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


def test_request_check_runs_on_the_requests_params_before_the_generation_config_eos():
    """aligndial.vllm.strength.stop_on_members (docs/vllm.md, Stopping) sets a pair request's
    `ignore_eos` and `stop_token_ids` inside the logits processor's `validate_params`, and adds the
    ids to the private `SamplingParams._all_stop_token_ids` (what min_tokens holds back). That
    works because vLLM's input processor runs the check on the params it then copies into the
    request, before `update_from_generation_config` adds the generation config's EOS, which it
    leaves out of the stops of an `ignore_eos` request."""
    import vllm
    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    source = inspect.getsource(InputProcessor.process_inputs)
    order = [source.find(s) for s in ("self._validate_params(params", "params.clone()", ".update_from_generation_config(")]
    assert -1 not in order and order == sorted(order), (
        f"vLLM {vllm.__version__} no longer checks a request's params before copying them and adding the "
        "generation config's EOS; move stop_on_members to where the request's stops are decided")
    assert "validate_logits_processors_params(params)" in inspect.getsource(InputProcessor._validate_params)
    params = SamplingParams(ignore_eos=True)
    params.update_from_generation_config({"eos_token_id": [7, 8]}, 7)
    assert params.stop_token_ids == [] and params._eos_token_id is None, (
        f"vLLM {vllm.__version__} stops an ignore_eos request on the generation config's EOS")
    assert isinstance(params._all_stop_token_ids, set), f"vLLM {vllm.__version__} renamed SamplingParams._all_stop_token_ids"
