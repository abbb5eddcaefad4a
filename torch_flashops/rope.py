"""Rotary position embeddings with FlashInfer's API (``flashinfer.rope``, spec/rope.md).

Positions come from ``pos_ids [nnz]``, or from a ragged batch ``indptr [B+1]`` + ``offsets [B]``
(token t of request b sits at ``offsets[b] + t - indptr[b]``), or index a precomputed
``cos_sin_cache`` (vLLM/SGLang). ``q [nnz, H_q, D]`` and ``k [nnz, H_k, D]`` may be views of one
packed qkv buffer (any strides with ``stride(-1) == 1``); the ``*_inplace`` functions write
through those views. Shape, dtype and option checks always run; checks that read indptr or
position values run in checked mode (``torch_flashops.set_checks(True)``). The in-place
functions reject a q or k whose elements share memory (e.g. heads made by ``expand()``).

Under ``torch.compile`` the float options (``rope_scale``, ``rope_theta``, the Llama-3.1
factors) are compile-time constants: pass them as Python numbers fixed by the model config. A
value that changes from call to call compiles a new graph for each value (and fails once
dynamo's recompile limit is reached with ``fullgraph=True``).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_indptr_values, check_range_values, check_same, check_tensor, expect, is_int, is_number
from . import _selfcheck
from ._config import checks_enabled
from .ops import rope as _ops

__all__ = [
    "apply_rope",
    "apply_rope_inplace",
    "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace",
    "apply_llama31_rope",
    "apply_llama31_rope_inplace",
    "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace",
    "apply_rope_with_cos_sin_cache",
    "apply_rope_with_cos_sin_cache_inplace",
]


# --------------------------------------------------------------------------- validation


_BACKENDS = ("cuda", "cute-dsl")  # FlashInfer's ``backend`` values; every one runs the same kernels here


def _check_positive(value, name: str):
    ok = is_number(value) and 0 < value < math.inf  # NaN fails too (SymFloats under dynamic=True; numpy scalars)
    expect(ok, name, "must be a finite number > 0, got {!r}", value)
    return float(value)


def _check_qk(q, k, qname: str = "q", kname: str = "k") -> None:
    """q [nnz, H_q, D], k [nnz, H_k, D]: float dtype, same nnz, D, dtype and device."""
    check_tensor(q, qname, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(k, kname, ndim=3, dtypes=FLOAT_DTYPES)
    check_same(q, k, qname, kname, shape=False)
    expect(k.shape[0] == q.shape[0], kname, "nnz {} does not match {}'s {} (shape {} vs {})", k.shape[0], qname, q.shape[0], tuple(k.shape), tuple(q.shape))
    expect(k.shape[2] == q.shape[2], kname, "head dim {} does not match {}'s {}", k.shape[2], qname, q.shape[2])


def _check_rotary_dim(rotary_dim, head_dim: int, name: str = "rotary_dim") -> int:
    rd = head_dim if rotary_dim is None else rotary_dim
    expect(is_int(rd), name, "must be an int or None, got {!r}", rotary_dim)
    expect(rd % 2 == 0 and 2 <= rd <= head_dim, name, "must be even and in [2, {}] (the head dim), got {}", head_dim, rd)
    return rd if isinstance(rd, (int, torch.SymInt)) else int(rd)  # (numpy ints to int; SymInts kept)


def _check_llama31(low_freq_factor, high_freq_factor, old_context_len) -> tuple:
    lf = _check_positive(low_freq_factor, "low_freq_factor")
    hf = _check_positive(high_freq_factor, "high_freq_factor")
    expect(lf < hf, "high_freq_factor", "must be greater than low_freq_factor ({}), got {}", lf, hf)
    return lf, hf, _check_positive(old_context_len, "old_context_len")


def _check_pos_ids(pos_ids, q, name: str = "pos_ids", qname: str = "q") -> None:
    check_tensor(pos_ids, name, ndim=1, dtypes=INDEX_DTYPES, device=q.device, last_contiguous=False)
    expect(pos_ids.shape[0] == q.shape[0], name, "shape {} must be ({},) (one position per token of {})",
           tuple(pos_ids.shape), q.shape[0], qname)


def _positions_from_indptr(q, indptr, offsets) -> torch.Tensor:
    """Validate ``indptr [B+1]`` / ``offsets [B]`` and expand them to ``pos_ids [nnz]`` on device."""
    check_tensor(indptr, "indptr", ndim=1, dtypes=INDEX_DTYPES, device=q.device, last_contiguous=False)
    check_tensor(offsets, "offsets", ndim=1, dtypes=INDEX_DTYPES, device=q.device, last_contiguous=False)
    expect(indptr.shape[0] >= 1, "indptr", "must have at least one element (B + 1 with B >= 0)")
    expect(offsets.dtype == indptr.dtype, "offsets", "dtype {} must match indptr's {}", offsets.dtype, indptr.dtype)
    expect(offsets.shape[0] == indptr.shape[0] - 1, "offsets", "length {} must be len(indptr) - 1 = {}", offsets.shape[0], indptr.shape[0] - 1)
    nnz = q.shape[0]
    if checks_enabled():
        check_indptr_values(indptr, "indptr", total=nnz)
    return _ops.rope_positions(indptr, offsets, nnz)


def _rope(inplace: bool, q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, llama31=None):
    """The one call path of the ``apply_*rope*`` functions once positions are known."""
    # placeholders when llama31 is off are literals, not a module global: dynamo would lift a
    # global float to a SymFloat input and restart the compile to specialise it
    args = (q, k, pos_ids, rotary_dim, bool(interleave), rope_scale, rope_theta, llama31 is not None,
            *(llama31 or (1.0, 4.0, 8192.0)))
    if inplace:
        _ops.rope_inplace(*args)
        return None
    return _ops.rope(*args)


def _check_options(q, k, rotary_dim, rope_scale, rope_theta, llama31=None):
    """Everything but the positions; returns ``(rd, rope_scale, rope_theta, llama31 tuple | None)``."""
    _check_qk(q, k)
    rd = _check_rotary_dim(rotary_dim, q.shape[2])
    scale, theta = _check_positive(rope_scale, "rope_scale"), _check_positive(rope_theta, "rope_theta")
    return rd, scale, theta, (_check_llama31(*llama31) if llama31 is not None else None)


def _check_backend(backend) -> None:
    # FlashInfer picks its CUDA or CuTe-DSL kernels by this name; both mean our kernel here
    expect(backend in _BACKENDS, "backend", "must be one of {}, got {!r}", _BACKENDS, backend)


def _indptr_form(inplace, q, k, indptr, offsets, rotary_dim, interleave, rope_scale, rope_theta, llama31=None,
                 backend="cuda"):
    _check_backend(backend)
    rd, scale, theta, l31 = _check_options(q, k, rotary_dim, rope_scale, rope_theta, llama31)
    return _rope(inplace, q, k, _positions_from_indptr(q, indptr, offsets), rd, interleave, scale, theta, l31)


def _pos_ids_form(inplace, q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, llama31=None,
                  backend="cuda"):
    _check_backend(backend)
    rd, scale, theta, l31 = _check_options(q, k, rotary_dim, rope_scale, rope_theta, llama31)
    _check_pos_ids(pos_ids, q)
    return _rope(inplace, q, k, pos_ids, rd, interleave, scale, theta, l31)


# --------------------------------------------------------------------------- indptr + offsets

_SHAPES_QK = """
    q : torch.Tensor
        fp16, bf16 or fp32, shape ``[nnz, num_q_heads, head_dim]``; ``stride(-1) == 1``, other
        strides free (e.g. a view of a packed qkv buffer).
    k : torch.Tensor
        same dtype and device as ``q``, shape ``[nnz, num_k_heads, head_dim]`` (any head count)."""

_SHAPES_INDPTR = _SHAPES_QK + """
    indptr : torch.Tensor
        int32 or int64, shape ``[batch_size + 1]``: request b owns tokens
        ``indptr[b] <= t < indptr[b + 1]``; starts at 0, non-decreasing, ends at ``nnz``.
    offsets : torch.Tensor
        same dtype as ``indptr``, shape ``[batch_size]``: position of each request's first token,
        so token t of request b is at ``offsets[b] + t - indptr[b]``."""

_SHAPES_POS_IDS = _SHAPES_QK + """
    pos_ids : torch.Tensor
        int32 or int64, shape ``[nnz]``: the position of every token (any integer)."""

_OPTIONS = """
    rotary_dim : Optional[int]
        number of leading dims of each head that rotate (even, ``2 <= rotary_dim <= head_dim``);
        ``None`` means ``head_dim``. The rest of the head is copied (or left) unchanged.
    interleave : bool
        ``False`` (default): rotate-half / GPT-NeoX pairs ``(x[i], x[i + rotary_dim/2])``;
        ``True``: GPT-J pairs ``(x[2i], x[2i+1])``.
    backend : str
        ``"cuda"`` (default) or ``"cute-dsl"``: FlashInfer's kernel choice, accepted so its calls
        run unchanged; both run this package's kernel."""

_LINEAR = """
    rope_scale : float
        linear position interpolation: frequencies are divided by it (default 1).
    rope_theta : float
        base of the frequencies ``rope_theta ** (-2i / rotary_dim)`` (default 1e4)."""

_LLAMA31 = """
    rope_scale : float
        Llama 3.1 scaling factor applied to the low frequencies (default 8).
    rope_theta : float
        base of the frequencies (default 5e5).
    low_freq_factor, high_freq_factor : float
        wavelengths above ``old_context_len / low_freq_factor`` are divided by ``rope_scale``,
        below ``old_context_len / high_freq_factor`` kept, smoothly blended between (1 and 4).
    old_context_len : int
        the original context length (default 8192)."""

_RETURNS = """
    Returns
    -------
    q_rope : torch.Tensor
        new contiguous tensor, shape and dtype of ``q``.
    k_rope : torch.Tensor
        new contiguous tensor, shape and dtype of ``k``."""

_RETURNS_INPLACE = """
    Returns
    -------
    None
        ``q`` and ``k`` are updated in place (only their first ``rotary_dim`` dims per head)."""


def _doc(summary: str, *parts: str) -> str:
    return f"{summary}\n\n    Parameters\n    ----------{''.join(parts)}\n"


# Defaults equal FlashInfer's (rope_theta 1e4 / 5e5) but are written as ints: under
# torch.compile(dynamic=True) dynamo lifts a float default to a graph input and then restarts the
# compile to specialise it, while int defaults stay constants.


def apply_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=10000, backend="cuda") -> Tuple[torch.Tensor, torch.Tensor]:
    return _indptr_form(False, q, k, indptr, offsets, rotary_dim, interleave, rope_scale, rope_theta, backend=backend)


def apply_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=10000, backend="cuda") -> None:
    _indptr_form(True, q, k, indptr, offsets, rotary_dim, interleave, rope_scale, rope_theta, backend=backend)


def apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=10000, backend="cuda") -> Tuple[torch.Tensor, torch.Tensor]:
    return _pos_ids_form(False, q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, backend=backend)


def apply_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=10000, backend="cuda") -> None:
    _pos_ids_form(True, q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, backend=backend)


def apply_llama31_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8, rope_theta=500000,
                       low_freq_factor=1, high_freq_factor=4, old_context_len=8192, backend="cuda") -> Tuple[torch.Tensor, torch.Tensor]:
    return _indptr_form(False, q, k, indptr, offsets, rotary_dim, interleave, rope_scale, rope_theta,
                        (low_freq_factor, high_freq_factor, old_context_len), backend)


def apply_llama31_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8, rope_theta=500000,
                               low_freq_factor=1, high_freq_factor=4, old_context_len=8192, backend="cuda") -> None:
    _indptr_form(True, q, k, indptr, offsets, rotary_dim, interleave, rope_scale, rope_theta,
                 (low_freq_factor, high_freq_factor, old_context_len), backend)


def apply_llama31_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8, rope_theta=500000,
                               low_freq_factor=1, high_freq_factor=4, old_context_len=8192, backend="cuda") -> Tuple[torch.Tensor, torch.Tensor]:
    return _pos_ids_form(False, q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta,
                         (low_freq_factor, high_freq_factor, old_context_len), backend)


def apply_llama31_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8, rope_theta=500000,
                                       low_freq_factor=1, high_freq_factor=4, old_context_len=8192, backend="cuda") -> None:
    _pos_ids_form(True, q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta,
                  (low_freq_factor, high_freq_factor, old_context_len), backend)


def _set_docs() -> None:
    """One numpy-style docstring per public function, assembled from the shared sections."""
    for fn in (apply_rope, apply_rope_inplace, apply_rope_pos_ids, apply_rope_pos_ids_inplace, apply_llama31_rope,
               apply_llama31_rope_inplace, apply_llama31_rope_pos_ids, apply_llama31_rope_pos_ids_inplace):
        name = fn.__name__
        llama, pos_ids, inplace = "llama31" in name, "pos_ids" in name, name.endswith("_inplace")
        summary = "Apply " + ("Llama 3.1 RoPE (smoothed frequency scaling)" if llama else "RoPE (linear scaling)")
        summary += " in place" if inplace else ""
        summary += " at explicit positions ``pos_ids``." if pos_ids else " to a ragged batch given by ``indptr``/``offsets``."
        fn.__doc__ = _doc(summary, _SHAPES_POS_IDS if pos_ids else _SHAPES_INDPTR, _OPTIONS,
                          _LLAMA31 if llama else _LINEAR) + (_RETURNS_INPLACE if inplace else _RETURNS)


_set_docs()


# --------------------------------------------------------------------------- cos/sin cache


def _cache_views(positions, query, key, head_size, cos_sin_cache):
    """Validate the vLLM-style arguments; return ``[nnz, H, head_size]`` views of query and key."""
    expect(is_int(head_size) and head_size > 0, "head_size",
           "must be a positive int, got {!r}", head_size)
    views = []
    for x, name in ((query, "query"), (key, "key")):
        check_tensor(x, name, ndim=(2, 3), dtypes=FLOAT_DTYPES)
        if x.dim() == 3:
            expect(x.shape[2] == head_size, name, "last dim {} must equal head_size {}", x.shape[2], head_size)
        else:
            expect(x.shape[1] % head_size == 0, name, "last dim {} must be a multiple of head_size {}", x.shape[1], head_size)
        views.append(x.view(x.shape[0], x.shape[-1] // head_size if x.dim() == 2 else x.shape[1], head_size))
    q3, k3 = views
    _check_qk(q3, k3, "query", "key")
    check_tensor(cos_sin_cache, "cos_sin_cache", ndim=2, device=query.device, last_contiguous=False)
    expect(cos_sin_cache.dtype == torch.float32, "cos_sin_cache", "must be float32, got {}", cos_sin_cache.dtype)
    expect(cos_sin_cache.shape[1] % 2 == 0 and 2 <= cos_sin_cache.shape[1] <= head_size, "cos_sin_cache",
           "shape[1] (the rotary dim) must be even and in [2, {}] (head_size), got shape {}", head_size,
           tuple(cos_sin_cache.shape))
    _check_pos_ids(positions, query, "positions", "query")
    if checks_enabled():
        check_range_values(positions, "positions", 0, cos_sin_cache.shape[0])
    return q3, k3


def apply_rope_with_cos_sin_cache(positions, query, key, head_size, cos_sin_cache, is_neox=True, backend="cuda") -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE with a precomputed cos/sin cache (vLLM / SGLang convention).

    Parameters
    ----------
    positions : torch.Tensor
        int32 or int64, shape ``[nnz]``: row of ``cos_sin_cache`` for each token,
        ``0 <= positions < max_position`` (checked in checked mode).
    query : torch.Tensor
        fp16, bf16 or fp32, shape ``[nnz, num_q_heads * head_size]`` or
        ``[nnz, num_q_heads, head_size]``; ``stride(-1) == 1``.
    key : torch.Tensor
        same dtype and device, shape ``[nnz, num_k_heads * head_size]`` or
        ``[nnz, num_k_heads, head_size]``.
    head_size : int
        size of one head.
    cos_sin_cache : torch.Tensor
        float32, shape ``[max_position, rotary_dim]`` with ``rotary_dim`` even and
        ``<= head_size``: row p is ``cos(p f_0 .. p f_{rd/2-1})`` followed by the sines.
    is_neox : bool
        ``True`` (default): rotate-half pairs ``(x[i], x[i + rd/2])``; ``False``: interleaved
        GPT-J pairs ``(x[2i], x[2i+1])``.
    backend : str
        ``"cuda"`` (default) or ``"cute-dsl"``, accepted as FlashInfer does; both run this
        package's kernel.

    Returns
    -------
    query_out : torch.Tensor
        new contiguous tensor, shape and dtype of ``query``.
    key_out : torch.Tensor
        new contiguous tensor, shape and dtype of ``key``.
    """
    _check_backend(backend)
    q3, k3 = _cache_views(positions, query, key, head_size, cos_sin_cache)
    q_out, k_out = _ops.rope_cos_sin_cache(q3, k3, positions, cos_sin_cache, not is_neox)
    return q_out.view(query.shape), k_out.view(key.shape)


def apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cos_sin_cache, is_neox=True, backend="cuda") -> None:
    """Apply RoPE with a precomputed cos/sin cache in place (vLLM / SGLang convention).

    Parameters
    ----------
    positions : torch.Tensor
        int32 or int64, shape ``[nnz]``: row of ``cos_sin_cache`` for each token.
    query : torch.Tensor
        fp16, bf16 or fp32, shape ``[nnz, num_q_heads * head_size]`` or
        ``[nnz, num_q_heads, head_size]``; ``stride(-1) == 1`` (may be a view of packed qkv).
    key : torch.Tensor
        same dtype and device, ``[nnz, num_k_heads * head_size]`` or ``[nnz, num_k_heads, head_size]``.
    head_size : int
        size of one head.
    cos_sin_cache : torch.Tensor
        float32, shape ``[max_position, rotary_dim]``, ``rotary_dim`` even and ``<= head_size``.
    is_neox : bool
        ``True`` (default): rotate-half pairs; ``False``: interleaved pairs.
    backend : str
        ``"cuda"`` (default) or ``"cute-dsl"``; both run this package's kernel.

    Returns
    -------
    None
        ``query`` and ``key`` are updated in place (first ``rotary_dim`` dims of each head).
    """
    _check_backend(backend)
    q3, k3 = _cache_views(positions, query, key, head_size, cos_sin_cache)
    _ops.rope_cos_sin_cache_inplace(q3, k3, positions, cos_sin_cache, not is_neox)


# --------------------------------------------------------------------------- self-check


@_selfcheck.selfcheck("rope")
def _rope_selfcheck(device) -> list:
    """Each rope op on small random fp16 inputs (q, k views of one packed qkv buffer, partial
    rotary dim, both pair layouts) against the fp64 oracle of ``reference.rope``."""
    from .reference import rope as ref

    g = torch.Generator().manual_seed(0)
    nnz, hq, hk, d, rd, dt = 13, 4, 2, 64, 48, torch.float16
    results = []

    def row(name, outs, exps, note):
        err = max(_selfcheck.max_abs_err(o, e) for o, e in zip(outs, exps))
        results.append(_selfcheck.CheckResult(name, err, 1e-2, note))

    indptr = torch.tensor([0, 5, 5, nnz], device=device)
    offsets = torch.tensor([3, 0, 200], device=device)
    pos_cpu = ref.positions_from_indptr(indptr.cpu(), offsets.cpu(), nnz)
    got = _ops.rope_positions(indptr, offsets, nnz)
    results.append(_selfcheck.CheckResult("rope_positions", float((got.cpu() - pos_cpu).abs().max()), 0.0, "B=3, one empty request"))
    cache = ref.rope_freqs(rd)
    cache = torch.cat([torch.cos(torch.arange(256.0)[:, None] * cache), torch.sin(torch.arange(256.0)[:, None] * cache)], 1).to(device)
    for interleave in (False, True):
        note = f"fp16 nnz={nnz} H={hq}/{hk} D={d} rd={rd} {'interleave' if interleave else 'rotate-half'}"
        qkv = torch.randn(nnz, (hq + 2 * hk) * d, generator=g).to(device, dt)
        q, k = qkv[:, : hq * d].view(nnz, hq, d), qkv[:, hq * d : (hq + hk) * d].view(nnz, hk, d)
        f = ref.rope_freqs(rd, 1e4, 1.0)
        exp = [ref.ref_rope_pos_ids(x.cpu(), pos_cpu, rd, f, interleave) for x in (q, k)]
        row("rope", apply_rope(q, k, indptr, offsets, rd, interleave), exp, note)
        q2, k2 = (x.clone() for x in (q, k))
        apply_rope_inplace(q2, k2, indptr, offsets, rd, interleave)
        row("rope_inplace", (q2, k2), exp, note)
        exp = [ref.ref_rope_cos_sin_cache(pos_cpu, x.cpu(), x.cpu(), d, cache.cpu(), not interleave)[0] for x in (q, k)]
        row("rope_cos_sin_cache", apply_rope_with_cos_sin_cache(pos_cpu.to(device), q, k, d, cache, not interleave), exp, note)
        apply_rope_with_cos_sin_cache_inplace(pos_cpu.to(device), q, k, d, cache, not interleave)
        row("rope_cos_sin_cache_inplace", (q, k), exp, note + " (packed qkv views)")
    return results
