"""Registry of per-family self-checks, run by ``python -m torch_flashops check``.

A family registers a function ``fn(device) -> list[CheckResult]`` that runs each of its ops
on small random inputs on ``device`` and compares against the ``reference/`` oracle.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch

_CHECKS: dict[str, Callable] = {}


@dataclasses.dataclass
class CheckResult:
    op: str
    max_err: float
    tol: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.max_err == self.max_err and self.max_err <= self.tol  # NaN fails


def selfcheck(family: str):
    """Decorator: register ``fn(device) -> list[CheckResult]`` for ``family``."""

    def deco(fn):
        _CHECKS[family] = fn
        return fn

    return deco


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| in fp64 on CPU; NaN if any NaN/inf mismatch or shape differs."""
    if actual.shape != expected.shape:
        return float("nan")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    same_inf = torch.isinf(a) & (a == e)
    d = (a - e).abs().masked_fill(same_inf, 0.0)
    return float(d.max()) if d.numel() else 0.0


def run_checks(device: str) -> list[tuple[str, CheckResult]]:
    out = []
    with warnings.catch_warnings():
        # Triton's interpreter evaluates log2(0) = -inf in NumPy (the LSE of an empty request), which
        # NumPy reports as a warning; the value is the intended one, and the table says what matters
        warnings.filterwarnings("ignore", message="divide by zero encountered in log2", category=RuntimeWarning)
        for fam, fn in _CHECKS.items():
            for r in fn(device):
                out.append((fam, r))
    return out
