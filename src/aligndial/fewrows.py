"""The few-row product: a decode step's shared weights times a few rows, and who gets which rows.

The dual path (`aligndial.dualpath`) and the LoRA pair (`aligndial.lora_pair`) both run one
model on several row blocks per decode step. `Router` says which rows the current forward is on
("all", "skip", or "dual": only the aligned rows); `install_few_rows_linear` gives a plain
nn.Linear the few-row form `few_rows_product` names for its dtype on this CPU, used only while
the router is in "dual" mode. Neither model imports the other: both import this.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

from aligndial.kernels import MAX_ROWS, few_rows_bf16, kernels_enabled


class Router:
    """Which rows the adapter layers transform in the current forward of one model.

    One per model instance, kept on the model (`model._aligndial_router`) and on every module
    that reads it: two DualPathModels over one model share it, and `copy.deepcopy` of either
    copies it once, with the modules that read it. The LoRA pair keeps one of its own."""

    def __init__(self, returns_tuple: bool):
        self.mode = "all"  # "all" rows, "skip" the adapter, or "dual": only rows [batch, 2·batch)
        self.batch = 0
        self.returns_tuple = returns_tuple


# A decode step of the dual path multiplies each shared weight by 2B rows. On some CPUs stock
# F.linear pays nearly once per row for a few rows, and another form costs about one row's:
# - fp32 on x86 CPUs whose best torch kernels are AVX2 (the AMD EPYC machines we measured):
#   W @ xᵀ with a row-contiguous x. On an AVX-512 CPU (Intel Sapphire Rapids) the same form
#   was slower than stock, so there stock stays;
# - bf16 on x86 with AVX2 (see aligndial.kernels): our kernel, which widens each weight once for
#   all rows (or uses AVX512-BF16 where the CPU has it).
# Measurements: benchmarks/dualpath_speed.py and docs/benchmarks.md ("Dual path").
#
# The choice is a pure function of (dtype, device, CPU), never a timing: the forms differ in
# float32 rounding, and a choice made by a timing race made the same greedy command give
# different tokens at near-ties from one run to the next. Used only in the dual forward on CPU:
# the λ=0 / λ=1 fast paths and every other device stay stock, bit-exact with plain transformers.
SMALL_ROWS = 8  # fp32: above this many rows stock GEMM is efficient again


def _fp32_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w @ x.T).T


def few_rows_product(dtype: torch.dtype, device: torch.device) -> tuple[Callable, int] | None:
    """The few-row form `(f(x, w) -> x @ w.T, max rows)` the dual path uses for weights of
    `dtype` computing on `device`, or None for stock F.linear. Depends only on its arguments and
    this CPU (ALIGNDIAL_KERNELS=0 turns every form off)."""
    if device.type != "cpu" or not kernels_enabled() or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if dtype == torch.float32:
        return (_fp32_product, SMALL_ROWS) if torch.backends.cpu.get_cpu_capability() == "AVX2" else None
    if dtype == torch.bfloat16:
        kernel = few_rows_bf16()
        return None if kernel is None else (kernel, MAX_ROWS)
    return None


class FewRowsLinear(torch.nn.Linear):
    """An nn.Linear that, in the dual path's mixed-λ forward on a few CPU rows of its dtype,
    computes with the few-row product; stock F.linear otherwise (a model cast to another dtype
    or moved off the CPU after installing steps aside). State is per instance, so copies and
    re-wrapped models stay correct."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ~60 calls per decode step: plain __dict__ lookups and identity checks only.
        w, bias = self._parameters["weight"], self._parameters["bias"]
        dtype = self._aligndial_dtype
        if (
            self._aligndial_router.mode != "dual" or x.numel() > self._aligndial_max_numel
            or x.dtype is not dtype or w.dtype is not dtype or not x.is_cpu
        ):
            return F.linear(x, w, bias)
        y = self._aligndial_product(x.reshape(-1, x.shape[-1]).contiguous(), w).view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias


def install_few_rows_linear(linear: torch.nn.Linear, router: Router, product, max_rows: int, dtype) -> None:
    linear.__class__ = FewRowsLinear
    linear._aligndial_router, linear._aligndial_product, linear._aligndial_dtype = router, product, dtype
    linear._aligndial_max_numel = max_rows * linear.in_features
