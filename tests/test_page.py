"""Tests of the page family (spec/attention.md §1) and the mask packing utilities (§0.4).

The expected caches are built here from per-token loops of ``reference.page`` on plain
``[P, page_size, H, D]`` tensors; the cache forms handed to the code under test are made from
those by this file's own ``_to_form``/``_from_form`` (not by the library's view helper).
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_flashops as fi
from tests.conftest import DEVICE
from torch_flashops import _config
from torch_flashops.page import _unpack_paged_kv_cache
from torch_flashops.reference import page as ref

from tests.helpers import CompileCounter, SchemaTestCase, compile_sm90, needs_expecttest, run_without_interpreter

OPS = torch.ops.flashops
LAYOUTS = ["NHD", "HND"]
FORMS = ["5d", "tuple"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(params=["kernel", "reference"])
def backend_device(request, device):
    """Run each test through the Triton kernel (CUDA, or the interpreter on CPU) and through
    the CPU reference backend; yields the device to put tensors on."""
    if request.param == "kernel":
        yield device
        return
    prev = _config._cpu_backend
    fi.set_cpu_backend("reference")
    try:
        yield "cpu"
    finally:
        _config._cpu_backend = prev


@contextlib.contextmanager
def checked_mode():
    prev = _config._checks
    fi.set_checks(True)
    try:
        yield
    finally:
        fi.set_checks(prev)


def _to_form(k, v, layout, form):
    """NHD-ordered ``[P, ps, H, D]`` K/V -> the cache in ``form`` and ``layout`` (fresh storage)."""
    if layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    if form == "5d":
        return torch.stack([k, v], 1).contiguous()
    return k.contiguous(), v.contiguous()


def _from_form(cache, layout):
    """Inverse of ``_to_form``: NHD-ordered K and V of a cache."""
    k, v = (cache[:, 0], cache[:, 1]) if isinstance(cache, torch.Tensor) else cache
    if layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    return k, v


def _csr(lengths, dtype=torch.int32):
    return torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=dtype)


def make_batch(gen, *, B, page_size, H, D, Dv=None, dtype=torch.float16, extra_pages=3, shared_pages=2,
               pad_rows=0, index_dtype=torch.int32):
    """A ragged batch with a page table whose appended tokens never share a slot.

    Each request starts with up to ``shared_pages`` full pages drawn (with repetition, so
    page ids repeat within and across requests) from a shared pool, then owns private pages;
    its appended tokens lie past the shared prefix. Page ids are shuffled. Returns a dict of
    CPU tensors, with ``seq_lens``, the append CSR and the K/V rows (``pad_rows`` extra rows
    of NaN at the end stand for CUDA-graph padding).
    """
    Dv = Dv or D
    rnd = lambda hi: int(torch.randint(0, hi, (1,), generator=gen))  # noqa: E731
    n_shared = [rnd(shared_pages + 1) for _ in range(B)]
    n_private = [rnd(4) for _ in range(B)]
    pool = 2
    P = pool + sum(n_private) + extra_pages
    perm = torch.randperm(P, generator=gen)
    shared_ids, private_ids = perm[:pool], perm[pool:].tolist()
    indices, last, seq_lens, append_lens = [], [], [], []
    for b in range(B):
        ids = [int(shared_ids[rnd(pool)]) for _ in range(n_shared[b])]
        ids += [private_ids.pop() for _ in range(n_private[b])]
        indices += ids
        n = len(ids)
        last_b = (1 + rnd(page_size)) if n_private[b] else (page_size if n else 0)
        seq = max(n - 1, 0) * page_size + last_b
        appendable = seq - n_shared[b] * page_size if n_private[b] else 0
        last.append(last_b)
        seq_lens.append(seq)
        append_lens.append(rnd(appendable + 1))
    nnz = sum(append_lens) + pad_rows
    key = torch.randn(nnz, H, D, generator=gen).to(dtype)
    value = torch.randn(nnz, H, Dv, generator=gen).to(dtype)
    key[nnz - pad_rows:] = float("nan")
    value[nnz - pad_rows:] = float("nan")
    return dict(
        P=P, page_size=page_size,
        kv_indptr=_csr([n_shared[b] + n_private[b] for b in range(B)], index_dtype),
        kv_indices=torch.tensor(indices + [int(perm[0])] * 2, dtype=index_dtype),  # 2 spare entries
        kv_last_page_len=torch.tensor(last, dtype=index_dtype),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        append_indptr=_csr(append_lens, index_dtype),
        key=key, value=value, nnz=nnz,
        k_cache=torch.randn(P, page_size, H, D, generator=gen).to(dtype),
        v_cache=torch.randn(P, page_size, H, Dv, generator=gen).to(dtype),
    )


def expected_cache(d, batch_indices, positions):
    k, v = d["k_cache"].clone(), d["v_cache"].clone()
    ref.ref_append_paged_kv_cache(k, v, d["key"], d["value"], batch_indices, positions,
                                  d["kv_indices"], d["kv_indptr"], d["page_size"])
    return k, v


def run_append(d, device, layout, form, *, key=None, value=None):
    """Compute batch indices/positions and append with the library; returns (cache, bi, pos)."""
    to = lambda t: t.to(device)  # noqa: E731
    cache = _to_form(to(d["k_cache"]), to(d["v_cache"]), layout, form)
    seq = fi.get_seq_lens(to(d["kv_indptr"]), to(d["kv_last_page_len"]), d["page_size"])
    bi, pos = fi.get_batch_indices_positions(to(d["append_indptr"]), seq, d["nnz"])
    fi.append_paged_kv_cache(to(d["key"]) if key is None else key, to(d["value"]) if value is None else value,
                             bi, pos, cache, to(d["kv_indices"]), to(d["kv_indptr"]), to(d["kv_last_page_len"]),
                             kv_layout=layout)
    return cache, bi, pos


def assert_cache_equal(cache, layout, exp_k, exp_v):
    got_k, got_v = _from_form(cache, layout)
    for name, got, exp in (("k_cache", got_k, exp_k), ("v_cache", got_v, exp_v)):
        got = got.cpu()
        same = (got == exp) | (got.isnan() & exp.isnan())
        assert same.all(), f"{name}: {int((~same).sum())} elements differ, first at {tuple(int(i) for i in (~same).nonzero()[0])}"


# --------------------------------------------------------------------------- get_seq_lens


def test_get_seq_lens_values():
    kv_indptr = torch.tensor([0, 3, 3, 4, 9], dtype=torch.int32)
    last = torch.tensor([2, 0, 16, 1], dtype=torch.int32)
    out = fi.get_seq_lens(kv_indptr, last, 16)
    assert out.dtype == torch.int32 and out.shape == (4,)
    assert out.tolist() == ref.ref_seq_lens(kv_indptr, last, 16) == [34, 0, 16, 65]


def test_get_seq_lens_bad_shape():
    with pytest.raises(ValueError, match="kv_last_page_len"):
        fi.get_seq_lens(torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([1], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="^kv_indptr"):  # index tensors are integers (spec §0.1)
        fi.get_seq_lens(torch.tensor([0.0, 2.0, 3.0]), torch.tensor([1, 2], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="^kv_last_page_len"):
        fi.get_seq_lens(torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([1.0, 2.0]), 4)


# --------------------------------------------------------------------------- batch indices / positions


def test_batch_indices_positions_spec_example(backend_device):
    bi, pos = fi.get_batch_indices_positions(torch.tensor([0, 2, 3, 3, 6], dtype=torch.int32, device=backend_device),
                                             torch.tensor([4, 1, 7, 3], dtype=torch.int32, device=backend_device), 8)
    assert bi.dtype == pos.dtype == torch.int32 and bi.is_contiguous() and pos.is_contiguous()
    assert bi.tolist() == [0, 0, 1, 3, 3, 3, -1, -1]
    assert pos.tolist() == [2, 3, 0, 0, 1, 2, 0, 0]


@settings(deadline=None)
@given(lens=st.lists(st.integers(0, 40), min_size=0, max_size=9), pad=st.integers(0, 5),
       slack=st.integers(0, 7), i64=st.booleans(), seed=st.integers(0, 2**16))
def test_batch_indices_positions_fuzz(lens, pad, slack, i64, seed):
    g = torch.Generator().manual_seed(seed)
    dt = torch.int64 if i64 else torch.int32
    append_indptr = _csr(lens, dt)
    seq_lens = (torch.tensor(lens, dtype=torch.int64) + torch.randint(0, slack + 1, (len(lens),), generator=g)).to(dt)
    nnz = sum(lens) + pad
    exp_bi, exp_pos = ref.ref_batch_indices_positions(append_indptr, seq_lens, nnz)
    bi, pos = fi.get_batch_indices_positions(append_indptr.to(DEVICE), seq_lens.to(DEVICE), nnz)
    assert torch.equal(bi.cpu(), exp_bi) and torch.equal(pos.cpu(), exp_pos)
    # Preallocated outputs, poisoned: filled in place and returned.
    bufs = [torch.full((nnz,), 12345, dtype=torch.int32, device=DEVICE) for _ in range(2)]
    out = fi.get_batch_indices_positions(append_indptr.to(DEVICE), seq_lens.to(DEVICE), nnz, *bufs)
    assert out[0] is bufs[0] and out[1] is bufs[1]
    assert torch.equal(bufs[0].cpu(), exp_bi) and torch.equal(bufs[1].cpu(), exp_pos)
    # The CPU reference backend agrees too.
    cpu_bi, cpu_pos = ref.batch_indices_positions(append_indptr, seq_lens, nnz)
    assert torch.equal(cpu_bi, exp_bi) and torch.equal(cpu_pos, exp_pos)


def test_batch_indices_positions_large_batch(device):
    """More requests than one binary-search step covers, many empty, one output block edge."""
    g = torch.Generator().manual_seed(3)
    lens = (torch.randint(0, 4, (300,), generator=g) * (torch.rand(300, generator=g) < 0.5)).tolist()
    append_indptr = _csr(lens)
    seq_lens = torch.tensor(lens, dtype=torch.int32) + 5
    nnz = sum(lens) + 1
    bi, pos = fi.get_batch_indices_positions(append_indptr.to(device), seq_lens.to(device), nnz)
    exp_bi, exp_pos = ref.ref_batch_indices_positions(append_indptr, seq_lens, nnz)
    assert torch.equal(bi.cpu(), exp_bi) and torch.equal(pos.cpu(), exp_pos)


def test_batch_indices_positions_one_buffer_given(device):
    positions = torch.full((5,), 7, dtype=torch.int32, device=device)
    bi, pos = fi.get_batch_indices_positions(torch.tensor([0, 2, 3], dtype=torch.int32, device=device),
                                             torch.tensor([2, 4], dtype=torch.int32, device=device), 5,
                                             positions=positions)
    assert pos is positions and bi.tolist() == [0, 0, 1, -1, -1] and pos.tolist() == [0, 1, 3, 0, 0]


def test_batch_indices_positions_int_like_nnz(device):
    """nnz may be a NumPy integer or a one-element integer tensor (e.g. ``append_indptr[-1]``),
    as FlashInfer's ``torch.empty((nnz,))`` takes them."""
    ai = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    sl = torch.tensor([4, 1], dtype=torch.int32, device=device)
    want = fi.get_batch_indices_positions(ai, sl, 3)
    assert want[0].tolist() == [0, 0, 1] and want[1].tolist() == [2, 3, 0]
    for nnz in (np.int64(3), np.int32(3), ai[-1], ai[-1:].long()):
        got = fi.get_batch_indices_positions(ai, sl, nnz)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), type(nnz)


@pytest.mark.parametrize("case", ["bi_dtype", "pos_shape", "seq_lens_len", "indptr_2d", "nnz_negative", "indptr_float",
                                  "nnz_float", "nnz_bool", "nnz_float_tensor", "nnz_two_elements", "same_buffer",
                                  "overlapping_buffers"])
def test_batch_indices_positions_bad_input(case, device):
    ai = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    sl = torch.tensor([2, 4], dtype=torch.int32, device=device)
    bi = torch.full((4,), 9, dtype=torch.int32, device=device)
    pos = torch.full((4,), 9, dtype=torch.int32, device=device)
    args, name = {
        "bi_dtype": ((ai, sl, 4, bi.long(), pos), "batch_indices"),
        "pos_shape": ((ai, sl, 4, bi, pos[:3]), "positions"),
        "seq_lens_len": ((ai, sl[:1], 4, bi, pos), "seq_lens"),
        "indptr_2d": ((ai[None], sl, 4, bi, pos), "append_indptr"),
        "nnz_negative": ((ai, sl, -1, None, None), "nnz"),
        "indptr_float": ((ai.float(), sl, 4, bi, pos), "append_indptr"),
        "nnz_float": ((ai, sl, 4.0, bi, pos), "nnz"),
        "nnz_bool": ((ai, sl, True, bi, pos), "nnz"),
        "nnz_float_tensor": ((ai, sl, torch.tensor(4.0), bi, pos), "nnz"),
        "nnz_two_elements": ((ai, sl, ai[:2], bi, pos), "nnz"),
        "same_buffer": ((ai, sl, 4, bi, bi), "positions"),
        "overlapping_buffers": ((ai, sl, 2, bi[:2], bi[1:3]), "positions"),
    }[case]
    with pytest.raises(ValueError, match=f"^{name}"):
        fi.get_batch_indices_positions(*args)
    assert (bi == 9).all() and (pos == 9).all()


@pytest.mark.parametrize("case", ["append_longer_than_seq", "nnz_too_small", "indptr_decreasing", "indptr_start"])
def test_batch_indices_positions_checked_mode(case, device):
    ai, sl, nnz, name = {
        "append_longer_than_seq": ([0, 2, 5], [2, 2], 6, "seq_lens"),
        "nnz_too_small": ([0, 2, 5], [2, 3], 4, "nnz"),
        "indptr_decreasing": ([0, 3, 2], [3, 3], 4, "append_indptr"),
        "indptr_start": ([1, 3, 4], [3, 3], 4, "append_indptr"),
    }[case]
    ai = torch.tensor(ai, dtype=torch.int32, device=device)
    sl = torch.tensor(sl, dtype=torch.int32, device=device)
    bufs = [torch.full((nnz,), 9, dtype=torch.int32, device=device) for _ in range(2)]
    with checked_mode(), pytest.raises(ValueError, match=f"^{name}"):
        fi.get_batch_indices_positions(ai, sl, nnz, *bufs)
    assert all((b == 9).all() for b in bufs)
    fi.get_batch_indices_positions(ai, sl, nnz, *bufs)  # unchecked: no error (result unspecified)


# --------------------------------------------------------------------------- append: correctness


@pytest.mark.parametrize("page_size", [1, 5, 16], ids=lambda p: f"ps{p}")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_append_matrix(layout, form, page_size, backend_device):
    g = torch.Generator().manual_seed(page_size * 7 + len(layout + form))
    d = make_batch(g, B=5, page_size=page_size, H=2, D=16, dtype=torch.bfloat16, pad_rows=2)
    cache, bi, pos = run_append(d, backend_device, layout, form)
    assert (bi[-2:] == -1).all()
    assert_cache_equal(cache, layout, *expected_cache(d, bi.cpu(), pos.cpu()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_append_dtypes_and_int64_indices(dtype, device):
    g = torch.Generator().manual_seed(11)
    d = make_batch(g, B=4, page_size=4, H=3, D=32, dtype=dtype, index_dtype=torch.int64)
    cache, bi, pos = run_append(d, device, "NHD", "5d")
    assert_cache_equal(cache, "NHD", *expected_cache(d, bi.cpu(), pos.cpu()))


def test_append_odd_dims_and_different_value_dim(device):
    """Head dims that are not powers of two (masked tile tails) and D_v != D (tuple only)."""
    g = torch.Generator().manual_seed(5)
    d = make_batch(g, B=3, page_size=3, H=5, D=24, Dv=8, dtype=torch.float16)
    for layout in LAYOUTS:
        cache, bi, pos = run_append(d, device, layout, "tuple")
        assert_cache_equal(cache, layout, *expected_cache(d, bi.cpu(), pos.cpu()))


def test_append_page_size_one_low_rank_forms(device):
    """4-D single tensor and 3-D tuple members mean page_size 1."""
    g = torch.Generator().manual_seed(6)
    d = make_batch(g, B=4, page_size=1, H=2, D=16)
    exp_k, exp_v = None, None
    for layout in LAYOUTS:
        for form in FORMS:
            cache = _to_form(d["k_cache"].to(device), d["v_cache"].to(device), layout, form)
            squeeze = 2 if layout == "NHD" else 3  # the page axis inside the 5-D / 4-D tensors
            low = cache.squeeze(squeeze) if form == "5d" else tuple(c.squeeze(squeeze - 1) for c in cache)
            seq = fi.get_seq_lens(d["kv_indptr"].to(device), d["kv_last_page_len"].to(device), 1)
            bi, pos = fi.get_batch_indices_positions(d["append_indptr"].to(device), seq, d["nnz"])
            fi.append_paged_kv_cache(d["key"].to(device), d["value"].to(device), bi, pos, low, d["kv_indices"].to(device),
                                     d["kv_indptr"].to(device), d["kv_last_page_len"].to(device), layout)
            if exp_k is None:
                exp_k, exp_v = expected_cache(d, bi.cpu(), pos.cpu())
            assert_cache_equal(cache, layout, exp_k, exp_v)  # ``low`` is a view of ``cache``


def test_append_strided_inputs_and_padded_caches(backend_device):
    """K from a packed qkv tensor, V with padded head stride; caches with padded page/dim strides."""
    g = torch.Generator().manual_seed(8)
    d = make_batch(g, B=4, page_size=5, H=2, D=16)
    dev = backend_device
    qkv = torch.randn(d["nnz"], 3, 2, 16, generator=g).to(torch.float16).to(dev)
    qkv[:, 1] = d["key"].to(dev)
    vpad = torch.randn(d["nnz"], 2, 24, generator=g).to(torch.float16).to(dev)
    vpad[..., :16] = d["value"].to(dev)
    key, value = qkv[:, 1], vpad[..., :16]
    assert not key.is_contiguous() and not value.is_contiguous()
    for layout in LAYOUTS:
        base_k, base_v = _to_form(d["k_cache"].to(dev), d["v_cache"].to(dev), layout, "tuple")
        big_k = torch.zeros(base_k.shape[0] * 2, *base_k.shape[1:-1], 32, dtype=base_k.dtype, device=dev)
        big_v = torch.zeros_like(big_k)
        k_cache, v_cache = big_k[::2, ..., :16], big_v[::2, ..., :16]  # padded page and dim strides
        k_cache.copy_(base_k)
        v_cache.copy_(base_v)
        seq = fi.get_seq_lens(d["kv_indptr"].to(dev), d["kv_last_page_len"].to(dev), 5)
        bi, pos = fi.get_batch_indices_positions(d["append_indptr"].to(dev), seq, d["nnz"])
        fi.append_paged_kv_cache(key, value, bi, pos, (k_cache, v_cache), d["kv_indices"].to(dev),
                                 d["kv_indptr"].to(dev), d["kv_last_page_len"].to(dev), layout)
        assert_cache_equal((k_cache, v_cache), layout, *expected_cache(d, bi.cpu(), pos.cpu()))
        assert (big_k[1::2] == 0).all() and (big_k[..., 16:] == 0).all() and (big_v[..., 16:] == 0).all()


def test_direct_ops_take_strided_index_tensors(backend_device):
    """``torch.ops.flashops`` called directly (no public checks in front) with strided 1-D index
    tensors and outputs: the kernels read and write flat arrays, so they used to overwrite the
    contiguous prefix of a strided output and read the wrong rows; now both backends give what
    the public functions give on contiguous tensors."""
    g = torch.Generator().manual_seed(12)
    d = make_batch(g, B=3, page_size=4, H=2, D=16)
    dev = backend_device
    seq = fi.get_seq_lens(d["kv_indptr"].to(dev), d["kv_last_page_len"].to(dev), 4)
    bi, pos = fi.get_batch_indices_positions(d["append_indptr"].to(dev), seq, d["nnz"])

    def spaced(t, fill):  # the values of t at every other element of a larger buffer
        buf = torch.full((2 * t.shape[0],), fill, dtype=t.dtype, device=dev)
        buf[::2] = t
        return buf, buf[::2]

    bi_buf, bi_view = spaced(torch.zeros_like(bi), -7)
    pos_buf, pos_view = spaced(torch.zeros_like(pos), -7)
    OPS.batch_indices_positions_out(spaced(d["append_indptr"].to(dev), -9)[1], spaced(seq, -9)[1], bi_view, pos_view)
    assert torch.equal(bi_view, bi) and torch.equal(pos_view, pos)
    assert (bi_buf[1::2] == -7).all() and (pos_buf[1::2] == -7).all()

    cache = _to_form(d["k_cache"].to(dev), d["v_cache"].to(dev), "NHD", "5d")
    OPS.append_paged_kv_cache(d["key"].to(dev), d["value"].to(dev), spaced(bi, -1)[1], spaced(pos, 0)[1], cache, None,
                              spaced(d["kv_indices"].to(dev), 0)[1], spaced(d["kv_indptr"].to(dev), 0)[1], "NHD")
    assert_cache_equal(cache, "NHD", *expected_cache(d, bi.cpu(), pos.cpu()))


@pytest.mark.parametrize("case", ["positions-short", "seq_lens-short", "seq_lens-short-fresh", "key-heads",
                                  "value-rows", "bi-short"])
@pytest.mark.parametrize("backend", ["device", "meta"])
def test_direct_ops_check_sizes(case, backend, device):
    """Direct op calls with sizes that would send a kernel past a tensor raise ValueError
    naming the argument, from the kernel path, the reference and the fake alike."""
    dev = device if backend == "device" else "meta"
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32).to(dev)  # noqa: E731
    cache = torch.zeros(4, 2, 2, 2, 8).to(dev)  # 4 pages of 2 slots, 2 heads, D 8 (NHD)
    key, value = torch.randn(3, 2, 8).to(dev), torch.randn(3, 2, 8).to(dev)
    calls = {
        "positions-short": (lambda: OPS.batch_indices_positions_out(i32(0, 3), i32(3), i32(0, 0, 0), i32(0, 0)),
                            "positions"),
        "seq_lens-short": (lambda: OPS.batch_indices_positions_out(i32(0, 1, 3), i32(3), i32(0, 0, 0), i32(0, 0, 0)),
                           "seq_lens"),
        "seq_lens-short-fresh": (lambda: OPS.batch_indices_positions(i32(0, 1, 3), i32(3), 3), "seq_lens"),
        "key-heads": (lambda: OPS.append_paged_kv_cache(torch.randn(3, 4, 8).to(dev), torch.randn(3, 4, 8).to(dev),
                                                        i32(0, 0, 0), i32(0, 1, 2), cache, None, i32(0, 1),
                                                        i32(0, 2), "NHD"), "append_key"),
        "value-rows": (lambda: OPS.append_paged_kv_cache(key, value[:2], i32(0, 0, 0), i32(0, 1, 2), cache, None,
                                                         i32(0, 1), i32(0, 2), "NHD"), "append_value"),
        "bi-short": (lambda: OPS.append_paged_kv_cache(key, value, i32(0), i32(0, 1, 2), cache, None, i32(0, 1),
                                                       i32(0, 2), "NHD"), "batch_indices"),
    }
    call, arg = calls[case]
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        call()


def test_append_skips_negative_batch_indices(backend_device):
    """Rows with batch index -1 (anywhere, not only at the end) leave the cache alone."""
    g = torch.Generator().manual_seed(9)
    d = make_batch(g, B=3, page_size=4, H=2, D=16)
    dev = backend_device
    cache = _to_form(d["k_cache"].to(dev), d["v_cache"].to(dev), "NHD", "5d")
    seq = fi.get_seq_lens(d["kv_indptr"].to(dev), d["kv_last_page_len"].to(dev), 4)
    bi, pos = fi.get_batch_indices_positions(d["append_indptr"].to(dev), seq, d["nnz"])
    skip = torch.arange(d["nnz"], device=dev) % 2 == 0
    bi = torch.where(skip, -1, bi)
    key = torch.where(skip[:, None, None].cpu(), float("nan"), d["key"]).to(dev)
    fi.append_paged_kv_cache(key, d["value"].to(dev), bi, pos, cache, d["kv_indices"].to(dev),
                             d["kv_indptr"].to(dev), d["kv_last_page_len"].to(dev))
    assert not _from_form(cache, "NHD")[0].isnan().any()
    assert_cache_equal(cache, "NHD", *expected_cache(dict(d, key=key.cpu()), bi.cpu(), pos.cpu()))


def test_append_colliding_rows_one_writer_wins(device):
    """Two rows aimed at one slot: the slot holds one of them (unspecified which), nothing else changes."""
    k_cache = torch.randn(3, 4, 1, 16).half().to(device)
    v_cache = torch.randn(3, 4, 1, 16).half().to(device)
    before_k = k_cache.clone()
    key = torch.randn(2, 1, 16).half().to(device)
    value = torch.randn(2, 1, 16).half().to(device)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    fi.append_paged_kv_cache(key, value, i32([0, 0]), i32([2, 2]), (k_cache, v_cache), i32([1]), i32([0, 1]), i32([3]))
    slot = k_cache[1, 2, 0]
    assert torch.equal(slot, key[0, 0]) or torch.equal(slot, key[1, 0])
    changed = (k_cache != before_k).any(-1).nonzero().tolist()
    assert changed == [[1, 2, 0]]


def test_append_empty_inputs(device):
    cache = torch.randn(2, 2, 4, 1, 16, device=device)
    before = cache.clone()
    e = torch.empty(0, dtype=torch.int32, device=device)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    fi.append_paged_kv_cache(torch.empty(0, 1, 16, device=device), torch.empty(0, 1, 16, device=device), e, e, cache,
                             e, i32([0]), e)
    assert torch.equal(cache, before)
    bi, pos = fi.get_batch_indices_positions(i32([0]), e, 3)
    assert bi.tolist() == [-1, -1, -1] and pos.tolist() == [0, 0, 0]
    assert fi.get_batch_indices_positions(i32([0, 0]), i32([0]), 0)[0].shape == (0,)


@settings(deadline=None)
@given(B=st.integers(1, 5), page_size=st.integers(1, 16), H=st.integers(1, 4), D=st.sampled_from([8, 16, 40]),
       layout=st.sampled_from(LAYOUTS), form=st.sampled_from(FORMS), pad=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_append_fuzz(B, page_size, H, D, layout, form, pad, seed):
    d = make_batch(torch.Generator().manual_seed(seed), B=B, page_size=page_size, H=H, D=D, pad_rows=pad)
    cache, bi, pos = run_append(d, DEVICE, layout, form)
    assert_cache_equal(cache, layout, *expected_cache(d, bi.cpu(), pos.cpu()))


def test_append_out_of_range_indices_stay_in_bounds(device):
    """Unchecked mode with bad page ids, batch indices and positions: rows are dropped, and
    nothing outside the cache's own elements is written (guard bands around it stay intact)."""
    P, ps, H, D = 4, 4, 2, 16
    storage = torch.zeros(P + 2, 2, ps, H, D, device=device)
    cache = storage[1:-1]
    cache.normal_()
    before = cache.clone()
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    kv_indptr, kv_indices = i32([0, 2, 3]), i32([-1, P, 2**30, 0])  # request 1's page is 2**30
    #           batch:      0   0   0    1    5   -7  0
    bi = i32([0, 0, 0, 1, 5, -7, 0])
    pos = i32([0, 5, -9, 1, 0, 0, 2**30])
    key = torch.randn(7, H, D, device=device)
    fi.append_paged_kv_cache(key, key.clone(), bi, pos, cache, kv_indices, kv_indptr, i32([4, 2]))
    assert (storage[0] == 0).all() and (storage[-1] == 0).all()
    assert torch.equal(cache, before)  # every row was invalid one way or another
    # a negative kv_indptr entry (garbage page table): truncating division would give page index 0
    fi.append_paged_kv_cache(key[:2], key[:2].clone(), i32([0, 0]), i32([1, 3]), cache, i32([0, 1]), i32([-1, 1, 2]),
                             i32([4, 2]))
    assert (storage[0] == 0).all() and (storage[-1] == 0).all() and torch.equal(cache, before)


def test_append_positions_outside_the_request_stay_in_its_pages(backend_device):
    """Unchecked mode: a position past a request's last page, or negative, is dropped rather than
    written into a neighbouring request's page (the kernel and the CPU backend alike)."""
    device = backend_device
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    ps = 2
    cache = torch.randn(3, 2, ps, 1, 4, device=device)  # P=3, NHD 5-D; request 0 owns page 0, request 1 page 2
    before = cache.clone()
    key = torch.full((3, 1, 4), 5.0, device=device)
    fi.append_paged_kv_cache(key, key.clone(), i32(0, 1, 1), i32(ps, -1, 1), cache, i32(0, 2), i32(0, 1, 2),
                             i32(2, 2))
    expect = before.clone()
    expect[2, :, 1] = 5.0  # only request 1's position 1 is inside its own page
    assert torch.equal(cache, expect)


def test_append_head_major_cache_past_int32(device):
    """A head-major cache whose head stride times the head index passes 2^31 elements: every head
    lands in its own place, nothing is written before the cache (offsets are int64). One fp16
    storage of 2^32 + 64 elements, 8 GiB of address space of which a few pages are touched."""
    if device != "cpu":
        pytest.skip("address-space trick for the CPU; the GPU suite covers large strides in its own tests")
    H, D = 3, 8
    store = torch.empty(2 ** 32 + 64, dtype=torch.float16)  # untouched pages stay virtual
    base, sh = 2 ** 31, 2 ** 30  # head 2 at element 2^32: an int32 head offset wraps to element 0
    store[0:D] = 7.0
    k_cache = store.as_strided((1, 1, H, D), (H * D * 4, H * D * 4, sh, 1), base)
    v_cache = torch.zeros(1, 1, H, D, dtype=torch.float16)
    key = torch.arange(1, H * D + 1, dtype=torch.float16).view(1, H, D)
    one = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    fi.append_paged_kv_cache(key, key.clone(), one(0), one(0), (k_cache, v_cache), one(0), one(0, 1), one(1))
    assert torch.equal(k_cache[0, 0], key[0]) and torch.equal(v_cache[0, 0], key[0])
    assert (store[0:D] == 7.0).all()


# --------------------------------------------------------------------------- append: bad input


def _bad_append_case(case, device):
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    cache = torch.randn(4, 2, 4, 2, 16, device=device)
    a = dict(append_key=torch.randn(3, 2, 16, device=device), append_value=torch.randn(3, 2, 16, device=device),
             batch_indices=i32([0, 0, 1]), positions=i32([0, 1, 0]), paged_kv_cache=cache,
             kv_indices=i32([2, 0, 1]), kv_indptr=i32([0, 2, 3]), kv_last_page_len=i32([4, 1]), kv_layout="NHD")
    changes = {
        "key_dtype": ("append_key: dtype torch.float16 must match paged_kv_cache's torch.float32",
                      dict(append_key=a["append_key"].half())),
        "key_heads": ("append_key", dict(append_key=torch.randn(3, 3, 16, device=device))),
        "key_dim": ("append_key", dict(append_key=torch.randn(3, 2, 8, device=device))),
        "key_rank": ("append_key", dict(append_key=torch.randn(3, 32, device=device))),
        "key_last_stride": ("append_key", dict(append_key=torch.randn(3, 16, 2, device=device).transpose(1, 2))),
        "value_rows": ("append_value", dict(append_value=torch.randn(2, 2, 16, device=device))),
        "batch_indices_len": ("batch_indices", dict(batch_indices=i32([0, 0]))),
        "positions_float": ("positions", dict(positions=a["positions"].float())),
        "kv_indices_2d": ("kv_indices", dict(kv_indices=a["kv_indices"][None])),
        "last_page_len_len": ("kv_last_page_len", dict(kv_last_page_len=i32([4]))),
        "cache_rank": ("paged_kv_cache", dict(paged_kv_cache=cache[0, 0])),
        "cache_dim1": ("paged_kv_cache", dict(paged_kv_cache=torch.randn(4, 3, 4, 2, 16, device=device))),
        "cache_int": ("paged_kv_cache", dict(paged_kv_cache=cache.int())),
        "tuple_len": ("paged_kv_cache", dict(paged_kv_cache=(cache[:, 0],))),
        "tuple_pages": (r"paged_kv_cache\[1\]", dict(paged_kv_cache=(cache[:, 0], cache[:3, 1]))),
        "tuple_dtype": (r"paged_kv_cache\[1\]", dict(paged_kv_cache=(cache[:, 0], cache[:, 1].half()))),
        "tuple_rank": (r"paged_kv_cache\[1\]", dict(paged_kv_cache=(cache[:, 0], cache[:, 1, 0]))),
        # checked mode (data-reading) cases
        "position_past_pages": ("positions", dict(positions=i32([0, 8, 0]))),
        "position_negative": ("positions", dict(positions=i32([0, -1, 0]))),
        "batch_index_too_big": ("batch_indices", dict(batch_indices=i32([0, 2, 1]))),
        "page_id_out_of_range": ("kv_indices", dict(kv_indices=i32([2, 4, 1]))),
        "page_id_negative": ("kv_indices", dict(kv_indices=i32([2, 0, -1]))),
        "indptr_decreasing": ("kv_indptr", dict(kv_indptr=i32([0, 3, 2]))),
        "indices_too_short": ("kv_indices", dict(kv_indices=i32([2, 0]))),
    }
    name, change = changes[case]
    a.update(change)
    return a, name


CHECKED = ["position_past_pages", "position_negative", "batch_index_too_big", "page_id_out_of_range",
           "page_id_negative", "indptr_decreasing", "indices_too_short"]
ALWAYS = ["key_dtype", "key_heads", "key_dim", "key_rank", "key_last_stride", "value_rows", "batch_indices_len",
          "positions_float", "kv_indices_2d", "last_page_len_len", "cache_rank", "cache_dim1", "cache_int",
          "tuple_len", "tuple_pages", "tuple_dtype", "tuple_rank"]


@pytest.mark.parametrize("case", ALWAYS + CHECKED)
def test_append_bad_input(case, device):
    a, name = _bad_append_case(case, device)
    cache = a["paged_kv_cache"]
    before = [t.clone() for t in (cache if isinstance(cache, tuple) else (cache,))]
    with checked_mode() if case in CHECKED else contextlib.nullcontext():
        with pytest.raises(ValueError, match=f"^{name}"):
            fi.append_paged_kv_cache(**a)
    after = cache if isinstance(cache, tuple) else (cache,)
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "cache was modified"


def test_append_bad_layout_and_fp8(device):
    a, _ = _bad_append_case("key_dtype", device)
    a["append_key"] = a["append_value"]
    with pytest.raises(KeyError, match="kv_layout"):
        fi.append_paged_kv_cache(**dict(a, kv_layout="NDH"))
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(NotImplementedError, match="fp8"):
            fi.append_paged_kv_cache(**dict(a, paged_kv_cache=a["paged_kv_cache"].to(torch.float8_e4m3fn)))


# --------------------------------------------------------------------------- cache-form helper


@pytest.mark.parametrize("form", FORMS + ["4d", "3d_tuple"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_unpack_paged_kv_cache(layout, form):
    P, ps, H, D = 3, 4 if form in FORMS else 1, 2, 8
    k = torch.randn(P, ps, H, D)
    v = torch.randn(P, ps, H, D)
    cache = _to_form(k, v, layout, "5d" if form in ("5d", "4d") else "tuple")
    if form == "4d":
        cache = cache.squeeze(2 if layout == "NHD" else 3)
    if form == "3d_tuple":
        cache = tuple(c.squeeze(1 if layout == "NHD" else 2) for c in cache)
    u = _unpack_paged_kv_cache(cache, layout)
    assert torch.equal(u.k, k) and torch.equal(u.v, v)
    assert (u.num_pages, u.page_size, u.num_kv_heads, u.head_dim, u.head_dim_vo) == (P, ps, H, D, D)
    first = cache if isinstance(cache, torch.Tensor) else cache[0]
    assert u.op_args[0] is first and (u.op_args[1] is None) == isinstance(cache, torch.Tensor)
    assert u.k.data_ptr() == first.data_ptr()  # views, not copies


# --------------------------------------------------------------------------- packbits


@pytest.mark.parametrize("bitorder", ["big", "little"])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 37])
def test_packbits_matches_numpy(n, bitorder):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    got = fi.packbits(x, bitorder)
    assert got.dtype == torch.uint8
    assert got.tolist() == np.packbits(x.numpy(), bitorder=bitorder).tolist()


def test_packbits_examples_and_nonbool():
    x = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    assert fi.packbits(x).tolist() == [0b10110011]
    assert fi.packbits(x, bitorder="little").tolist() == [0b11001101]
    assert fi.packbits(torch.tensor([[0.0, 2.5], [-1.0, 0.0]])).tolist() == [0b01100000]  # flattened, nonzero = 1
    from torch_flashops.quantization import packbits, segment_packbits  # the flashinfer.quantization path

    assert packbits is fi.packbits and segment_packbits is fi.segment_packbits
    with pytest.raises(ValueError, match="^bitorder"):
        fi.packbits(x, bitorder="middle")


@pytest.mark.parametrize("bitorder", ["big", "little"])
def test_segment_packbits(bitorder):
    g = torch.Generator().manual_seed(1)
    lens = [0, 5, 8, 17, 0, 1, 9]
    x = torch.rand(sum(lens) + 3, generator=g) < 0.5  # longer than indptr[-1]: the tail is ignored
    for dt in (torch.int32, torch.int64):
        packed, new_indptr = fi.segment_packbits(x, _csr(lens, dt), bitorder)
        assert new_indptr.dtype == torch.int32 and new_indptr.tolist() == _csr([(n + 7) // 8 for n in lens]).tolist()
        ind = _csr(lens).tolist()
        exp = np.concatenate([np.packbits(x[ind[i]:ind[i + 1]].numpy(), bitorder=bitorder) for i in range(len(lens))])
        assert packed.tolist() == exp.tolist()
    x = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    if bitorder == "big":  # FlashInfer's docstring example
        assert fi.segment_packbits(x, torch.tensor([0, 4, 7, 11]))[0].tolist() == [0b10110000, 0b100000, 0b11010000]
    with pytest.raises(ValueError, match="^indptr"):
        fi.segment_packbits(x, torch.tensor([0, 4, 3]))
    with pytest.raises(ValueError, match="^x"):
        fi.segment_packbits(x, torch.tensor([0, 4, 12]))


def test_segment_packbits_is_the_attention_mask_layout():
    """Per-request masks packed little-endian from byte boundaries (spec §0.4): bit
    ``r*kv_len + j`` of request b is bit ``k % 8`` of byte ``new_indptr[b] + k // 8``."""
    g = torch.Generator().manual_seed(2)
    shapes = [(3, 5), (1, 1), (4, 4)]
    masks = [torch.rand(q, k, generator=g) < 0.5 for q, k in shapes]
    packed, new_indptr = fi.segment_packbits(torch.cat([m.flatten() for m in masks]),
                                             _csr([q * k for q, k in shapes]), bitorder="little")
    for b, m in enumerate(masks):
        for k, bit in enumerate(m.flatten().tolist()):
            byte = int(packed[int(new_indptr[b]) + k // 8])
            assert (byte >> (k % 8)) & 1 == bit


# --------------------------------------------------------------------------- gather (paged prefill)


def _gather_case(device, layout, form, n=37, P=6, ps=4, H=3, D=16, Dv=32, seed=8):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(P, ps, H, D, generator=g, dtype=torch.float32).half()
    v = torch.randn(P, ps, H, Dv, generator=g, dtype=torch.float32).half()
    page = torch.randint(0, P, (n,), generator=g)
    slot = torch.randint(0, ps, (n,), generator=g)
    page[3], page[5], page[7] = -1, P, 1 << 40  # ids outside the cache read page 0
    slot[9], slot[11] = -2, ps  # so do slots outside the page (slot 0)
    if form == "5d" and D != Dv:
        v = v[..., :D].contiguous()
    return k, v, _to_form(k.to(device), v.to(device), layout, form), page.to(device), slot.to(device)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("form", ["5d", "tuple"])
def test_gather_paged_kv(layout, form, device):
    """``flashops::gather_paged_kv`` copies K and V rows at (page, slot) into contiguous
    ``[N, H, D]`` tensors for every cache form and layout (D_v != D for pairs); ids and slots
    outside the cache read page 0 / slot 0 (checked against a plain loop over the rows)."""
    k, v, cache, page, slot = _gather_case(device, layout, form)
    args = (cache, None) if form == "5d" else cache
    ko, vo = OPS.gather_paged_kv(*args, layout, page, slot)
    assert ko.is_contiguous() and vo.is_contiguous() and ko.shape == (37, 3, 16)
    for i, (p, s) in enumerate(zip(page.tolist(), slot.tolist())):
        p = p if 0 <= p < k.shape[0] else 0
        s = s if 0 <= s < k.shape[1] else 0
        assert torch.equal(ko[i].cpu(), k[p, s]) and torch.equal(vo[i].cpu(), v[p, s])
    ps = torch.stack([page, slot], 1)  # the ids as strided 1-D views
    ko2, vo2 = OPS.gather_paged_kv(*args, layout, ps[:, 0], ps[:, 1])
    assert torch.equal(ko2, ko) and torch.equal(vo2, vo)
    empty = OPS.gather_paged_kv(*args, layout, page[:0], slot[:0])
    assert empty[0].shape == (0, 3, 16)
    with pytest.raises(ValueError, match="^slot"):
        OPS.gather_paged_kv(*args, layout, page, slot[:5])
    with pytest.raises(ValueError, match="^page"):
        OPS.gather_paged_kv(*args, layout, page.int(), slot)


# --------------------------------------------------------------------------- ops: opcheck, schemas


def _op_samples(device):
    g = torch.Generator().manual_seed(4)
    d = make_batch(g, B=3, page_size=4, H=2, D=16, pad_rows=1)
    to = lambda t: t.to(device)  # noqa: E731
    seq = ref.ref_seq_lens(d["kv_indptr"], d["kv_last_page_len"], 4)
    bi, pos = ref.ref_batch_indices_positions(d["append_indptr"], seq, d["nnz"])
    common = (to(d["key"].nan_to_num()), to(d["value"].nan_to_num()), to(bi), to(pos))
    tail = (to(d["kv_indices"]), to(d["kv_indptr"]))
    k, v = to(d["k_cache"]), to(d["v_cache"])
    return d, seq, [
        (OPS.append_paged_kv_cache.default, common + (_to_form(k, v, "NHD", "5d"), None) + tail + ("NHD",)),
        (OPS.append_paged_kv_cache.default, common + _to_form(k, v, "HND", "tuple") + tail + ("HND",)),
        (OPS.batch_indices_positions.default, (to(d["append_indptr"]), to(torch.tensor(seq, dtype=torch.int32)), d["nnz"])),
        (OPS.batch_indices_positions_out.default, (to(d["append_indptr"]), to(torch.tensor(seq, dtype=torch.int32)),
                                                   torch.zeros(d["nnz"], dtype=torch.int32, device=device),
                                                   torch.zeros(d["nnz"], dtype=torch.int32, device=device))),
        (OPS.gather_paged_kv.default, (_to_form(k, v, "HND", "5d"), None, "HND", to(torch.arange(7) % 5),
                                       to(torch.arange(7) % 4))),
    ]


@pytest.mark.parametrize("sample", range(5), ids=["append-5d", "append-tuple", "batch_indices_positions",
                                                  "batch_indices_positions_out", "gather"])
def test_opcheck(sample, device):
    op, args = _op_samples(device)[2][sample]
    torch.library.opcheck(op, args)


@needs_expecttest
class TestSchemas(SchemaTestCase):
    def test_append_paged_kv_cache(self):
        self.assertExpectedInline(str(OPS.append_paged_kv_cache.default._schema), """\
flashops::append_paged_kv_cache(Tensor append_key, Tensor append_value, Tensor batch_indices, Tensor positions, Tensor(a!) paged_kv_cache, Tensor(b!)? paged_v_cache, Tensor kv_indices, Tensor kv_indptr, str kv_layout) -> ()""")

    def test_batch_indices_positions(self):
        self.assertExpectedInline(str(OPS.batch_indices_positions.default._schema), """\
flashops::batch_indices_positions(Tensor append_indptr, Tensor seq_lens, SymInt nnz) -> (Tensor, Tensor)""")

    def test_gather_paged_kv(self):
        self.assertExpectedInline(str(OPS.gather_paged_kv.default._schema), """\
flashops::gather_paged_kv(Tensor paged_kv_cache, Tensor? paged_v_cache, str kv_layout, Tensor page, Tensor slot) -> (Tensor, Tensor)""")

    def test_batch_indices_positions_out(self):
        self.assertExpectedInline(str(OPS.batch_indices_positions_out.default._schema), """\
flashops::batch_indices_positions_out(Tensor append_indptr, Tensor seq_lens, Tensor(a!) batch_indices, Tensor(b!) positions) -> ()""")


# --------------------------------------------------------------------------- torch.compile


def _append_then_read(key, value, append_indptr, cache, kv_indices, kv_indptr, kv_last_page_len, layout="NHD"):
    """Append, then read the written rows back through the page table (a tiny attention stand-in)."""
    seq = fi.get_seq_lens(kv_indptr, kv_last_page_len, _unpack_paged_kv_cache(cache, layout).page_size)
    bi, pos = fi.get_batch_indices_positions(append_indptr, seq, key.shape[0])
    fi.append_paged_kv_cache(key, value, bi, pos, cache, kv_indices, kv_indptr, kv_last_page_len, layout)
    u = _unpack_paged_kv_cache(cache, layout)
    x = kv_indptr[bi.clamp(min=0)].long() * u.page_size + pos
    pages = kv_indices[x // u.page_size].long()
    return u.k[pages, x % u.page_size], u.v[pages, x % u.page_size], bi, pos


def test_compile_append_then_read_dynamic(device):
    """fullgraph + dynamic, for a 5-D NHD cache and an HND (k, v) pair: one frame across nnz
    values, the reads see the writes, the caller's cache is updated, and the generated code
    mutates it in place (no copy of the cache). One test, so one process pays Inductor's
    warm-up."""
    from torch._inductor.utils import run_and_get_code

    for form, layout in (("5d", "NHD"), ("tuple", "HND")):
        cc = CompileCounter(_append_then_read, dynamic=True)
        for i, seed in enumerate((21, 22, 23)):
            d = make_batch(torch.Generator().manual_seed(seed), B=4, page_size=4, H=2, D=16)
            to = lambda t: t.to(device)  # noqa: E731
            cache = _to_form(to(d["k_cache"]), to(d["v_cache"]), layout, form)
            args = (to(d["key"]), to(d["value"]), to(d["append_indptr"]), cache, to(d["kv_indices"]),
                    to(d["kv_indptr"]), to(d["kv_last_page_len"]), layout)
            if i == 0:
                (k_read, v_read, bi, pos), code = run_and_get_code(cc, *args)
                src = "\n".join(code)
                assert "flashops.append_paged_kv_cache" in src and "clone" not in src and ".copy_(" not in src, form
            else:
                k_read, v_read, bi, pos = cc(*args)
            ok = (bi >= 0).cpu()
            assert torch.equal(k_read.cpu()[ok], d["key"][ok]) and torch.equal(v_read.cpu()[ok], d["value"][ok])
            assert_cache_equal(cache, layout, *expected_cache(d, bi.cpu(), pos.cpu()))
        assert cc.frames == 1, f"{form}: {cc.frames} frames compiled (graph break or recompile)"
        assert cc.graph_ops().count("flashops.append_paged_kv_cache.default") == 1, form


class _CachedLayer(torch.nn.Module):
    """A layer that keeps its KV cache as a buffer and appends to it in forward."""

    def __init__(self, P, page_size, H, D, dtype, device):
        super().__init__()
        self.register_buffer("kv_cache", torch.randn(P, 2, page_size, H, D, device=device).to(dtype))

    def forward(self, key, value, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len):
        fi.append_paged_kv_cache(key, value, batch_indices, positions, self.kv_cache, kv_indices, kv_indptr,
                                 kv_last_page_len)
        return self.kv_cache[:, 0].float().sum(dim=(1, 2, 3))


def test_compile_cache_as_module_buffer_and_out_variant(device):
    d = make_batch(torch.Generator().manual_seed(31), B=3, page_size=5, H=2, D=16, pad_rows=2)
    to = lambda t: t.to(device)  # noqa: E731
    layer = _CachedLayer(d["P"], 5, 2, 16, torch.float16, device)
    layer.kv_cache.copy_(_to_form(to(d["k_cache"]), to(d["v_cache"]), "NHD", "5d"))
    eager_cache = layer.kv_cache.clone()

    def positions_into(append_indptr, seq_lens, bi_buf, pos_buf):
        return fi.get_batch_indices_positions(append_indptr, seq_lens, bi_buf.shape[0], bi_buf, pos_buf)

    seq = fi.get_seq_lens(to(d["kv_indptr"]), to(d["kv_last_page_len"]), 5)
    bufs = [torch.full((d["nnz"],), 99, dtype=torch.int32, device=device) for _ in range(2)]
    cp = CompileCounter(positions_into, backend="aot_eager")
    bi, pos = cp(to(d["append_indptr"]), seq, *bufs)
    assert bi is bufs[0] and pos is bufs[1] and (bufs[0][-2:] == -1).all() and cp.frames == 1
    exp_bi, exp_pos = ref.ref_batch_indices_positions(d["append_indptr"], seq.cpu(), d["nnz"])
    assert torch.equal(bufs[0].cpu(), exp_bi) and torch.equal(bufs[1].cpu(), exp_pos)

    args = (to(d["key"]), to(d["value"]), bi, pos, to(d["kv_indices"]), to(d["kv_indptr"]), to(d["kv_last_page_len"]))
    cc = CompileCounter(layer)
    out = cc(*args)
    assert cc.frames == 1
    assert_cache_equal(layer.kv_cache, "NHD", *expected_cache(d, exp_bi, exp_pos))
    fi.append_paged_kv_cache(*args[:4], eager_cache, *args[4:])
    assert torch.equal(layer.kv_cache, eager_cache)
    assert torch.allclose(out, eager_cache[:, 0].float().sum(dim=(1, 2, 3)))


# --------------------------------------------------------------------------- self-check


def test_selfcheck(device):
    from torch_flashops._selfcheck import _CHECKS

    results = _CHECKS["page"](device)
    assert {r.op for r in results} == {"batch_indices_positions", "batch_indices_positions_out", "get_seq_lens",
                                      "append_paged_kv_cache", "gather_paged_kv"}
    bad = [(r.op, r.note, r.max_err) for r in results if not r.ok]
    assert not bad, bad


# --------------------------------------------------------------------------- kernels compile for the GPU


def aot_compile_sm90() -> dict:
    """Compile both page kernels for an H100 (sm_90) without a GPU (PTX + cubin through Triton's
    bundled ptxas), specialised as a launch with H_kv=8, D=128 bf16 rows would be. Needs the
    real JIT: run without TRITON_INTERPRET."""
    from torch_flashops.ops import page as ops

    def build(fn, ptr_types, constexprs, aligned, num_warps):
        sig = {n: ptr_types.get(n, "i32") for n in fn.arg_names if n not in constexprs}
        out = compile_sm90(fn, sig, constexprs, aligned, num_warps)
        ptx = out["ptx"]
        return {"cubin_bytes": out["cubin_bytes"],
                "vector_loads": len([ln for ln in ptx.splitlines() if "ld.global" in ln and ".v4" in ln]),
                "vector_stores": len([ln for ln in ptx.splitlines() if "st.global" in ln and ".v4" in ln])}

    fn = ops._append_paged_kv_kernel
    cfg = ops._append_config(65536, 8, 128, 128)
    ptrs = {n: "*i32" for n in fn.arg_names if n.endswith("_ptr")}
    ptrs.update({n: "*bf16" for n in ("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr")})
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or "stride" in n or n in ("DK", "DV", "page_size")]
    append = build(fn, ptrs, {k: v for k, v in cfg.items() if k.startswith("BLOCK")}, aligned, cfg["num_warps"])
    fn = ops._batch_indices_positions_kernel
    positions = build(fn, {n: "*i32" for n in fn.arg_names if n.endswith("_ptr")}, {"BLOCK": 1024},
                      [n for n in fn.arg_names if n.endswith("_ptr")], 4)
    return {"append": append, "positions": positions}


def test_kernels_compile_for_sm90_without_gpu():
    """Catches what the interpreter lets through; the append copy must use 16-byte accesses."""
    info = run_without_interpreter("import json; from tests.test_page import aot_compile_sm90; "
                                   "print(json.dumps(aot_compile_sm90()))")
    assert info["positions"]["cubin_bytes"] > 0
    a = info["append"]
    assert a["cubin_bytes"] > 0 and a["vector_loads"] >= 2 and a["vector_stores"] >= 2, a


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_gpu_reduce_overhead_cache_buffer_no_cudagraph_skips():
    """mode="reduce-overhead" with the cache as a module buffer: captured (0 cudagraph skips),
    replays write the cache."""
    from torch._dynamo.utils import counters

    d = make_batch(torch.Generator().manual_seed(41), B=6, page_size=16, H=8, D=128, dtype=torch.bfloat16)
    to = lambda t: t.cuda()  # noqa: E731
    layer = _CachedLayer(d["P"], 16, 8, 128, torch.bfloat16, "cuda")
    start = _to_form(to(d["k_cache"]), to(d["v_cache"]), "NHD", "5d")
    seq = fi.get_seq_lens(to(d["kv_indptr"]), to(d["kv_last_page_len"]), 16)
    bi, pos = fi.get_batch_indices_positions(to(d["append_indptr"]), seq, d["nnz"])
    args = (to(d["key"]), to(d["value"]), bi, pos, to(d["kv_indices"]), to(d["kv_indptr"]), to(d["kv_last_page_len"]))
    counters.clear()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        layer.kv_cache.copy_(start)
        compiled(*args)
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert_cache_equal(layer.kv_cache, "NHD", *expected_cache(d, bi.cpu(), pos.cpu()))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_append_model_shapes(layout):
    """Model-sized heads (H_kv=8, D=128, bf16) with shuffled pages and padding rows."""
    d = make_batch(torch.Generator().manual_seed(42), B=16, page_size=16, H=8, D=128, dtype=torch.bfloat16,
                   pad_rows=5, shared_pages=4)
    cache, bi, pos = run_append(d, "cuda", layout, "5d")
    assert_cache_equal(cache, layout, *expected_cache(d, bi.cpu(), pos.cpu()))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_append_on_second_device():
    """The launchers run on the tensors' GPU, not the current one."""
    d = make_batch(torch.Generator().manual_seed(43), B=4, page_size=16, H=2, D=64, dtype=torch.float16)
    cache, bi, pos = run_append(d, "cuda:1", "NHD", "tuple")
    assert_cache_equal(cache, "NHD", *expected_cache(d, bi.cpu(), pos.cpu()))
