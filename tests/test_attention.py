"""attention family: the kernels (single / paged / ragged, decode and prefill) against the §9
oracle, through the FlashInfer-compatible functions and wrappers.

On CPU-only machines the Triton kernels run in the interpreter (conftest): shapes are tiny
(D 16/32, a few pages, page sizes 1/3/4/5). The plain-PyTorch CPU backend is tested beside them
(``backend`` fixture). API behaviour (compile, opcheck, bad input, CUDA graphs) lives in
``test_attention_api.py``.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import torch_flashops as fi
from torch_flashops import prefill as prefill_mod
from torch_flashops.ops import attention as attn_ops
from torch_flashops.reference.attention import ref_attention

from .helpers import CompileCounter, assert_close, poison

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning",
                                        "ignore::DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LSE_TOL = dict(atol=1e-3, rtol=1e-3)
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def workspace(device, nbytes=1 << 22):
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


# --------------------------------------------------------------------------- batch builder


class Batch:
    """A random paged batch: CSR page table with shuffled (optionally shared) pages, the cache in
    the requested form/layout, the oracle's NHD K/V views, and q (optionally a strided view)."""

    def __init__(self, qo_lens, kv_lens, *, page_size, Hq, Hkv, D, Dv=None, dtype=torch.float32, layout="NHD",
                 form="5d", seed=0, device=DEVICE, shared_pages=False, q_strided=False, pad_cache=False,
                 spare_pages=3):
        g = torch.Generator().manual_seed(seed)
        Dv = Dv or D
        self.qo_lens, self.kv_lens = list(qo_lens), list(kv_lens)
        B = len(kv_lens)
        npages = [(n + page_size - 1) // page_size for n in kv_lens]
        P = sum(npages) + spare_pages
        self.P, self.page_size, self.layout = P, page_size, layout
        if shared_pages:
            ids = torch.randint(0, P, (sum(npages),), generator=g)
        else:
            ids = torch.randperm(P, generator=g)[: sum(npages)]
        self.kv_indptr = torch.tensor([0] + torch.tensor(npages, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)
        self.kv_indices = ids.to(torch.int32)
        self.last = torch.tensor([(n - 1) % page_size + 1 if n > 0 else 0 for n in kv_lens], dtype=torch.int32)
        self.qo_indptr = torch.tensor([0] + torch.tensor(self.qo_lens, dtype=torch.long).cumsum(0).tolist(),
                                      dtype=torch.int32)
        k = torch.randn(P, page_size, Hkv, D, generator=g)
        v = torch.randn(P, page_size, Hkv, Dv, generator=g)
        self.k_nhd, self.v_nhd = k.to(dtype), v.to(dtype)  # oracle inputs [P, page, H, D]
        to_layout = (lambda t: t) if layout == "NHD" else (lambda t: t.transpose(1, 2).contiguous())
        kl, vl = to_layout(self.k_nhd).to(device), to_layout(self.v_nhd).to(device)
        if form == "5d":
            assert D == Dv
            self.cache = torch.stack([kl, vl], dim=1)
        else:
            if pad_cache:  # padded head/page strides: views into wider buffers
                kb = torch.zeros(*kl.shape[:-1], D + 16, dtype=dtype, device=device)
                vb = torch.zeros(*vl.shape[:-1], Dv + 16, dtype=dtype, device=device)
                kb[..., :D], vb[..., :Dv] = kl, vl
                kl, vl = kb[..., :D], vb[..., :Dv]
            self.cache = (kl, vl)
        N = int(self.qo_indptr[-1])
        qd = torch.randn(N, Hq, D, generator=g).to(dtype)
        if q_strided:  # q sliced out of a packed qkv buffer
            qkv = torch.randn(N, (Hq + 2 * Hkv) * D, generator=g).to(dtype).to(device)
            qkv[:, : Hq * D] = qd.reshape(N, Hq * D).to(device)
            self.q = qkv[:, : Hq * D].unflatten(1, (Hq, D))
        else:
            self.q = qd.to(device)
        self.Hq, self.Hkv, self.D, self.Dv, self.dtype, self.device = Hq, Hkv, D, Dv, dtype, device

    def oracle(self, **kw):
        return ref_attention(self.q.cpu(), self.k_nhd, self.v_nhd, self.qo_indptr, self.kv_indptr, self.kv_indices,
                             self.last, **kw)

    def dev(self, t):
        return t.to(self.device)

    def random_masks(self, seed):
        """Per-request random bool masks [qo, kv] (about half set), with a fully masked row."""
        g = torch.Generator().manual_seed(seed)
        masks = []
        for qo, kv in zip(self.qo_lens, self.kv_lens):
            m = torch.rand(qo, kv, generator=g) < 0.5
            if qo > 1:
                m[0] = False
            masks.append(m)
        return masks


def check_attention(name, o, lse, ref_o, ref_lse, dtype, rows=None):
    rows = slice(None) if rows is None else rows
    assert_close(f"{name}.o", o[rows], ref_o[rows].to(o.dtype), dtype=o.dtype)
    if lse is not None:
        assert lse.dtype == torch.float32
        assert_close(f"{name}.lse", lse[rows], ref_lse[rows], **LSE_TOL)


@contextlib.contextmanager
def gather_threshold(rows_per_key):
    """Temporarily set the rows-per-key threshold of the paged prefill's gathered-K/V path
    (None: leave the default)."""
    old = prefill_mod.PAGED_GATHER_MIN_ROWS_PER_KEY
    if rows_per_key is not None:
        prefill_mod.PAGED_GATHER_MIN_ROWS_PER_KEY = rows_per_key
    try:
        yield
    finally:
        prefill_mod.PAGED_GATHER_MIN_ROWS_PER_KEY = old


def plan_paged(w, b: Batch, **kw):
    kw.setdefault("q_data_type", b.dtype)
    w.plan(b.dev(b.qo_indptr), b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), b.Hq, b.Hkv, b.D, b.page_size,
           head_dim_vo=b.Dv, **kw)


# --------------------------------------------------------------------------- single request


SINGLE_CASES = [
    # qo, kv, Hq, Hkv, D, causal, layout, options
    (5, 37, 4, 2, 32, False, "NHD", {}),
    (5, 37, 4, 2, 32, True, "HND", {}),
    (7, 7, 3, 1, 16, True, "NHD", dict(window_left=2, logits_soft_cap=5.0)),
    (4, 20, 4, 4, 32, True, "NHD", dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=500.0, rope_scale=2.0)),
    (6, 19, 8, 2, 16, False, "HND", dict(pos_encoding_mode="ALIBI")),
    (3, 300, 8, 1, 16, True, "NHD", dict(sm_scale=0.3, lse_base="ln")),  # long kv: split-KV path
    # a negative scale: the kernel scales every logit before the row max (no folded FMA)
    (5, 90, 4, 2, 16, True, "NHD", dict(sm_scale=-0.25, window_left=50)),
]


@pytest.mark.parametrize("case", SINGLE_CASES, ids=lambda c: f"qo{c[0]}-kv{c[1]}-H{c[2]}/{c[3]}-D{c[4]}-"
                         f"{'causal' if c[5] else 'full'}-{c[6]}-{'-'.join(c[7]) or 'plain'}")
def test_single_prefill(case, backend, device):
    qo, kv, Hq, Hkv, D, causal, layout, opts = case
    g = torch.Generator().manual_seed(qo * 100 + kv)
    q = torch.randn(qo, Hq, D, generator=g)
    k = torch.randn(kv, Hkv, D, generator=g)
    v = torch.randn(kv, Hkv, D, generator=g)
    kk, vv = (k, v) if layout == "NHD" else (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
    o, lse = fi.single_prefill_with_kv_cache(q.to(device), kk.to(device), vv.to(device), causal=causal,
                                             kv_layout=layout, return_lse=True, **opts)
    assert o.shape == (qo, Hq, D) and o.is_contiguous() and lse.shape == (qo, Hq)
    ro, rl = ref_attention(q, k.unsqueeze(1), v.unsqueeze(1), [0, qo], [0, kv], torch.arange(kv), [1], causal=causal,
                           **{("masks" if a == "custom_mask" else a): x for a, x in opts.items()})
    check_attention("single_prefill", o, lse, ro, rl, torch.float32)


def test_single_prefill_masks_dtypes_and_scales(backend, device):
    """custom mask (with a fully masked row) == its packed form == its flattened form; bf16 with o_dtype
    fp32; k/v scales."""
    g = torch.Generator().manual_seed(3)
    qo, kv, H, D = 6, 21, 2, 16
    q, k, v = (torch.randn(n, H, D, generator=g) for n in (qo, kv, kv))
    mask = torch.rand(qo, kv, generator=g) < 0.4
    mask[2] = False
    packed = torch.from_numpy(__import__("numpy").packbits(mask.numpy().reshape(-1), bitorder="little"))
    ro, rl = ref_attention(q, k.unsqueeze(1), v.unsqueeze(1), [0, qo], [0, kv], torch.arange(kv), [1], masks=[mask],
                           k_scale=0.5, v_scale=2.0)
    for kw in (dict(custom_mask=mask.to(device)), dict(packed_custom_mask=packed.to(device), causal=True),
               dict(custom_mask=mask.reshape(-1).to(device))):  # flattened, as FlashInfer reads it
        o, lse = fi.single_prefill_with_kv_cache_return_lse(q.to(device), k.to(device), v.to(device), k_scale=0.5,
                                                            v_scale=2.0, **kw)
        check_attention("masked", o, lse, ro, rl, torch.float32)
        assert (o[2] == 0).all() and torch.isinf(lse[2]).all() and (lse[2] < 0).all()
    qb, kb, vb = (t.to(device, torch.bfloat16) for t in (q, k, v))
    o = fi.single_prefill_with_kv_cache(qb, kb, vb, causal=True, o_dtype="float32")
    ro, _ = ref_attention(qb.cpu(), kb.cpu().unsqueeze(1), vb.cpu().unsqueeze(1), [0, qo], [0, kv],
                          torch.arange(kv), [1], causal=True)
    assert o.dtype == torch.float32
    assert_close("bf16->fp32", o, ro.float(), dtype=torch.bfloat16)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kv", [1, 17, 200])
def test_single_decode(layout, kv, backend, device):
    g = torch.Generator().manual_seed(kv)
    Hq, Hkv, D = 6, 2, 32
    q, k, v = torch.randn(Hq, D, generator=g), torch.randn(kv, Hkv, D, generator=g), torch.randn(kv, Hkv, D, generator=g)
    kk, vv = (k, v) if layout == "NHD" else (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
    o, lse = fi.single_decode_with_kv_cache(q.to(device), kk.to(device), vv.to(device), kv_layout=layout,
                                            window_left=kv // 2, return_lse=True, q_scale=1.5)
    assert o.shape == (Hq, D) and lse.shape == (Hq,)
    ro, rl = ref_attention(q[None], k.unsqueeze(1), v.unsqueeze(1), [0, 1], [0, kv], torch.arange(kv), [1],
                           window_left=kv // 2, q_scale=1.5)
    check_attention("single_decode", o, lse, ro[0], rl[0], torch.float32)


def test_extreme_logits_stay_finite(device):
    """|s| up to ~5e4 after scaling: outputs finite and equal to the oracle."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(4, 2, 16, generator=g) * 300
    k = torch.randn(40, 2, 16, generator=g) * 300
    v = torch.randn(40, 2, 16, generator=g)
    o, lse = fi.single_prefill_with_kv_cache(q.to(device), k.to(device), v.to(device), return_lse=True, sm_scale=1.0)
    ro, rl = ref_attention(q, k.unsqueeze(1), v.unsqueeze(1), [0, 4], [0, 40], torch.arange(40), [1], sm_scale=1.0)
    assert rl.abs().max() > 5e4 / math.log(2) * 0.5
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    check_attention("extreme", o, lse, ro, rl, torch.float32)


# --------------------------------------------------------------------------- batch: paged prefill


PAGED_CASES = [
    # qo_lens, kv_lens, page, Hq, Hkv, D, layout, form, causal, options
    ([3, 0, 5, 1], [7, 0, 20, 33], 4, 4, 2, 32, "NHD", "5d", True, {}),
    ([3, 0, 5, 1], [7, 0, 20, 33], 4, 4, 2, 32, "HND", "tuple", False, {}),
    ([2, 6, 1], [2, 3, 11], 1, 7, 1, 16, "NHD", "tuple", True, {}),  # qo > kv rows see nothing
    ([4, 4], [9, 16], 5, 8, 2, 16, "HND", "5d", True, dict(window_left=1, logits_soft_cap=8.0)),
    ([5, 2], [12, 30], 3, 2, 2, 16, "NHD", "5d", True, dict(pos_encoding_mode="ROPE_LLAMA")),
    ([3, 3], [10, 17], 4, 6, 3, 16, "NHD", "tuple", False, dict(pos_encoding_mode="ALIBI", sm_scale=0.2)),
]


def _paged_id(c):
    return (f"B{len(c[0])}-page{c[2]}-H{c[3]}/{c[4]}-D{c[5]}-{c[6]}-{c[7]}-{'causal' if c[8] else 'full'}"
            f"{'-' + '-'.join(c[9]) if c[9] else ''}")


@pytest.mark.parametrize("case", PAGED_CASES, ids=_paged_id)
def test_paged_prefill(case, backend, device):
    qo, kv, page, Hq, Hkv, D, layout, form, causal, opts = case
    b = Batch(qo, kv, page_size=page, Hq=Hq, Hkv=Hkv, D=D, layout=layout, form=form, seed=len(qo) * 7 + page,
              q_strided=form == "tuple", pad_cache=form == "tuple", shared_pages=True)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device), layout)
    plan_paged(w, b, causal=causal, **opts)
    out, lse_out = poison(b.q.shape[0], Hq, D, device=device), poison(b.q.shape[0], Hq, device=device)
    o, lse = w.run(b.q, b.cache, out=out, lse=lse_out, return_lse=True)
    assert o is out and lse is lse_out
    ro, rl = b.oracle(causal=causal, **opts)
    check_attention("paged", o, lse, ro, rl, torch.float32)
    o2 = w.run(b.q, b.cache)  # fresh outputs, same values
    assert o2.is_contiguous() and torch.equal(o2, o)


def test_paged_prefill_custom_mask(backend, device):
    b = Batch([3, 4, 0, 2], [5, 9, 3, 0], page_size=3, Hq=4, Hkv=2, D=16, seed=5)
    masks = b.random_masks(1)
    flat = torch.cat([m.reshape(-1) for m in masks])
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w, b, custom_mask=flat.to(device), causal=True)  # causal is ignored with a mask
    o, lse = w.run_return_lse(b.q, b.cache)
    ro, rl = b.oracle(masks=masks, window_left=-1)
    check_attention("mask", o, lse, ro, rl, torch.float32)
    # the same bits pre-packed per request from byte boundaries (spec §0.4)
    import numpy as np

    packed = torch.from_numpy(np.concatenate([np.packbits(m.numpy().reshape(-1), bitorder="little") for m in masks]))
    plan_paged(w, b, packed_custom_mask=packed.to(device), window_left=2)
    o, lse = w.run_return_lse(b.q, b.cache)
    ro, rl = b.oracle(masks=masks, window_left=2)
    check_attention("packed mask + window", o, lse, ro, rl, torch.float32)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_paged_prefill_half(dtype, device):
    b = Batch([3, 1, 6], [40, 5, 70], page_size=16, Hq=8, Hkv=2, D=32, dtype=DT[dtype], seed=11)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w, b, causal=True)
    o, lse = w.run(b.q, b.cache, return_lse=True)
    ro, rl = b.oracle(causal=True)
    assert o.dtype == DT[dtype]
    check_attention(dtype, o, lse, ro, rl, DT[dtype])


def test_split_kv_matches_unsplit_and_is_deterministic(device):
    """fixed_split_size (pages per chunk) and disable_split_kv agree; runs are bitwise repeatable;
    with a fixed split size a request's result does not depend on the rest of the batch."""
    b = Batch([1, 2, 1], [75, 40, 3], page_size=4, Hq=4, Hkv=2, D=16, seed=21)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w, b, causal=True, disable_split_kv=True)
    o_ref, lse_ref = w.run(b.q, b.cache, return_lse=True)
    assert w._t.split_work.shape[0] // 4 <= 2 and (w._t.split_work[::4] < 0).all()  # idle padding only
    plan_paged(w, b, causal=True, fixed_split_size=3)
    assert int((w._t.split_work[::4] >= 0).sum()) >= 8  # the long requests really are split
    o1, lse1 = w.run(b.q, b.cache, return_lse=True)
    o2, lse2 = w.run(b.q, b.cache, return_lse=True)
    assert torch.equal(o1, o2) and torch.equal(lse1, lse2)
    check_attention("split", o1, lse1, o_ref, lse_ref, torch.float32)
    ro, rl = b.oracle(causal=True)
    check_attention("split vs oracle", o1, lse1, ro, rl, torch.float32)
    # request 0 alone, same fixed split: bitwise the same rows
    b0 = Batch([1], [75], page_size=4, Hq=4, Hkv=2, D=16, seed=21)
    b0.cache, b0.kv_indices, b0.q = b.cache, b.kv_indices[: int(b.kv_indptr[1])], b.q[:1]
    w0 = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w0, b0, causal=True, fixed_split_size=3)
    assert torch.equal(w0.run(b0.q, b0.cache), o1[:1])


def _single_vs_oracle(qo, kv, device, seed, Hq=2, Hkv=1, D=16, **kw):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(qo, Hq, D, generator=g), torch.randn(kv, Hkv, D, generator=g), torch.randn(kv, Hkv, D, generator=g)
    o, lse = fi.single_prefill_with_kv_cache(q.to(device), k.to(device), v.to(device), return_lse=True, **kw)
    ref_kw = {n: kw[n] for n in ("causal", "window_left", "k_scale", "v_scale") if n in kw}
    ro, rl = ref_attention(q, k.unsqueeze(1), v.unsqueeze(1), torch.tensor([0, qo]), torch.tensor([0, kv]),
                           torch.arange(kv), [1], **ref_kw)
    check_attention(f"single qo={qo} kv={kv} {kw}", o, lse, ro, rl, torch.float32)


@pytest.mark.parametrize("qo", [2, 5])
@pytest.mark.parametrize("delta", [61, 62, 63, 64, 126])
def test_causal_full_tile_boundary(qo, delta, device):
    """kv_len - qo_len near a key-tile edge (64 keys here): where the tiles every row of a query
    tile sees end and the diagonal tiles (masked per row) begin. One key off there gives a row
    a key it must not see; keys in one tile (the fuzz's sizes) never reach that split."""
    _single_vs_oracle(qo, qo + delta, device, seed=qo * 1000 + delta, causal=True)


@pytest.mark.parametrize("qo,kv,window,causal", [(8, 200, 100, True), (40, 300, 150, False), (64, 200, 130, True)])
def test_window_over_several_key_tiles(qo, kv, window, causal, device):
    """Sliding windows wider than a key tile over multi-row query tiles: the first key tile a
    tile's last row still sees is a rounded-down tile start (rounding up drops keys)."""
    _single_vs_oracle(qo, kv, device, seed=qo + kv, causal=causal, window_left=window)


def test_scales_on_the_split_path(device):
    """k_scale and v_scale where the keys are split and merged (the merge kernel applies
    v_scale), single request and a wrapper with a fixed split."""
    _single_vs_oracle(3, 300, device, seed=31, k_scale=0.5, v_scale=2.0)
    b = Batch([1, 3], [150, 90], page_size=4, Hq=4, Hkv=2, D=16, seed=32)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w, b, causal=True, fixed_split_size=4)
    assert int((w._t.split_work[::4] >= 0).sum()) >= 4  # really split
    o, lse = w.run(b.q, b.cache, return_lse=True, k_scale=0.5, v_scale=2.0)
    ro, rl = b.oracle(causal=True, k_scale=0.5, v_scale=2.0)
    check_attention("wrapper split scales", o, lse, ro, rl, torch.float32)


@pytest.mark.parametrize("split", [dict(fixed_split_size=2), dict(disable_split_kv=True)])
@pytest.mark.parametrize("causal,window", [(True, -1), (True, 9), (False, 9)])
def test_fixed_split_is_batch_invariant_with_taller_requests(split, causal, window, device):
    """With fixed_split_size or disable_split_kv a request's bits do not depend on its batch even
    when another request is much taller: the plan's tile height (which sets the tile's key range
    and the merge steps) must not come from the batch's longest request, as it does otherwise."""
    b = Batch([3, 40], [47, 60], page_size=4, Hq=4, Hkv=2, D=16, seed=23)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w, b, causal=causal, window_left=window, **split)
    o, lse = w.run(b.q, b.cache, return_lse=True)
    ro, rl = b.oracle(causal=causal, window_left=window)
    check_attention("batched", o, lse, ro, rl, torch.float32)
    b0 = Batch([3], [47], page_size=4, Hq=4, Hkv=2, D=16, seed=23)
    b0.cache, b0.kv_indices, b0.q = b.cache, b.kv_indices[: int(b.kv_indptr[1])], b.q[:3]
    w0 = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w0, b0, causal=causal, window_left=window, **split)
    o0, lse0 = w0.run(b0.q, b0.cache, return_lse=True)
    assert w0._plan.block_m == w._plan.block_m == 128
    assert torch.equal(o0, o[:3]) and torch.equal(lse0, lse[:3])


def test_fixed_config_ignores_launch_size():
    """Under a fixed split the CUDA launch configuration depends on the tile only: the rules that
    read the grid (whole requests, 128-key tiles for short unsplit programs, warps and stages for
    small grids) would change a row's summation order with the batch."""
    seen = {attn_ops.attn_config(bm, 128, 128, torch.bfloat16, "cuda", n, keys, split=sp, group=4, fixed=True)
            for bm in (16,) for n in (1, 64, 128, 4096) for keys in (100, 512, 4096) for sp in (False, True)}
    assert seen == {(64, 4, 2)}


# --------------------------------------------------------------------------- batch: decode


@pytest.mark.parametrize("layout,form,page", [("NHD", "5d", 16), ("HND", "tuple", 1), ("NHD", "tuple", 3)])
def test_decode_matches_oracle_and_prefill(layout, form, page, backend, device):
    kv = [1, 37, 0, 150, 16]
    b = Batch([1] * len(kv), kv, page_size=page, Hq=8, Hkv=2, D=16, layout=layout, form=form, seed=page,
              q_strided=True)
    dec = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), layout)
    dec.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 8, 2, 16, page, q_data_type="float32",
             logits_soft_cap=20.0, window_left=40)
    o, lse = dec.run(b.q, b.cache, return_lse=True)
    ro, rl = b.oracle(logits_soft_cap=20.0, window_left=40)
    check_attention("decode", o, lse, ro, rl, torch.float32)
    assert (o[2] == 0).all() and torch.isinf(lse[2]).all()  # kv_len 0
    pre = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device), layout)
    plan_paged(pre, b, logits_soft_cap=20.0, window_left=40)
    op, lp = pre.run(b.q, b.cache, return_lse=True)
    check_attention("decode == prefill(qo_len 1)", o, lse, op, lp, torch.float32)


def test_decode_q_len_per_req(device):
    """Speculative verify: L query rows per request, causal inside the request."""
    L, kv = 3, [3, 10, 24]
    b = Batch([L] * 3, kv, page_size=4, Hq=4, Hkv=1, D=16, seed=31)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), use_tensor_cores=True)
    w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 4, 1, 16, 4, q_data_type=torch.float32,
           q_len_per_req=L)
    o, lse = w.run(b.q, b.cache, return_lse=True, q_len_per_req=L)
    ro, rl = b.oracle(causal=True)
    check_attention("q_len_per_req", o, lse, ro, rl, torch.float32)


def test_decode_split_kv_long_context(device):
    """Small batch, long context: the planner splits KV on its own; equals the unsplit plan."""
    b = Batch([1, 1], [1600, 90], page_size=16, Hq=4, Hkv=1, D=16, seed=41)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 4, 1, 16, 16, q_data_type=torch.float32)
    assert int((w._t.split_work[::4] >= 0).sum()) >= 3
    o, lse = w.run(b.q, b.cache, return_lse=True)
    ro, rl = b.oracle()
    check_attention("decode split", o, lse, ro, rl, torch.float32)
    w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 4, 1, 16, 16, q_data_type=torch.float32,
           disable_split_kv=True)
    o2, lse2 = w.run(b.q, b.cache, return_lse=True)
    check_attention("decode unsplit", o2, lse2, o, lse, torch.float32)


@pytest.mark.parametrize("ahead", [1, 2])
def test_decode_page_ids_ahead(ahead, device, monkeypatch):
    """Both paged loops (page ids one or two key tiles ahead, ``ops.attention.page_ahead``) on
    multi-tile requests, page sizes that do and do not divide the key tile, windows (masked
    first and last segments) and a split plan: each equals the oracle."""
    from torch_flashops.ops import attention as A

    monkeypatch.setattr(A, "page_ahead", lambda *args: ahead)
    for page, kv, window in ((16, [150, 300, 37, 1], -1), (3, [200, 65, 130], 70)):
        b = Batch([1] * len(kv), kv, page_size=page, Hq=8, Hkv=2, D=16, seed=50 + page)
        for split in (False, True):
            w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
            w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 8, 2, 16, page, q_data_type=torch.float32,
                   window_left=window, disable_split_kv=not split, fixed_split_size=(5 if split else None))
            o, lse = w.run(b.q, b.cache, return_lse=True)
            ro, rl = b.oracle(window_left=window)
            check_attention(f"ahead={ahead} page={page} split={split}", o, lse, ro, rl, torch.float32)


def test_decode_128_key_tiles(device, monkeypatch):
    """Decode with 128-key tiles (what an H100 launch of under one program per SM with 65-128
    keys a program picks; the interpreter's own default is 64): requests shorter than, equal to
    and longer than one tile, page sizes 16 and 3, unsplit and split, equal to the oracle."""
    from torch_flashops.ops import attention as A

    real = A.attn_config
    monkeypatch.setattr(A, "attn_config", lambda bm, *a, **k: (128, 4, 1) if bm <= 32 else real(bm, *a, **k))
    for page, kv in ((16, [100, 128, 37, 300]), (3, [129, 64, 250])):
        b = Batch([1] * len(kv), kv, page_size=page, Hq=8, Hkv=2, D=16, seed=80 + page)
        for split in (False, True):
            w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
            w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 8, 2, 16, page, q_data_type=torch.float32,
                   disable_split_kv=not split, fixed_split_size=(64 if split else None))
            o, lse = w.run(b.q, b.cache, return_lse=True)
            ro, rl = b.oracle()
            check_attention(f"128-key tiles page={page} split={split}", o, lse, ro, rl, torch.float32)


def test_kv_row_addressing_forms(device, monkeypatch):
    """K/V row addresses: int32 page/slot arithmetic (``lean_addressing``) and the int64 form,
    with K and V sharing strides (one offset per row: a 5-D cache, a tuple of one layout) or not
    (a tuple whose V rows are padded): every form equals the oracle, and the two arithmetic forms
    give bitwise equal results (decode with a split plan, and causal paged prefill)."""
    from torch_flashops.ops import attention as A

    kv = [150, 37, 1, 64]
    for form, pad_v in (("5d", False), ("tuple", False), ("tuple", True)):
        b = Batch([1, 3, 1, 2], kv, page_size=16, Hq=8, Hkv=2, D=16, form=form, seed=90)
        if pad_v:
            k, v = b.cache
            vb = torch.randn(*v.shape[:-1], v.shape[-1] + 8, dtype=v.dtype, device=v.device)
            vb[..., :16] = v
            b.cache = (k, vb[..., :16])
            assert b.cache[0].stride() != b.cache[1].stride()
        outs = []
        for lean in (True, False):
            monkeypatch.setattr(A, "LEAN_ADDRESSING", lean)
            assert A.lean_addressing(*(b.cache if form == "tuple" else (b.cache[:, 0], b.cache[:, 1]))) == lean
            w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
            plan_paged(w, b, causal=True, fixed_split_size=2)
            o, lse = w.run(b.q, b.cache, return_lse=True)
            ro, rl = b.oracle(causal=True)
            check_attention(f"{form} pad_v={pad_v} lean={lean}", o, lse, ro, rl, torch.float32)
            outs.append((o, lse))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_whole_request_rule_and_schedule():
    """The whole-request decode rule (``whole_requests``: 48..num_SMs programs of 512..2048 keys,
    decode tiles, 16-bit D <= 128, CUDA only) and a schedule planned with it: no split items, one
    work item per (request, m tile)."""
    from torch_flashops import _attention_plan as P
    from torch_flashops.ops import attention as A

    assert A._whole_rule(128, 512, 16, False, 132, 4) and A._whole_rule(48, 2048, 32, False, 132, 8)
    for n, keys, bm, wide, grp in ((133, 512, 16, False, 4), (47, 512, 16, False, 8), (128, 511, 16, False, 4),
                                   (128, 2049, 16, False, 4), (128, 512, 64, False, 4), (128, 512, 16, True, 4),
                                   (64, 512, 16, False, 4)):
        assert not A._whole_rule(n, keys, bm, wide, 132, grp), (n, keys, bm, wide, grp)
    assert not A.whole_requests(128, 512, 16, False, "cpu")  # the interpreter keeps its own schedules
    lens = np.array([512, 700])
    kw = dict(group=4, block_m=16, block_n=64, num_kv_heads=1, d_vo=128, causal=False, window_left=-1,
              has_mask=False, device="cpu", workspace_bytes=1 << 24)
    split = P.build_schedule(np.ones(2, dtype=np.int64), lens, **kw)
    whole = P.build_schedule(np.ones(2, dtype=np.int64), lens, whole=True, **kw)
    assert split.split_work.shape[0] > 0  # the interpreter's schedule splits these
    assert whole.split_work.shape[0] == 0 and sorted(whole.work[:, 3].tolist()) == sorted(lens.tolist())
    fixed = P.build_schedule(np.ones(2, dtype=np.int64), lens, whole=True, fixed_split_keys=128, **kw)
    assert fixed.split_work.shape[0] > 0  # fixed_split_size still splits (batch invariance asked for)


def test_lean_addressing_rule():
    """int32 row arithmetic only where every stride and every in-page offset fits (meta tensors:
    no memory)."""
    from torch_flashops.ops import attention as A

    def t(shape, stride):
        return torch.empty_strided(shape, stride, dtype=torch.bfloat16, device="meta")

    ok = t((1000, 16, 8, 128), (2 * 16 * 8 * 128, 8 * 128, 128, 1))
    assert A.lean_addressing(ok, ok)
    huge_page = t((4, 16, 8, 128), (2 ** 31, 8 * 128, 128, 1))  # page stride past int32
    assert not A.lean_addressing(huge_page, ok) and not A.lean_addressing(ok, huge_page)
    wide_page = t((4, 64, 8, 128), (2 ** 32, 2 ** 25, 128, 1))  # 63 * 2^25 + ... >= 2^31 inside a page
    assert not A.lean_addressing(ok, wide_page)
    ragged = t((10, 1, 8, 128), (1024, 2 ** 40, 128, 1))  # a size-1 page dim's stride never multiplies
    assert A.lean_addressing(ragged, ragged)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (7, 1), (16, 1)])
def test_split_merge_row_chunks(hq, hkv, device):
    """The merge folds row chunks of one GQA group (>= 4 rows): group sizes 1, 7 and 16 with
    multi-row requests, so chunks are partly live, fully live or past the request's rows."""
    b = Batch([1, 3, 2], [90, 40, 17], page_size=4, Hq=hq, Hkv=hkv, D=16, seed=60 + hq)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w, b, causal=True, fixed_split_size=2)
    assert int((w._t.split_work[::4] >= 0).sum()) >= 10
    o, lse = w.run(b.q, b.cache, return_lse=True)
    ro, rl = b.oracle(causal=True)
    check_attention(f"split merge group {hq // hkv}", o, lse, ro, rl, torch.float32)


def test_merge_column_chunks_per_program(device, monkeypatch):
    """The merge's column chunks spread over 1, 3 or 8 programs per (row, KV head) (D=128: 8
    chunks, so 3 leaves a ragged last program): bitwise the same result, equal to the oracle."""
    from torch_flashops.ops import attention as A

    b = Batch([1, 2, 1], [70, 33, 120], page_size=4, Hq=8, Hkv=2, D=128, seed=71)
    outs = []
    for d_split in (1, 3, 8):
        monkeypatch.setattr(A, "merge_d_split", lambda *args, d=d_split: d)
        w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
        plan_paged(w, b, causal=True, fixed_split_size=8)
        assert int((w._t.split_work[::4] >= 0).sum()) >= 6
        o, lse = poison(b.q.shape[0], 8, 128, device=device), poison(b.q.shape[0], 8, device=device)
        w.run(b.q, b.cache, out=o, lse=lse)
        outs.append((o, lse))
    ro, rl = b.oracle(causal=True)
    check_attention("merge d_split", outs[0][0], outs[0][1], ro, rl, torch.float32)
    for o, lse in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(lse, outs[0][1])


# --------------------------------------------------------------------------- batch: ragged


@pytest.mark.parametrize("causal", [False, True])
def test_ragged_prefill(causal, backend, device):
    """Ragged K/V, (D_qk, D_vo) = (48, 32) (padded head dims), q sliced out of a packed buffer."""
    g = torch.Generator().manual_seed(5)
    qo, kv, Hq, Hkv, Dqk, Dvo = [3, 0, 4, 2], [10, 4, 6, 0], 4, 2, 48, 32
    qi = torch.tensor([0, 3, 3, 7, 9], dtype=torch.int32)
    ki = torch.tensor([0, 10, 14, 20, 20], dtype=torch.int32)
    qkv = torch.randn(9, Hq * Dqk + 8, generator=g)
    q = qkv[:, : Hq * Dqk].unflatten(1, (Hq, Dqk))
    k, v = torch.randn(20, Hkv, Dqk, generator=g), torch.randn(20, Hkv, Dvo, generator=g)
    w = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qi.to(device), ki.to(device), Hq, Hkv, Dqk, Dvo, causal=causal, q_data_type=torch.float32)
    o, lse = w.run(q.to(device), k.to(device), v.to(device), return_lse=True)
    assert o.shape == (9, Hq, Dvo)
    ro, rl = ref_attention(q, k.unsqueeze(1), v.unsqueeze(1), qi, ki, torch.arange(20), [1] * 4, causal=causal)
    check_attention("ragged", o, lse, ro, rl, torch.float32)


@pytest.mark.parametrize("tma,block_n", [(False, None), (True, None), (True, 128)])
def test_ragged_tma_tiles_ignore_other_rows(tma, block_n, device, monkeypatch):
    """Ragged key tiles by bulk copy (``use_tma``) or pointer loads: a tile reaching past its
    request reads the next request's rows or NaN rows past every request (K/V buffers longer
    than kv_indptr[-1]); neither may leak into the result (causal and not, split and not).
    ``block_n`` 128: the key tiles CUDA's long prefills take with TMA, over split chunks that
    start at multiples of the planner's 64-key tile, not of 128."""
    from torch_flashops.ops import attention as A

    monkeypatch.setattr(A, "use_tma", lambda *a: tma and A.tma_eligible(*a[:4]))
    if block_n is not None:
        real_cfg = A.attn_config
        monkeypatch.setattr(A, "attn_config", lambda *a, **k: (block_n, 4, 1) if k.get("tma") else real_cfg(*a, **k))
    g = torch.Generator().manual_seed(12)
    qi = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    ki = torch.tensor([0, 70, 75, 190], dtype=torch.int32)
    Hq, Hkv, D = 4, 2, 32
    q = torch.randn(9, Hq, D, generator=g)
    k, v = torch.randn(260, Hkv, D, generator=g), torch.randn(260, Hkv, D, generator=g)
    k[190:], v[190:] = float("nan"), float("nan")  # rows owned by no request
    launched = []
    real_kernel = A._attn_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launched.append((kw["TMA"], kw["BLOCK_N"]))
                return real_kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(A, "_attn_fwd_kernel", Spy())
    expected = []
    for causal, split in ((False, None), (True, None), (True, 16)):
        # (on CUDA a fixed split asks for batch invariance: no TMA, whose choice reads the batch)
        expected.append(tma and not (split is not None and torch.device(device).type == "cuda"))
        w = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
        w.plan(qi.to(device), ki.to(device), Hq, Hkv, D, causal=causal, q_data_type=torch.float32,
               fixed_split_size=split)
        o, lse = w.run(q.to(device), k.to(device), v.to(device), return_lse=True)
        ro, rl = ref_attention(q, k[:190].unsqueeze(1), v[:190].unsqueeze(1), qi, ki, torch.arange(190), [1] * 3,
                               causal=causal)
        check_attention(f"ragged tma={tma} block_n={block_n} causal={causal} split={split}", o, lse, ro, rl,
                        torch.float32)
        assert launched and all(t == expected[-1] and (block_n in (None, bn) or not t) for t, bn in launched)
        launched.clear()


def test_ragged_positional_order_and_split(device):
    """Ragged plan's positional order is (..., window_left, logits_soft_cap, sm_scale) [spec §6]."""
    g = torch.Generator().manual_seed(6)
    qi = torch.tensor([0, 2, 3], dtype=torch.int32)
    ki = torch.tensor([0, 150, 170], dtype=torch.int32)
    q, k, v = torch.randn(3, 2, 16, generator=g), torch.randn(170, 1, 16, generator=g), torch.randn(170, 1, 16, generator=g)
    w = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    #      qo, kv, Hq, Hkv, Dqk, Dvo, mask, packed, causal, pos, fp16red, window, cap, sm_scale
    w.plan(qi, ki, 2, 1, 16, None, None, None, True, "NONE", False, 60, 10.0, 0.3, q_data_type="float32",
           fixed_split_size=32)
    o, lse = w.run(q.to(device), k.to(device), v.to(device), return_lse=True)
    ro, rl = ref_attention(q, k.unsqueeze(1), v.unsqueeze(1), qi, ki, torch.arange(170), [1, 1], causal=True,
                           window_left=60, logits_soft_cap=10.0, sm_scale=0.3)
    check_attention("ragged positional", o, lse, ro, rl, torch.float32)


# --------------------------------------------------------------------------- hypothesis fuzz


GQA = [(1, 1), (2, 1), (4, 2), (7, 1), (8, 1), (6, 3), (5, 5)]


@st.composite
def batches(draw):
    B = draw(st.integers(1, 4))
    qo = draw(st.lists(st.integers(0, 5), min_size=B, max_size=B))
    kv = draw(st.lists(st.integers(0, 24), min_size=B, max_size=B))
    return dict(
        qo=qo, kv=kv, page=draw(st.sampled_from([1, 3, 4, 5])), heads=draw(st.sampled_from(GQA)),
        D=draw(st.sampled_from([16, 32])), layout=draw(st.sampled_from(["NHD", "HND"])),
        form=draw(st.sampled_from(["5d", "tuple"])), causal=draw(st.booleans()),
        window=draw(st.sampled_from([-1, -1, 0, 1, 5])), cap=draw(st.sampled_from([0.0, 0.0, 6.0])),
        pos=draw(st.sampled_from(["NONE", "NONE", "ROPE_LLAMA", "ALIBI"])), mask=draw(st.booleans()),
        split=draw(st.sampled_from([None, 1, 2])), seed=draw(st.integers(0, 2 ** 16)),
        strided=draw(st.booleans()), shared=draw(st.booleans()), gather=draw(st.booleans()),
    )


_FUZZ_BASE = dict(page=4, heads=(4, 2), D=16, layout="NHD", form="5d", causal=True, window=-1, cap=0.0, pos="NONE",
                  mask=False, split=None, seed=7, strided=False, shared=False, gather=False)


@settings(deadline=None)
@given(batches())
# fixed draws of what 8 derandomized examples may miss: keys over several 64-key tiles (the
# full/diagonal tile split), RoPE inside attention, ALiBi with a mask and a fixed split, HND tuples
@example(dict(_FUZZ_BASE, qo=[3, 5], kv=[150, 70], window=70, pos="ROPE_LLAMA", strided=True))
@example(dict(_FUZZ_BASE, qo=[2, 0, 4], kv=[131, 5, 66], layout="HND", form="tuple", causal=False, pos="ALIBI",
              mask=True, split=2, cap=6.0, heads=(7, 1), page=5))
@example(dict(_FUZZ_BASE, qo=[5, 1], kv=[133, 200], gather=True, heads=(8, 1), shared=True))
def test_paged_fuzz(c):
    Hq, Hkv = c["heads"]
    b = Batch(c["qo"], c["kv"], page_size=c["page"], Hq=Hq, Hkv=Hkv, D=c["D"], layout=c["layout"], form=c["form"],
              seed=c["seed"], q_strided=c["strided"], shared_pages=c["shared"], pad_cache=c["strided"])
    masks = b.random_masks(c["seed"]) if c["mask"] else None
    opts = dict(window_left=c["window"], logits_soft_cap=c["cap"], pos_encoding_mode=c["pos"])
    # (a fixed split is never coarsened: one-key chunks of 4 x 24 keys at 5 KV heads need 8 MB)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(DEVICE, 32 << 20), c["layout"])
    flat = torch.cat([m.reshape(-1) for m in masks]).to(DEVICE) if masks else None
    with gather_threshold(0 if c["gather"] else None):  # the gathered-K/V path on small batches too
        plan_paged(w, b, causal=c["causal"], custom_mask=flat, fixed_split_size=c["split"], **opts)
    # (a fixed split asks for batch invariance: never the gathered path, whose choice reads the batch)
    assert (w._gather is not None) == (c["gather"] and sum(c["kv"]) > 0 and c["split"] is None)
    o, lse = w.run(b.q, b.cache, return_lse=True)
    ro, rl = b.oracle(causal=c["causal"], masks=masks, **opts)
    check_attention("fuzz", o, lse, ro, rl, torch.float32)


@pytest.mark.parametrize("layout,form", [("NHD", "5d"), ("NHD", "tuple"), ("HND", "tuple")])
def test_paged_prefill_gather_path(layout, form, device):
    """Many query rows per key (threshold lowered to this batch's size): plan() takes the
    gathered-K/V path; it equals the in-place paged path and the oracle, compiles to one graph,
    and (unchecked) maps page ids outside the cache to page 0 as the paged kernel does."""
    qo, kv = [40, 0, 33], [44, 5, 33]
    b = Batch(qo, kv, page_size=4, Hq=4, Hkv=2, D=16, layout=layout, form=form, seed=12)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device), layout)
    with gather_threshold(16):  # 40*44 - 40*39/2 + ... pairs over 82 keys: ~20 rows per key
        plan_paged(w, b, causal=True)
    assert w._gather is not None
    o, lse = w.run(b.q, b.cache, return_lse=True)
    ro, rl = b.oracle(causal=True)
    check_attention("gathered", o, lse, ro, rl, torch.float32)
    ref = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device), layout)
    with gather_threshold(10 ** 9):
        plan_paged(ref, b, causal=True)
    assert ref._gather is None
    o2, lse2 = ref.run(b.q, b.cache, return_lse=True)
    assert_close("gathered vs paged", o, o2, atol=1e-5, rtol=1e-5)
    cc = CompileCounter(lambda q, c: w.run(q, c))
    assert_close("compiled gathered", cc(b.q, b.cache), o, atol=1e-5, rtol=1e-5)
    assert cc.frames == 1 and "flashops.ragged_attention.default" in cc.graph_ops()
    b.kv_indices[2] = b.P + 7  # outside the cache
    with gather_threshold(16):
        plan_paged(w, b, causal=True)
    with gather_threshold(10 ** 9):
        plan_paged(ref, b, causal=True)
    assert_close("bad page id: gathered vs paged", w.run(b.q, b.cache), ref.run(b.q, b.cache), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- multi-level cascade


@pytest.mark.parametrize("causal", [False, True])
def test_multilevel_cascade_equals_flat_prefill(causal, device):
    """Three levels (prefix shared by all rows, a middle level shared by groups, unique
    suffixes) over one cache == one paged prefill over the concatenated page lists."""
    g = torch.Generator().manual_seed(7 + causal)
    page, Hq, Hkv, D, P = 4, 4, 2, 16, 40
    cache = torch.randn(P, 2, page, Hkv, D, generator=g).to(device)
    pages = torch.randperm(P, generator=g).int()
    qo_lens = [2, 1, 2]
    qo_indptr = torch.tensor([0, 2, 3, 5], dtype=torch.int32)
    N = 5
    prefix = pages[:3]  # 12 tokens, full pages
    mid = [pages[3:5], pages[5:6]]  # requests 0-1 share two pages, request 2 one page
    uniq_lens = [5, 2, 7]
    uniq, at = [], 6
    for n in uniq_lens:
        k = (n + page - 1) // page
        uniq.append(pages[at:at + k])
        at += k
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    levels = dict(
        qo=[i32([0, N]), i32([0, 3, 5]), qo_indptr],
        indptr=[i32([0, 3]), i32([0, 2, 3]), i32([0] + torch.tensor([len(u) for u in uniq]).cumsum(0).tolist())],
        indices=[prefix, torch.cat(mid), torch.cat(uniq)],
        last=[i32([4]), i32([4, 4]), i32([(n - 1) % page + 1 for n in uniq_lens])],
    )
    w = fi.MultiLevelCascadeAttentionWrapper(3, workspace(device))
    w.plan(levels["qo"], levels["indptr"], levels["indices"], levels["last"], Hq, Hkv, D, page, causal=causal,
           q_data_type="float32")
    q = torch.randn(N, Hq, D, generator=g).to(device)
    o = w.run(q, cache)
    flat_pages = [torch.cat([prefix, mid[0 if b < 2 else 1], uniq[b]]) for b in range(3)]
    flat_indptr = i32([0] + torch.tensor([len(p) for p in flat_pages]).cumsum(0).tolist())
    ro, _ = ref_attention(q.cpu(), cache[:, 0].cpu(), cache[:, 1].cpu(), qo_indptr, flat_indptr, torch.cat(flat_pages),
                          levels["last"][2], causal=causal)
    assert_close("cascade", o, ro.float())
    flat = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    flat.plan(qo_indptr, flat_indptr, torch.cat(flat_pages), levels["last"][2], Hq, Hkv, D, page, causal=causal,
              q_data_type="float32")
    assert_close("cascade vs flat wrapper", o, flat.run(q, cache))
    with pytest.raises(ValueError, match="qo_indptr_arr"):
        w.plan([i32([0, 4])] + levels["qo"][1:], levels["indptr"], levels["indices"], levels["last"], Hq, Hkv, D,
               page)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kind", ["decode", "prefill", "prefill-causal", "decode-no-prefix"])
def test_shared_prefix_wrappers_equal_flat_attention(kind, layout, device):
    """FlashInfer's older two-level cascade wrappers (the shared prefix as one contiguous K/V pair,
    each request's suffix in paged KV) == attention over the prefix's pages followed by the
    suffix pages in one page table; causal masks the suffix only (bottom-right aligned over the
    whole key list, which the prefix precedes), as FlashInfer's forward does. bf16 q against the
    float16 that ``begin_forward`` plans by default re-plans at forward."""
    g = torch.Generator().manual_seed(11 + len(kind) + len(layout))
    page, Hq, Hkv, D, P = 4, 4, 2, 16, 30
    dtype = torch.bfloat16 if kind in ("decode", "prefill") else torch.float16
    cache_nhd = torch.randn(P, 2, page, Hkv, D, generator=g).to(dtype)
    pages = torch.randperm(P, generator=g).int()
    prefix = pages[: 0 if kind == "decode-no-prefix" else 3]  # 12 shared tokens, full pages
    uniq_lens = [5, 2, 7]
    uniq, at = [], 3
    for n in uniq_lens:
        uniq.append(pages[at:at + (n + page - 1) // page])
        at += len(uniq[-1])
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    u_indptr = i32([0] + torch.tensor([len(u) for u in uniq]).cumsum(0).tolist())
    u_last = i32([(n - 1) % page + 1 for n in uniq_lens])
    qo_lens = [1, 1, 1] if kind.startswith("decode") else [2, 1, 3]
    qo_indptr = i32([0] + torch.tensor(qo_lens).cumsum(0).tolist())
    k_shared, v_shared = (cache_nhd[prefix.long(), i].reshape(-1, Hkv, D) for i in (0, 1))
    cache = cache_nhd
    if layout == "HND":
        cache = cache_nhd.transpose(2, 3).contiguous()
        k_shared, v_shared = (t.transpose(0, 1).contiguous() for t in (k_shared, v_shared))
    cache, k_shared, v_shared = (t.to(device) for t in (cache, k_shared, v_shared))
    q = torch.randn(sum(qo_lens), Hq, D, generator=g).to(dtype).to(device)
    causal, sm_scale = kind == "prefill-causal", (0.3 if kind == "prefill-causal" else None)
    if kind.startswith("decode"):
        w = fi.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(workspace(device), layout)
        with pytest.raises(RuntimeError, match="before a successful begin_forward"):
            w.forward(q, k_shared, v_shared, cache)
        w.begin_forward(u_indptr, torch.cat(uniq), u_last, Hq, Hkv, D, page,
                        **({} if dtype == torch.bfloat16 else dict(data_type=torch.float16)))
        o = w.forward(q, k_shared, v_shared, cache)
        assert w._batch_decode_wrapper._plan.q_dtype == dtype
    else:
        w = fi.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(workspace(device), layout)
        w.begin_forward(qo_indptr, u_indptr, torch.cat(uniq), u_last, Hq, Hkv, D, page)
        o = w.forward(q, k_shared, v_shared, cache, causal=causal, sm_scale=sm_scale)
    assert o.shape == q.shape and o.dtype == dtype
    flat_pages = [torch.cat([prefix, u]) for u in uniq]
    flat_indptr = i32([0] + torch.tensor([len(p) for p in flat_pages]).cumsum(0).tolist())
    ro, _ = ref_attention(q.cpu().float(), cache_nhd[:, 0].float(), cache_nhd[:, 1].float(), qo_indptr, flat_indptr,
                          torch.cat(flat_pages), u_last, causal=causal, sm_scale=sm_scale)
    assert_close(f"shared prefix {kind} {layout}", o, ro.to(dtype), dtype=dtype)


@pytest.mark.parametrize("D", [64, 128])
def test_model_head_dims(D, device):
    """fp16 decode and causal prefill at the model head dims (a few rows: the interpreter is slow)."""
    b = Batch([1, 3], [37, 20], page_size=16, Hq=4, Hkv=1, D=D, dtype=torch.float16, seed=D, device=device)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w, b, causal=True)
    o, lse = w.run(b.q, b.cache, return_lse=True)
    ro, rl = b.oracle(causal=True)
    check_attention(f"D={D}", o, lse, ro, rl, torch.float16)


def test_kernels_compile_for_hopper():
    """The attention kernel (decode and prefill tiles, ragged tiles by TMA, each place of the
    programmatic-dependent-launch trigger) and the merge kernel (with and without its
    ``griddepcontrol.wait``) compile for sm_90 on this machine
    (``scripts/inspect_attention_ir.py``, outside the interpreter), with the PDL instruction
    exactly where asked: the interpreter accepts code Triton's compiler rejects (e.g. an
    if-block that changes a tensor's shape), and the GPU machine is not always at hand."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHOPS_INTERPRET")}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    for args, tma, pdl in ((["paged", "16", "64", "8", "3"], "0", "1"), (["ragged", "128", "64", "8", "3"], "0", "0"),
                           (["ragged", "128", "64", "8", "3"], "1", "2"), (["merge", "16"], "0", "1"),
                           (["merge", "128"], "0", "0")):
        r = subprocess.run([sys.executable, str(root / "scripts" / "inspect_attention_ir.py"), *args],
                           env=dict(env, TMA=tma, PDL=pdl), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "shared memory" in r.stdout, (args, r.stdout[-2000:], r.stderr[-4000:])
        assert ("griddepcontrol: 0;" in r.stdout) == (pdl == "0"), (args, pdl, r.stdout)  # the PDL instruction
