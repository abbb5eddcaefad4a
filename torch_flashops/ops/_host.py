"""Host arithmetic shared by the launchers and the attention planner, in plain Python:
``triton.cdiv`` and ``triton.next_power_of_2`` are JIT functions that cost about 2 us per call
on the host, several of which every eager launch (and every ``plan()``) used to pay. Also the
compile options every launch passes."""
from __future__ import annotations


# Passed to every kernel launch. Fused multiply-adds are what the kernels were tuned and tested
# with (the attention kernels fold the softmax scale into exp2's FMA); triton 3.9 warns at the
# first compile that does not say so, and names 3.10 as the release whose default turns them off.
# Being explicit, it also overrides TRITON_DEFAULT_FP_FUSION; every launcher shares this one dict,
# so ``COMPILE_OPTIONS["enable_fp_fusion"] = False`` turns FMAs off in later launches (a recompile).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ``b > 0``."""
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(0, int(n) - 1).bit_length()
