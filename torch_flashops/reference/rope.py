"""Rotary position embeddings in plain PyTorch: the test oracle (spec/rope.md §6) and the CPU
backend of the ``flashops::rope*`` ops.

Oracle functions compute in fp64 from an fp32 frequency table and an fp32 angle, exactly as the
spec's precision contract prescribes, and return fp64. The ``*_cpu`` functions wrap them with
the ops' signatures and output contracts (fresh contiguous outputs in the input dtype, or
in-place writes of the rotated part only). Nothing here imports the Triton code.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "rope_freqs",
    "rotate",
    "ref_rope_pos_ids",
    "positions_from_indptr",
    "ref_rope_cos_sin_cache",
    "rope_half",
]


# --------------------------------------------------------------------------- oracle (spec §6)


def rope_freqs(
    rd: int,
    rope_theta: float = 1e4,
    rope_scale: float = 1.0,
    llama31: Optional[Tuple[float, float, float]] = None,
    *,
    device=None,
) -> torch.Tensor:
    """The per-pair frequencies ``f'_i``, fp32 ``[rd // 2]``, computed in fp64 then rounded once.

    ``llama31 = (low_freq_factor, high_freq_factor, old_context_len)`` selects Llama 3.1's
    smoothing between ``f / rope_scale`` (long wavelengths) and ``f`` (short ones).
    """
    i = torch.arange(rd // 2, dtype=torch.float64, device=device)
    f = rope_theta ** (-2.0 * i / rd)
    if llama31 is not None:
        lf, hf, ctx = llama31
        smooth = (f * ctx / (2 * math.pi * (hf - lf)) - lf / (hf - lf)).clamp(0.0, 1.0)
        return ((1 - smooth) * f / rope_scale + smooth * f).float()
    return (f / rope_scale).float()


def _pair_index(rd: int, interleave: bool, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Element indices ``(i1, i2)`` of the two members of each rotated pair."""
    i = torch.arange(rd // 2, device=device)
    return (2 * i, 2 * i + 1) if interleave else (i, i + rd // 2)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rd: int, interleave: bool) -> torch.Tensor:
    """Rotate the pairs of ``x[..., :rd]``; ``x [nnz, H, D]``, ``cos``/``sin [nnz, rd // 2]``.

    Returns fp64 ``[nnz, H, D]`` with ``x[..., rd:]`` unchanged.
    """
    out = x.double().clone()
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    i1, i2 = _pair_index(rd, interleave, x.device)
    a, b = out[..., i1], out[..., i2]  # advanced indexing copies, so the writes below are safe
    out[..., i1] = a * c - b * s
    out[..., i2] = b * c + a * s
    return out


def ref_rope_pos_ids(x: torch.Tensor, pos_ids: torch.Tensor, rd: int, freqs: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """RoPE of ``x [nnz, H, D]`` at positions ``pos_ids [nnz]``; the angle is one fp32 product."""
    ang = pos_ids.to(torch.float32)[:, None] * freqs.to(pos_ids.device)[None, :]
    return rotate(x, torch.cos(ang.double()), torch.sin(ang.double()), rd, interleave)


def positions_from_indptr(indptr: torch.Tensor, offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """``pos[t] = offsets[b] + (t - indptr[b])`` for ``indptr[b] <= t < indptr[b+1]``; a loop over
    requests on purpose (the op's CPU backend below uses a vectorised search instead)."""
    pos = torch.zeros(nnz, dtype=offsets.dtype, device=offsets.device)
    for b in range(len(indptr) - 1):
        lo, hi = int(indptr[b]), int(indptr[b + 1])
        pos[lo:hi] = offsets[b] + torch.arange(hi - lo, dtype=offsets.dtype, device=offsets.device)
    return pos


def ref_rope_cos_sin_cache(positions, query, key, head_size: int, cache: torch.Tensor, is_neox: bool = True):
    """vLLM-style RoPE from a ``[max_position, rd]`` cos|sin cache; fp64 outputs shaped like the inputs."""
    rd = cache.shape[1]
    cs = cache[positions.long()]
    cos, sin = cs[:, : rd // 2], cs[:, rd // 2 :]

    def one(x):
        heads = x.shape[-1] // head_size if x.dim() == 2 else x.shape[1]  # (not -1: nnz may be 0)
        return rotate(x.reshape(x.shape[0], heads, head_size), cos, sin, rd, not is_neox).reshape(x.shape)

    return one(query), one(key)


def rope_half(x: torch.Tensor, pos: torch.Tensor, rd: int, rope_theta: float = 1e4, rope_scale: float = 1.0) -> torch.Tensor:
    """ROPE_LLAMA as used inside attention (attention.md §9): rotate-half, linear scaling."""
    return ref_rope_pos_ids(x, pos, rd, rope_freqs(rd, rope_theta, rope_scale), False)


# --------------------------------------------------------------------------- CPU backend


def _llama31_params(llama31: bool, low_freq_factor: float, high_freq_factor: float, old_context_len: float):
    return (low_freq_factor, high_freq_factor, old_context_len) if llama31 else None


def rope_cpu(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, llama31,
             low_freq_factor, high_freq_factor, old_context_len):
    """``flashops::rope`` on CPU: fresh contiguous ``(q_out, k_out)`` in the input dtype."""
    freqs = rope_freqs(rotary_dim, rope_theta, rope_scale, _llama31_params(llama31, low_freq_factor, high_freq_factor, old_context_len))
    return tuple(ref_rope_pos_ids(x, pos_ids, rotary_dim, freqs, interleave).to(x.dtype).contiguous() for x in (q, k))


def rope_inplace_cpu(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, llama31,
                     low_freq_factor, high_freq_factor, old_context_len):
    """``flashops::rope_inplace`` on CPU: writes ``x[..., :rotary_dim]`` of q and k through the views."""
    freqs = rope_freqs(rotary_dim, rope_theta, rope_scale, _llama31_params(llama31, low_freq_factor, high_freq_factor, old_context_len))
    for x in (q, k):
        x[..., :rotary_dim] = ref_rope_pos_ids(x, pos_ids, rotary_dim, freqs, interleave)[..., :rotary_dim].to(x.dtype)


def _cache_cos_sin(positions, cos_sin_cache):
    """Rows of the cache per token; positions outside ``[0, max_position)`` give NaN (as the kernel)."""
    rd, max_pos = cos_sin_cache.shape[1], cos_sin_cache.shape[0]
    p = positions.long()
    ok = (p >= 0) & (p < max_pos)
    cs = cos_sin_cache[p.clamp(0, max(max_pos - 1, 0))] if max_pos > 0 else cos_sin_cache.new_empty((p.numel(), rd))
    cs = cs.masked_fill(~ok[:, None], float("nan"))
    return cs[:, : rd // 2], cs[:, rd // 2 :]


def rope_cos_sin_cache_cpu(q, k, positions, cos_sin_cache, interleave):
    """``flashops::rope_cos_sin_cache`` on CPU (``q``, ``k`` are ``[nnz, H, head_size]``)."""
    rd = cos_sin_cache.shape[1]
    cos, sin = _cache_cos_sin(positions, cos_sin_cache)
    return tuple(rotate(x, cos, sin, rd, interleave).to(x.dtype).contiguous() for x in (q, k))


def rope_cos_sin_cache_inplace_cpu(q, k, positions, cos_sin_cache, interleave):
    """``flashops::rope_cos_sin_cache_inplace`` on CPU."""
    rd = cos_sin_cache.shape[1]
    cos, sin = _cache_cos_sin(positions, cos_sin_cache)
    for x in (q, k):
        x[..., :rd] = rotate(x, cos, sin, rd, interleave)[..., :rd].to(x.dtype)


def rope_positions_cpu(indptr, offsets, nnz):
    """``flashops::rope_positions`` on CPU: vectorised segment search, no per-request loop."""
    out = torch.zeros(nnz, dtype=offsets.dtype, device=offsets.device)
    nb = offsets.shape[0]
    if nb == 0 or nnz == 0:
        return out
    t = torch.arange(nnz, dtype=torch.int64, device=offsets.device)
    ip = indptr.long().contiguous()  # (searchsorted warns on strided boundaries)
    b = (torch.searchsorted(ip, t, right=True) - 1).clamp(0, nb - 1)
    return (offsets.long()[b] + (t - ip[b])).to(offsets.dtype)
