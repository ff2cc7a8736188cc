"""What a command prints besides its output. By default the libraries we run keep their notices
to themselves: TRL's warning on importing `trl.experimental` (GKD, which `train distill` uses),
vLLM's start-up INFO log (dozens of lines per engine) and transformers' advisory warnings.
Errors still show. `--verbose` shows everything.

The settings are environment variables the libraries read when they import or start a worker
(vLLM's engine processes inherit them), plus transformers' verbosity; all are restored when the
command ends, so a test that runs several commands in one process is not affected by the first.
A variable the user set is never overridden.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

QUIET_ENV = {"TRL_EXPERIMENTAL_SILENCE": "1", "VLLM_LOGGING_LEVEL": "ERROR",
             "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}  # vLLM's workers read it at start


@contextmanager
def quiet_libraries(verbose: bool):
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    added = [k for k in QUIET_ENV if k not in os.environ]
    os.environ.update({k: QUIET_ENV[k] for k in added})
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" per model: a second or less here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        for k in added:
            os.environ.pop(k, None)
