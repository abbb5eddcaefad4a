"""Shape-level code of the ``cascade`` (state merging) family: validation and fake impls.

Everything here reads metadata only (shape, dtype, device, strides; SymInt-safe: no ``int()``
of a size, no data reads), so the same checks serve FakeTensors at trace time, the Triton
launchers and the CPU implementation: a direct ``torch.ops.flashops.*`` call with bad
arguments gets the same ``ValueError`` (naming the argument) as the public API, before
anything is written. The common case is one cheap boolean test per tensor; the shared
``_checks`` helpers build the message only on failure.
"""
from __future__ import annotations

import torch

from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_same, check_tensor, check_writable, expect

MASK_DTYPES = (torch.bool, torch.uint8)


def _lse_shape(s, v, s_name: str, v_name: str, k: int) -> None:
    """``s.shape == v.shape[:k]`` (the LSE has one value per (row, [state,] head))."""
    if s.shape != v.shape[:k]:
        raise ValueError(
            f"{s_name}: shape {tuple(s.shape)} does not match {v_name}'s leading dims "
            f"{tuple(v.shape[:k])} (expected {v_name}.shape[:{k}])"
        )


# --------------------------------------------------------------------------- validation
def check_merge_state(v_a, s_a, v_b, s_b) -> None:
    """``v_a, v_b [N, H, D]`` one float dtype; ``s_a, s_b [N, H]`` fp16/bf16/fp32; one device."""
    check_tensor(v_a, "v_a", ndim=3, dtypes=FLOAT_DTYPES)
    dev = v_a.device
    check_tensor(s_a, "s_a", ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(v_b, "v_b", ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(s_b, "s_b", ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    if v_b.shape != v_a.shape or v_b.dtype != v_a.dtype:
        check_same(v_a, v_b, "v_a", "v_b", device=False)
    _lse_shape(s_a, v_a, "s_a", "v_a", 2)
    _lse_shape(s_b, v_b, "s_b", "v_b", 2)


def check_merge_state_in_place(v, s, v_other, s_other, mask=None, *, storage: bool = False) -> None:
    """As ``check_merge_state``, plus ``s``/``s_other`` fp32 and ``mask [N]`` bool/uint8.

    ``storage``: also reject write targets with internally overlapping memory (real tensors
    only; the fake impl skips it).
    """
    check_tensor(v, "v", ndim=3, dtypes=FLOAT_DTYPES)
    dev = v.device
    check_tensor(s, "s", ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(v_other, "v_other", ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(s_other, "s_other", ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    expect(s.dtype == torch.float32, "s",
           f"must be float32 to be updated in place (got {s.dtype}; a cast copy would drop the update)")
    expect(s_other.dtype == torch.float32, "s_other", f"must be float32 (got {s_other.dtype})")
    if v_other.shape != v.shape or v_other.dtype != v.dtype:
        check_same(v, v_other, "v", "v_other", device=False)
    _lse_shape(s, v, "s", "v", 2)
    _lse_shape(s_other, v_other, "s_other", "v_other", 2)
    if mask is not None:
        check_tensor(mask, "mask", ndim=1, dtypes=MASK_DTYPES, device=dev)
        if mask.shape[0] != v.shape[0]:
            raise ValueError(f"mask: shape {tuple(mask.shape)} must be [N] = [{v.shape[0]}] (one flag per row of v)")
    if storage:
        check_writable(v, "v")
        check_writable(s, "s")


def check_merge_states(v, s) -> None:
    """``v [N, S, H, D]`` float; ``s [N, S, H]`` fp16/bf16/fp32; one device."""
    check_tensor(v, "v", ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor(s, "s", ndim=3, dtypes=FLOAT_DTYPES, device=v.device)
    _lse_shape(s, v, "s", "v", 3)


def check_variable_length_merge_states(v, s, indptr) -> None:
    """``v [M, H, D]`` float; ``s [M, H]`` fp16/bf16/fp32; ``indptr [N+1]`` int32/int64."""
    check_tensor(v, "v", ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(s, "s", ndim=2, dtypes=FLOAT_DTYPES, device=v.device)
    _lse_shape(s, v, "s", "v", 2)
    check_tensor(indptr, "indptr", ndim=1, dtypes=INDEX_DTYPES, device=v.device)
    expect(indptr.shape[0] >= 1, "indptr", "must have at least one element ([N+1] for N segments)")


# ----------------------------------------------------------------------------- fake impls
def merge_outputs(v, s, n_rows):
    """Fresh contiguous outputs of a merge into ``n_rows`` rows: ``v [n_rows, H, D]`` in v's
    dtype and ``s [n_rows, H]`` fp32 (``H, D`` = v's last two dims). No checks."""
    H, D = v.shape[-2], v.shape[-1]
    return v.new_empty((n_rows, H, D)), s.new_empty((n_rows, H), dtype=torch.float32)


def merge_state_fake(v_a, s_a, v_b, s_b, lse_ln=False):
    check_merge_state(v_a, s_a, v_b, s_b)
    return merge_outputs(v_a, s_a, v_a.shape[0])


def merge_state_in_place_fake(v, s, v_other, s_other, mask=None, lse_ln=False):
    check_merge_state_in_place(v, s, v_other, s_other, mask)


def merge_states_fake(v, s, lse_ln=False):
    check_merge_states(v, s)
    return merge_outputs(v, s, v.shape[0])


def variable_length_merge_states_fake(v, s, indptr, lse_ln=False):
    check_variable_length_merge_states(v, s, indptr)
    return merge_outputs(v, s, indptr.shape[0] - 1)
