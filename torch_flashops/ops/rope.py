"""Rotary position embeddings (RoPE): Triton kernels, launchers and the ``flashops::rope*`` ops.

Math (spec/rope.md), per token t, head h, pair i (0 <= i < rd/2) of the row x = X[t, h, :D]:

    rotate-half (interleave=False):  (a, b) = (x[i], x[i + rd/2])
    interleave  (interleave=True):   (a, b) = (x[2i], x[2i+1])
    theta = fp32(pos[t]) * f'_i          (f' from the fp32 table of reference.rope_freqs)
      or  cos/sin = cache[pos[t], i], cache[pos[t], rd/2 + i]     (cos/sin-cache variant)
    a' = a cos(theta) - b sin(theta)
    b' = b cos(theta) + a sin(theta)     (fp32, rounded once to the input dtype)
    x[rd:D] is copied (out-of-place) or left untouched (in-place).

Shapes: q [nnz, Hq, D], k [nnz, Hk, D], any strides with stride(-1) == 1 (views of a packed
qkv buffer); pos [nnz] int32/int64; freqs [rd/2] fp32; cache [max_pos, rd] fp32.

One pass over memory: program (pt, g) takes BLOCK_T tokens, computes their cos/sin once (accurate
tl.cos/tl.sin of the fp32 angle, or two cache-row loads), then walks head blocks g, g+G, ... of
the list [q head blocks..., k head blocks...], loading each [BLOCK_T, BLOCK_H, D] tile once and
storing it once; the row segments it touches are contiguous, so loads and stores vectorise.
``rd``, ``D``, ``interleave`` and the tile sizes are constexpr; nnz and head counts are runtime.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _config
from .._checks import check_writable
from .._registry import register_op
from ..meta import rope as meta
from ..reference import rope as ref
from ._host import COMPILE_OPTIONS, cdiv, next_pow2

__all__ = [
    "rope",
    "rope_inplace",
    "rope_cos_sin_cache",
    "rope_cos_sin_cache_inplace",
    "rope_positions",
]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _token_cos_sin(pos_ptr, freq_ptr, cache_ptr, cache_stride, max_pos, t, t_mask,
                   HALF: tl.constexpr, HALF_P2: tl.constexpr, FROM_CACHE: tl.constexpr):
    """cos, sin [BLOCK_T, HALF_P2] fp32 for the tokens ``t``; NaN for cache rows out of range."""
    i = tl.arange(0, HALF_P2)
    pos = tl.load(pos_ptr + t, mask=t_mask, other=0)
    if FROM_CACHE:
        ok = (t_mask & (pos >= 0) & (pos < max_pos))[:, None] & (i < HALF)[None, :]
        row = cache_ptr + pos.to(tl.int64)[:, None] * cache_stride + i[None, :]
        c = tl.load(row, mask=ok, other=float("nan"))
        s = tl.load(row + HALF, mask=ok, other=float("nan"))
    else:
        f = tl.load(freq_ptr + i, mask=i < HALF, other=0.0)
        theta = pos.to(tl.float32)[:, None] * f[None, :]  # one fp32 product, as the spec
        c = tl.cos(theta)
        s = tl.sin(theta)
    return c, s


@triton.jit
def _rotate_head_block(x_ptr, o_ptr, xs_t, xs_h, os_t, os_h, t64, t_mask, h0, H, c, s,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                       RD: tl.constexpr, HALF_P2: tl.constexpr, REST_P2: tl.constexpr,
                       INTERLEAVE: tl.constexpr, COPY_REST: tl.constexpr):
    """Rotate heads [h0, h0 + BLOCK_H) of tokens t64 from x into o (o may be x: in place)."""
    h = h0 + tl.arange(0, BLOCK_H)
    th_mask = (t_mask[:, None] & (h < H)[None, :])[:, :, None]
    h64 = h.to(tl.int64)  # head-major storage has head strides of nnz * D
    x_row = x_ptr + (t64[:, None] * xs_t + h64[None, :] * xs_h)[:, :, None]
    o_row = o_ptr + (t64[:, None] * os_t + h64[None, :] * os_h)[:, :, None]
    c = c[:, None, :]
    s = s[:, None, :]
    if INTERLEAVE:
        # one contiguous load of x[:rd]; pairs are adjacent, so split the last dim in two
        j = tl.arange(0, 2 * HALF_P2)[None, None, :]
        m = th_mask & (j < RD)
        x = tl.load(x_row + j, mask=m, other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, HALF_P2, 2)))
        y = tl.reshape(tl.join(a * c - b * s, b * c + a * s), (BLOCK_T, BLOCK_H, 2 * HALF_P2))
        tl.store(o_row + j, y.to(o_ptr.dtype.element_ty), mask=m)
    else:
        # two contiguous half-row loads: x[:rd/2] and x[rd/2:rd]
        i = tl.arange(0, HALF_P2)[None, None, :]
        m = th_mask & (i < RD // 2)
        a = tl.load(x_row + i, mask=m, other=0.0).to(tl.float32)
        b = tl.load(x_row + RD // 2 + i, mask=m, other=0.0).to(tl.float32)
        tl.store(o_row + i, (a * c - b * s).to(o_ptr.dtype.element_ty), mask=m)
        tl.store(o_row + RD // 2 + i, (b * c + a * s).to(o_ptr.dtype.element_ty), mask=m)
    if COPY_REST:
        r = RD + tl.arange(0, REST_P2)[None, None, :]
        m = th_mask & (r < D)
        tl.store(o_row + r, tl.load(x_row + r, mask=m), mask=m)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, freq_ptr, cache_ptr,
                 nnz, Hq, Hk, q_st, q_sh, k_st, k_sh, qo_st, qo_sh, ko_st, ko_sh,
                 cache_stride, max_pos, n_qblocks, n_blocks,
                 BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, RD: tl.constexpr,
                 HALF_P2: tl.constexpr, REST_P2: tl.constexpr, INTERLEAVE: tl.constexpr,
                 FROM_CACHE: tl.constexpr, COPY_REST: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < nnz
    c, s = _token_cos_sin(pos_ptr, freq_ptr, cache_ptr, cache_stride, max_pos, t, t_mask,
                          RD // 2, HALF_P2, FROM_CACHE)
    t64 = t.to(tl.int64)
    for blk in range(tl.program_id(1), n_blocks, tl.num_programs(1)):
        if blk < n_qblocks:
            _rotate_head_block(q_ptr, qo_ptr, q_st, q_sh, qo_st, qo_sh, t64, t_mask, blk * BLOCK_H, Hq,
                               c, s, BLOCK_T, BLOCK_H, D, RD, HALF_P2, REST_P2, INTERLEAVE, COPY_REST)
        else:
            _rotate_head_block(k_ptr, ko_ptr, k_st, k_sh, ko_st, ko_sh, t64, t_mask,
                               (blk - n_qblocks) * BLOCK_H, Hk,
                               c, s, BLOCK_T, BLOCK_H, D, RD, HALF_P2, REST_P2, INTERLEAVE, COPY_REST)


@triton.jit
def _positions_kernel(indptr_ptr, offsets_ptr, out_ptr, nnz, B, n_steps, BLOCK: tl.constexpr):
    """pos[t] = offsets[b] + t - indptr[b] with b the last request whose start is <= t
    (binary search over indptr[0 .. B-1]; always in bounds, whatever the indptr values)."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = lo + (B - 1)
    for _ in range(n_steps):
        mid = (lo + hi + 1) // 2
        right = tl.load(indptr_ptr + mid) <= t
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    start = tl.load(indptr_ptr + lo).to(tl.int64)
    pos = tl.load(offsets_ptr + lo).to(tl.int64) + (t.to(tl.int64) - start)
    tl.store(out_ptr + t, pos.to(out_ptr.dtype.element_ty), mask=t < nnz)


# --------------------------------------------------------------------------- launch heuristics

_TILE_ELEMS = 4096       # elements of one [BLOCK_T, BLOCK_H, D] tile on the GPU
_HEAD_ROW_ELEMS = 1024   # at most this many elements of one token's heads per tile row
_MIN_PROGRAMS = 1024     # below this many token blocks, split the head blocks over programs too
_POS_BLOCK = 1024
_config_override: Optional[dict] = None


@contextlib.contextmanager
def launch_config(**cfg):
    """Force tile sizes (keys of ``_launch_config``'s result); for tests and tuning only."""
    global _config_override
    old, _config_override = _config_override, cfg
    try:
        yield
    finally:
        _config_override = old


# plain-int helper (with _host's cdiv and next_pow2): triton's are constexpr-function wrappers
# costing microseconds per host call, and a decode step launches this kernel many times
def _pow2_floor(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def _launch_config(nnz: int, Hq: int, Hk: int, D: int, rd: int, *, interpreting: Optional[bool] = None) -> dict:
    """Tile sizes and program split for one call (the only place these numbers live).

    ``interpreting`` defaults to whether Triton's CPU interpreter runs the kernels."""
    interpreting = _config.interpreting() if interpreting is None else interpreting
    half_p2 = next_pow2(rd // 2)
    row = 2 * half_p2 + (next_pow2(D - rd) if D > rd else 0)
    heads = next_pow2(max(Hq, Hk, 1))
    if interpreting:
        # the interpreter costs ~3 ms per program-iteration: few, large programs
        cfg = dict(BLOCK_T=min(next_pow2(max(nnz, 1)), 64), BLOCK_H=heads, G=1, num_warps=4)
    else:
        block_h = _pow2_floor(min(heads, max(1, _HEAD_ROW_ELEMS // row)))
        block_t = _pow2_floor(max(1, _TILE_ELEMS // (block_h * row)))
        cfg = dict(BLOCK_T=block_t, BLOCK_H=block_h, G=1, num_warps=4)
    if _config_override:
        cfg.update(_config_override)
    if "G" not in (_config_override or {}):
        n_tb = max(1, cdiv(nnz, cfg["BLOCK_T"]))
        n_blocks = cdiv(Hq, cfg["BLOCK_H"]) + cdiv(Hk, cfg["BLOCK_H"])
        if not interpreting and n_tb < _MIN_PROGRAMS:
            cfg["G"] = max(1, min(n_blocks, cdiv(_MIN_PROGRAMS, n_tb)))
    return cfg


# --------------------------------------------------------------------------- frequency tables

_FREQS: dict = {}


def _freq_table(device: torch.device, rd: int, rope_scale: float, rope_theta: float, llama31: Optional[tuple]) -> torch.Tensor:
    """fp32 [rd/2] f'_i (reference.rope_freqs), cached per device and parameters.

    The table is built once on the host and copied; while a CUDA graph is being captured (no host
    copies allowed) an uncached table is computed on the device with the same fp64 formula.
    The cached copy is made on another *thread*: during their warm-up, torch.compile's CUDA-graph
    trees route every allocation of the current thread into the graphs' private pool
    (``_cuda_beginAllocateCurrentThreadToPool``), and a cached tensor living there is an
    untracked live allocation that makes the trees fail.
    """
    key = (device, rd, float(rope_scale), float(rope_theta), llama31)
    f = _FREQS.get(key)
    if f is None:
        host = ref.rope_freqs(rd, rope_theta, rope_scale, llama31)
        if device.type != "cuda":
            f = host.to(device)
        elif torch.cuda.is_current_stream_capturing():
            return ref.rope_freqs(rd, rope_theta, rope_scale, llama31, device=device)
        else:
            f = _copy_outside_graph_pools(host, device)
        _FREQS[key] = f
    return f


def _copy_outside_graph_pools(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host.to(device)`` from a fresh thread (allocation not routed to any CUDA-graph pool),
    complete before returning."""
    out, err = [], []

    def work():
        try:
            with torch.cuda.device(device):
                t = host.to(device)
                torch.cuda.current_stream(device).synchronize()
                out.append(t)
        except BaseException as e:  # re-raised on the calling thread
            err.append(e)

    th = threading.Thread(target=work, name="flashops-rope-freqs")
    th.start()
    th.join()
    if err:
        raise err[0]
    return out[0]


# --------------------------------------------------------------------------- launchers


def _launch(q, k, q_out, k_out, pos, rd: int, interleave: bool, *, freqs=None, cache=None):
    """Run ``_rope_kernel`` on 3-D q, k (out-of-place when ``q_out is not q``)."""
    nnz, Hq, D = q.shape
    Hk = k.shape[1]
    if nnz == 0 or Hq + Hk == 0:
        return
    cfg = _launch_config(nnz, Hq, Hk, D, rd)
    bh = cfg["BLOCK_H"]
    n_q = cdiv(Hq, bh)
    n_blocks = n_q + cdiv(Hk, bh)
    copy_rest = rd < D and q_out is not q
    from_cache = cache is not None
    table = cache.contiguous() if from_cache else freqs  # no-op for the usual contiguous cache
    pos = pos.contiguous()
    grid = (cdiv(nnz, cfg["BLOCK_T"]), min(cfg["G"], n_blocks))
    _rope_kernel[grid](
        q, k, q_out, k_out, pos, table, table,
        nnz, Hq, Hk, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        table.stride(0) if from_cache else 0, table.shape[0] if from_cache else 0, n_q, n_blocks,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_H=bh, D=D, RD=rd,
        HALF_P2=next_pow2(rd // 2),
        REST_P2=next_pow2(D - rd) if copy_rest else 1,
        INTERLEAVE=bool(interleave), FROM_CACHE=from_cache, COPY_REST=copy_rest,
        num_warps=cfg["num_warps"],
        **COMPILE_OPTIONS,
    )


def _llama(llama31, low_freq_factor, high_freq_factor, old_context_len):
    return (float(low_freq_factor), float(high_freq_factor), float(old_context_len)) if llama31 else None


def _rope_freq_launch(q, k, q_out, k_out, pos_ids, rotary_dim, interleave, rope_scale, rope_theta,
                      llama31, low_freq_factor, high_freq_factor, old_context_len):
    freqs = _freq_table(q.device, rotary_dim, rope_scale, rope_theta,
                        _llama(llama31, low_freq_factor, high_freq_factor, old_context_len))
    _launch(q, k, q_out, k_out, pos_ids, rotary_dim, interleave, freqs=freqs)


def _rope_cuda(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, llama31,
               low_freq_factor, high_freq_factor, old_context_len):
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rope_freq_launch(q, k, q_out, k_out, pos_ids, rotary_dim, interleave, rope_scale, rope_theta,
                      llama31, low_freq_factor, high_freq_factor, old_context_len)
    return q_out, k_out


def _rope_inplace_cuda(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, llama31,
                       low_freq_factor, high_freq_factor, old_context_len):
    _rope_freq_launch(q, k, q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta,
                      llama31, low_freq_factor, high_freq_factor, old_context_len)


def _rope_cos_sin_cache_cuda(q, k, positions, cos_sin_cache, interleave):
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, q_out, k_out, positions, cos_sin_cache.shape[1], interleave, cache=cos_sin_cache)
    return q_out, k_out


def _rope_cos_sin_cache_inplace_cuda(q, k, positions, cos_sin_cache, interleave):
    _launch(q, k, q, k, positions, cos_sin_cache.shape[1], interleave, cache=cos_sin_cache)


def _rope_positions_cuda(indptr, offsets, nnz):
    out = torch.empty(nnz, dtype=offsets.dtype, device=offsets.device)
    B = offsets.shape[0]
    if nnz == 0:
        return out
    if B == 0:  # no request covers any token: positions unspecified, make them 0
        return out.zero_()
    grid = (cdiv(nnz, _POS_BLOCK),)
    _positions_kernel[grid](indptr.contiguous(), offsets.contiguous(), out, nnz, B, int(B).bit_length(),
                            BLOCK=_POS_BLOCK, **COMPILE_OPTIONS)
    return out


# --------------------------------------------------------------------------- ops

_ROPE_ARGS = ("Tensor q, Tensor k, Tensor pos_ids, int rotary_dim, bool interleave, float rope_scale, "
              "float rope_theta, bool llama31, float low_freq_factor, float high_freq_factor, "
              "float old_context_len")
_CACHE_ARGS = "Tensor q, Tensor k, Tensor positions, Tensor cos_sin_cache, bool interleave"

def _in_place(fn):
    """``fn`` (an in-place implementation) after rejecting q/k with elements that share memory
    (checked inside the op, on real tensors only, so compiled graphs never trace it)."""
    def checked(q, k, *args):
        check_writable(q, "q")
        check_writable(k, "k")
        return fn(q, k, *args)
    return checked


rope = register_op(f"rope({_ROPE_ARGS}) -> (Tensor, Tensor)",
                   cuda=_rope_cuda, reference=ref.rope_cpu, fake=meta.rope_fake)
rope_inplace = register_op(f"rope_inplace({_ROPE_ARGS}) -> ()",
                           cuda=_in_place(_rope_inplace_cuda), reference=_in_place(ref.rope_inplace_cpu),
                           mutates=("q", "k"))
rope_cos_sin_cache = register_op(f"rope_cos_sin_cache({_CACHE_ARGS}) -> (Tensor, Tensor)",
                                 cuda=_rope_cos_sin_cache_cuda, reference=ref.rope_cos_sin_cache_cpu,
                                 fake=meta.rope_cos_sin_cache_fake)
rope_cos_sin_cache_inplace = register_op(f"rope_cos_sin_cache_inplace({_CACHE_ARGS}) -> ()",
                                         cuda=_in_place(_rope_cos_sin_cache_inplace_cuda),
                                         reference=_in_place(ref.rope_cos_sin_cache_inplace_cpu), mutates=("q", "k"))
rope_positions = register_op("rope_positions(Tensor indptr, Tensor offsets, SymInt nnz) -> Tensor",
                             cuda=_rope_positions_cuda, reference=ref.rope_positions_cpu,
                             fake=meta.rope_positions_fake)
