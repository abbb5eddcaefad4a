"""RoPE family (spec/rope.md §7): kernels vs the fp64 oracle, independent oracles, model configs,
opcheck, torch.compile, schema snapshots and bad input.

On CPU the Triton kernels run in the interpreter (tests/conftest.py), so shapes stay small.
Out-of-place outputs are allocated inside the ops; they are poisoned by running with
deterministic algorithms on, which makes ``torch.empty`` fill float memory with NaN.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_flashops as fo
from tests.helpers import CompileCounter, SchemaTestCase, assert_close, needs_expecttest
from torch_flashops import _config, _selfcheck
from torch_flashops.ops import rope as rope_ops
from torch_flashops.reference import rope as ref

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LLAMA31_DEFAULTS = dict(rope_scale=8.0, rope_theta=5e5, llama31=(1.0, 4.0, 8192.0))


# --------------------------------------------------------------------------- helpers


def packed_qk(nnz, hq, hk, d, dtype, device, seed=0):
    """``(qkv, q, k)``: q ``[nnz, hq, d]`` and k ``[nnz, hk, d]`` are views of one random packed
    ``qkv [nnz, (hq + 2 hk) d]`` buffer (the v part is the untouched neighbour)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(nnz, (hq + 2 * hk) * d, generator=g).to(device, dtype)
    return qkv, qkv[:, : hq * d].view(nnz, hq, d), qkv[:, hq * d : (hq + hk) * d].view(nnz, hk, d)


def head_major_qk(nnz, hq, hk, d, dtype, device, seed=0):
    """q, k stored head-major ``[H, nnz, d]`` and viewed ``[nnz, H, d]`` (strides (d, nnz d, 1))."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, nnz, d, generator=g).to(device, dtype).transpose(0, 1)
    k = torch.randn(hk, nnz, d, generator=g).to(device, dtype).transpose(0, 1)
    return q, k


def oracle(x, pos, rd, interleave, rope_scale=1.0, rope_theta=1e4, llama31=None):
    """fp64 expected output of the pos_ids form (spec §6)."""
    return ref.ref_rope_pos_ids(x.cpu(), pos.cpu(), rd, ref.rope_freqs(rd, rope_theta, rope_scale, llama31), interleave)


def assert_rope_close(name, actual, expected, pos=None):
    """Spec §7 tolerance: per-dtype atol/rtol, plus ``|pos| * 2^-22`` of atol for tokens at
    positions >= 512 (an ulp of frequency grows into the angle). ``pos`` None: base tolerance."""
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    if pos is not None:
        p = pos.detach().cpu().double().abs()
        extra = torch.where(p < 512, 0.0, p * 2.0**-22).view(-1, *([1] * (a.dim() - 1)))
        d = a - e
        a = e + d.sign() * (d.abs() - extra).clamp_min(0.0)  # NaN stays NaN
    assert_close(name, a, e, dtype=actual.dtype)


def ragged(lengths, offsets, device, dtype=torch.int64):
    """CSR ``indptr`` from request lengths, plus ``offsets``; and the expanded positions."""
    indptr = torch.tensor([0] + list(torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist() if lengths else []), dtype=dtype)
    offs = torch.tensor(offsets, dtype=dtype)
    pos = ref.positions_from_indptr(indptr, offs, int(indptr[-1]))
    return indptr.to(device), offs.to(device), pos


def rope_call(form, inplace, q, k, positions, rd=None, interleave=False, rope_scale=1.0, rope_theta=1e4, llama31=None):
    """Dispatch to the matching public function; returns the outputs (for in-place: q, k)."""
    kw = dict(rotary_dim=rd, interleave=interleave, rope_scale=rope_scale, rope_theta=rope_theta)
    if llama31 is not None:
        kw.update(low_freq_factor=llama31[0], high_freq_factor=llama31[1], old_context_len=llama31[2])
    name = "apply_llama31_rope" if llama31 is not None else "apply_rope"
    name += "_pos_ids" if form == "pos_ids" else ""
    name += "_inplace" if inplace else ""
    fn = getattr(fo, name)
    if inplace:
        assert fn(q, k, *positions, **kw) is None
        return q, k
    return fn(q, k, *positions, **kw)


# --------------------------------------------------------------------------- correctness matrix


@pytest.mark.parametrize("interleave", [False, True], ids=["half", "interleave"])
@pytest.mark.parametrize("rd_frac", [0.25, 0.5, 0.75, 1.0], ids=["rd=D/4", "rd=D/2", "rd=3D/4", "rd=D"])
@pytest.mark.parametrize("d", [64, 128, 256], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_rope_pos_ids_matrix(device, nan_empty, dtype, d, rd_frac, interleave):
    """Out-of-place vs the oracle, in-place == out-of-place bitwise, neighbours untouched."""
    dt, rd = DTYPES[dtype], int(d * rd_frac)
    nnz, hq, hk = 7, 5, 1
    qkv, q, k = packed_qk(nnz, hq, hk, d, dt, device)
    pos = torch.randint(0, 512, (nnz,), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(device)
    q_out, k_out = fo.apply_rope_pos_ids(q, k, pos, rd, interleave)
    assert q_out.is_contiguous() and k_out.is_contiguous() and q_out.dtype == dt and q_out.shape == q.shape
    assert_rope_close("q_out", q_out, oracle(q, pos, rd, interleave))
    assert_rope_close("k_out", k_out, oracle(k, pos, rd, interleave))
    before = qkv.clone()
    assert fo.apply_rope_pos_ids_inplace(q, k, pos, rd, interleave) is None
    assert torch.equal(q, q_out) and torch.equal(k, k_out), "in-place differs from out-of-place"
    assert torch.equal(qkv[:, (hq + hk) * d :], before[:, (hq + hk) * d :]), "v part of qkv was written"
    assert torch.equal(q[..., rd:], before[:, : hq * d].view(nnz, hq, d)[..., rd:]), "q[..., rd:] was written"


@pytest.mark.parametrize("nnz", [0, 1, 7, 1000], ids=lambda n: f"nnz{n}")
@pytest.mark.parametrize("heads", [(32, 8), (5, 1)], ids=["H32-8", "H5-1"])
def test_rope_nnz_heads(device, nan_empty, nnz, heads):
    hq, hk = heads
    d, rd, dt = 64, 64, torch.bfloat16
    qkv, q, k = packed_qk(nnz, hq, hk, d, dt, device)
    pos = torch.randint(0, 500, (nnz,), generator=torch.Generator().manual_seed(2)).to(device)
    q_out, k_out = fo.apply_rope_pos_ids(q, k, pos)
    assert q_out.shape == (nnz, hq, d) and k_out.shape == (nnz, hk, d)
    assert_rope_close("q_out", q_out, oracle(q, pos, rd, False))
    assert_rope_close("k_out", k_out, oracle(k, pos, rd, False))
    fo.apply_rope_pos_ids_inplace(q, k, pos)
    assert torch.equal(q, q_out) and torch.equal(k, k_out)


@pytest.mark.parametrize("interleave", [False, True], ids=["half", "interleave"])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_rope_large_and_negative_positions(device, nan_empty, pos_dtype, interleave):
    """Positions up to 2^20 and below 0, fp32: the position-dependent tolerance of §7."""
    nnz, d, rd = 64, 64, 48
    _, q, k = packed_qk(nnz, 3, 2, d, torch.float32, device)
    g = torch.Generator().manual_seed(3)
    pos = torch.cat([torch.randint(0, 2**20, (nnz - 8,), generator=g), torch.tensor([2**20, 2**20 - 1, 0, -1, -7, -4096, -(2**20), 511])])
    pos = pos.to(device, pos_dtype)
    q_out, k_out = fo.apply_rope_pos_ids(q, k, pos, rd, interleave, rope_scale=2.0, rope_theta=5e4)
    assert_rope_close("q_out", q_out, oracle(q, pos, rd, interleave, 2.0, 5e4), pos)
    assert_rope_close("k_out", k_out, oracle(k, pos, rd, interleave, 2.0, 5e4), pos)


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_rope_head_major_strides(device, nan_empty, inplace):
    """Non-contiguous q/k (head-major storage) are read and written through their strides."""
    q, k = head_major_qk(9, 3, 2, 32, torch.float16, device)
    assert not q.is_contiguous()
    pos = torch.arange(100, 109, device=device)
    exp_q, exp_k = oracle(q, pos, 16, True), oracle(k, pos, 16, True)
    q_out, k_out = rope_call("pos_ids", inplace, q, k, (pos,), 16, True)
    assert_rope_close("q", q_out, exp_q)
    assert_rope_close("k", k_out, exp_k)


def test_rope_gpu_tiles_small_blocks(device, nan_empty):
    """The GPU launch configuration and a forced tiny one (several token blocks, head blocks
    split over programs, ragged head counts) give the same bits as the default one."""
    nnz, hq, hk, d = 11, 32, 8, 128
    _, q, k = packed_qk(nnz, hq, hk, d, torch.bfloat16, device)
    pos = torch.randint(0, 4000, (nnz,), generator=torch.Generator().manual_seed(4)).to(device)
    for interleave, rd in ((False, 128), (True, 96)):
        base = fo.apply_rope_pos_ids(q, k, pos, rd, interleave)
        assert_rope_close("q", base[0], oracle(q, pos, rd, interleave))
        gpu_cfg = rope_ops._launch_config(nnz, hq, hk, d, rd, interpreting=False)
        for cfg in (gpu_cfg, dict(BLOCK_T=2, BLOCK_H=4, G=3, num_warps=4), dict(BLOCK_T=4, BLOCK_H=16, G=1, num_warps=4)):
            with rope_ops.launch_config(**cfg):
                got = fo.apply_rope_pos_ids(q, k, pos, rd, interleave)
            assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1]), f"config {cfg}"


def test_rope_empty(device, nan_empty):
    """nnz == 0 and B == 0: every entry point returns empty outputs / does nothing."""
    _, q, k = packed_qk(0, 4, 2, 32, torch.bfloat16, device)
    pos = torch.zeros(0, dtype=torch.int64, device=device)
    for indptr, offs in ((torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(0, dtype=torch.int32, device=device)),
                         (torch.zeros(3, dtype=torch.int64, device=device), torch.tensor([4, 5], device=device))):
        for fn in (fo.apply_rope, fo.apply_llama31_rope):
            qo, ko = fn(q, k, indptr, offs)
            assert qo.shape == (0, 4, 32) and ko.shape == (0, 2, 32)
        assert fo.apply_rope_inplace(q, k, indptr, offs) is None
    qo, ko = fo.apply_rope_pos_ids(q, k, pos, 16, True)
    assert qo.shape == q.shape and ko.shape == k.shape
    fo.apply_llama31_rope_pos_ids_inplace(q, k, pos)
    qo, ko = fo.apply_rope_with_cos_sin_cache(pos, q.reshape(0, 128), k.reshape(0, 64), 32, torch.rand(8, 32, device=device))
    assert qo.shape == (0, 128) and ko.shape == (0, 64)


# --------------------------------------------------------------------------- positions / indptr form


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize(
    "lengths, offsets",
    [([5], [0]), ([3, 0, 4, 0], [10, 7, 0, 99]), ([0, 0], [1, 2]), ([1] * 9, list(range(100, 109))), ([], [])],
    ids=["one", "empty-segments", "all-empty", "decode-batch", "B0"],
)
def test_rope_positions_op(device, nan_empty, lengths, offsets, idx_dtype):
    indptr, offs, pos = ragged(lengths, offsets, device, idx_dtype)
    got = rope_ops.rope_positions(indptr, offs, pos.shape[0])
    assert got.dtype == idx_dtype and got.shape == pos.shape
    assert torch.equal(got.cpu(), pos)


@pytest.mark.parametrize("llama", [False, True], ids=["linear", "llama31"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_rope_indptr_equals_pos_ids_bitwise(device, nan_empty, inplace, llama):
    """Ragged batch with empty requests and nonzero offsets: indptr form == pos_ids form, bitwise."""
    indptr, offs, pos = ragged([4, 0, 1, 6, 0], [0, 5, 3000, 17, 2], device, torch.int32)
    nnz = pos.shape[0]
    l31 = LLAMA31_DEFAULTS["llama31"] if llama else None
    outs = []
    for form, positions in (("indptr", (indptr, offs)), ("pos_ids", (pos.to(device),))):
        _, q, k = packed_qk(nnz, 4, 2, 64, torch.bfloat16, device)
        outs.append([x.clone() for x in rope_call(form, inplace, q, k, positions, 32, False, 8.0, 5e5, l31)])
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    _, q, k = packed_qk(nnz, 4, 2, 64, torch.bfloat16, device)
    assert_rope_close("q", outs[0][0], oracle(q, pos, 32, False, 8.0, 5e5, l31))


# --------------------------------------------------------------------------- independent oracles


@pytest.mark.parametrize("rd", [16, 24, 64], ids=lambda r: f"rd{r}")
def test_interleave_vs_complex_form(device, nan_empty, rd):
    """interleave=True == multiplying ``x[2i] + i x[2i+1]`` by ``e^{i theta}`` (Meta's form)."""
    nnz, hq, hk, d = 10, 3, 1, 64
    _, q, k = packed_qk(nnz, hq, hk, d, torch.float32, device)
    pos = torch.randint(-100, 3000, (nnz,), generator=torch.Generator().manual_seed(5)).to(device)
    q_out, k_out = fo.apply_rope_pos_ids(q, k, pos, rd, interleave=True, rope_theta=1e4)
    i = torch.arange(rd // 2, dtype=torch.float64)
    freqs = (1e4 ** (-2.0 * i / rd)).float()  # fp32 frequencies, computed here on purpose
    theta = (pos.cpu().float()[:, None] * freqs[None, :]).double()
    for name, x, out in (("q", q, q_out), ("k", k, k_out)):
        xc = torch.view_as_complex(x.cpu().double()[..., :rd].reshape(nnz, -1, rd // 2, 2).contiguous())
        yc = xc * torch.polar(torch.ones_like(theta), theta)[:, None, :]
        exp = x.cpu().double().clone()
        exp[..., :rd] = torch.view_as_real(yc).reshape(nnz, -1, rd)
        assert_rope_close(name, out, exp, pos)


@pytest.mark.parametrize("rope_scale,rope_theta", [(2.0, 1e4), (0.5, 5e5)])
def test_rope_scale_with_independent_frequencies(device, nan_empty, rope_scale, rope_theta):
    """rope_scale / rope_theta against frequencies built here (``theta^(-2i/rd) / scale``), not
    with the reference's ``rope_freqs``, which the kernels share: a wrong scale in that table
    would otherwise pass every oracle comparison."""
    nnz, hq, hk, d, rd = 9, 2, 1, 32, 24
    _, q, k = packed_qk(nnz, hq, hk, d, torch.float32, device)
    pos = torch.randint(0, 5000, (nnz,), generator=torch.Generator().manual_seed(8)).to(device)
    q_out, k_out = fo.apply_rope_pos_ids(q, k, pos, rd, rope_scale=rope_scale, rope_theta=rope_theta)
    i = torch.arange(rd // 2, dtype=torch.float64)
    freqs = (rope_theta ** (-2.0 * i / rd) / rope_scale).float()
    ang = (pos.cpu().float()[:, None] * freqs[None, :]).double()[:, None, :]
    for name, x, out in (("q", q, q_out), ("k", k, k_out)):
        x = x.cpu().double()
        x1, x2 = x[..., : rd // 2], x[..., rd // 2 : rd]
        exp = x.clone()
        exp[..., : rd // 2] = x1 * ang.cos() - x2 * ang.sin()
        exp[..., rd // 2 : rd] = x2 * ang.cos() + x1 * ang.sin()
        assert_rope_close(name, out, exp, pos)


def _llama31_freqs_by_wavelength(rd, theta, scale, lf, hf, old_len):
    """Meta's/HF's "llama3" rope scaling, written with the wavelength branches (spec §1)."""
    out = []
    for i in range(rd // 2):
        f = theta ** (-2.0 * i / rd)
        wavelen = 2 * math.pi / f
        if wavelen < old_len / hf:
            out.append(f)
        elif wavelen > old_len / lf:
            out.append(f / scale)
        else:
            smooth = (old_len / wavelen - lf) / (hf - lf)
            out.append((1 - smooth) * f / scale + smooth * f)
    return torch.tensor(out, dtype=torch.float64).float()


@pytest.mark.parametrize("params", [(128, 5e5, 8.0, 1.0, 4.0, 8192.0), (64, 1e4, 4.0, 2.0, 8.0, 2048.0), (96, 5e5, 32.0, 1.0, 4.0, 8192.0)],
                         ids=["llama3.1-8B", "custom", "rd96-factor32"])
def test_llama31_vs_wavelength_branches(device, nan_empty, params):
    rd, theta, scale, lf, hf, old_len = params
    f_branch = _llama31_freqs_by_wavelength(rd, theta, scale, lf, hf, old_len)
    torch.testing.assert_close(ref.rope_freqs(rd, theta, scale, (lf, hf, old_len)), f_branch, rtol=2e-7, atol=0)
    assert (f_branch < ref.rope_freqs(rd, theta, 1.0)).any() and (f_branch == ref.rope_freqs(rd, theta, 1.0)).any()
    nnz = 9
    _, q, k = packed_qk(nnz, 2, 1, rd, torch.float32, device)
    pos = torch.tensor([0, 1, 511, 8191, 8192, 20000, 65535, 131071, 3]).to(device)
    q_out, k_out = fo.apply_llama31_rope_pos_ids(q, k, pos, None, False, scale, theta, lf, hf, old_len)
    for name, x, out in (("q", q, q_out), ("k", k, k_out)):
        exp = ref.ref_rope_pos_ids(x.cpu(), pos.cpu(), rd, f_branch, False)
        assert_rope_close(name, out, exp, pos)


@pytest.mark.parametrize("layout", ["2d", "3d"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_cos_sin_cache_equivalence(device, nan_empty, is_neox, layout):
    """A vLLM-built fp32 cache gives apply_rope_pos_ids' result up to sin/cos rounding; and
    exactly the cache oracle; in-place on packed 2-D views == out-of-place."""
    nnz, hq, hk, hs, rd, max_pos = 12, 4, 2, 64, 32, 4096
    qkv, q, k = packed_qk(nnz, hq, hk, hs, torch.float16, device)
    freqs = ref.rope_freqs(rd, 1e4, 1.0)
    t = torch.arange(max_pos, dtype=torch.float32)
    cache = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1).to(device)
    pos = torch.randint(0, max_pos, (nnz,), generator=torch.Generator().manual_seed(6)).to(device)
    query, key = (qkv[:, : hq * hs], qkv[:, hq * hs : (hq + hk) * hs]) if layout == "2d" else (q, k)
    q_out, k_out = fo.apply_rope_with_cos_sin_cache(pos, query, key, hs, cache, is_neox)
    assert q_out.shape == query.shape and k_out.shape == key.shape and q_out.is_contiguous()
    exp_q, exp_k = ref.ref_rope_cos_sin_cache(pos.cpu(), query.cpu(), key.cpu(), hs, cache.cpu(), is_neox)
    assert_rope_close("query_out", q_out, exp_q)  # base tolerance at any position
    assert_rope_close("key_out", k_out, exp_k)
    pq, pk = fo.apply_rope_pos_ids(q, k, pos, rd, interleave=not is_neox)
    assert_close("query_out vs pos_ids form", q_out.reshape(pq.shape), pq, atol=2e-3, rtol=2e-3)
    assert_close("key_out vs pos_ids form", k_out.reshape(pk.shape), pk, atol=2e-3, rtol=2e-3)
    before = qkv.clone()
    assert fo.apply_rope_with_cos_sin_cache_inplace(pos, query, key, hs, cache, is_neox) is None
    assert torch.equal(query, q_out) and torch.equal(key, k_out)
    assert torch.equal(qkv[:, (hq + hk) * hs :], before[:, (hq + hk) * hs :])


@pytest.mark.parametrize("layout", ["2d", "3d"])
def test_cos_sin_cache_empty_batch(device, nan_empty, layout):
    """nnz = 0 (spec §7): op and oracle both give empty outputs of the input shapes."""
    hs, rd = 16, 8
    cache = torch.randn(32, rd).to(device)
    pos = torch.zeros(0, dtype=torch.int64, device=device)
    query, key = ((torch.randn(0, 2 * hs), torch.randn(0, hs)) if layout == "2d"
                  else (torch.randn(0, 2, hs), torch.randn(0, 1, hs)))
    query, key = query.to(device), key.to(device)
    q_out, k_out = fo.apply_rope_with_cos_sin_cache(pos, query, key, hs, cache, True)
    exp_q, exp_k = ref.ref_rope_cos_sin_cache(pos.cpu(), query.cpu(), key.cpu(), hs, cache.cpu(), True)
    assert q_out.shape == exp_q.shape == query.shape and k_out.shape == exp_k.shape == key.shape


def test_cos_sin_cache_out_of_range_gives_nan(device, nan_empty):
    """Unchecked mode never reads outside the cache: such rows come out NaN (not garbage)."""
    _, q, k = packed_qk(3, 1, 1, 8, torch.float32, device)
    cache = torch.rand(10, 8, device=device)
    qo, _ = fo.apply_rope_with_cos_sin_cache(torch.tensor([0, 10, -1], device=device), q, k, 8, cache)
    assert not qo[0].isnan().any() and qo[1:].isnan().all()


# --------------------------------------------------------------------------- model configurations

MODELS = {
    # name: (H_q, H_k, D, rotary_dim, interleave, dtype, options)
    "llama-3.1-8b": (32, 8, 128, None, False, torch.bfloat16, LLAMA31_DEFAULTS),
    "llama-2-7b": (32, 32, 128, None, False, torch.float16, dict(rope_theta=1e4)),
    "qwen3-8b": (32, 8, 128, None, False, torch.bfloat16, dict(rope_theta=1e6)),
    "gpt-neox-20b": (64, 64, 96, 24, False, torch.float16, dict(rope_theta=1e4)),
    "gpt-j-6b": (16, 16, 256, 64, True, torch.float16, dict(rope_theta=1e4)),
    "phi-2": (32, 32, 80, 32, False, torch.float16, dict(rope_theta=1e4)),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_model_configs(device, nan_empty, model):
    """A prefill of 2 requests + a decode token per model, through the indptr form in place."""
    hq, hk, d, rd, interleave, dt, opts = MODELS[model]
    indptr, offs, pos = ragged([5, 0, 3, 1], [0, 40, 1000, 100000], device)
    qkv, q, k = packed_qk(pos.shape[0], hq, hk, d, dt, device)
    exp = [oracle(x, pos, rd or d, interleave, opts.get("rope_scale", 1.0), opts["rope_theta"], opts.get("llama31")) for x in (q, k)]
    before = qkv.clone()
    rope_call("indptr", True, q, k, (indptr, offs), rd, interleave, **opts)
    assert_rope_close("q", q, exp[0], pos)
    assert_rope_close("k", k, exp[1], pos)
    assert torch.equal(qkv[:, (hq + hk) * d :], before[:, (hq + hk) * d :])


# --------------------------------------------------------------------------- fuzzing


@st.composite
def rope_cases(draw):
    lengths = draw(st.lists(st.integers(0, 6), min_size=0, max_size=4))
    d = draw(st.sampled_from([8, 16, 32, 48, 64, 80]))
    return dict(
        lengths=lengths,
        offsets=[draw(st.integers(-50, 5000)) for _ in lengths],
        hq=draw(st.integers(1, 6)),
        hk=draw(st.integers(1, 3)),
        d=d,
        rd=2 * draw(st.integers(1, d // 2)),
        interleave=draw(st.booleans()),
        dtype=draw(st.sampled_from(list(DTYPES))),
        form=draw(st.sampled_from(["indptr", "pos_ids"])),
        inplace=draw(st.booleans()),
        llama=draw(st.booleans()),
        idx=draw(st.sampled_from([torch.int32, torch.int64])),
    )


@settings(parent=settings.default,  # the loaded profile (ci / gpu); the device fixture is per-test but constant
          suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])
@given(case=rope_cases())
def test_rope_fuzz(device, case):
    indptr, offs, pos = ragged(case["lengths"], case["offsets"], device, case["idx"])
    nnz = pos.shape[0]
    qkv, q, k = packed_qk(nnz, case["hq"], case["hk"], case["d"], DTYPES[case["dtype"]], device)
    l31 = (1.0, 4.0, 64.0) if case["llama"] else None
    exp = [oracle(x, pos, case["rd"], case["interleave"], 2.0, 1e4, l31) for x in (q, k)]
    positions = (indptr, offs) if case["form"] == "indptr" else (pos.to(device),)
    out = rope_call(case["form"], case["inplace"], q, k, positions, case["rd"], case["interleave"], 2.0, 1e4, l31)
    assert_rope_close("q", out[0], exp[0], pos)
    assert_rope_close("k", out[1], exp[1], pos)


# --------------------------------------------------------------------------- op contract


def _op_args(device, views=False):
    """Arguments for each op, fresh tensors per op (same values); q, k packed views or contiguous."""
    nnz, hq, hk, d = 6, 3, 2, 32

    def qk():
        _, q, k = packed_qk(nnz, hq, hk, d, torch.float16, device)
        return (q, k) if views else (q.contiguous(), k.contiguous())

    pos = torch.arange(3, 3 + nnz, device=device)
    cache = torch.rand(16, 16, generator=torch.Generator().manual_seed(7)).to(device)
    opts = (24, False, 1.0, 1e4, True, 1.0, 4.0, 8192.0)
    return {
        "rope": (*qk(), pos, *opts),
        "rope_inplace": (*qk(), pos, *opts),
        "rope_cos_sin_cache": (*qk(), pos, cache, True),
        "rope_cos_sin_cache_inplace": (*qk(), pos, cache, True),
        "rope_positions": (torch.tensor([0, 2, 2, nnz], device=device), torch.tensor([5, 0, 9], device=device), nnz),
    }


@pytest.mark.parametrize(
    "name, views",
    [(n, v) for n in ("rope", "rope_inplace", "rope_cos_sin_cache", "rope_cos_sin_cache_inplace") for v in (False, True)]
    + [("rope_positions", False)],
    ids=lambda x: {False: "contiguous", True: "qkv-views"}.get(x, x) if isinstance(x, bool) else x,
)
def test_opcheck(device, name, views):
    op = getattr(torch.ops.flashops, name).default
    torch.library.opcheck(op, _op_args(device, views)[name])


@needs_expecttest
class TestRopeSchemas(SchemaTestCase):
    """The ops' schema strings (a contract change shows in review)."""

    def test_schemas(self):
        s = {n: str(getattr(torch.ops.flashops, n).default._schema) for n in
             ("rope", "rope_inplace", "rope_cos_sin_cache", "rope_cos_sin_cache_inplace", "rope_positions")}
        self.assertExpectedInline(s["rope"], """flashops::rope(Tensor q, Tensor k, Tensor pos_ids, int rotary_dim, bool interleave, float rope_scale, float rope_theta, bool llama31, float low_freq_factor, float high_freq_factor, float old_context_len) -> (Tensor, Tensor)""")
        self.assertExpectedInline(s["rope_inplace"], """flashops::rope_inplace(Tensor(a!) q, Tensor(b!) k, Tensor pos_ids, int rotary_dim, bool interleave, float rope_scale, float rope_theta, bool llama31, float low_freq_factor, float high_freq_factor, float old_context_len) -> ()""")
        self.assertExpectedInline(s["rope_cos_sin_cache"], """flashops::rope_cos_sin_cache(Tensor q, Tensor k, Tensor positions, Tensor cos_sin_cache, bool interleave) -> (Tensor, Tensor)""")
        self.assertExpectedInline(s["rope_cos_sin_cache_inplace"], """flashops::rope_cos_sin_cache_inplace(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin_cache, bool interleave) -> ()""")
        self.assertExpectedInline(s["rope_positions"], """flashops::rope_positions(Tensor indptr, Tensor offsets, SymInt nnz) -> Tensor""")


def test_cpu_reference_backend(nan_empty):
    """The plain-PyTorch CPU backend honours each op's contract and agrees with the kernels."""
    args = _op_args("cpu", views=True)
    old = _config._cpu_backend
    results = {}
    try:
        for backend in ["reference"] + (["triton"] if _config.interpreting() else []):
            _config.set_cpu_backend(backend)
            a = _op_args("cpu", views=True)
            got = {n: getattr(torch.ops.flashops, n).default(*a[n]) for n in ("rope", "rope_cos_sin_cache", "rope_positions")}
            for n in ("rope_inplace", "rope_cos_sin_cache_inplace"):
                getattr(torch.ops.flashops, n).default(*a[n])
                got[n] = a[n][:2]
            results[backend] = got
    finally:
        _config.set_cpu_backend(old)
    r = results["reference"]
    assert all(x.is_contiguous() for x in r["rope"]) and r["rope"][0].dtype == torch.float16
    exp = [oracle(x, args["rope"][2], 24, False, 1.0, 1e4, (1.0, 4.0, 8192.0)) for x in args["rope"][:2]]
    for n in ("rope", "rope_inplace"):
        assert_rope_close(f"{n} q", r[n][0], exp[0])
        assert_rope_close(f"{n} k", r[n][1], exp[1])
    for n, got in results.get("triton", {}).items():
        for a, b in zip(got if isinstance(got, (tuple, list)) else [got], r[n] if isinstance(r[n], (tuple, list)) else [r[n]]):
            if a.is_floating_point():
                assert_close(n, a, b)
            else:
                assert torch.equal(a, b), n


def test_selfcheck(device):
    results = _selfcheck._CHECKS["rope"](device)
    assert {r.op for r in results} == set(rope_ops.__all__)
    assert all(r.ok for r in results), [(r.op, r.max_err, r.note) for r in results if not r.ok]


# --------------------------------------------------------------------------- torch.compile


def test_compile_dynamic_nnz_no_recompile(device):
    """All three position forms in one fullgraph, dynamic over nnz and B: one frame, no recompile."""

    def f(q, k, indptr, offsets, pos_ids):
        a = fo.apply_llama31_rope(q * 2, k, indptr, offsets)
        b = fo.apply_rope_pos_ids(q, k, pos_ids, 32, True)
        n = q.shape[0]
        c = fo.apply_rope_with_cos_sin_cache(pos_ids, q.reshape(n, -1), k.reshape(n, -1), 64, cache, False)
        return a[0] + 1, a[1], b[0], b[1], c[0] * 2, c[1]

    cache = torch.rand(128, 16, device=device)

    cc = CompileCounter(f, dynamic=True)
    # first call: all sizes distinct (nnz 7, B 2, B+1 3, H 6/5, D 64), so duck sizing ties none together
    for lengths, offsets in (([3, 4], [7, 0]), ([4, 0, 5], [1, 2, 3]), ([2, 6, 1, 3], [9, 0, 4, 100])):
        indptr, offs, pos = ragged(lengths, offsets, device)
        _, q, k = packed_qk(pos.shape[0], 6, 5, 64, torch.float16, device)
        got = cc(q, k, indptr, offs, pos.to(device))
        exp = f(q, k, indptr, offs, pos.to(device))
        for g, e in zip(got, exp):
            assert torch.equal(g, e)
    assert cc.frames == 1, f"{cc.frames} frames: graph break or recompile"
    assert {"flashops.rope.default", "flashops.rope_positions.default", "flashops.rope_cos_sin_cache.default"} <= set(cc.graph_ops())


def test_compile_inplace_packed_qkv_visible(device):
    """In-place RoPE on views of a packed qkv buffer inside a compiled function: the caller's
    buffer is updated (q and k parts), v untouched, and equals eager."""
    hq, hk, d = 4, 2, 32

    def f(qkv, pos, indptr, offsets):
        nnz = qkv.shape[0]
        q = qkv[:, : hq * d].view(nnz, hq, d)
        k = qkv[:, hq * d : (hq + hk) * d].view(nnz, hk, d)
        fo.apply_rope_pos_ids_inplace(q, k, pos, 16)
        fo.apply_rope_inplace(q, k, indptr, offsets, None, True)
        fo.apply_rope_with_cos_sin_cache_inplace(pos, qkv[:, : hq * d], qkv[:, hq * d : (hq + hk) * d], d, cache)

    cache = torch.rand(64, 8, device=device)
    cc = CompileCounter(f, dynamic=True)
    for lengths in ([3, 4], [5, 0, 6]):
        indptr, offs, pos = ragged(lengths, [2] * len(lengths), device)
        qkv, _, _ = packed_qk(pos.shape[0], hq, hk, d, torch.bfloat16, device)
        eager = qkv.clone()
        f(eager, pos.to(device), indptr, offs)
        before = qkv.clone()
        assert cc(qkv, pos.to(device), indptr, offs) is None
        assert torch.equal(qkv, eager), "compiled in-place result differs from eager / not visible"
        assert not torch.equal(qkv[:, : (hq + hk) * d], before[:, : (hq + hk) * d])
        assert torch.equal(qkv[:, (hq + hk) * d :], before[:, (hq + hk) * d :])
    assert cc.frames == 1


# --------------------------------------------------------------------------- bad input


def _bad_cases(device):
    """(label, call, argument name in the error) for every rejected input."""
    _, q, k = packed_qk(4, 2, 1, 16, torch.float16, device)
    pos = torch.arange(4, device=device)
    indptr, offs = torch.tensor([0, 4], device=device), torch.tensor([0], device=device)
    cache = torch.rand(8, 8, device=device)
    query, key = q.reshape(4, -1), k.reshape(4, -1)
    R, RP = fo.apply_rope_inplace, fo.apply_rope_pos_ids_inplace
    return q, k, [
        ("q-dtype", lambda: RP(q.to(torch.float64), k, pos), "q"),
        ("q-int", lambda: RP(q.to(torch.int32), k, pos), "q"),
        ("q-rank", lambda: RP(q.reshape(4, -1), k, pos), "q"),
        ("q-not-tensor", lambda: RP(q.tolist(), k, pos), "q"),
        ("k-dtype-mismatch", lambda: RP(q, k.float(), pos), "k"),
        ("k-device", lambda: RP(q, k.to("meta"), pos), "k"),
        ("k-nnz", lambda: RP(q, k[:3], pos), "k"),
        ("k-headdim", lambda: RP(q, k[..., :8], pos), "k"),
        ("q-last-dim-strided", lambda: RP(q[..., ::2], k[..., ::2], pos), "q"),
        ("rotary_dim-odd", lambda: RP(q, k, pos, 7), "rotary_dim"),
        ("rotary_dim-too-large", lambda: RP(q, k, pos, 18), "rotary_dim"),
        ("rotary_dim-zero", lambda: RP(q, k, pos, 0), "rotary_dim"),
        ("rotary_dim-float", lambda: RP(q, k, pos, 8.0), "rotary_dim"),
        ("rope_scale", lambda: RP(q, k, pos, rope_scale=0), "rope_scale"),
        ("rope_theta", lambda: RP(q, k, pos, rope_theta=-1.0), "rope_theta"),
        ("rope_theta-nan", lambda: RP(q, k, pos, rope_theta=float("nan")), "rope_theta"),
        ("low_freq_factor", lambda: fo.apply_llama31_rope_pos_ids_inplace(q, k, pos, low_freq_factor=0), "low_freq_factor"),
        ("freq-factors-order", lambda: fo.apply_llama31_rope_pos_ids_inplace(q, k, pos, low_freq_factor=4, high_freq_factor=4), "high_freq_factor"),
        ("old_context_len", lambda: fo.apply_llama31_rope_inplace(q, k, indptr, offs, old_context_len=0), "old_context_len"),
        ("pos-float", lambda: RP(q, k, pos.float()), "pos_ids"),
        ("pos-length", lambda: RP(q, k, pos[:3]), "pos_ids"),
        ("pos-rank", lambda: RP(q, k, pos[:, None]), "pos_ids"),
        ("pos-device", lambda: RP(q, k, pos.to("meta")), "pos_ids"),
        ("offsets-length", lambda: R(q, k, indptr, torch.tensor([0, 1], device=device)), "offsets"),
        ("offsets-dtype", lambda: R(q, k, indptr, offs.to(torch.int32)), "offsets"),
        ("indptr-float", lambda: R(q, k, indptr.float(), offs), "indptr"),
        ("indptr-empty", lambda: R(q, k, indptr[:0], offs[:0]), "indptr"),
        ("cache-dtype", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 16, cache.half()), "cos_sin_cache"),
        ("cache-rd-too-large", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 16, torch.rand(8, 18, device=device)), "cos_sin_cache"),
        ("cache-rd-odd", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 16, torch.rand(8, 5, device=device)), "cos_sin_cache"),
        ("cache-rank", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 16, cache[0]), "cos_sin_cache"),
        ("query-not-multiple", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 12, cache), "query"),
        ("key-not-multiple", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos, query, key[:, :10], 4, cache), "key"),
        ("query-3d-headsize", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos, q, k, 8, cache), "query"),
        ("head_size", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 0, cache), "head_size"),
        ("positions-float", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos.float(), query, key, 16, cache), "positions"),
        ("positions-length", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos[:2], query, key, 16, cache), "positions"),
        ("backend-pos_ids", lambda: RP(q, k, pos, backend="triton"), "backend"),
        ("backend-indptr", lambda: fo.apply_llama31_rope_inplace(q, k, indptr, offs, backend="cute"), "backend"),
        ("backend-cache", lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 16, cache, backend=None), "backend"),
    ]


def test_bad_input(device):
    q, k, cases = _bad_cases(device)
    q0, k0 = q.clone(), k.clone()
    for label, call, arg in cases:
        with pytest.raises(ValueError) as ei:
            call()
        assert str(ei.value).startswith(f"{arg}:"), f"{label}: message {str(ei.value)!r} does not name {arg}"
        assert torch.equal(q, q0) and torch.equal(k, k0), f"{label}: q/k written despite the error"


def test_flashinfer_backend_names(device):
    """FlashInfer's ``backend="cuda"`` / ``"cute-dsl"`` choose its kernel; here both give the
    default call's result, out of place and in place, positionally and by keyword."""
    _, q, k = packed_qk(6, 4, 2, 32, torch.float16, device, seed=3)
    pos = torch.arange(6, device=device) * 5
    indptr, offs = torch.tensor([0, 2, 6], device=device), torch.tensor([3, 9], device=device)
    cache = torch.rand(64, 16, device=device)
    query, key = q.reshape(6, -1), k.reshape(6, -1)
    calls = [
        lambda b: fo.apply_rope_pos_ids(q, k, pos, 16, False, 1, 10000, b),
        lambda b: fo.apply_rope(q, k, indptr, offs, backend=b),
        lambda b: fo.apply_llama31_rope_pos_ids(q, k, pos, backend=b),
        lambda b: fo.apply_llama31_rope(q, k, indptr, offs, None, True, 8, 500000, 1, 4, 8192, b),
        lambda b: fo.apply_rope_with_cos_sin_cache(pos, query, key, 32, cache, True, b),
    ]
    for i, call in enumerate(calls):
        want = call("cuda")
        got = call("cute-dsl")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), i
    for b in ("cuda", "cute-dsl"):
        q2, k2 = q.clone(), k.clone()
        fo.apply_rope_pos_ids_inplace(q2, k2, pos, backend=b)
        want = fo.apply_rope_pos_ids(q, k, pos)
        assert torch.equal(q2, want[0]) and torch.equal(k2, want[1]), b
        q2, k2 = query.clone(), key.clone()
        fo.apply_rope_with_cos_sin_cache_inplace(pos, q2, k2, 32, cache, backend=b)
        want = fo.apply_rope_with_cos_sin_cache(pos, query, key, 32, cache)
        assert torch.equal(q2, want[0]) and torch.equal(k2, want[1]), b


def test_numpy_scalar_options(device):
    """Options read from a config with numpy (np.float32 theta, np.int64 rotary_dim / head_size)
    act as the Python numbers they hold; a non-number is still refused by name."""
    import numpy as np

    _, q, k = packed_qk(5, 2, 1, 16, torch.float32, device)
    pos = torch.arange(3, 8, device=device)
    want = fo.apply_rope_pos_ids(q, k, pos, rotary_dim=8, rope_scale=2.0, rope_theta=1e4)
    got = fo.apply_rope_pos_ids(q, k, pos, rotary_dim=np.int64(8), rope_scale=np.float64(2.0),
                                rope_theta=np.float32(1e4))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    cache = torch.rand(8, 8, device=device)
    query, key = q.reshape(5, -1), k.reshape(5, -1)
    want = fo.apply_rope_with_cos_sin_cache(pos, query, key, 16, cache)
    got = fo.apply_rope_with_cos_sin_cache(pos, query, key, np.int32(16), cache)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="^rope_theta: must be a finite number"):
        fo.apply_rope_pos_ids(q, k, pos, rope_theta="1e4")
    with pytest.raises(ValueError, match=r"^positions: .*one position per token of query"):
        fo.apply_rope_with_cos_sin_cache(pos[:4], query, key, 16, cache)
    with pytest.raises(ValueError, match=r"^cos_sin_cache: shape\[1\] \(the rotary dim\)"):
        fo.apply_rope_with_cos_sin_cache(pos, query, key, 16, torch.rand(8, 7, device=device))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inplace_rejects_overlapping_memory(device, backend):
    """In place, a q or k whose elements share memory (heads made by expand(), tokens with
    stride 0) would be rotated once per alias (concurrently on a GPU): ValueError naming it,
    and nothing written."""
    if backend == "triton" and not _config.interpreting():
        # (on CUDA the CPU backend does not matter: the "reference" case runs the same kernels)
        pytest.skip("the triton CPU backend needs the interpreter")
    old = _config._cpu_backend
    _config.set_cpu_backend(backend)
    try:
        g = torch.Generator().manual_seed(4)
        pos = torch.tensor([1, 2, 3], device=device)
        row = torch.randn(3, 1, 8, generator=g).to(device)
        k = torch.randn(3, 2, 8, generator=g).to(device)
        cache = torch.randn(16, 8, generator=g).to(device)
        for q in (row.expand(3, 4, 8), row[:1].expand(3, 1, 8)):  # heads sharing a row; tokens sharing one
            for call, arg in ((lambda: fo.apply_rope_pos_ids_inplace(q, k, pos), "q"),
                              (lambda: fo.apply_rope_pos_ids_inplace(k, q, pos), "k"),
                              (lambda: fo.apply_rope_with_cos_sin_cache_inplace(pos, q, k, 8, cache), "q")):
                k0, row0 = k.clone(), row.clone()
                with pytest.raises(ValueError, match=f"^{arg}: has internally overlapping memory"):
                    call()
                assert torch.equal(k, k0) and torch.equal(row, row0)
        q = row.clone().expand(3, 4, 8).contiguous()  # the same values, own memory: rotated once per head
        fo.apply_rope_pos_ids_inplace(q, k, pos)
        want = fo.apply_rope_pos_ids(row, k[:, :1], pos)[0]
        assert_close("contiguous copy", q, want.expand(3, 4, 8), atol=1e-5, rtol=1e-5)
    finally:
        _config.set_cpu_backend(old)


@pytest.mark.parametrize(
    "label, lengths_indptr, arg",
    [("indptr-start", [1, 4], "indptr"), ("indptr-decreasing", [0, 3, 2, 4], "indptr"), ("indptr-end", [0, 3], "indptr")],
)
def test_bad_indptr_checked_mode(device, checked, label, lengths_indptr, arg):
    _, q, k = packed_qk(4, 2, 1, 16, torch.float16, device)
    q0 = q.clone()
    indptr = torch.tensor(lengths_indptr, device=device)
    offs = torch.zeros(len(lengths_indptr) - 1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        fo.apply_rope_inplace(q, k, indptr, offs)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        fo.apply_llama31_rope(q, k, indptr, offs)
    assert torch.equal(q, q0)


@pytest.mark.parametrize("bad", [-1, 8], ids=["negative", "past-end"])
def test_bad_positions_checked_mode(device, checked, bad):
    _, q, k = packed_qk(4, 2, 1, 16, torch.float16, device)
    q0 = q.clone()
    pos = torch.tensor([0, 1, bad, 2], device=device)
    with pytest.raises(ValueError, match="^positions:"):
        fo.apply_rope_with_cos_sin_cache_inplace(pos, q, k, 16, torch.rand(8, 16, device=device))
    assert torch.equal(q, q0)
    fo.set_checks(False)  # unchecked: runs, and the bad row comes out NaN (no OOB read)
    fo.apply_rope_with_cos_sin_cache_inplace(pos, q, k, 16, torch.rand(8, 16, device=device))
    assert q[2].isnan().all() and not q[[0, 1, 3]].isnan().any()


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_cuda_graph_capture_fresh_params():
    """Capturing a call whose frequency table is not cached yet (built on device during
    capture), then replaying with new data, matches eager."""
    _, q, k = packed_qk(33, 8, 2, 128, torch.bfloat16, "cuda")
    pos = torch.randint(0, 9000, (33,), device="cuda")
    theta = 12345.678  # a value no other test uses
    fo.apply_llama31_rope_pos_ids_inplace(q.clone(), k.clone(), pos)  # compile the kernel before capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        qs, ks = q.clone(), k.clone()
        with torch.cuda.graph(g):
            fo.apply_llama31_rope_pos_ids_inplace(qs, ks, pos, rope_theta=theta)
    qs.copy_(q)
    ks.copy_(k)
    g.replay()
    torch.cuda.synchronize()
    q2, k2 = q.clone(), k.clone()
    fo.apply_llama31_rope_pos_ids_inplace(q2, k2, pos, rope_theta=theta)
    assert torch.equal(qs, q2) and torch.equal(ks, k2)


@pytest.mark.gpu
def test_reduce_overhead_no_cudagraph_skips():
    """In-place RoPE on views of an intermediate qkv inside mode="reduce-overhead": captured
    (0 cudagraph skips) and equal to eager."""
    from torch._dynamo.utils import counters

    hq, hk, d = 8, 2, 64

    def f(x, w, pos):
        qkv = x @ w
        n = qkv.shape[0]
        q = qkv[:, : hq * d].view(n, hq, d)
        k = qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
        fo.apply_rope_pos_ids_inplace(q, k, pos)
        return qkv

    counters.clear()
    cf = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16) / 16
    pos = torch.randint(0, 4096, (16,), device="cuda")
    for _ in range(3):
        out = cf(x, w, pos).clone()
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert_close("qkv", out, f(x, w, pos))
