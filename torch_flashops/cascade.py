"""Attention-state merging, FlashInfer-compatible (``flashinfer.cascade``; spec attention.md §7).

An attention *state* ``(v, s)`` is the attention output over some set of keys together with
its log-sum-exp (LSE, base 2 by default: FlashInfer's convention). Two states over disjoint
key sets merge into the state over their union; that is how shared-prefix (cascade) and
split-KV attention combine partial results. An empty state (``s == -inf``, e.g. a fully
masked row) contributes nothing; merging only empty states gives ``v = 0, s = -inf``.

Every function takes keyword ``lse_base``: ``"log2"`` (default) or ``"ln"`` (natural-log
LSEs in and out). Math is fp32; merged values come back in the values' dtype, LSEs as fp32.
All tensors must be on one device and have ``stride(-1) == 1``; other strides are free.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from . import _checks, _config
from ._selfcheck import CheckResult, max_abs_err, selfcheck
from .meta import cascade as _meta
from .ops import cascade as _ops

__all__ = ["merge_state", "merge_state_in_place", "merge_states", "variable_length_merge_states"]
# (the cascade wrappers are added at the end of this module.)

_LSE_BASES = {"log2": False, "ln": True}


def _lse_ln(lse_base: str) -> bool:
    """``lse_base`` -> the ops' ``lse_ln`` flag; anything but "log2"/"ln" is a ValueError."""
    try:
        return _LSE_BASES[lse_base]
    except (KeyError, TypeError):
        raise ValueError(f"lse_base: must be 'log2' or 'ln', got {lse_base!r}") from None


def merge_state(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor, *, lse_base: str = "log2"
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Merge the attention states of two KV segments ``A`` and ``B``.

    Parameters
    ----------
    v_a : torch.Tensor
        Attention output over segment ``A``, shape ``[seq_len, num_heads, head_dim]``,
        float16/bfloat16/float32.
    s_a : torch.Tensor
        LSE over segment ``A``, shape ``[seq_len, num_heads]``, float16, bfloat16 or float32 (read as
        float32).
    v_b : torch.Tensor
        Attention output over segment ``B``, same shape and dtype as ``v_a``.
    s_b : torch.Tensor
        LSE over segment ``B``, shape ``[seq_len, num_heads]``.
    lse_base : str
        ``"log2"`` (default) or ``"ln"``: the base of ``s_a``, ``s_b`` and the returned LSE.

    Returns
    -------
    V : torch.Tensor
        The merged output (attention over ``[A; B]``), shape ``[seq_len, num_heads, head_dim]``,
        ``v_a``'s dtype, contiguous.
    S : torch.Tensor
        The merged LSE, float32, shape ``[seq_len, num_heads]``.

    Example
    -------
    >>> import torch, torch_flashops as flashinfer
    >>> va, vb = torch.randn(2048, 32, 128).half(), torch.randn(2048, 32, 128).half()
    >>> sa, sb = torch.randn(2048, 32), torch.randn(2048, 32)
    >>> v, s = flashinfer.merge_state(va, sa, vb, sb)
    >>> v.shape, s.shape
    (torch.Size([2048, 32, 128]), torch.Size([2048, 32]))
    """
    return _ops.merge_state_op(v_a, s_a, v_b, s_b, _lse_ln(lse_base))


def merge_state_in_place(
    v: torch.Tensor,
    s: torch.Tensor,
    v_other: torch.Tensor,
    s_other: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    lse_base: str = "log2",
) -> None:
    r"""Merge the state ``(v_other, s_other)`` into ``(v, s)``, in place.

    Parameters
    ----------
    v : torch.Tensor
        Partial attention output, updated in place, shape ``[seq_len, num_heads, head_dim]``,
        float16/bfloat16/float32.
    s : torch.Tensor
        Its LSE, updated in place, float32 (a ``ValueError`` otherwise: a cast copy would
        drop the update), shape ``[seq_len, num_heads]``.
    v_other : torch.Tensor
        The state to merge in, same shape and dtype as ``v``.
    s_other : torch.Tensor
        Its LSE, float32, shape ``[seq_len, num_heads]``.
    mask : Optional[torch.Tensor]
        bool or uint8, shape ``[seq_len]``: rows whose flag is 0 are left untouched (useful for
        fixed-shape CUDA-graph batches). Default: merge every row.
    lse_base : str
        ``"log2"`` (default) or ``"ln"``: the base of ``s`` and ``s_other``.

    Example
    -------
    >>> import torch, torch_flashops as flashinfer
    >>> v, v_other = torch.randn(2048, 32, 128).half(), torch.randn(2048, 32, 128).half()
    >>> s, s_other = torch.randn(2048, 32), torch.randn(2048, 32)
    >>> flashinfer.merge_state_in_place(v, s, v_other, s_other)
    """
    _ops.merge_state_in_place_op(v, s, v_other, s_other, mask, _lse_ln(lse_base))


def merge_states(v: torch.Tensor, s: torch.Tensor, *, lse_base: str = "log2") -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Merge ``num_states`` attention states per row.

    Parameters
    ----------
    v : torch.Tensor
        Attention outputs over the KV segments, shape
        ``[seq_len, num_states, num_heads, head_dim]``, float16/bfloat16/float32.
    s : torch.Tensor
        Their LSEs, shape ``[seq_len, num_states, num_heads]``, float16, bfloat16 or float32 (read as
        float32).
    lse_base : str
        ``"log2"`` (default) or ``"ln"``.

    Returns
    -------
    V : torch.Tensor
        The merged output, shape ``[seq_len, num_heads, head_dim]``, ``v``'s dtype
        (zeros when ``num_states == 0``).
    S : torch.Tensor
        The merged LSE, float32, shape ``[seq_len, num_heads]`` (``-inf`` when
        ``num_states == 0``).

    Example
    -------
    >>> import torch, torch_flashops as flashinfer
    >>> v = torch.randn(16, 100, 32, 128).half()
    >>> s = torch.randn(16, 100, 32)
    >>> V, S = flashinfer.merge_states(v, s)
    >>> V.shape, S.shape
    (torch.Size([16, 32, 128]), torch.Size([16, 32]))
    """
    return _ops.merge_states_op(v, s, _lse_ln(lse_base))


def variable_length_merge_states(
    v: torch.Tensor, s: torch.Tensor, indptr: torch.Tensor, *, lse_base: str = "log2"
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Merge variable-length runs of attention states (CSR segments of rows).

    Output row ``i`` merges input rows ``indptr[i]:indptr[i+1]``; an empty segment gives
    ``0 / -inf`` [diff: ``flashinfer.triton.cascade.variable_length_merge_states`` returns an
    LSE of -5e4 there].

    Parameters
    ----------
    v : torch.Tensor
        Attention outputs, shape ``[total_rows, num_heads, head_dim]``,
        float16/bfloat16/float32.
    s : torch.Tensor
        Their LSEs, shape ``[total_rows, num_heads]``, float16, bfloat16 or float32 (read as float32).
    indptr : torch.Tensor
        int32 (or int64), shape ``[seq_len + 1]``, on ``v``'s device: starts at 0,
        non-decreasing, ``indptr[-1] <= total_rows`` (verified in checked mode,
        ``torch_flashops.set_checks(True)``; without it out-of-range segments are clamped
        to ``[0, total_rows)``).
    lse_base : str
        ``"log2"`` (default) or ``"ln"``.

    Returns
    -------
    V : torch.Tensor
        The merged output, shape ``[seq_len, num_heads, head_dim]``, ``v``'s dtype.
    S : torch.Tensor
        The merged LSE, float32, shape ``[seq_len, num_heads]``.

    Example
    -------
    >>> import torch, torch_flashops as flashinfer
    >>> v, s = torch.randn(10, 4, 64).half(), torch.randn(10, 4)
    >>> indptr = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    >>> V, S = flashinfer.variable_length_merge_states(v, s, indptr)
    >>> V.shape, bool(S[1].isneginf().all())
    (torch.Size([3, 4, 64]), True)
    """
    lse_ln = _lse_ln(lse_base)
    if _config.checks_enabled():
        _meta.check_variable_length_merge_states(v, s, indptr)
        _checks.check_indptr_values(indptr, "indptr")
        last = int(indptr[-1])
        _checks.expect(last <= v.shape[0], "indptr",
                       f"last value {last} exceeds the number of state rows {v.shape[0]}")
    return _ops.variable_length_merge_states_op(v, s, indptr, lse_ln)


# ------------------------------------------------------------------------------ self-check
@selfcheck("cascade")
def _selfcheck_cascade(device) -> list:
    """Each op on small random states (with empty ones) against the fp64 reference."""
    from .reference import cascade as ref

    g = torch.Generator().manual_seed(0)
    N, S, H, D = 5, 3, 4, 64
    dt = torch.float16 if device != "cpu" else torch.float32
    tol = 2e-3 if dt == torch.float16 else 1e-4

    def states(*lead):
        v = torch.randn(*lead, H, D, generator=g)
        s = torch.randn(*lead, H, generator=g) * 4
        s[0, ..., 0] = float("-inf")
        return v.to(device, dt), s.to(device)

    def err(pair, expected):
        return max(max_abs_err(pair[0].float(), expected[0]), max_abs_err(pair[1], expected[1]))

    out = []
    (va, sa), (vb, sb) = states(N), states(N)
    out.append(CheckResult("merge_state", err(merge_state(va, sa, vb, sb), ref.ref_merge_state(va, sa, vb, sb)), tol))
    exp = ref.ref_merge_state(va, sa, vb, sb, lse_ln=True)
    out.append(CheckResult("merge_state", err(merge_state(va, sa, vb, sb, lse_base="ln"), exp), tol, "lse_base='ln'"))
    v, s = va.clone(), sa.clone()
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool, device=device)
    merge_state_in_place(v, s, vb, sb, mask)
    o, lse = (t.cpu() for t in ref.ref_merge_state(va, sa, vb, sb))  # the oracle runs on va's device
    keep = mask.cpu()
    o = torch.where(keep[:, None, None], o, va.cpu().double())
    lse = torch.where(keep[:, None], lse, sa.cpu().double())
    out.append(CheckResult("merge_state_in_place", err((v, s), (o, lse)), tol, "with mask"))
    vv, ss = states(N, S)
    out.append(CheckResult("merge_states", err(merge_states(vv, ss), ref.ref_merge_stacked(vv, ss)), tol))
    vr, sr = states(9)
    indptr = torch.tensor([0, 2, 2, 7, 9], dtype=torch.int32, device=device)
    out.append(CheckResult("variable_length_merge_states",
                           err(variable_length_merge_states(vr, sr, indptr),
                               ref.ref_variable_length_merge_states(vr.cpu(), sr.cpu(), indptr.cpu())),
                           tol, "with an empty segment"))
    return out


# flashinfer.triton.cascade.* lives at torch_flashops.triton.cascade (imported last: it
# re-exports the functions above).
importlib.import_module(".triton", __package__)

# FlashInfer keeps the cascade wrappers in flashinfer.cascade too. They are built on the batch
# wrappers (which themselves use the merge functions above), hence the late import.
from .cascade_wrapper import (  # noqa: E402
    BatchDecodeWithSharedPrefixPagedKVCacheWrapper, BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
    MultiLevelCascadeAttentionWrapper)

__all__ += ["MultiLevelCascadeAttentionWrapper", "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
            "BatchPrefillWithSharedPrefixPagedKVCacheWrapper"]
