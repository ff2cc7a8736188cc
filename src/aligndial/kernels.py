"""Our one compiled kernel: a bf16 product for a few rows (the dual path's decode shape).

The dual path multiplies every shared weight by 2B rows at each decode step, and stock torch
is slow at that shape on the x86 CPUs we measured (see `csrc/few_rows_bf16.cpp`; the numbers
are in docs/benchmarks.md, "Dual path"): without native bf16 (AMD Zen 3) the second row costs
nearly as much as the first; with it (Intel Sapphire Rapids) oneDNN's 1-2 row product took
several times what the kernel's AVX512-BF16 loop does.
The dual path uses it for bf16 on x86 CPUs with AVX2 (`aligndial.dualpath.few_rows_product`,
a fixed rule, never a timing, so results do not depend on machine load).

It is compiled on first use with torch's C++ extension builder (gcc + ninja; once per machine,
cached in torch's extensions directory; build time in docs/benchmarks.md). Set ALIGNDIAL_KERNELS=0 to use
torch's GEMM instead. If the build fails, a warning says why and torch's GEMM is used. A build
interrupted by Ctrl-C leaves torch's `lock` file behind; the next build removes it (`_exclusive`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "few_rows_bf16.cpp"
# The most rows of x the kernel takes (its register blocks are written for 1-4 rows); compiled
# into the kernel as ALIGNDIAL_MAX_ROWS, and every caller checks it from here.
MAX_ROWS = 4


def kernels_enabled() -> bool:
    return os.environ.get("ALIGNDIAL_KERNELS", "1") != "0"


def few_rows_bf16() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """`f(x, w) -> x @ w.T` for contiguous bf16 x (1..MAX_ROWS rows) and w, or None where the
    kernel does not apply (disabled, not x86 with AVX2) or could not be built."""
    if not kernels_enabled() or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    module = _build()
    return None if module is None else module.few_rows_bf16


# How long a run waits for another process that is building the kernel before it gives up and
# uses torch's GEMM: many times a build's time (docs/benchmarks.md), generous for a loaded machine.
BUILD_WAIT_SECONDS = 600.0
NAME = "aligndial_few_rows_bf16"


@functools.cache
def _build():
    """The compiled module (`few_rows_bf16`, `few_rows_bf16_avx2`, `has_avx512_bf16`), or None."""
    from torch.utils.cpp_extension import _get_build_directory, load
    from tqdm import tqdm

    done = threading.Event()
    bar = tqdm(desc="aligndial: compiling the bf16 few-row kernel (once per machine)", bar_format="{desc} {elapsed}")

    def tick():
        while not done.wait(1.0):
            bar.refresh()

    threading.Thread(target=tick, daemon=True).start()
    try:
        build_dir = Path(_get_build_directory(NAME, verbose=False))
        with _exclusive(build_dir) as ours:
            if not ours:
                warnings.warn(
                    f"aligndial waited {BUILD_WAIT_SECONDS:.0f} s for another process building its bf16 few-row kernel "
                    f"in {build_dir}; using torch's GEMM this time (same results, slower dual path in bf16).",
                    stacklevel=3,
                )
                return None
            _remove_stale_torch_lock(build_dir)
            return load(
                name=NAME, sources=[str(SOURCE)], build_directory=str(build_dir),
                # MAX_ROWS is compiled in, so the kernel's row limit and the Python callers' are one constant.
                extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", f"-DALIGNDIAL_MAX_ROWS={MAX_ROWS}"],
                extra_ldflags=["-fopenmp"],
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


@contextlib.contextmanager
def _exclusive(build_dir: Path):
    """Hold an OS file lock for the build (yields True), or yield False after BUILD_WAIT_SECONDS
    of another process holding it. Unlike torch's own `lock` file, which a build interrupted by
    Ctrl-C leaves behind (and every later run then waits on forever), the OS releases this
    lock when its process ends, however it ends."""
    import fcntl

    with open(build_dir / "aligndial.lock", "a") as handle:
        deadline = time.monotonic() + BUILD_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(0.5)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_torch_lock(build_dir: Path) -> None:
    """Every build of this kernel holds `_exclusive`, so torch's `lock` file found while we hold
    it was left by a build that died (Ctrl-C, kill): remove it, or torch would wait on it forever."""
    lock = build_dir / "lock"
    if lock.exists():
        warnings.warn(f"aligndial: removing a stale torch extension lock left by an interrupted kernel build: {lock}", stacklevel=4)
        lock.unlink(missing_ok=True)
