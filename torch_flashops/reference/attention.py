"""Attention in plain PyTorch: the test oracle (spec/attention.md §9) and the CPU backend of the
``flashops::single_attention`` / ``paged_attention`` / ``ragged_attention`` ops.

* ``ref_attention`` is the spec's oracle: fp64, one request at a time, straight from §0.4.
* ``*_cpu`` are the ops' CPU implementations (same signatures and output contracts as the Triton
  launchers: fresh contiguous ``o`` in the output dtype, fp32 ``lse``; the ``_out`` variants
  write the given tensors). They compute in fp32 from the CSR arrays and ignore the GPU work
  lists, which only decide how the kernel tiles the same math.

Nothing here imports the Triton code.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = [
    "alibi_slopes",
    "rope_half",
    "ref_attention",
    "unpack_mask_bits",
]

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- oracle (spec §9)


def alibi_slopes(H: int) -> torch.Tensor:
    """ALiBi slopes of ``H`` heads, fp64 ``[H]`` (spec §0.4 step 3)."""
    n = 2 ** int(math.floor(math.log2(H)))
    s = [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    s += [2.0 ** (-4.0 * (2 * m + 1) / n) for m in range(H - n)]
    return torch.tensor(s, dtype=torch.float64)


def rope_half(x: torch.Tensor, pos: torch.Tensor, D: int, rope_theta: float = 1e4, rope_scale: float = 1.0) -> torch.Tensor:
    """Rotate-half RoPE of ``x [n, H, D]`` at positions ``pos [n]`` (rope.md §1/§6), fp64.

    Frequencies ``f_i = rope_theta^(-2i/D) / rope_scale`` are rounded to fp32 once, the angle is
    one fp32 product ``fp32(pos) * f_i``, sin/cos and the rotation are fp64.
    """
    i = torch.arange(D // 2, dtype=torch.float64)
    f = (rope_theta ** (-2.0 * i / D) / rope_scale).float()
    ang = (pos.to(torch.float32)[:, None] * f[None, :]).double()
    c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    x = x.double()
    a, b = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def ref_attention(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, last_page_len, *,
                  causal=False, sm_scale=None, logits_soft_cap=0.0, window_left=-1,
                  pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4, masks=None,
                  q_scale=1.0, k_scale=1.0, v_scale=1.0, lse_base="log2"):
    """Attention of every query row over its request's paged keys, fp64 (spec §9).

    ``k_cache``, ``v_cache``: NHD 4-D ``[P, page, H_kv, D]`` (HND: ``.transpose(1, 2)`` first;
    single/ragged K/V: page_size 1 and ``kv_indices = arange``). ``masks``: per-request bool
    ``[qo_len, kv_len]`` or None. Returns ``(o [N, H_qo, D_vo], lse [N, H_qo])`` in fp64.
    """
    P, page, Hkv, Dqk = k_cache.shape
    N, Hq, Dvo = q.shape[0], q.shape[1], v_cache.shape[-1]
    scale = (sm_scale if sm_scale is not None else Dqk ** -0.5) * q_scale * k_scale
    o = torch.zeros(N, Hq, Dvo, dtype=torch.float64)
    lse = torch.full((N, Hq), -math.inf, dtype=torch.float64)
    q, k_cache, v_cache = q.cpu(), k_cache.cpu(), v_cache.cpu()
    for b in range(len(kv_indptr) - 1):
        pages = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])].long().cpu()
        kv_len = (len(pages) - 1) * page + int(last_page_len[b]) if len(pages) else 0  # no pages: kv_len 0
        K = k_cache[pages].reshape(-1, Hkv, Dqk)[:kv_len].double()
        V = v_cache[pages].reshape(-1, Hkv, Dvo)[:kv_len].double()
        K, V = K.repeat_interleave(Hq // Hkv, 1), V.repeat_interleave(Hq // Hkv, 1)
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        Q, qo_len = q[q0:q1].double(), q1 - q0
        r, j = torch.arange(qo_len)[:, None], torch.arange(kv_len)[None, :]  # row, key
        p = r + (kv_len - qo_len)  # absolute query position
        if pos_encoding_mode == "ROPE_LLAMA":
            Q = rope_half(Q, p[:, 0], Dqk, rope_theta, rope_scale)
            K = rope_half(K, j[0], Dqk, rope_theta, rope_scale)
        s = torch.einsum("rhd,jhd->hrj", Q, K) * scale
        if pos_encoding_mode == "ALIBI":
            s = s + alibi_slopes(Hq)[:, None, None] * (j - r)
        if logits_soft_cap and logits_soft_cap > 0:
            s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
        keep = masks[b].bool().cpu() if masks is not None else (
            j <= p if causal else torch.ones(qo_len, kv_len, dtype=torch.bool))
        if window_left >= 0:
            keep = keep & (j >= p - window_left)
        s = s.masked_fill(~keep, -math.inf)
        m = torch.logsumexp(s, dim=-1, keepdim=True)  # -inf on empty rows
        w = torch.exp(s - m).nan_to_num(nan=0.0)  # empty rows -> weights 0
        o[q0:q1] = torch.einsum("hrj,jhd->rhd", w, V) * v_scale
        lse[q0:q1] = m[..., 0].T / (math.log(2) if lse_base == "log2" else 1.0)
    return o, lse


def unpack_mask_bits(packed: torch.Tensor, byte_offset: int, nbits: int) -> torch.Tensor:
    """Bits ``[0, nbits)`` of a little-endian packed mask starting at ``byte_offset``, as bool."""
    nbytes = (nbits + 7) // 8
    by = packed[byte_offset:byte_offset + nbytes].to(torch.int32)
    bits = (by[:, None] >> torch.arange(8, dtype=torch.int32, device=by.device)[None, :]) & 1
    return bits.reshape(-1)[:nbits].bool()


# --------------------------------------------------------------------------- CPU backend


def _attend_fp32(Q, K, V, keep, *, scale, soft_cap, pos_mode, rope_scale, rope_theta, kv_offset, alibi):
    """One request in fp32: ``Q [qo, Hq, D]``, ``K/V [kv, Hkv, D*]``, ``keep [qo, kv]`` bool.

    Returns ``o [qo, Hq, Dvo]`` (fp32, unscaled by v_scale) and ``lse_2 [qo, Hq]`` (base 2).
    """
    qo_len, Hq, D = Q.shape
    kv_len, Hkv = K.shape[0], K.shape[1]
    G = Hq // Hkv
    Q, K, V = Q.float(), K.float(), V.float()
    if pos_mode == "ROPE_LLAMA":
        f = (rope_theta ** (-2.0 * torch.arange(D // 2, dtype=torch.float64) / D) / rope_scale).float()

        def rot(x, pos):
            ang = pos.float()[:, None] * f[None, :]
            c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
            a, b = x[..., : D // 2], x[..., D // 2:]
            return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

        Q = rot(Q, torch.arange(qo_len) + kv_offset)
        K = rot(K, torch.arange(kv_len))
    # [Hkv, G, qo, kv] logits without materialising repeated K
    Qg = Q.view(qo_len, Hkv, G, D).permute(1, 2, 0, 3)
    s = torch.matmul(Qg, K.permute(1, 2, 0).unsqueeze(1)) * scale
    if pos_mode == "ALIBI":
        rel = (torch.arange(kv_len)[None, :] - torch.arange(qo_len)[:, None]).float()
        s = s + alibi.view(Hkv, G, 1, 1) * rel
    if soft_cap > 0:
        s = soft_cap * torch.tanh(s / soft_cap)
    s = s.masked_fill(~keep, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(s - m_safe)
    denom = w.sum(dim=-1, keepdim=True)
    o = torch.matmul(w, V.permute(1, 0, 2).unsqueeze(1)) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (m_safe + torch.log(denom)).squeeze(-1) / LN2  # log(0) = -inf on empty rows
    return o.permute(2, 0, 1, 3).reshape(qo_len, Hq, -1), lse.permute(2, 0, 1).reshape(qo_len, Hq)


def _keep(qo_len, kv_len, causal, window_left, mask_bits):
    r = torch.arange(qo_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    p = r + (kv_len - qo_len)
    if mask_bits is not None:
        keep = mask_bits.view(qo_len, kv_len)
    elif causal:
        keep = j <= p
    else:
        keep = torch.ones(qo_len, kv_len, dtype=torch.bool)
    if window_left >= 0:
        keep = keep & (j >= p - window_left)
    return keep


def _alibi_fp32(Hq, pos_mode):
    return alibi_slopes(Hq).float() if pos_mode == "ALIBI" else None


def _run_requests(q, requests: Sequence[Tuple[int, int, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], o, lse, *,
                  causal, window_left, sm_scale, logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln):
    """Fill ``o``/``lse`` rows of each request ``(q0, q1, K, V, mask_bits)``; other rows untouched."""
    Hq = q.shape[1]
    alibi = _alibi_fp32(Hq, pos_encoding_mode)
    for q0, q1, K, V, bits in requests:
        qo_len, kv_len = q1 - q0, K.shape[0]
        if qo_len == 0:
            continue
        if kv_len == 0:  # no keys: empty rows
            o[q0:q1] = 0
            lse[q0:q1] = -math.inf
            continue
        keep = _keep(qo_len, kv_len, causal, window_left, bits)
        ob, lb = _attend_fp32(q[q0:q1], K, V, keep, scale=sm_scale, soft_cap=logits_soft_cap, pos_mode=pos_encoding_mode,
                              rope_scale=rope_scale, rope_theta=rope_theta, kv_offset=kv_len - qo_len, alibi=alibi)
        o[q0:q1] = (ob * v_scale).to(o.dtype)
        lse[q0:q1] = lb * LN2 if lse_ln else lb


def _fresh_outputs(q, d_vo, o_dtype):
    o = torch.zeros(q.shape[0], q.shape[1], d_vo, dtype=o_dtype or q.dtype, device=q.device)
    lse = torch.full((q.shape[0], q.shape[1]), -math.inf, dtype=torch.float32, device=q.device)
    return o, lse


def _single_kv(k, v, kv_layout):
    return (k.transpose(0, 1), v.transpose(0, 1)) if kv_layout == "HND" else (k, v)


def single_attention_cpu(q, k, v, packed_mask, kv_layout, causal, window_left, sm_scale, logits_soft_cap,
                         pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln, o_dtype=None):
    K, V = _single_kv(k, v, kv_layout)
    o, lse = _fresh_outputs(q, V.shape[-1], o_dtype)
    bits = unpack_mask_bits(packed_mask, 0, q.shape[0] * K.shape[0]) if packed_mask is not None else None
    _run_requests(q, [(0, q.shape[0], K, V, bits)], o, lse, causal=causal, window_left=window_left, sm_scale=sm_scale,
                  logits_soft_cap=logits_soft_cap, pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale,
                  rope_theta=rope_theta, v_scale=v_scale, lse_ln=lse_ln)
    return o, lse


def _batch_requests(qo_indptr, kv_indptr, kv_lens, packed_mask, mask_indptr, gather):
    qi, ki = qo_indptr.tolist(), kv_indptr.tolist()
    lens = kv_lens.tolist() if kv_lens is not None else None
    mi = mask_indptr.tolist() if mask_indptr is not None else None
    out: List = []
    for b in range(len(qi) - 1):
        K, V = gather(b, ki, lens)
        bits = None
        if packed_mask is not None:
            bits = unpack_mask_bits(packed_mask, mi[b], (qi[b + 1] - qi[b]) * K.shape[0])
        out.append((qi[b], qi[b + 1], K, V, bits))
    return out


def _paged_gather(k_view, v_view, kv_indices):
    page = k_view.shape[1]

    def gather(b, ki, lens):
        pages = kv_indices[ki[b]:ki[b + 1]].long()
        n = lens[b]
        K = k_view[pages].reshape(-1, k_view.shape[2], k_view.shape[3])[:n]
        V = v_view[pages].reshape(-1, v_view.shape[2], v_view.shape[3])[:n]
        assert K.shape[0] == n and pages.numel() * page >= n
        return K, V

    return gather


def paged_attention_out_cpu(q, k_cache, v_cache, kv_layout, work, split_work, merge, qo_indptr, kv_indptr, kv_indices,
                            kv_lens, packed_mask, mask_indptr, block_m, causal, window_left, sm_scale, logits_soft_cap,
                            pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln, o, lse):
    from ..meta.page import paged_kv_views  # shape-only helper, not code under test

    kv, vv = paged_kv_views(k_cache, v_cache, kv_layout)
    reqs = _batch_requests(qo_indptr, kv_indptr, kv_lens, packed_mask, mask_indptr, _paged_gather(kv, vv, kv_indices))
    _run_requests(q, reqs, o, lse, causal=causal, window_left=window_left, sm_scale=sm_scale,
                  logits_soft_cap=logits_soft_cap, pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale,
                  rope_theta=rope_theta, v_scale=v_scale, lse_ln=lse_ln)


def ragged_attention_out_cpu(q, k, v, work, split_work, merge, qo_indptr, kv_indptr, packed_mask, mask_indptr, block_m,
                             causal, window_left, sm_scale, logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta,
                             v_scale, lse_ln, o, lse):
    def gather(b, ki, lens):
        return k[ki[b]:ki[b + 1]], v[ki[b]:ki[b + 1]]

    reqs = _batch_requests(qo_indptr, kv_indptr, None, packed_mask, mask_indptr, gather)
    _run_requests(q, reqs, o, lse, causal=causal, window_left=window_left, sm_scale=sm_scale,
                  logits_soft_cap=logits_soft_cap, pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale,
                  rope_theta=rope_theta, v_scale=v_scale, lse_ln=lse_ln)
