"""Our one compiled kernel: a bf16 product for a few rows, for CPUs without native bf16.

The dual path multiplies every shared weight by 2B rows at each decode step. Where oneDNN has
no native bf16 (x86 CPUs without AVX512-BF16 / AMX, e.g. AMD Zen 3), torch's bf16 GEMM widens
the weights once per row, so the second row costs nearly as much as the first; the kernel in
`csrc/few_rows_bf16.cpp` widens each weight once for all rows. Where bf16 is native, torch
already batches rows almost for free, and we leave it alone.

It is compiled on first use with torch's C++ extension builder (gcc + ninja; about a minute,
once per machine, cached in torch's extensions directory). Set ALIGNDIAL_KERNELS=0 to use
torch's GEMM instead. If the build fails, a warning says why and torch's GEMM is used.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "few_rows_bf16.cpp"
MAX_ROWS = 4


def kernels_enabled() -> bool:
    return os.environ.get("ALIGNDIAL_KERNELS", "1") != "0"


def few_rows_bf16() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """`f(x, w) -> x @ w.T` for contiguous bf16 x (1..MAX_ROWS rows) and w, or None where the
    kernel does not apply (disabled, not x86 with AVX2, native bf16) or could not be built."""
    if not kernels_enabled() or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return _build()


@functools.cache
def _build():
    from torch.utils.cpp_extension import load
    from tqdm import tqdm

    done = threading.Event()
    bar = tqdm(desc="aligndial: compiling the bf16 few-row kernel (once per machine)", bar_format="{desc} {elapsed}")

    def tick():
        while not done.wait(1.0):
            bar.refresh()

    threading.Thread(target=tick, daemon=True).start()
    try:
        module = load(
            name="aligndial_few_rows_bf16", sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
        )
    except Exception as err:  # no compiler, no ninja, a read-only cache: fall back, and say so
        warnings.warn(
            f"aligndial could not build its bf16 few-row kernel ({type(err).__name__}: {str(err)[-300:]}); "
            "using torch's GEMM, which is slower for the dual path in bf16 on this CPU. "
            "Install gcc and `pip install ninja`, or set ALIGNDIAL_KERNELS=0 to silence this.",
            stacklevel=3,
        )
        return None
    finally:
        done.set()
        bar.close()
    return module.few_rows_bf16
