"""cascade family: merge_state, merge_state_in_place, merge_states, variable_length_merge_states.

On CPU-only machines the Triton kernels run in the interpreter (conftest), so shapes are tiny;
the reference CPU backend is tested beside them (``backend`` fixture).
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import torch_flashops as fo
from torch_flashops import _config
from torch_flashops.ops import cascade as ops
from torch_flashops.reference import cascade as ref

from .helpers import (CompileCounter, SchemaTestCase, assert_close, compile_sm90, needs_expecttest,
                      run_without_interpreter)

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

INF = math.inf
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LSE_TOL = dict(atol=1e-3, rtol=1e-3)
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DT_ID = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_states(lead, H, D, dtype, device, *, seed=0, special=True, lse_dtype=torch.float32):
    """Random states v [*lead, H, D], s [*lead, H] (s spread over ~[-12, 12]); with ``special``
    the first rows get an empty head, an all-empty row and extreme LSEs (+-5e4), and empty
    states carry garbage (NaN) values that must not leak."""
    g = _gen(seed)
    v = torch.randn(*lead, H, D, generator=g)
    s = torch.randn(*lead, H, generator=g) * 4
    if special and lead and lead[0] >= 3:
        s[0, ..., 0] = -INF
        v[0, ..., 0, :] = float("nan")  # garbage under an empty state
        s[1] = -INF  # every state of row 1 empty
        s[2, ..., 0] = 5e4
        if H > 1:
            s[2, ..., 1] = -5e4
    return v.to(device, dtype), s.to(device, lse_dtype)


def check_pair(name, actual, expected, dtype):
    v, s = actual
    assert v.dtype == dtype and s.dtype == torch.float32, f"{name}: dtypes {v.dtype}, {s.dtype}"
    assert v.is_contiguous() and s.is_contiguous(), f"{name}: outputs must be contiguous"
    assert_close(f"{name}.v", v, expected[0].to(dtype), dtype=dtype)
    assert_close(f"{name}.s", s, expected[1], **LSE_TOL)


# ----------------------------------------------------------------------------- merge_state
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("N,H,D", [(5, 4, 64), (3, 5, 48), (1, 1, 16)], ids=lambda x: str(x))
@pytest.mark.parametrize("lse_base", ["log2", "ln"])
def test_merge_state(backend, device, dtype, N, H, D, lse_base):
    va, sa = make_states((N,), H, D, dtype, device, seed=1)
    vb, sb = make_states((N,), H, D, dtype, device, seed=2, special=False)
    if N >= 3:
        sb[1] = -INF  # row 1: both states empty
    out = fo.merge_state(va, sa, vb, sb, lse_base=lse_base)
    expected = ref.ref_merge_state(va.cpu(), sa.cpu(), vb.cpu(), sb.cpu(), lse_ln=lse_base == "ln")
    check_pair("merge_state", out, expected, dtype)
    if N >= 3:  # the all-empty row: exactly 0 / -inf
        assert (out[0][1] == 0).all() and torch.isneginf(out[1][1]).all()


def test_merge_state_hand_values(backend, device):
    """Equal LSEs average the values and add one bit; an empty state is ignored."""
    va = torch.tensor([[[1.0, 2.0]], [[1.0, 2.0]]], device=device)
    vb = torch.tensor([[[3.0, 6.0]], [[float("nan"), 5.0]]], device=device)
    sa = torch.tensor([[3.0], [0.5]], device=device)
    sb = torch.tensor([[3.0], [-INF]], device=device)
    v, s = fo.merge_state(va, sa, vb, sb)
    assert v.tolist() == [[[2.0, 4.0]], [[1.0, 2.0]]]
    assert s.tolist() == [[4.0], [0.5]]


def test_merge_state_strided_and_lse_dtypes(backend, device):
    """Non-contiguous views (v sliced from a wider buffer, s transposed) and bf16/fp16 LSEs."""
    N, H, D = 4, 3, 32
    big = torch.randn(N, 2 * H, D + 16, generator=_gen(3)).to(device, torch.bfloat16)
    va, vb = big[:, :H, :D], big[:, H:, 16:]
    sa = (torch.randn(H, N, generator=_gen(4)) * 3).to(device).T  # stride (1, N)
    sb = (torch.randn(N, H, generator=_gen(5)) * 3).to(device, torch.float16)
    with pytest.raises(ValueError, match="^s_a"):  # stride(-1) != 1 is rejected
        fo.merge_state(va, sa, vb, sb)
    sa = sa.contiguous()[:, :H]
    s_wide = torch.randn(N, H + 2, generator=_gen(6)).to(device)[:, 1:H + 1]  # padded row stride
    out = fo.merge_state(va, s_wide, vb, sb)
    check_pair("strided", out, ref.ref_merge_state(va.cpu(), s_wide.cpu(), vb.cpu(), sb.cpu()), torch.bfloat16)


def test_nan_propagates(backend, device):
    va, sa = make_states((3,), 2, 16, torch.float32, device, special=False)
    vb, sb = make_states((3,), 2, 16, torch.float32, device, seed=1, special=False)
    sa[0, 0] = float("nan")
    va[1, 1, 3] = float("nan")
    v, s = fo.merge_state(va, sa, vb, sb)
    assert torch.isnan(v[0, 0]).all() and torch.isnan(s[0, 0])
    assert torch.isnan(v[1, 1, 3]) and not torch.isnan(v[1, 1, :3]).any() and not torch.isnan(s[1]).any()
    assert not torch.isnan(v[2]).any()


# -------------------------------------------------------------------- merge_state_in_place
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "uint8"])
def test_merge_state_in_place(backend, device, dtype, mask_kind):
    N, H, D = 5, 3, 32
    v0, s0 = make_states((N,), H, D, dtype, device, seed=7)
    vo, so = make_states((N,), H, D, dtype, device, seed=8, special=False)
    flags = torch.tensor([1, 0, 1, 1, 0], device=device)
    mask = None if mask_kind == "none" else flags.to(torch.bool if mask_kind == "bool" else torch.uint8)
    v, s = v0.clone(), s0.clone()
    assert fo.merge_state_in_place(v, s, vo, so, mask) is None
    o, lse = ref.ref_merge_state(v0.cpu(), s0.cpu(), vo.cpu(), so.cpu())
    if mask is not None:
        keep = flags.cpu().bool()
        o = torch.where(keep[:, None, None], o, v0.cpu().double())
        lse = torch.where(keep[:, None], lse, s0.cpu().double())
    assert_close("in_place.v", v, o.to(dtype), dtype=dtype)
    assert_close("in_place.s", s, lse, **LSE_TOL)
    if mask is not None:  # untouched rows are bit-identical (NaN garbage included)
        assert torch.equal(v[1].nan_to_num(7.0), v0[1].nan_to_num(7.0)) and torch.equal(s[4], s0[4])


def test_merge_state_in_place_strided_ln(backend, device):
    """In-place into views of a larger buffer (only the view changes), natural-log LSEs."""
    N, H, D = 4, 2, 32
    buf = torch.randn(N, 2, H, D + 8, generator=_gen(9)).to(device)
    sbuf = (torch.randn(N, H + 1, generator=_gen(10)) * 2).to(device)
    v, s = buf[:, 0, :, :D], sbuf[:, :H]
    v0, s0, buf0, sbuf0 = v.clone(), s.clone(), buf.clone(), sbuf.clone()
    vo, so = make_states((N,), H, D, torch.float32, device, seed=11, special=False)
    fo.merge_state_in_place(v, s, vo, so, lse_base="ln")
    o, lse = ref.ref_merge_state(v0.cpu(), s0.cpu(), vo.cpu(), so.cpu(), lse_ln=True)
    assert_close("strided.v", v, o.float())
    assert_close("strided.s", s, lse, **LSE_TOL)
    assert torch.equal(buf[:, 1], buf0[:, 1]) and torch.equal(buf[..., D:], buf0[..., D:])
    assert torch.equal(sbuf[:, H], sbuf0[:, H])


def test_merge_state_in_place_other_state_overlapping_target(backend, device):
    """v_other / s_other as shifted rows of the buffer being written (and interleaved halves of
    one buffer): every backend merges the *old* values, as an out-of-place merge of copies does.
    The kernel used to read rows that other programs had already rewritten."""
    N, H, D = 9, 2, 16
    buf = torch.randn(N + 1, H, D, generator=_gen(21)).to(device)
    sbuf = (torch.randn(N + 1, H, generator=_gen(22)) * 3).to(device)
    v, s, vo, so = buf[1:], sbuf[1:], buf[:-1], sbuf[:-1]
    o, lse = ref.ref_merge_state(v.cpu().clone(), s.cpu().clone(), vo.cpu().clone(), so.cpu().clone())
    fo.merge_state_in_place(v, s, vo, so)
    assert_close("shifted.v", v, o.float())
    assert_close("shifted.s", s, lse, **LSE_TOL)
    pair = torch.randn(N, 2, H, D, generator=_gen(23)).to(device)  # [N, 2, H, D]: the two states interleaved
    spair = torch.randn(N, 2, H, generator=_gen(24)).to(device)
    o, lse = ref.ref_merge_state(pair[:, 0].cpu().clone(), spair[:, 0].cpu().clone(), pair[:, 1].cpu().clone(),
                                 spair[:, 1].cpu().clone())
    fo.merge_state_in_place(pair[:, 0], spair[:, 0], pair[:, 1], spair[:, 1])
    assert_close("interleaved.v", pair[:, 0], o.float())
    assert_close("interleaved.s", spair[:, 0], lse, **LSE_TOL)


# ---------------------------------------------------------------------------- merge_states
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("S", [0, 1, 3, 8], ids=lambda s: f"S{s}")
def test_merge_states(backend, device, dtype, S):
    N, H, D = 4, 3, 32
    v, s = make_states((N, S), H, D, dtype, device, seed=12)
    if S >= 2:
        s[0, 1:] = -INF  # row 0: a single non-empty state (index 0 of head 1..)
    out = fo.merge_states(v, s)
    check_pair("merge_states", out, ref.ref_merge_stacked(v.cpu(), s.cpu()), dtype)
    if S == 0:
        assert (out[0] == 0).all() and torch.isneginf(out[1]).all()


def test_merge_states_strided_ln(backend, device):
    """v [N, S, H, D] taken as a permuted view of [S, N, H, D]; bf16 LSEs; lse_base='ln'."""
    N, S, H, D = 3, 4, 2, 48
    v = torch.randn(S, N, H, D, generator=_gen(13)).to(device).permute(1, 0, 2, 3)
    s = (torch.randn(S, N, H, generator=_gen(14)) * 3).to(device, torch.bfloat16).permute(1, 0, 2)
    out = fo.merge_states(v, s, lse_base="ln")
    check_pair("merge_states", out, ref.ref_merge_stacked(v.cpu(), s.cpu(), lse_ln=True), torch.float32)


# ------------------------------------------------------------ variable_length_merge_states
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("lens", [[2, 0, 3, 1], [0], [], [5], [0, 0, 4]], ids=lambda x: "lens" + "-".join(map(str, x)))
def test_variable_length_merge_states(backend, device, dtype, lens):
    H, D = 3, 32
    M = sum(lens) + 1  # one trailing row no segment uses
    v, s = make_states((M,), H, D, dtype, device, seed=15)
    indptr = torch.tensor([0] + list(torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()), dtype=torch.int32)
    out = fo.variable_length_merge_states(v, s, indptr.to(device))
    expected = ref.ref_variable_length_merge_states(v.cpu(), s.cpu(), indptr)
    check_pair("varlen", out, expected, dtype)
    for i, n in enumerate(lens):
        if n == 0:
            assert (out[0][i] == 0).all() and torch.isneginf(out[1][i]).all()


def test_variable_length_int64_ln_and_flashinfer_path(backend, device):
    v, s = make_states((7,), 2, 16, torch.float16, device, seed=16)
    indptr = torch.tensor([0, 3, 3, 7], dtype=torch.int64, device=device)
    out = fo.triton.cascade.variable_length_merge_states(v, s, indptr, lse_base="ln")
    check_pair("varlen", out, ref.ref_variable_length_merge_states(v.cpu(), s.cpu(), indptr.cpu(), lse_ln=True),
               torch.float16)


def test_variable_length_garbage_indptr_stays_in_bounds(backend, device):
    """Unchecked mode: out-of-range segments are clamped to the rows of v (no OOB read)."""
    v, s = make_states((4,), 2, 16, torch.float32, device, special=False)
    indptr = torch.tensor([-3, 2, 1, 9], dtype=torch.int32, device=device)
    ov, os_ = fo.variable_length_merge_states(v, s, indptr)
    clamped = torch.tensor([0, 2, 2, 4], dtype=torch.int32)  # [0,2), [2,2) empty, [1,4)
    e0 = ref.ref_variable_length_merge_states(v.cpu(), s.cpu(), clamped[:2])
    e2 = ref.ref_merge_stacked(v.cpu()[1:4][None], s.cpu()[1:4][None])
    assert_close("seg0", ov[:1], e0[0].float())
    assert (ov[1] == 0).all() and torch.isneginf(os_[1]).all()
    assert_close("seg2", ov[2:], e2[0].float())


# ----------------------------------------------------------------------- semantics: union
def _dense_attention(q, k, v, scale):
    """fp64 attention over all keys: o [N, H, D], base-2 LSE [N, H]."""
    logits = torch.einsum("nhd,jhd->nhj", q, k) * scale
    lse = torch.logsumexp(logits, -1)
    return torch.einsum("nhj,jhd->nhd", torch.softmax(logits, -1), v), lse / math.log(2)


def test_merging_disjoint_key_sets_equals_attention_over_union(backend, device):
    """Split the keys of a tiny dense attention into parts (one of them empty), attend to each,
    merge with every op: the result equals attention over all keys."""
    g = _gen(17)
    N, H, D, L = 3, 2, 16, 11
    q, k, v = (torch.randn(n, H, D, generator=g, dtype=torch.float64) for n in (N, L, L))
    scale = D ** -0.5
    o_all, lse_all = _dense_attention(q, k, v, scale)
    parts = [list(range(0, 4)), [], list(range(4, 9)), list(range(9, 11))]
    states = []
    for idx in parts:
        if idx:
            states.append(_dense_attention(q, k[idx], v[idx], scale))
        else:
            states.append((torch.zeros(N, H, D, dtype=torch.float64), torch.full((N, H), -INF, dtype=torch.float64)))
    vs = [x[0].float().to(device) for x in states]
    ss = [x[1].float().to(device) for x in states]
    # pairwise, in place
    acc_v, acc_s = vs[0].clone(), ss[0].clone()
    for vi, si in zip(vs[1:], ss[1:]):
        fo.merge_state_in_place(acc_v, acc_s, vi, si)
    assert_close("in_place chain.v", acc_v, o_all.float())
    assert_close("in_place chain.s", acc_s, lse_all, **LSE_TOL)
    # tree of merge_state
    v01, s01 = fo.merge_state(vs[0], ss[0], vs[1], ss[1])
    v23, s23 = fo.merge_state(vs[2], ss[2], vs[3], ss[3])
    vt, st_ = fo.merge_state(v01, s01, v23, s23)
    assert_close("tree.v", vt, o_all.float())
    assert_close("tree.s", st_, lse_all, **LSE_TOL)
    # all at once
    vm, sm = fo.merge_states(torch.stack(vs, 1), torch.stack(ss, 1))
    assert_close("merge_states.v", vm, o_all.float())
    assert_close("merge_states.s", sm, lse_all, **LSE_TOL)
    # varlen: row-major [N * parts] with segments of 4 rows each
    vv = torch.stack(vs, 1).reshape(N * 4, H, D)
    sv = torch.stack(ss, 1).reshape(N * 4, H)
    indptr = torch.arange(0, 4 * N + 1, 4, dtype=torch.int32, device=device)
    vl, sl = fo.variable_length_merge_states(vv, sv, indptr)
    assert_close("varlen.v", vl, o_all.float())
    assert_close("varlen.s", sl, lse_all, **LSE_TOL)


# ------------------------------------------------------------------------------ hypothesis
@st.composite
def _merge_cases(draw):
    N = draw(st.integers(0, 5))
    H = draw(st.integers(1, 5))
    D = draw(st.sampled_from([1, 16, 24, 64, 600]))
    S = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(DTYPES))
    empty_p = draw(st.sampled_from([0.0, 0.3, 1.0]))
    lse_base = draw(st.sampled_from(["log2", "ln"]))
    lens = draw(st.lists(st.integers(0, 3), min_size=0, max_size=4))
    seed = draw(st.integers(0, 2 ** 16))
    return N, H, D, S, dtype, empty_p, lse_base, lens, seed


@given(case=_merge_cases())
def test_hypothesis_all_ops(case):
    device = DEVICE  # (a function-scoped fixture would not be reset between examples)
    N, H, D, S, dtype, empty_p, lse_base, lens, seed = case
    g = _gen(seed)
    ln = lse_base == "ln"

    def states(*lead):
        v = torch.randn(*lead, H, D, generator=g)
        s = torch.randn(*lead, H, generator=g) * 8
        s[torch.rand(*lead, H, generator=g) < empty_p] = -INF
        return v.to(device, dtype), s.to(device)

    va, sa = states(N)
    vb, sb = states(N)
    check_pair("merge_state", fo.merge_state(va, sa, vb, sb, lse_base=lse_base),
               ref.ref_merge_state(va.cpu(), sa.cpu(), vb.cpu(), sb.cpu(), lse_ln=ln), dtype)
    v, s = va.clone(), sa.clone()
    mask = (torch.rand(N, generator=g) < 0.5).to(device)
    fo.merge_state_in_place(v, s, vb, sb, mask, lse_base=lse_base)
    o, lse = ref.ref_merge_state(va.cpu(), sa.cpu(), vb.cpu(), sb.cpu(), lse_ln=ln)
    keep = mask.cpu()
    assert_close("in_place.v", v, torch.where(keep[:, None, None], o, va.cpu().double()).to(dtype), dtype=dtype)
    assert_close("in_place.s", s, torch.where(keep[:, None], lse, sa.cpu().double()), **LSE_TOL)
    vs, ss = states(N, S)
    check_pair("merge_states", fo.merge_states(vs, ss, lse_base=lse_base),
               ref.ref_merge_stacked(vs.cpu(), ss.cpu(), lse_ln=ln), dtype)
    vr, sr = states(sum(lens))
    indptr = torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    check_pair("varlen", fo.variable_length_merge_states(vr, sr, indptr.to(device), lse_base=lse_base),
               ref.ref_variable_length_merge_states(vr.cpu(), sr.cpu(), indptr, lse_ln=ln), dtype)


# ------------------------------------------------------------------------------- opcheck
def _op_samples(device):
    va, sa = make_states((4,), 2, 16, torch.float16, device, special=False)
    vb, sb = make_states((4,), 2, 16, torch.float16, device, seed=1, special=False)
    vs, ss = make_states((3, 2), 2, 16, torch.bfloat16, device)
    indptr = torch.tensor([0, 1, 1, 4], dtype=torch.int32, device=device)
    mask = torch.tensor([True, False, True, True], device=device)
    return {  # one sample each (opcheck is slow); defaults and non-defaults alternate
        "merge_state": (va, sa, vb, sb),
        "merge_state_in_place": (va.clone(), sa.clone(), vb, sb, mask, True),
        "merge_states": (vs, ss, True),
        "variable_length_merge_states": (va, sa, indptr),
    }


@pytest.mark.parametrize("name", ["merge_state", "merge_state_in_place", "merge_states", "variable_length_merge_states"])
def test_opcheck(device, name):
    torch.library.opcheck(getattr(torch.ops.flashops, name).default, _op_samples(device)[name])


# ------------------------------------------------------------------------------- compile
def test_compile_fullgraph_dynamic_no_recompile(device):
    """All four ops in one compiled function: one frame (no graph break), the in-place write
    visible to the caller, and no recompile when N or the segment count changes."""

    def f(va, sa, vb, sb, vs, ss, indptr, acc_v, acc_s):
        v, s = fo.merge_state(va, sa, vb, sb)
        fo.merge_state_in_place(acc_v, acc_s, v, s)
        vm, sm = fo.merge_states(vs, ss, lse_base="log2")
        vl, sl = fo.variable_length_merge_states(va, sa, indptr)
        return v, s, vm, sm, vl, sl

    cc = CompileCounter(f, dynamic=True)
    # Sizes chosen to avoid coincidences (duck sizing would tie equal sizes) and 0/1.
    for N, bounds in ((5, [0, 2, 5]), (7, [0, 3, 3, 7]), (9, [0, 1, 4, 4, 8])):
        va, sa = make_states((N,), 2, 16, torch.float32, device, seed=N, special=False)
        vb, sb = make_states((N,), 2, 16, torch.float32, device, seed=N + 1, special=False)
        vs, ss = make_states((N, 2), 2, 16, torch.float32, device, seed=N + 2)
        indptr = torch.tensor(bounds, dtype=torch.int32, device=device)
        acc_v, acc_s = make_states((N,), 2, 16, torch.float32, device, seed=N + 3, special=False)
        acc_v0, acc_s0 = acc_v.clone(), acc_s.clone()
        v, s, vm, sm, vl, sl = cc(va, sa, vb, sb, vs, ss, indptr, acc_v, acc_s)
        e = ref.ref_merge_state(va.cpu(), sa.cpu(), vb.cpu(), sb.cpu())
        assert_close("compiled merge_state.v", v, e[0].float())
        ei = ref.ref_merge_state(acc_v0.cpu(), acc_s0.cpu(), e[0], e[1])
        assert_close("compiled in_place.v (caller's tensor)", acc_v, ei[0].float(), atol=1e-4, rtol=1e-4)
        assert_close("compiled in_place.s (caller's tensor)", acc_s, ei[1], **LSE_TOL)
        assert_close("compiled merge_states.s", sm, ref.ref_merge_stacked(vs.cpu(), ss.cpu())[1], **LSE_TOL)
        assert_close("compiled varlen.v", vl,
                     ref.ref_variable_length_merge_states(va.cpu(), sa.cpu(), indptr.cpu())[0].float())
    assert cc.frames == 1, f"expected 1 compiled frame (no graph break / recompile), got {cc.frames}"
    assert cc.graph_ops() == [
        "flashops.merge_state.default",
        "flashops.merge_state_in_place.default",
        "flashops.merge_states.default",
        "flashops.variable_length_merge_states.default",
    ]


# ------------------------------------------------------------------------------ bad input
def _valid(device):
    va, sa = make_states((4,), 2, 16, torch.float16, device, special=False)
    vb, sb = make_states((4,), 2, 16, torch.float16, device, seed=1, special=False)
    return va, sa, vb, sb


BAD_MERGE_STATE = {
    "v_a-rank": (lambda a: (a[0][0], a[1], a[2], a[3]), "v_a"),
    "v_a-int": (lambda a: (a[0].to(torch.int32), a[1], a[2], a[3]), "v_a"),
    "v_b-shape": (lambda a: (a[0], a[1], a[2][:, :, :8], a[3]), "v_b"),
    "v_b-dtype": (lambda a: (a[0], a[1], a[2].float(), a[3]), "v_b"),
    "s_a-shape": (lambda a: (a[0], a[1][:3], a[2], a[3]), "s_a"),
    "s_b-rank": (lambda a: (a[0], a[1], a[2], a[3][..., None]), "s_b"),
    "s_b-dtype": (lambda a: (a[0], a[1], a[2], a[3].to(torch.int64)), "s_b"),
    "v_a-stride": (lambda a: (a[0].transpose(1, 2).contiguous().transpose(1, 2), a[1], a[2], a[3]), "v_a"),
    "s_b-device": (lambda a: (a[0], a[1], a[2], a[3].to("meta")), "s_b"),
}


@pytest.mark.parametrize("case", list(BAD_MERGE_STATE), ids=str)
def test_bad_input_merge_state(device, case):
    make, argname = BAD_MERGE_STATE[case]
    args = make(_valid(device))
    with pytest.raises(ValueError, match=f"^{argname}"):
        fo.merge_state(*args)
    with pytest.raises(ValueError, match=f"^{argname}"):  # the op itself validates too
        torch.ops.flashops.merge_state(*args)


@pytest.mark.parametrize("case", ["s-fp16", "s_other-bf16", "v_other-shape", "mask-shape", "mask-dtype",
                                  "v-expanded", "lse_base"])
def test_bad_input_merge_state_in_place_writes_nothing(device, case):
    va, sa, vb, sb = _valid(device)
    v, s, mask, kw = va.clone(), sa.clone(), None, {}
    argname = case.split("-")[0]
    if case == "s-fp16":
        s = s.half()
    elif case == "s_other-bf16":
        sb = sb.bfloat16()
    elif case == "v_other-shape":
        vb = vb[:3]
    elif case == "mask-shape":
        mask = torch.ones(5, dtype=torch.bool, device=device)
    elif case == "mask-dtype":
        mask = torch.ones(4, dtype=torch.float32, device=device)
    elif case == "v-expanded":
        v = va[:1].expand(4, -1, -1)
    else:
        kw = dict(lse_base="e")
    v0, s0 = v.clone(), s.clone()
    with pytest.raises(ValueError, match=f"^{argname}"):
        fo.merge_state_in_place(v, s, vb, sb, mask, **kw)
    assert torch.equal(v, v0) and torch.equal(s, s0), "nothing may be written on bad input"


def test_bad_input_merge_states(device):
    v, s = make_states((3, 2), 2, 16, torch.float32, device, special=False)
    for args, name in [((v[0], s), "v"), ((v, s[:, :1]), "s"), ((v, s[..., None]), "s"),
                       ((v, s.to(torch.int32)), "s")]:
        with pytest.raises(ValueError, match=f"^{name}"):
            fo.merge_states(*args)
    with pytest.raises(ValueError, match="^lse_base"):
        fo.merge_states(v, s, lse_base=2)


def test_bad_input_variable_length(device):
    v, s = make_states((6,), 2, 16, torch.float32, device, special=False)
    good = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    for indptr, name in [(good.float(), "indptr"), (good[None], "indptr"), (good[:0], "indptr"),
                         (good.to("meta"), "indptr")]:
        with pytest.raises(ValueError, match=f"^{name}"):
            fo.variable_length_merge_states(v, s, indptr)
    with pytest.raises(ValueError, match="^s"):
        fo.variable_length_merge_states(v, s[:5], good)
    # data checks run in checked mode only
    bad_values = {"start": [1, 2, 6], "decreasing": [0, 4, 2], "past-the-end": [0, 2, 7]}
    old = _config._checks
    try:
        fo.set_checks(True)
        for what, vals in bad_values.items():
            with pytest.raises(ValueError, match="^indptr"):
                fo.variable_length_merge_states(v, s, torch.tensor(vals, dtype=torch.int32, device=device))
        fo.variable_length_merge_states(v, s, good)  # valid input passes in checked mode
    finally:
        fo.set_checks(old)


@pytest.mark.parametrize("D", [40, 600], ids=["D40", "D600-chunked"])
def test_poisoned_output_buffers_are_overwritten(device, nan_empty, D):
    """Fresh outputs come from torch.empty, poisoned (``nan_empty``), so an element an op forgot
    to write shows; every op against the reference. D = 600 takes the merge kernels' loop over
    512-column chunks, which the fixed CPU cases reach only here."""
    N, H, S = 6, 3, 3
    va, sa = make_states((N,), H, D, torch.float32, device, special=False)
    vb, sb = make_states((N,), H, D, torch.float32, device, seed=1, special=False)
    check_pair("merge_state", fo.merge_state(va, sa, vb, sb),
               ref.ref_merge_state(va.cpu(), sa.cpu(), vb.cpu(), sb.cpu()), torch.float32)
    v, s = make_states((N, S), H, D, torch.float32, device, seed=2, special=False)
    check_pair("merge_states", fo.merge_states(v, s), ref.ref_merge_stacked(v.cpu(), s.cpu()), torch.float32)
    indptr = torch.tensor([0, 2, 2, 7, 18], dtype=torch.int32)
    vv, sv = v.reshape(N * S, H, D), s.reshape(N * S, H)
    check_pair("variable_length_merge_states", fo.variable_length_merge_states(vv, sv, indptr.to(device)),
               ref.ref_variable_length_merge_states(vv.cpu(), sv.cpu(), indptr), torch.float32)
    exp = ref.ref_merge_state(va.cpu(), sa.cpu(), vb.cpu(), sb.cpu())
    fo.merge_state_in_place(va, sa, vb, sb)
    check_pair("merge_state_in_place", (va, sa), exp, torch.float32)


# ------------------------------------------------------------- kernels compile for the GPU
def aot_compile_sm90(kernel: str, switch: bool) -> dict:
    """Compile one cascade kernel for an H100 (sm_90) without a GPU: PTX + cubin via Triton's
    bundled ptxas. Needs the real JIT (run without TRITON_INTERPRET). ``switch``: HAS_MASK of
    the pair kernel, VARLEN of the run kernel."""
    if kernel == "pair":
        fn, cst = ops._merge_pair_kernel, dict(HAS_MASK=switch, LSE_LN=switch, BLOCK_H=16, BLOCK_D=128)
    else:
        fn, cst = ops._merge_run_kernel, dict(VARLEN=switch, LSE_LN=not switch, BLOCK_H=16, BLOCK_D=128)
    ptr_types = {"mask_ptr": "*u8", "indptr_ptr": "*i32"}
    sig = {}
    for name in fn.arg_names:
        if name in cst:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*fp32" if name.startswith("s") else "*bf16")
        else:
            sig[name] = "i32"
    # As a launch with 16-aligned pointers, row/head strides and D specializes (H, the state
    # count and the LSE head strides stay plain ints).
    aligned = [n for n in fn.arg_names if sig[n] != "constexpr" and n not in ("H", "count")
               and not (n.startswith("s") and n.endswith("_sh"))]
    out = compile_sm90(fn, {n: t for n, t in sig.items() if t != "constexpr"}, cst, aligned, 8)
    ptx = out["ptx"]
    return {"ptx_lines": ptx.count("\n"), "vector_loads": ptx.count("ld.global.v4"),
            "cubin_bytes": out["cubin_bytes"]}


def test_kernels_compile_for_sm90_without_gpu():
    """Catches what the interpreter lets through (e.g. non-constexpr globals) on machines
    without a GPU: both kernels must lower to PTX and assemble, with 16-byte vector loads."""
    info = run_without_interpreter("import json; from tests.test_cascade import aot_compile_sm90; "
                                   "print(json.dumps({k: aot_compile_sm90(k, True) for k in ('pair', 'run')}))")
    for k, r in info.items():
        assert r["cubin_bytes"] > 0 and r["vector_loads"] >= 1, (k, r)


# --------------------------------------------------------------------- schema snapshots
@needs_expecttest
class TestSchemas(SchemaTestCase):
    def _schema(self, name):
        return str(getattr(torch.ops.flashops, name).default._schema)

    def test_merge_state(self):
        self.assertExpectedInline(self._schema("merge_state"), """flashops::merge_state(Tensor v_a, Tensor s_a, Tensor v_b, Tensor s_b, bool lse_ln=False) -> (Tensor, Tensor)""")

    def test_merge_state_in_place(self):
        self.assertExpectedInline(self._schema("merge_state_in_place"), """flashops::merge_state_in_place(Tensor(a!) v, Tensor(b!) s, Tensor v_other, Tensor s_other, Tensor? mask=None, bool lse_ln=False) -> ()""")

    def test_merge_states(self):
        self.assertExpectedInline(self._schema("merge_states"), """flashops::merge_states(Tensor v, Tensor s, bool lse_ln=False) -> (Tensor, Tensor)""")

    def test_variable_length_merge_states(self):
        self.assertExpectedInline(self._schema("variable_length_merge_states"), """flashops::variable_length_merge_states(Tensor v, Tensor s, Tensor indptr, bool lse_ln=False) -> (Tensor, Tensor)""")


# ------------------------------------------------------------------- GPU: big, graphs
@pytest.mark.gpu
@pytest.mark.parametrize("N,H,D,dtype", [(4099, 40, 128, torch.bfloat16), (1000, 8, 576, torch.float16),
                                         (333, 28, 64, torch.float32)], ids=lambda x: str(x))
def test_gpu_large_shapes_and_cuda_graph_replay(N, H, D, dtype):
    """Partial head blocks (H=40, 28), D above one chunk (576), all four ops captured in one
    CUDA graph and replayed on new data (no host sync inside the ops)."""
    dev = "cuda"
    va, sa = make_states((N,), H, D, dtype, dev, seed=20)
    vb, sb = make_states((N,), H, D, dtype, dev, seed=21)
    vs, ss = make_states((N, 3), H, D, dtype, dev, seed=22)
    indptr = torch.tensor([0] + sorted(torch.randint(0, N, (N // 3,), generator=_gen(23)).tolist()) + [N],
                          dtype=torch.int32, device=dev)
    mask = (torch.rand(N, generator=_gen(24)) < 0.7).to(dev)
    v_ip, s_ip = va.clone(), sa.clone()

    def step():
        v_ip.copy_(va)
        s_ip.copy_(sa)
        fo.merge_state_in_place(v_ip, s_ip, vb, sb, mask)
        return fo.merge_state(va, sa, vb, sb), fo.merge_states(vs, ss), fo.variable_length_merge_states(va, sa, indptr)

    step()  # warm-up: compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (30, 31):  # new data in the captured buffers, then replay
        for dst, src in zip((va, sa, vb, sb, vs, ss), (*make_states((N,), H, D, dtype, dev, seed=seed),
                                                       *make_states((N,), H, D, dtype, dev, seed=seed + 10),
                                                       *make_states((N, 3), H, D, dtype, dev, seed=seed + 20))):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        (v, s), (vm, sm), (vl, sl) = outs
        check_pair("graph merge_state", (v, s), ref.ref_merge_state(va, sa, vb, sb), dtype)
        check_pair("graph merge_states", (vm, sm), ref.ref_merge_stacked(vs, ss), dtype)
        check_pair("graph varlen", (vl, sl), ref.ref_variable_length_merge_states(va.cpu(), sa.cpu(), indptr.cpu()),
                   dtype)
        o, lse = ref.ref_merge_state(va, sa, vb, sb)
        keep = mask.bool()
        assert_close("graph in_place.v", v_ip, torch.where(keep[:, None, None], o, va.double()).to(dtype), dtype=dtype)
        assert_close("graph in_place.s", s_ip, torch.where(keep[:, None], lse, sa.double()), **LSE_TOL)


# ------------------------------------------------------------------------------ selfcheck
def test_selfcheck(device):
    from torch_flashops._selfcheck import _CHECKS

    results = _CHECKS["cascade"](device)
    assert {r.op for r in results} == {"merge_state", "merge_state_in_place", "merge_states",
                                       "variable_length_merge_states"}
    bad = [r for r in results if not r.ok]
    assert not bad, bad
