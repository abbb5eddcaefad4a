"""The ``moe`` compute family: grouped GEMM, silu_and_mul (and gelu_and_mul, gelu_tanh_and_mul),
moe_sum, fused_moe, cutlass shim.

On CPU the Triton kernels run in the interpreter (tiny H/I, E 4-16); every op is also run
through the plain-PyTorch CPU backend. Oracles: ``reference.moe`` (fp32), the alignment oracle
of ``reference.moe_routing``. Fresh outputs are poisoned through the allocator
(``fill_uninitialized_memory``: ``torch.empty`` returns NaN), ``out=`` buffers with ``poison``.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_flashops as fo
from torch_flashops import _config
from torch_flashops.fused_moe import _fused_moe, fused_moe  # (top-level torch_flashops.fused_moe is the module)
from torch_flashops.ops import moe as ops
from torch_flashops.reference import moe as ref
from torch_flashops.reference.moe_routing import ref_moe_align_block_size

from .conftest import DEVICE
from .helpers import (CompileCounter, SchemaTestCase, assert_close, compile_sm90, needs_expecttest, poison,
                      run_without_interpreter)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_ID = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# spec §9: fused_moe and the pipeline against the dense fp32 oracle
MOE_TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=1e-2, rtol=1e-2),
           torch.float32: dict(atol=1e-4, rtol=1e-4)}


@contextlib.contextmanager
def poisoned_allocations():
    """Every ``torch.empty`` inside returns NaN-filled memory, so unwritten output rows show."""
    import torch.utils.deterministic as det

    old_det, old_warn, old_fill = (torch.are_deterministic_algorithms_enabled(),
                                   torch.is_deterministic_algorithms_warn_only_enabled(),
                                   det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = old_fill
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def up_gate(w1):
    """``[gate; up]`` w1 as ``[up; gate]`` (FlashInfer's CUTLASS order), a new tensor."""
    I = w1.shape[1] // 2
    return torch.cat([w1[:, I:], w1[:, :I]], 1)


def make_moe(T, H, I, E, k, dtype, device, *, seed=0):
    """Random layer inputs: x [T, H], w1 [E, 2I, H], w2 [E, H, I] scaled so that every stage is
    O(1); ids distinct per token, weights in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w1 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k].int()
    tw = torch.rand(T, k, generator=g) + 0.1
    return (x.to(device, dtype), w1.to(device, dtype), w2.to(device, dtype), tw.to(device), ids.to(device))


def check_layer(name, out, x, w1, w2, tw, ids, *, pipeline=True, B=16, **kw):
    """``out`` against the dense fp32 oracle (and the five-step pipeline) within spec §9's tolerance.
    With ``rsf`` the layer's output is ``rsf`` times the unscaled sum, and so is its rounding
    error: the tolerance applies to the unscaled sum (atol times rsf; a soak run found bf16
    layers whose experts' terms of ~10 cancel to ~0.2, off by 0.026 at rsf 2.5, 3 ulp from the
    rounding pipeline)."""
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    tol = dict(MOE_TOL[x.dtype])
    tol["atol"] *= max(1.0, abs(float(kw.get("rsf") or 1.0)))
    exp = ref.ref_fused_moe_dense(x.float(), w1.float(), w2.float(), tw, ids, **kw)
    assert_close(f"{name} vs dense", out, exp, **tol)
    if pipeline:
        pipe = ref.ref_fused_moe_pipeline(x, w1, w2, tw, ids, B=B, **kw)
        assert_close(f"{name} vs pipeline", out, pipe.float(), **tol)


# ------------------------------------------------------- silu_and_mul, gelu(_tanh)_and_mul
# public function -> fp32 oracle; the three share one kernel (ACT) and one argument check
ACT_AND_MUL = {
    "silu_and_mul": (fo.silu_and_mul, ref.ref_silu_and_mul),
    "gelu_and_mul": (fo.gelu_and_mul, lambda h: ref.ref_gelu_and_mul(h, False)),
    "gelu_tanh_and_mul": (fo.gelu_tanh_and_mul, lambda h: ref.ref_gelu_and_mul(h, True)),
}


def _act_input(*shape, generator, dtype, device):
    """``randn * 3`` (never 0) with the gate half of the first row swept over [-12, 12] (odd points
    of an even sweep: no exact 0): past |x| ~ 10 the tanh form's exp2 overflows to inf (or
    underflows to 0), the erf form saturates."""
    x = torch.randn(*shape, generator=generator) * 3
    d = shape[-1] // 2
    if x.numel():
        x.view(-1, shape[-1])[0, :d] = torch.linspace(-12, 12, 2 * d)[1::2]
    return x.to(device, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # the interpreter's inf: intended
@pytest.mark.parametrize("name", sorted(ACT_AND_MUL))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", [(7, 48), (2, 3, 20), (0, 16), (5, 2), (3, 0), (0,)], ids=lambda s: "x".join(map(str, s)))
def test_act_and_mul(device, backend, name, dtype, shape):
    fn, oracle = ACT_AND_MUL[name]
    x = _act_input(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype, device=device)
    with poisoned_allocations():
        y = fn(x)
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype and y.is_contiguous()
    assert_close(name, y, oracle(x.float().cpu()).to(dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # the interpreter's inf: intended
@pytest.mark.parametrize("name", sorted(ACT_AND_MUL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_act_and_mul_out_strided(device, backend, name, dtype):
    """Row-strided input, out= given (poisoned, written in place and returned), and an out whose
    leading dims cannot be flattened."""
    fn, oracle = ACT_AND_MUL[name]
    g = torch.Generator().manual_seed(2)
    big = _act_input(6, 40, generator=g, dtype=dtype, device=device)
    x = big[:, :24]  # row stride 40
    out = poison(6, 12, dtype=dtype, device=device)
    assert fn(x, out=out, enable_pdl=True) is out
    assert_close(f"{name} out=", out, oracle(x.float().cpu()).to(dtype))
    out3 = poison(3, 4, 10, dtype=dtype, device=device).transpose(0, 1)  # [4, 3, 10], not flattenable
    x3 = _act_input(4, 3, 20, generator=g, dtype=dtype, device=device)
    fn(x3, out=out3)
    assert_close(f"{name} out= transposed", out3, oracle(x3.float().cpu()).to(dtype))


# ----------------------------------------------------------------------------------- moe_sum
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_moe_sum(device, backend, dtype, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(9, k, 40, generator=g).to(device, dtype)
    with poisoned_allocations():
        y = fo.moe_sum(x, 2.5)
    assert y.shape == (9, 40) and y.dtype == dtype
    assert_close("moe_sum", y, ref.ref_moe_sum(x.float().cpu(), 2.5).to(dtype))
    # fixed j order: bitwise reproducible; a strided [T, k, H] view works too
    assert torch.equal(y, fo.moe_sum(x, 2.5))
    xs = torch.randn(9, k + 1, 40, generator=g).to(device, dtype)[:, 1:]
    assert_close("moe_sum strided", fo.moe_sum(xs), ref.ref_moe_sum(xs.float().cpu()).to(dtype))


# -------------------------------------------------------------------------- moe_grouped_gemm
def check_grouped_gemm(device, dtype, block_size, top_k, mul, *, M, K, N, E):
    """moe_grouped_gemm on random a, w and ids (with -1s) against the oracle; returns (c, ids)."""
    g = torch.Generator().manual_seed(block_size + top_k)
    a = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(E, N, K, generator=g) * K ** -0.5).to(device, dtype)
    ids = torch.randint(-1, E, (M, top_k), generator=g, dtype=torch.int32)
    tw = torch.rand(M, top_k, generator=g)
    sid, eid, ntp = ref_moe_align_block_size(ids, block_size, E)
    with poisoned_allocations():
        c = fo.moe_grouped_gemm(a, w, sid.to(device), eid.to(device), ntp.to(device), block_size, top_k,
                                tw.to(device), mul)
    exp = ref.ref_moe_grouped_gemm(a.float().cpu(), w.float().cpu(), sid, eid, ntp, block_size, top_k, tw, mul)
    assert c.shape == (M * top_k, N) and c.dtype == dtype
    assert_close("moe_grouped_gemm", c, exp.to(dtype).float(), dtype=dtype)
    return c, ids


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("top_k,mul", [(1, False), (2, True), (3, False)], ids=["k1", "k2-mul", "k3"])
def test_moe_grouped_gemm(device, backend, dtype, block_size, top_k, mul):
    """Against the block-by-block oracle on the alignment oracle's output: skipped pairs (-1)
    give zero rows, uneven K and N exercise the masks."""
    c, ids = check_grouped_gemm(device, dtype, block_size, top_k, mul, M=11, K=40, N=24, E=5)
    skipped = (ids.reshape(-1) < 0).to(device)
    assert (c[skipped] == 0).all()


def test_moe_grouped_gemm_strided_a_and_w(device, backend):
    """Row-strided a and an expert-strided w (a slice of a bigger stack) are read in place."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, 50, generator=g)[:, :32].to(device)
    w = (torch.randn(6, 16, 32, generator=g)[::2]).to(device)  # experts 0, 2, 4 of the stack
    ids = torch.randint(0, 3, (6, 2), generator=g, dtype=torch.int32)
    sid, eid, ntp = ref_moe_align_block_size(ids, 16, 3)
    c = fo.moe_grouped_gemm(a, w, sid.to(device), eid.to(device), ntp.to(device), 16, 2)
    exp = ref.ref_moe_grouped_gemm(a.cpu(), w.cpu(), sid, eid, ntp, 16, 2)
    assert_close("moe_grouped_gemm strided", c, exp, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------ fused_moe's align
@pytest.mark.parametrize("path", ["one-program", "two-launch", "table"])
@pytest.mark.parametrize("T,k,E,B,remote", [(17, 2, 4, 16, False), (40, 3, 6, 32, True), (300, 8, 20, 16, True),
                                            (2, 1, 3, 64, False), (16, 8, 128, 16, False)], ids=lambda v: str(v))
def test_fused_align_layout(device, T, k, E, B, remote, path):
    """fused_moe's internal alignment (all three paths) against the align oracle: the same
    padded total and expert per block, each bucket holding exactly its pairs (any order), pads
    = numel."""
    g = torch.Generator().manual_seed(T)
    Eg = 2 * E if remote else E
    ids = torch.randint(-1, Eg, (T, k), generator=g, dtype=torch.int32)
    emap = None
    if remote:  # this rank holds the even global experts
        emap = torch.full((Eg,), -1, dtype=torch.int32)
        emap[::2] = torch.arange(E, dtype=torch.int32)
    one_max = 1 << 30 if path == "one-program" else -1
    sid, eid, ntp = ops.fused_align(ids.to(device), B, E, emap.to(device) if remote else None, one_program_max=one_max,
                                    table_min=0 if path == "table" else 1 << 62)
    rs, re_, rn = ref_moe_align_block_size(ids, B, Eg, emap)
    n = int(ntp[0])
    assert n == int(rn[0]) and sid.numel() == T * k + (E + 1) * (B - 1)
    sid, eid = sid.cpu()[:n], eid.cpu()[: n // B]
    assert torch.equal(eid, re_[: n // B])
    # bucket by bucket (each expert's blocks are consecutive, the skip bucket last): the same
    # pairs, everything else in the bucket's blocks the pad value
    starts = [b for b in range(n // B) if b == 0 or eid[b] != eid[b - 1]]
    for i, b0 in enumerate(starts):
        b1 = starts[i + 1] if i + 1 < len(starts) else n // B
        got, exp = sid[b0 * B:b1 * B], rs[b0 * B:b1 * B]
        assert sorted(got.tolist()) == sorted(exp.tolist()), (b0, b1)


# --------------------------------------------------------------------------------- fused_moe
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("T", [0, 1, 3, 17])
def test_fused_moe(device, backend, dtype, T):
    """T 1 and 3 with E 8, k 2 take the one-pair-per-block decode path (T*k*4 <= E) for T=1;
    the others go through the alignment."""
    x, w1, w2, tw, ids = make_moe(T, 32, 16, 8, 2, dtype, device, seed=T)
    with poisoned_allocations():
        out = fused_moe(x, w1, w2, tw, ids, routed_scaling_factor=1.5)
    assert out.shape == (T, 32) and (T == 0 or out.data_ptr() != x.data_ptr())
    check_layer("fused_moe", out, x, w1, w2, tw, ids, rsf=1.5)


@pytest.mark.parametrize("remote", [False, True])
def test_fused_moe_table_align(device, monkeypatch, remote):
    """fused_moe with its alignment on the table path (ALIGN_TABLE_MIN 0): skipped rows (-1)
    and, with an expert map, remote experts contribute 0, as on the default paths."""
    monkeypatch.setattr(ops, "ALIGN_TABLE_MIN", 0)
    T, H, I, E, k = 33, 32, 16, 6, 2
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, torch.float32, device, seed=77)
    kw, call = {}, {}
    if remote:  # 2E global experts; this rank holds the even ones as its local 0..E-1
        g = torch.Generator().manual_seed(78)
        ids = torch.rand(T, 2 * E, generator=g).argsort(-1)[:, :k].int().to(device)
        emap = torch.full((2 * E,), -1, dtype=torch.int32)
        emap[::2] = torch.arange(E, dtype=torch.int32)
        kw["expert_map"] = emap.to(device)
        call = dict(expert_map=kw["expert_map"], global_num_experts=2 * E)
    ids[[0, 9]] = -1
    with poisoned_allocations():
        out = fused_moe(x, w1, w2, tw, ids, **call)
    check_layer("fused_moe table align", out, x, w1, w2, tw, ids, **kw)


SCENARIOS = ["skip-rows", "one-hot", "empty-experts", "map-half-remote", "on-input-k1", "non-contiguous-x",
             "decode-pairs-map", "int64-ids"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fused_moe_scenarios(device, backend, scenario):
    T, H, I, E, k = 17, 32, 16, 6, 2
    dtype = torch.float32
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, dtype, device, seed=hash(scenario) % 1000)
    kw, call = {}, {}
    if scenario == "skip-rows":
        ids[[0, 5, 16]] = -1
        ids[7, 1] = -1
    elif scenario == "one-hot":
        ids[:, 0] = 3
        ids[:, 1] = torch.where(ids[:, 1] == 3, 0, ids[:, 1]).to(ids.dtype)
    elif scenario == "empty-experts":
        ids = ids % 2  # experts 2..5 get nothing (and k columns may repeat an expert)
        ids[:, 1] = 1 - ids[:, 0]
    elif scenario == "map-half-remote":
        Eg = 2 * E  # global experts; this rank holds the odd ones
        g = torch.Generator().manual_seed(9)
        ids = torch.rand(T, Eg, generator=g).argsort(-1)[:, :k].int().to(device)
        ids[2, 0] = -1
        emap = torch.full((Eg,), -1, dtype=torch.int32)
        emap[1::2] = torch.arange(E, dtype=torch.int32)
        kw["expert_map"] = emap.to(device)
        call = dict(expert_map=kw["expert_map"], global_num_experts=Eg)
    elif scenario == "on-input-k1":
        tw, ids = tw[:, :1].contiguous(), ids[:, :1].contiguous()
        kw = dict(on_input=True, rsf=2.0)
        call = dict(apply_router_weight_on_input=True, routed_scaling_factor=2.0)
    elif scenario == "non-contiguous-x":
        big = torch.randn(T, H + 24, generator=torch.Generator().manual_seed(3)).to(device, dtype)
        x = big[:, 5:5 + H]
    elif scenario == "decode-pairs-map":
        T, E = 2, 16
        x, w1, w2, tw, ids = make_moe(T, H, I, E, k, dtype, device, seed=4)
        ids[1, 1] = -1
        emap = torch.arange(E, dtype=torch.int32)
        emap[ids[0, 0].item()] = -1  # one of token 0's experts is remote
        kw["expert_map"] = emap.to(device)
        call = dict(expert_map=kw["expert_map"])
    elif scenario == "int64-ids":
        ids = ids.long()
    with poisoned_allocations():
        out = fused_moe(x, w1, w2, tw, ids, **call)
    check_layer(scenario, out, x, w1, w2, tw, ids, **kw)
    if scenario == "map-half-remote":  # remote pairs contribute exactly 0
        local = torch.where(ids >= 0, kw["expert_map"][ids.clamp(min=0).long()], -1)
        none_local = (local < 0).all(1)
        if none_local.any():
            assert (out[none_local] == 0).all()


@pytest.mark.parametrize("T,sort_x", [(1, False), (17, False), (17, True)], ids=["decode-pairs", "aligned", "sort-x"])
def test_fused_moe_weight_descriptor_path(device, monkeypatch, T, sort_x):
    """Configs with "tma": weight tiles (and sorted A tiles) through tensor descriptors (zero
    fill past N and K instead of wrapped pointers); "sort_x": x copied into slot order before
    GEMM1. H and I not multiples of the tiles."""
    real = ops.moe_config

    def with_tma(*a):
        cfg = real(*a)
        g1 = {**cfg["gemm1"], "tma": True, **({"sort_x": True} if sort_x else {})}
        return {**cfg, "gemm1": g1, "gemm2": {**cfg["gemm2"], "tma": True}}

    monkeypatch.setattr(ops, "moe_config", with_tma)
    monkeypatch.setattr(ops, "DECODE_ONE_LAUNCH", False)  # T=1: the pair path's GEMMs, not the one-launch kernel
    x, w1, w2, tw, ids = make_moe(T, 40, 24, 8, 2, torch.bfloat16, device, seed=21)
    with poisoned_allocations():
        out = fused_moe(x, w1, w2, tw, ids)
    check_layer("fused_moe tma", out, x, w1, w2, tw, ids, pipeline=False)


def _skips_and_remote(ids, w1, w2, emap: list, skip_rows: list):
    """Expert parallelism in a test layer: rows ``skip_rows`` of ids become -1 (padding tokens),
    ``emap`` maps global experts to local ones (-1: remote) and the weights keep the local ones.
    Returns (ids, w1, w2, oracle kwargs, fused_moe kwargs)."""
    ids = ids.clone()
    ids[skip_rows] = -1
    m = torch.tensor(emap, dtype=torch.int32, device=ids.device)
    n = int((m >= 0).sum())
    return (ids, w1[:n].contiguous(), w2[:n].contiguous(), {"expert_map": m},
            {"expert_map": m, "global_num_experts": len(emap)})


@pytest.mark.parametrize("what", ["plain", "tma-sort-x", "skips-map", "persistent-gemm2"])
@pytest.mark.parametrize("up_first", [False, True], ids=["gate-up", "up-gate"])
def test_fused_moe_half_tail(device, monkeypatch, what, up_first):
    """BLOCK_M 32 with HALF_TAIL_MIN_BLOCK_M 32: an expert's last block whose second half is
    all padding multiplies only its first 16 rows (its own code path, A by a half-height
    descriptor with "tma"). The routing gives experts tails of 1..16 rows (the half path),
    17..31 (the full path) and exact multiples of 32; against the dense oracle, with
    poisoned allocations (the half path leaves the intermediate's padding rows unwritten, and a
    persistent GEMM2, which has no half path, reads them as pads). With w1 as [gate; up] and as
    [up; gate] (cutlass_fused_moe's order)."""
    monkeypatch.setattr(ops, "HALF_TAIL_MIN_BLOCK_M", 32)
    monkeypatch.setattr(ops, "DECODE_ONE_LAUNCH", False)
    real = ops.moe_config

    def cfg32(*a):
        cfg = real(*a)
        g1, g2 = dict(cfg["gemm1"]), dict(cfg["gemm2"])
        if what == "tma-sort-x":
            g1.update(tma=True, sort_x=True)
            g2.update(tma=True)
        elif what == "persistent-gemm2":
            g2.update(tma=True, persistent=True)
        return {**cfg, "block_m": 32, "pairs": False, "gemm1": g1, "gemm2": g2}

    monkeypatch.setattr(ops, "moe_config", cfg32)
    T, H, I, E, k = 50, 40, 24, 5, 2
    dtype = torch.bfloat16 if what in ("tma-sort-x", "persistent-gemm2") else torch.float32
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, dtype, device, seed=31)
    # pairs per expert: 0 -> 5 (tail 5), 1 -> 40 (tail 8), 2 -> 23 (tail 23), 3 -> 32, 4 -> 0
    first = torch.tensor([0] * 5 + [1] * 40 + [2] * 5)
    second = torch.tensor([2] * 18 + [3] * 32)
    second = torch.where(second == first, 3, second)
    ids = torch.stack([first, second], 1).int().to(device)
    kw, call = {}, {}
    if what == "skips-map":  # expert 2 is remote
        ids, w1, w2, kw, call = _skips_and_remote(ids, w1, w2, [0, 1, -1, 2, 3], [3, 44])
    counts = torch.bincount(ids[ids >= 0].long().cpu(), minlength=E)
    assert any(0 < c % 32 <= 16 for c in counts.tolist()) and any(c % 32 > 16 for c in counts.tolist())
    with poisoned_allocations():
        out = _fused_moe(x, up_gate(w1) if up_first else w1, w2, tw, ids, w1_up_first=up_first, **call)
    check_layer(f"fused_moe half tail {what}", out, x, w1, w2, tw, ids, pipeline=False, **kw)


@pytest.mark.parametrize("what", ["gemm2", "gemm1", "both-bf16", "skips-map", "many-waves"])
def test_fused_moe_tail_split(device, monkeypatch, what):
    """Config key "tail_split": the tiles of a GEMM's last, partial wave split along K into
    pieces that store fp32 partial tiles; the last piece of a tile folds them in piece order and
    runs the epilogue (routing weight in GEMM2, silu*up in GEMM1). 7 programs a wave under the
    interpreter; the test checks on the host (``ops.tail_plan`` over the alignment's live blocks)
    that the routing does split the GEMMs it configures, then compares with the dense oracle
    under poisoned allocations. "many-waves" (CUDA) runs the real wave size: pieces of different
    programs meet on the counters concurrently."""
    if what == "many-waves" and device != "cuda":
        pytest.skip("sizes for the GPU")
    monkeypatch.setattr(ops, "DECODE_ONE_LAUNCH", False)
    real = ops.moe_config
    s1 = 4 if what in ("gemm1", "both-bf16", "skips-map", "many-waves") else 0
    s2 = 4 if what != "gemm1" else 0
    bm = 16 if what != "many-waves" else 128

    def split_cfg(*a):
        cfg = real(*a)
        g1 = {**cfg["gemm1"], "tma": True, "sort_x": True, "tail_split": s1}
        g2 = {**cfg["gemm2"], "tma": True, "tail_split": s2}
        for g in (g1, g2):
            g.pop("persistent", None)
            if what != "many-waves":
                g.update(BLOCK_N=16, BLOCK_K=16)
            else:
                g.update(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        return {**cfg, "block_m": bm, "pairs": False, "gemm1": g1, "gemm2": g2}

    monkeypatch.setattr(ops, "moe_config", split_cfg)
    # (sizes chosen so that under this seed both GEMMs have tail tiles of local experts, and every
    # piece has K work)
    T, H, I, E, k = ((29, 32, 32, 5, 2) if what == "skips-map" else (29, 96, 96, 5, 2) if what != "many-waves"
                     else (2048, 1024, 3584, 8, 2))
    dtype = torch.float32 if what in ("gemm2", "gemm1") else torch.bfloat16
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, dtype, device, seed=71)
    kw, call = {}, {}
    if what == "skips-map":  # expert 2 is remote
        ids, w1, w2, kw, call = _skips_and_remote(ids, w1, w2, [0, 1, -1, 2, 3], [3, 11])
    num_local = w1.shape[0]
    slots = ops.TAIL_SLOTS_INTERP
    if device == "cuda":  # small cases: the interpreter's wave of 7 programs, so the GPU splits them too
        slots = torch.cuda.get_device_properties(0).multi_processor_count if what == "many-waves" else slots
        monkeypatch.setattr(ops, "TAIL_SLOTS", slots)
    _, expert_ids, ntp = ops.fused_align(ids, bm, num_local, kw.get("expert_map"))
    live_m = -(-int(ntp.item()) // bm)
    cfg = split_cfg(T, k, E, I, H, dtype, x.device)
    splits = []
    for s, g, n, kdim in ((s1, cfg["gemm1"], I, H), (s2, cfg["gemm2"], H, I)):
        if s:  # the kernel's tail, on the host: some tail tile of a local expert, every piece with K work
            n_pid_n = -(-n // g["BLOCK_N"])
            full, tail, pieces = ops.tail_plan(live_m * n_pid_n, slots, s)
            width = g["GROUP_M"] * n_pid_n
            tail_m = []
            for t in range(full, full + tail):  # ops._grouped_tile
                first = t // width * g["GROUP_M"]
                tail_m.append(first + (t % width) % min(live_m - first, g["GROUP_M"]))
            k_tiles = -(-kdim // g["BLOCK_K"])
            splits.append(tail > 0 and pieces > 1 and (pieces - 1) * -(-k_tiles // pieces) < k_tiles
                          and any(expert_ids[m].item() >= 0 for m in tail_m))
    # (the GPU's routing decides which of its GEMMs end in a partial wave: at least one)
    assert (any if what == "many-waves" else all)(splits), (what, splits)
    with poisoned_allocations():
        out = fused_moe(x, w1, w2, tw, ids, **call)
    check_layer(f"fused_moe tail split {what}", out, x, w1, w2, tw, ids, pipeline=False, **kw)


@pytest.mark.parametrize("what", ["gemm2", "both-sort-x", "both-gather", "both-skips-map"])
@pytest.mark.parametrize("up_first", [False, True], ids=["gate-up", "up-gate"])
def test_fused_moe_persistent_gemm(device, monkeypatch, what, up_first):
    """Configs with "persistent" (and "tma"): the aligned GEMMs as a grid of persistent programs
    walking the live tiles (3 programs under the interpreter, so each takes several tiles).
    GEMM1 reads x sorted by a descriptor ("sort_x") or gathers its rows by pointers. Skipped
    blocks (ids -1, remote experts) store zeros without an MMA. H and I not multiples of the
    tiles; against the dense oracle with poisoned allocations. With w1 as [gate; up] and as
    [up; gate] (cutlass_fused_moe's order)."""
    monkeypatch.setattr(ops, "DECODE_ONE_LAUNCH", False)
    real = ops.moe_config

    def persistent(*a):
        cfg = real(*a)
        g1, g2 = dict(cfg["gemm1"]), {**cfg["gemm2"], "tma": True, "persistent": True}
        if what != "gemm2":
            g1.update(tma=True, persistent=True, **({"sort_x": True} if what == "both-sort-x" else {}))
            g1.pop("sort_x", None) if what != "both-sort-x" else None
        return {**cfg, "pairs": False, "gemm1": g1, "gemm2": g2}

    monkeypatch.setattr(ops, "moe_config", persistent)
    launched = []
    real_kernel = ops._moe_gemm_persistent_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real_kernel[grid]

    monkeypatch.setattr(ops, "_moe_gemm_persistent_kernel", Spy())
    T, H, I, E, k = 37, 40, 24, 6, 2
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, torch.bfloat16, device, seed=41)
    kw, call = {}, {}
    if what == "both-skips-map":  # experts 1 and 4 are remote
        ids, w1, w2, kw, call = _skips_and_remote(ids, w1, w2, [0, -1, 1, 2, -1, 3], [0, 5, 20])
    with poisoned_allocations():
        out = _fused_moe(x, up_gate(w1) if up_first else w1, w2, tw, ids, w1_up_first=up_first, **call)
    check_layer(f"fused_moe persistent {what}", out, x, w1, w2, tw, ids, pipeline=False, **kw)
    assert len(launched) == (1 if what == "gemm2" else 2), launched


@pytest.mark.parametrize("what", ["sort-x", "gather", "half-tail", "persistent", "skips-map", "tail-split"])
def test_fused_moe_one_dot(device, monkeypatch, what):
    """Config key "one_dot" (GEMM1 with "tma"): the gate and up tiles of w1 come as one box of
    the [E, 2, I, H] view and go through one dot into a [BM, 2 * BLOCK_N] accumulator that is
    split for the silu(gate) * up epilogue. I is not a multiple of BLOCK_N (the box's zero fill
    past I, not the up rows, fills the last tile) nor H of BLOCK_K. A spy checks which kernel ran
    GEMM1 and that it took the one-dot form (with "tail_split" it must not: pieces keep two
    accumulators); against the dense oracle with poisoned allocations."""
    monkeypatch.setattr(ops, "DECODE_ONE_LAUNCH", False)
    if what == "half-tail":
        monkeypatch.setattr(ops, "HALF_TAIL_MIN_BLOCK_M", 32)
    real = ops.moe_config

    def one_dot(*a):
        cfg = real(*a)
        g1 = {**cfg["gemm1"], "tma": True, "one_dot": True, "BLOCK_N": 16, "BLOCK_K": 16}
        g1.pop("persistent", None)
        if what != "gather":
            g1["sort_x"] = True
        if what == "persistent":
            g1["persistent"] = True
        if what == "tail-split":
            g1["tail_split"] = 4
        return {**cfg, "block_m": 32 if what == "half-tail" else 16, "pairs": False, "gemm1": g1,
                "gemm2": {**cfg["gemm2"], "tma": True}}

    monkeypatch.setattr(ops, "moe_config", one_dot)
    seen = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["FUSE_SILU"]:
                    seen.append((self.name, kw["GU_ONE"]))
                return self.kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ops, "_moe_gemm_kernel", Spy("block", ops._moe_gemm_kernel))
    monkeypatch.setattr(ops, "_moe_gemm_persistent_kernel", Spy("persistent", ops._moe_gemm_persistent_kernel))
    T, H, I, E, k = 37, 40, 24, 5, 2
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, torch.bfloat16, device, seed=43)
    kw, call = {}, {}
    if what == "skips-map":  # expert 1 is remote
        ids, w1, w2, kw, call = _skips_and_remote(ids, w1, w2, [0, -1, 1, 2, 3], [0, 5, 20])
    with poisoned_allocations():
        out = fused_moe(x, w1, w2, tw, ids, **call)
    check_layer(f"fused_moe one_dot {what}", out, x, w1, w2, tw, ids, pipeline=False, **kw)
    assert seen == [("persistent" if what == "persistent" else "block", what != "tail-split")], seen


def test_fused_moe_k1_weight_on_output(device):
    """k = 1 with the routing weight applied in GEMM2's epilogue (the default), random weights,
    on the aligned path: a dropped or doubled weight must show (weights of 1 would hide it)."""
    x, w1, w2, tw, ids = make_moe(17, 32, 16, 6, 1, torch.float32, device, seed=41)
    assert not ops._pairs_rule(17, 1, 6)
    assert (tw - 1).abs().min() > 1e-3
    with poisoned_allocations():
        out = fused_moe(x, w1, w2, tw, ids, routed_scaling_factor=1.5)
    check_layer("k=1 weight on output", out, x, w1, w2, tw, ids, rsf=1.5)


DECODE_CASES = {  # (T, H, I, E, k, dtype, what)
    "plain": (1, 32, 16, 8, 2, torch.float32, None),
    "bf16-T2-H-not-pow2": (2, 40, 24, 16, 2, torch.bfloat16, None),
    "fp16-k5-skips": (3, 48, 20, 64, 5, torch.float16, "skips"),
    "map-remote": (2, 32, 16, 16, 2, torch.float32, "map"),
    "on-input-k1": (1, 32, 16, 4, 1, torch.float32, "on_input"),
    "k1-on-output": (1, 32, 16, 4, 1, torch.float32, None),
    "H-in-chunks": (1, 2304, 16, 8, 2, torch.float32, None),  # phase 1 loops over 9 chunks of 256
    # w1 as [up; gate] (cutlass_fused_moe's order), read in place by both phase-1 loops
    "up-first": (2, 48, 20, 32, 2, torch.bfloat16, "up_first"),
    "up-first-H-in-chunks": (1, 2304, 16, 8, 2, torch.float32, "up_first"),
}


@pytest.mark.parametrize("programs", [1, 3, 7])
@pytest.mark.parametrize("case", list(DECODE_CASES))
@pytest.mark.parametrize("one_launch", [True, False], ids=["decode-kernel", "pair-gemms"])
def test_fused_moe_decode_paths(device, backend, monkeypatch, case, programs, one_launch):
    """Decode batches (T*k*4 <= E) take the pair path: by default the whole layer in one
    persistent kernel (``_moe_decode_kernel``, its work striped over ``programs`` programs; on
    the GPU one launch with a grid barrier, under the interpreter its two phases), else the
    pair-per-block GEMMs and the finalize. Both against the dense oracle, with skipped pairs,
    remote experts, the routing weight on the input, H and I not powers of two."""
    T, H, I, E, k, dtype, what = DECODE_CASES[case]
    assert ops._pairs_rule(T, k, E)
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, dtype, device, seed=sum(map(ord, case)))
    kw, call = {"rsf": 1.5}, {"routed_scaling_factor": 1.5}
    if what == "skips":
        ids[0, 1] = -1
        ids[2] = -1  # a token with no expert at all: output row 0
    elif what == "map":
        emap = torch.arange(E, dtype=torch.int32)
        emap[ids[0, 0].item()] = -1
        emap = emap.to(device)
        kw["expert_map"] = call["expert_map"] = emap
    elif what == "on_input":
        kw, call = dict(on_input=True, rsf=2.0), dict(apply_router_weight_on_input=True, routed_scaling_factor=2.0)
    elif what == "up_first":
        call["w1_up_first"] = True
    monkeypatch.setattr(ops, "DECODE_ONE_LAUNCH", one_launch)
    monkeypatch.setattr(ops, "DECODE_MAX_ELEMS", 1 << 40)  # CUDA too, whatever the shipped size rule
    for var in ("FLASHOPS_MOE_DECODE_ONE_LAUNCH", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        monkeypatch.delenv(var, raising=False)  # the caller's switches would pick the path instead
    real, used = ops._moe_decode, []

    def spy(*a, **k_):
        used.append(1)
        return real(*a, **k_, programs=programs, pipe1=programs != 3)  # both phase-1 loops

    monkeypatch.setattr(ops, "_moe_decode", spy)
    with poisoned_allocations():
        out = _fused_moe(x, up_gate(w1) if what == "up_first" else w1, w2, tw, ids, **call)
    if backend == "kernel":
        assert len(used) == (1 if one_launch else 0)
    check_layer(case, out, x, w1, w2, tw, ids, **kw)
    if what == "skips":
        assert (out[2] == 0).all()


def test_decode_tiles():
    """Tile loads of about 16k elements, H split exactly where a power of two divides it."""
    assert ops.decode_tiles(1, 8, 192, 2048) == {"BI": 4, "BK": 2048, "BH": 8, "BJ": 256, "KP": 8}  # Qwen3
    assert ops.decode_tiles(1, 8, 512, 7168) == {"BI": 8, "BK": 1024, "BH": 4, "BJ": 512, "KP": 8}  # DeepSeek-V3
    assert ops.decode_tiles(1, 2, 7168, 4096) == {"BI": 4, "BK": 2048, "BH": 8, "BJ": 1024, "KP": 2}  # Mixtral
    assert ops.decode_tiles(1, 3, 20, 40) == {"BI": 32, "BK": 64, "BH": 64, "BJ": 32, "KP": 4}


def test_fused_moe_rsf_in_routing_or_output(device, backend):
    """routed_scaling_factor in the routing weights or on the output: the same layer output."""
    x, w1, w2, tw, ids = make_moe(9, 32, 16, 4, 2, torch.float32, device, seed=11)
    a = fused_moe(x, w1, w2, tw * 2.5, ids)
    b = fused_moe(x, w1, w2, tw, ids, routed_scaling_factor=2.5)
    assert_close("rsf placement", a, b, atol=1e-4, rtol=1e-4)
    check_layer("rsf output", b, x, w1, w2, tw, ids, pipeline=False, rsf=2.5)


def test_fused_moe_deterministic_and_no_alias(device):
    x, w1, w2, tw, ids = make_moe(17, 32, 16, 4, 2, torch.bfloat16, device, seed=12)
    x0 = x.clone()
    a = fused_moe(x, w1, w2, tw, ids)
    b = fused_moe(x, w1, w2, tw, ids)
    assert torch.equal(a, b) and torch.equal(x, x0)
    assert a.data_ptr() != x.data_ptr()


@settings(deadline=None)
@given(data=st.data())
def test_fused_moe_hypothesis(data):
    E = data.draw(st.integers(1, 12), label="E")
    k = data.draw(st.integers(1, min(E, 4)), label="k")
    T = data.draw(st.integers(0, 20), label="T")
    H = data.draw(st.sampled_from([16, 24, 40]), label="H")
    I = data.draw(st.sampled_from([8, 16, 20]), label="I")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    rsf = data.draw(st.sampled_from([1.0, 2.5]), label="rsf")
    # GEMM forms beside the shape's own config: weights by descriptor, x sorted, one dot for gate
    # and up, persistent programs, tail split (each falls back where its preconditions fail)
    g1_form = data.draw(st.sampled_from(sorted(_HYP_GEMM1_FORMS)), label="gemm1 form")
    g2_form = data.draw(st.sampled_from(sorted(_HYP_GEMM2_FORMS)), label="gemm2 form")
    block_m = data.draw(st.sampled_from([None, 16, 32]), label="block_m")
    up_first = data.draw(st.booleans(), label="w1 [up; gate]")
    _fused_moe_case(E, k, T, H, I, dtype, seed, rsf, g1_form, g2_form, block_m, up_first)


# Draws the ci profile's 8 examples can miss (st.data() tests take no @example): every GEMM form
# with T > 0, tokens over several blocks, k = E, a lone expert, dropped ids and both rsf values.
@pytest.mark.parametrize("E,k,T,H,I,g1_form,g2_form,block_m", [
    (8, 2, 20, 40, 20, "tail-split", "tail-split", 16),
    (6, 3, 17, 24, 16, "persistent-one-dot", "persistent", None),
    (4, 4, 13, 16, 8, "one-dot-sort-x", "tma", 32),
    (1, 1, 19, 40, 20, "tma-sort-x", "as-config", 16),
    (12, 4, 11, 24, 20, "one-dot", "persistent", 16),
    (5, 2, 9, 16, 16, "tma", "tail-split", None),
    (6, 2, 15, 40, 20, "persistent", "as-config", 16),
])
@pytest.mark.parametrize("up_first", [False, True], ids=["gate-up", "up-gate"])
def test_fused_moe_gemm_forms(E, k, T, H, I, g1_form, g2_form, block_m, up_first):
    """Each GEMM form, with w1 as ``[gate; up]`` and as ``[up; gate]`` (cutlass_fused_moe's
    order, read in place)."""
    for i, dtype in enumerate(DTYPES):
        _fused_moe_case(E, k, T, H, I, dtype, 100 + i, (1.0, 2.5)[i % 2], g1_form, g2_form, block_m, up_first)


def _fused_moe_case(E, k, T, H, I, dtype, seed, rsf, g1_form, g2_form, block_m, up_first=False):
    device = DEVICE  # (a function-scoped fixture would not be reset between hypothesis examples)
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, dtype, device, seed=seed)
    if T:
        drop = torch.rand(T, k, generator=torch.Generator().manual_seed(seed)) < 0.2
        ids = torch.where(drop.to(device), -1, ids).int()
    real = ops.moe_config

    def drawn(*a):
        cfg = real(*a)
        return {**cfg, "block_m": block_m or cfg["block_m"],
                "gemm1": {**cfg["gemm1"], **_HYP_GEMM1_FORMS[g1_form]},
                "gemm2": {**cfg["gemm2"], **_HYP_GEMM2_FORMS[g2_form]}}

    ops.moe_config = drawn
    try:
        with poisoned_allocations(), warnings.catch_warnings():
            # under the interpreter an integer division by zero (undefined on the GPU) warns
            warnings.filterwarnings("error", message="divide by zero", category=RuntimeWarning)
            if up_first:
                out = _fused_moe(x, up_gate(w1), w2, tw, ids, routed_scaling_factor=rsf, w1_up_first=True)
            else:
                out = fused_moe(x, w1, w2, tw, ids, routed_scaling_factor=rsf)
    finally:
        ops.moe_config = real
    check_layer("fused_moe (%s / %s%s)" % (g1_form, g2_form, ", [up; gate]" if up_first else ""), out, x, w1, w2,
                tw, ids, pipeline=False, rsf=rsf)


_HYP_GEMM1_FORMS = {
    "as-config": {}, "tma": {"tma": True}, "tma-sort-x": {"tma": True, "sort_x": True},
    "one-dot": {"tma": True, "one_dot": True}, "one-dot-sort-x": {"tma": True, "one_dot": True, "sort_x": True},
    "persistent-one-dot": {"tma": True, "one_dot": True, "sort_x": True, "persistent": True},
    "persistent": {"tma": True, "persistent": True},
    "tail-split": {"tma": True, "sort_x": True, "tail_split": 4},
}
_HYP_GEMM2_FORMS = {"as-config": {}, "tma": {"tma": True}, "persistent": {"tma": True, "persistent": True},
                    "tail-split": {"tma": True, "tail_split": 4}}


# ------------------------------------------------------------------------------- cutlass shim
def test_strided_operands_past_int32():
    """Views whose strides put elements past 2^31 from the base (the kernels' offsets are int64):
    moe_sum over [T, k, H] with stride(1) = 2^30 (a [k, T, H] buffer viewed token-major), and
    fused_moe with w1's rows 2^30 apart (w1 stored [2I, E, H] and transposed), whose up half
    starts 2^31 elements in. bf16 storages of 4 and 6 GiB of address space, a few pages touched;
    an int32 offset would land 4 GiB before the storage."""
    if torch.cuda.is_available():
        pytest.skip("address-space trick for the CPU")
    s, H = 2 ** 30, 16
    store = torch.empty(2 * s + H, dtype=torch.bfloat16)  # untouched pages stay virtual
    x = store.as_strided((1, 3, H), (3 * s, s, 1), 0)
    for j in range(3):
        x[0, j] = float(2 ** j)
    assert torch.equal(fo.moe_sum(x), torch.full((1, H), 7.0, dtype=torch.bfloat16))
    del x, store
    I = 2
    store = torch.empty(2 * I * s, dtype=torch.bfloat16)
    w1 = store.as_strided((1, 2 * I, H), (H, s, 1), 0)  # rows i * 2^30: the up rows at 2^31 and 3 * 2^30
    g = torch.Generator().manual_seed(5)
    w1.copy_(torch.randn(1, 2 * I, H, generator=g).to(torch.bfloat16))
    w2 = (torch.randn(1, H, I, generator=g) * I ** -0.5).to(torch.bfloat16)
    xin = torch.randn(1, H, generator=g).to(torch.bfloat16)
    tw, ids = torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32)
    out = fused_moe(xin, w1, w2, tw, ids)
    assert_close("fused_moe, w1 rows 2^30 apart", out, ref.ref_fused_moe_dense(
        xin.float(), w1.contiguous().float(), w2.float(), tw, ids), **MOE_TOL[torch.bfloat16])


@pytest.mark.parametrize("path", ["decode", "pairs", "aligned"])
def test_out_of_range_ids_stay_in_bounds(path, device, backend, monkeypatch):
    """Unchecked mode, ids outside the contract (>= E, <= -2, past the expert map, map entries
    past the local experts): such pairs are skipped on every path (the one-launch decode kernel,
    the pair-path GEMMs, the aligned path), never read past the weights. w1/w2 are views of
    larger buffers, so a read past them would add real numbers. The CPU reference backend skips
    them too (it used to raise an IndexError)."""
    H, I, E, k = 32, 16, 16, 3
    T = 6 if path == "aligned" else 1
    assert ops._pairs_rule(T, k, E) == (path != "aligned")
    if path == "pairs":
        monkeypatch.setattr(ops, "DECODE_ONE_LAUNCH", False)
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, torch.float32, device, seed=21)
    g = torch.Generator().manual_seed(22)
    b1 = torch.randn(E + 4, 2 * I, H, generator=g).to(device)
    b2 = torch.randn(E + 4, H, I, generator=g).to(device)
    b1[:E], b2[:E] = w1, w2
    w1, w2 = b1[:E], b2[:E]
    bad = ids.clone()
    bad[:, 0] = E + torch.arange(T, device=device) % 3  # E, E+1, E+2
    bad[0, 1] = -5
    good = torch.where((bad >= 0) & (bad < E), bad, -1)
    out = fused_moe(x, w1, w2, tw, bad)
    assert_close("ids out of range skipped", out, ref.ref_fused_moe_dense(x, w1, w2, tw, good), **MOE_TOL[torch.float32])
    # expert parallel: 2E global ids, this rank's map sends [E, 2E) to its experts; one entry points past them
    emap = torch.tensor([-1] * E + list(range(E)), dtype=torch.int32, device=device)
    emap[E + 1] = E + 2
    gids = ids + E
    gids[:, 0] = 2 * E + torch.arange(T, device=device) % 3  # past the map
    gids[0, 1] = E + 1  # mapped past the local experts
    local = torch.where((gids >= 0) & (gids < 2 * E), emap[gids.clamp(0, 2 * E - 1).long()], -1)
    local = torch.where((local >= 0) & (local < E), local, -1)
    out = fused_moe(x, w1, w2, tw, gids, expert_map=emap)
    assert_close("mapped ids out of range skipped", out, ref.ref_fused_moe_dense(x, w1, w2, tw, local),
                 **MOE_TOL[torch.float32])
    # an empty map (no expert on this rank, none in the batch): nothing read from it, output 0
    out = fused_moe(x, w1, w2, tw, -torch.ones_like(ids), expert_map=torch.empty(0, dtype=torch.int32, device=device))
    assert torch.equal(out, torch.zeros_like(x))


def test_cutlass_fused_moe(device, monkeypatch):
    """fc1 is [up; gate], read in place (the op gets fc1 itself, no swapped copy); ep_size 2 maps
    global ids onto this rank's contiguous shard."""
    T, H, I, E, k = 9, 32, 16, 4, 2
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, torch.float32, device, seed=13)
    fc1 = up_gate(w1)
    seen = []
    real_op = ops.fused_moe

    def spy(*a):
        seen.append((a[1], a[-1]))
        return real_op(*a)

    monkeypatch.setattr(ops, "fused_moe", spy)
    res = fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32, quant_scales=[])
    monkeypatch.setattr(ops, "fused_moe", real_op)
    assert len(seen) == 1 and seen[0][0] is fc1 and seen[0][1] is True, seen
    assert isinstance(res, list) and len(res) == 1
    check_layer("cutlass_fused_moe", res[0], x, w1, w2, tw, ids, pipeline=False)
    # expert parallel: rank 1 of 2 holds global experts [4, 8)
    g = torch.Generator().manual_seed(14)
    gids = torch.rand(T, 2 * E, generator=g).argsort(-1)[:, :k].int().to(device)
    out = poison(T, H, dtype=torch.float32, device=device)
    res = fo.cutlass_fused_moe(x, gids, tw, fc1, w2, torch.float32, ep_size=2, ep_rank=1, output=out)
    assert res[0] is out
    emap = torch.tensor([-1] * E + list(range(E)), dtype=torch.int32)
    exp = ref.ref_fused_moe_dense(x, w1, w2, tw, gids, expert_map=emap)
    assert_close("cutlass_fused_moe ep", out, exp, **MOE_TOL[torch.float32])
    with pytest.raises(NotImplementedError, match="quant_scales"):
        fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32, quant_scales=[torch.ones(1)])
    # tensor parallel (FlashInfer's own test pattern): each rank holds its slice of I in fc1's up and
    # gate halves and in fc2, computes a partial result, and the sum over ranks is the whole layer
    for tp in (2, 4):
        parts = []
        for rank in range(tp):
            sl = slice(rank * I // tp, (rank + 1) * I // tp)
            fc1_r = torch.cat([w1[:, I:][:, sl], w1[:, :I][:, sl]], 1).contiguous()
            out = poison(T, H, dtype=torch.float32, device=device)
            parts.append(fo.cutlass_fused_moe(x, ids, tw, fc1_r, w2[:, :, sl].contiguous(), torch.float32,
                                              tp_size=tp, tp_rank=rank, output=out)[0])
        check_layer(f"cutlass_fused_moe tp_size={tp}, summed", sum(parts), x, w1, w2, tw, ids, pipeline=False)
        # with expert parallelism too: rank (1, r) of (2, tp)
        parts = [fo.cutlass_fused_moe(x, gids, tw, torch.cat([w1[:, I:][:, sl], w1[:, :I][:, sl]], 1).contiguous(),
                                      w2[:, :, sl].contiguous(), torch.float32, tp_size=tp, tp_rank=rank,
                                      ep_size=2, ep_rank=1)[0]
                 for rank, sl in ((r, slice(r * I // tp, (r + 1) * I // tp)) for r in range(tp))]
        assert_close(f"cutlass_fused_moe ep x tp={tp}, summed", sum(parts), exp, **MOE_TOL[torch.float32])
    for tp, rank in ((2, 2), (2, -1)):
        _bad("^tp_rank: ", fo.cutlass_fused_moe, x, ids, tw, fc1, w2, torch.float32, tp_size=tp, tp_rank=rank)
    _bad("^tp_size: must be >= 1, got 0", fo.cutlass_fused_moe, x, ids, tw, fc1, w2, torch.float32, tp_size=0)
    # activation_type: FlashInfer's enum, its int codes (3 = Swiglu), or an engine's stand-in enum
    Standin = __import__("enum").IntEnum("ActivationType", {"Swiglu": 5})
    base = fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32)[0]
    for act in (fo.ActivationType.Swiglu, 3, Standin.Swiglu, None):
        assert_close(f"activation_type={act!r}", fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32,
                                                                      activation_type=act)[0], base, atol=0, rtol=0)
    for act, exc, match in ((fo.ActivationType.Gelu, NotImplementedError, "^activation_type: only SwiGLU"),
                            (2, NotImplementedError, r"^activation_type: only SwiGLU .* \(Silu\)"),
                            (fo.ActivationType.Situ, NotImplementedError, r"\(Situ\)"),
                            (12, ValueError, "^activation_type: 12 is not"), ("swiglu", ValueError, "^activation_type")):
        with pytest.raises(exc, match=match):
            fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32, activation_type=act)
    with pytest.raises(NotImplementedError, match="situ_beta"):
        fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32, situ_beta=torch.ones(1))
    # FlashInfer 0.7's keywords: no-ops where they cannot change the result, refused otherwise
    same = fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32, use_fused_finalize=False,
                                workspace_buffer=torch.empty(64, dtype=torch.uint8, device=device))[0]
    assert_close("use_fused_finalize=False", same, fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32)[0],
                 atol=0, rtol=0)
    for kw in (dict(profile_ids=[0, 1]), dict(use_wfp4afp8_humming=True)):
        with pytest.raises(NotImplementedError, match=next(iter(kw))):
            fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32, **kw)
    with pytest.raises(ValueError, match="^output_dtype: must be one of"):  # (it used to cast to int32)
        fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.int32)
    # errors name this function's arguments, not fused_moe's
    _bad("^fc2_expert_weights: shape", fo.cutlass_fused_moe, x, ids, tw, fc1, w2[:, :, :8], torch.float32)
    _bad("^fc1_expert_weights: dtype", fo.cutlass_fused_moe, x, ids, tw, fc1.half(), w2, torch.float32)
    _bad("^fc2_expert_weights: dtype", fo.cutlass_fused_moe, x, ids, tw, fc1, w2.half(), torch.float32)
    _bad("^fc1_expert_weights: shape", fo.cutlass_fused_moe, x[:, :16], ids, tw, fc1, w2, torch.float32)
    _bad("^token_final_scales: shape", fo.cutlass_fused_moe, x, ids, tw[:, :1], fc1, w2, torch.float32)
    _bad("^token_selected_experts: has 8 rows", fo.cutlass_fused_moe, x, ids[:8], tw[:8], fc1, w2, torch.float32)
    _bad("^token_selected_experts:", fo.cutlass_fused_moe, x, ids.float(), tw, fc1, w2, torch.float32)
    _bad("^fc2_expert_weights: last dimension", fo.cutlass_fused_moe, x, ids, tw, fc1,
         w2.transpose(1, 2).contiguous().transpose(1, 2), torch.float32)
    _bad("^token_final_scales: on meta", fo.cutlass_fused_moe, x, ids, tw.to("meta"), fc1, w2, torch.float32)
    _bad("^fc2_expert_weights: on meta", fo.cutlass_fused_moe, x, ids, tw, fc1, w2.to("meta"), torch.float32)
    _bad("^fc1_expert_weights: on meta", fo.cutlass_fused_moe, x, ids, tw, fc1.to("meta"), w2, torch.float32)
    # ids strided as fused_moe accepts them
    strided = fo.cutlass_fused_moe(x, ids.t().contiguous().t(), tw, fc1, w2, torch.float32)[0]
    assert_close("strided ids", strided, fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32)[0], atol=0, rtol=0)


def test_numpy_ints_and_none_scale(device, backend):
    """Sizes read from a config with numpy (np.int64 top_k) act as the ints they hold, and
    routed_scaling_factor=None (SGLang's default) means 1; a non-number is refused by name."""
    import numpy as np

    T, H, I, E, k = 5, 16, 8, 4, 2
    x, w1, w2, tw, ids = make_moe(T, H, I, E, k, torch.float32, device, seed=31)
    want = fused_moe(x, w1, w2, tw, ids)
    assert torch.equal(fused_moe(x, w1, w2, tw, ids, routed_scaling_factor=None), want)
    assert_close("np.float32 scale", fused_moe(x, w1, w2, tw, ids, routed_scaling_factor=np.float32(2.0)), 2 * want,
                 **MOE_TOL[torch.float32])
    y = torch.randn(T, k, H, device=device)
    assert torch.equal(fo.moe_sum(y, None), fo.moe_sum(y))
    _bad("^routed_scaling_factor: must be a number or None", fo.moe_sum, y, "2")
    sid, eid, ntp = fo.moe_align_block_size(ids, 16, E)
    assert torch.equal(fo.moe_grouped_gemm(x, w1, sid, eid, ntp, 16, np.int64(k)),
                       fo.moe_grouped_gemm(x, w1, sid, eid, ntp, 16, k))
    _bad("^top_k: must be a positive int", fo.moe_grouped_gemm, x, w1, sid, eid, ntp, 16, 2.0)


# ---------------------------------------------------------------------------------- opcheck
def _op_samples(device):
    x, w1, w2, tw, ids = make_moe(5, 16, 8, 4, 2, torch.float32, device, seed=15)
    xd, w1d, w2d, twd, idsd = make_moe(1, 16, 8, 8, 2, torch.float32, device, seed=16)  # decode pairs
    sid, eid, ntp = (t.to(device) for t in ref_moe_align_block_size(ids.cpu(), 16, 4))
    h = torch.randn(3, 2, 16, device=device)
    return {
        "moe_grouped_gemm": [(x, w1, sid, eid, ntp, 16, 2, tw, True), (x, w1, sid, eid, ntp, 16, 2, None, False)],
        "silu_and_mul": [(h,)],
        "silu_and_mul_out": [(h, torch.empty(3, 2, 8, device=device))],
        "gelu_and_mul": [(h,), (h, True)],
        "gelu_and_mul_out": [(h, torch.empty(3, 2, 8, device=device)), (h, torch.empty(3, 2, 8, device=device), True)],
        "moe_sum": [(torch.randn(4, 3, 8, device=device), 2.0)],
        "fused_moe": [(x, w1, w2, tw, ids, "silu", False, 1.5, None, -1),
                      (xd, w1d, w2d, twd, idsd, "silu", False, 1.0,
                       torch.arange(8, dtype=torch.int32, device=device), 8),
                      (x, w1, w2, tw, ids, "silu", False, 1.0, None, -1, True)],  # w1 as [up; gate]
    }


@pytest.mark.parametrize("name", ["moe_grouped_gemm", "silu_and_mul", "silu_and_mul_out", "gelu_and_mul",
                                  "gelu_and_mul_out", "moe_sum", "fused_moe"])
def test_opcheck(device, name):
    op = getattr(torch.ops.flashops, name).default
    for args in _op_samples(device)[name]:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------- compile
def test_compile_fused_moe_dynamic_no_recompile(device):
    """fused_moe and moe_sum inside one compiled function: one frame (no graph break), no
    recompile as T changes; the fused_moe op stays opaque in the graph."""

    def layer(x, w1, w2, tw, ids):
        return fused_moe(x, w1, w2, tw, ids, routed_scaling_factor=2.0) + 1.0

    cc = CompileCounter(layer, dynamic=True)
    for T in (3, 6, 10):
        args = make_moe(T, 16, 8, 4, 2, torch.float32, device, seed=T)
        assert_close(f"compiled T={T}", cc(*args), layer(*args), atol=1e-5, rtol=1e-5)
    assert cc.frames == 1
    assert cc.graph_ops() == ["flashops.fused_moe.default"]


def test_compile_cutlass_fused_moe_reads_fc1_in_place(device):
    """cutlass_fused_moe compiled (fullgraph, dynamic T, expert parallel): one frame, no
    recompile as T changes, the fused_moe op with w1_up_first=True on fc1 itself (no copy of the
    weights in the graph), the eager result."""

    def layer(x, ids, tw, fc1, w2):
        return fo.cutlass_fused_moe(x, ids, tw, fc1, w2, torch.float32, ep_size=2, ep_rank=1)[0]

    cc = CompileCounter(layer, dynamic=True)
    for T in (3, 6, 10):
        x, w1, w2, tw, ids = make_moe(T, 16, 8, 4, 2, torch.float32, device, seed=T)
        args = (x, ids + 4, tw, up_gate(w1), w2)  # this rank holds global experts 4..7
        assert_close(f"compiled T={T}", cc(*args), layer(*args), atol=0, rtol=0)
        check_layer(f"compiled cutlass T={T}", cc(*args), x, w1, w2, tw, ids, pipeline=False)
    assert cc.frames == 1
    assert cc.graph_ops() == ["flashops.fused_moe.default"]
    nodes = [n for gm in cc.counter.graphs for n in gm.graph.nodes if n.op == "call_function"]
    moe = next(n for n in nodes if str(n.target) == "flashops.fused_moe.default")
    assert moe.args[1].name == "l_fc1_" and moe.args[-1] is True, moe.args  # fc1 itself, [up; gate]
    assert not any("cat" in str(n.target) for n in nodes), [str(n.target) for n in nodes]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")
@pytest.mark.parametrize("name", sorted(ACT_AND_MUL))
def test_compile_act_and_mul_out_visible(device, name):
    fn, oracle = ACT_AND_MUL[name]

    def f(h, out):
        fn(h, out=out)
        return fo.moe_sum(out.view(out.shape[0], 1, -1))

    cc = CompileCounter(f, dynamic=True)
    for T in (3, 5):
        h = _act_input(T, 16, generator=torch.Generator().manual_seed(T), dtype=torch.float32, device=device)
        out = poison(T, 8, device=device)
        s = cc(h, out)
        assert_close("out written under compile", out, oracle(h.cpu()))
        assert_close("moe_sum of it", s, out)
    assert cc.frames == 1


# ------------------------------------------------------------------------------- bad input
def _bad(match, fn, *a, **kw):
    with pytest.raises(ValueError, match=match):
        fn(*a, **kw)


def test_fused_moe_bad_input(device):
    x, w1, w2, tw, ids = make_moe(4, 16, 8, 4, 2, torch.float32, device)
    _bad("^w1:", fused_moe, x, w1[:, :, :8], w2, tw, ids)
    _bad("^w1:", fused_moe, x, w1[:, :15], w2, tw, ids)
    _bad("^w2:", fused_moe, x, w1, w2[:, :, :4], tw, ids)
    _bad("^w2: dtype torch.float16 must match hidden_states' torch.float32", fused_moe, x, w1, w2.half(), tw, ids)
    _bad("^topk_weights:", fused_moe, x, w1, w2, tw[:, :1], ids)
    _bad("^topk_ids:", fused_moe, x, w1, w2, tw[:3], ids[:3])
    _bad("^topk_ids:", fused_moe, x, w1, w2, tw, ids.float())
    _bad("^hidden_states:", fused_moe, x.int(), w1, w2, tw, ids)
    _bad("^hidden_states:", fused_moe, x.t(), w1, w2, tw, ids)
    _bad("^apply_router_weight_on_input:", fused_moe, x, w1, w2, tw, ids, apply_router_weight_on_input=True)
    _bad("^expert_map:", fused_moe, x, w1, w2, tw, ids, expert_map=torch.arange(4, dtype=torch.int32, device=device),
         global_num_experts=6)
    _bad("^global_num_experts:", fused_moe, x, w1, w2, tw, ids, global_num_experts=6)
    with pytest.raises(NotImplementedError, match="gelu"):
        fused_moe(x, w1, w2, tw, ids, activation="gelu")
    old = _config._checks
    _config.set_checks(True)
    try:
        _bad("^topk_ids: values must lie in \\[-1, 4\\)", fused_moe, x, w1, w2, tw, torch.full_like(ids, 4))
        _bad("^topk_ids:", fused_moe, x, w1, w2, tw, torch.full_like(ids, -2))
        _bad("^expert_map:", fused_moe, x, w1, w2, tw, ids, expert_map=torch.full((4,), 7, dtype=torch.int32, device=device))
    finally:
        _config.set_checks(old)


def test_grouped_gemm_and_helpers_bad_input(device):
    a = torch.randn(4, 16, device=device)
    w = torch.randn(3, 8, 16, device=device)
    ids = torch.randint(0, 3, (4, 2), dtype=torch.int32)
    sid, eid, ntp = (t.to(device) for t in ref_moe_align_block_size(ids, 16, 3))
    _bad("^block_size:", fo.moe_grouped_gemm, a, w, sid, eid, ntp, 8, 2)
    _bad("^w:", fo.moe_grouped_gemm, a, w[:, :, :8], sid, eid, ntp, 16, 2)
    _bad("^sorted_token_ids:", fo.moe_grouped_gemm, a, w, sid.long(), eid, ntp, 16, 2)
    _bad("^topk_weights:", fo.moe_grouped_gemm, a, w, sid, eid, ntp, 16, 2, None, True)
    _bad("^topk_weights:", fo.moe_grouped_gemm, a, w, sid, eid, ntp, 16, 2, torch.rand(3, device=device), True)
    _bad("^expert_ids:", fo.moe_grouped_gemm, a, w, sid, eid[:1], ntp, 16, 2)
    old = _config._checks
    _config.set_checks(True)
    try:
        _bad("^expert_ids:", fo.moe_grouped_gemm, a, w, sid, torch.full_like(eid, 3), ntp, 16, 2)
        _bad("^num_tokens_post_pad:", fo.moe_grouped_gemm, a, w, sid, eid, ntp + 1, 16, 2)
        _bad("^sorted_token_ids:", fo.moe_grouped_gemm, a, w, sid + 100, eid, ntp, 16, 2)
        # top_k other than the align call's: pairs missing (the pad value would read as one)
        s1, e1, n1 = (t.to(device) for t in ref_moe_align_block_size(ids[:, :1], 16, 3))  # 4 pairs, pad 4
        _bad("^sorted_token_ids: .* each of the a.shape\\[0\\] \\* top_k = 8 pairs", fo.moe_grouped_gemm, a, w,
             s1, e1, n1, 16, 2)
    finally:
        _config.set_checks(old)
    h = torch.randn(3, 7, device=device)
    for fn, _ in ACT_AND_MUL.values():
        _bad("^input: last dim must be even", fn, h)
        _bad("^input:", fn, h[:, :6].int())
        out = poison(3, 4, device=device)
        _bad("^out: shape \\(3, 4\\) must be \\(3, 5\\)", fn, torch.randn(3, 10, device=device), out=out)
        assert torch.isnan(out).all()  # nothing written
        _bad("^out: dtype torch.float16 must match", fn, torch.randn(3, 8, device=device), out=out.half())
        _bad("^out: has internally overlapping", fn, torch.randn(3, 10, device=device),
             out=poison(1, 5, device=device).expand(3, 5))
    _bad("^w: dtype torch.float16 must match a's torch.float32", fo.moe_grouped_gemm, a, w.half(), sid, eid, ntp, 16, 2)
    _bad("^input:", fo.moe_sum, torch.randn(3, 8, device=device))


# ---------------------------------------------------------------------------- configs, check
def test_shipped_configs_are_valid():
    """Every shipped launch-config table parses, keys are token counts, tiles are sane."""
    import glob
    import json
    import os

    files = glob.glob(os.path.join(ops.CONFIG_DIR, "*.json"))
    for f in files:
        table = json.loads(pathlib.Path(f).read_text())
        assert table, f
        for t, cfg in table.items():
            assert int(t) >= 1
            assert cfg["block_m"] in ops.GEMM_BLOCK_SIZES
            for g in ("gemm1", "gemm2"):
                c = cfg[g]
                assert {"BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"} <= set(c), (f, t, g)
                assert c["BLOCK_N"] >= 16 and c["BLOCK_K"] >= 16 and c["num_warps"] in (1, 2, 4, 8, 16)
                extra = set(c) - {"BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
                assert extra <= {"tma", "sort_x", "persistent", "progs_per_sm", "flatten", "tail_split", "one_dot"}, \
                    (f, t, g, extra)  # a misspelt key would be ignored silently
                if c.get("one_dot"):  # GEMM1 only, weights by descriptor
                    assert g == "gemm1" and c.get("tma"), (f, t, g)


def test_fit_smem():
    """Shipped 16-bit persistent tiles launch with the stages they were tuned and compiled with
    (no extra stage reserved for them); for wider elements the pipelined tiles, the persistent
    loop's extra stage included, fit the budget."""
    import glob
    import json

    for f in glob.glob(os.path.join(ops.CONFIG_DIR, "*.json")):
        for t, cfg in json.loads(pathlib.Path(f).read_text()).items():
            for g, fused in (("gemm1", True), ("gemm2", False)):
                if cfg[g].get("persistent"):
                    plain = ops._fit_smem({**cfg[g], "persistent": False}, cfg["block_m"], fused, 2)
                    fitted = ops._fit_smem(cfg[g], cfg["block_m"], fused, 2)
                    assert fitted == {**plain, "persistent": True} and fitted["num_stages"] >= 3, (f, t, g)
    for persistent in (False, True):
        for fused in (False, True):
            for bm in (16, 32, 64, 128):
                c = ops._fit_smem({**ops._g(64, 128, 1, 4, 4), "tma": True, "persistent": persistent}, bm, fused, 4)
                stages = c["num_stages"] + (1 if persistent else 0)
                assert stages * (bm + (2 if fused else 1) * c["BLOCK_N"]) * c["BLOCK_K"] * 4 <= ops._SMEM_BUDGET, c


def test_config_tables_of_the_same_chip():
    """A card without tables of its own takes those of a card with the same chip (H200 -> H100's
    tables, which the GPU tests run), its own first; other cards get only their own."""
    import os

    h100 = "NVIDIA H100 80GB HBM3"
    assert ops.table_devices("NVIDIA H200", (9, 0)) == ("NVIDIA H200", h100)
    assert ops.table_devices(h100, (9, 0)) == (h100,)
    assert ops.table_devices("NVIDIA A100-SXM4-80GB", (8, 0)) == ("NVIDIA A100-SXM4-80GB",)
    for E, I, H in ((8, 7168, 4096), (128, 192, 2048), (256, 512, 7168)):  # every shipped model shape
        assert os.path.exists(os.path.join(ops.CONFIG_DIR, ops.config_file_name(E, I, H, h100, torch.bfloat16)))


def test_config_table_overlay():
    """A card's own table may hold only some token counts: those replace its chip's entries, the
    rest come from the chip's table (the shipped H200 DeepSeek file holds T=1 only)."""
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    shape = (256, 512, 7168)
    chip = ops._load_table(ops.config_file_name(*shape, h100, torch.bfloat16))
    own = ops._load_table(ops.config_file_name(*shape, h200, torch.bfloat16))
    assert own and chip and set(own) < set(chip)
    merged = ops.merged_table(*shape, ops.table_devices(h200, (9, 0)), torch.bfloat16)
    assert set(merged) == set(chip)
    for t in merged:
        assert merged[t] == (own[t] if t in own else chip[t]), t
    assert merged[1] != chip[1]  # the overlay really changes something
    assert ops.merged_table(*shape, (h100,), torch.bfloat16) == chip
    assert ops.merged_table(3, 5, 7, (h200, h100), torch.bfloat16) is None


def test_moe_config_selection():
    cfg = ops.default_moe_config(1, 8, 256, 512, 7168)
    assert cfg["pairs"]  # decode: one pair per block
    cfg = ops.default_moe_config(4096, 2, 8, 7168, 4096)
    assert not cfg["pairs"] and cfg["block_m"] in ops.GEMM_BLOCK_SIZES


def test_autotune_picks_fastest_candidate(device, monkeypatch):
    """``autotune_moe_config`` runs every GEMM1 and GEMM2 candidate of a BLOCK_M once and keeps
    the fastest by its timer. A fake timer ranks first the persistent one-dot GEMM1 and a
    tail-split GEMM2 (forms only the candidate list adds to the base tiles); the tuner must
    return those, cache the choice, and the layer must run correctly with it."""
    monkeypatch.setattr(ops, "DECODE_ONE_LAUNCH", False)
    monkeypatch.setattr(ops, "_TUNED", {})
    x, w1, w2, tw, ids = make_moe(40, 32, 32, 2, 2, torch.bfloat16, device, seed=5)
    timed = []

    def timer(fn):
        g = (fn.__defaults__ or (None,))[0]  # the candidate runs are run(g=g); the align is not
        if g is None:
            return 0.01
        timed.append(g)
        return 0.1 if (g.get("persistent") and g.get("one_dot")) or g.get("tail_split") else 1.0

    cfg = ops.autotune_moe_config(x, w1, w2, tw, ids, options=[(128, False)], timer=timer)
    g1, g2 = cfg["gemm1"], cfg["gemm2"]
    assert g1.get("persistent") and g1.get("one_dot") and g1.get("sort_x") and g1["num_stages"] <= 3, cfg
    assert g2.get("tail_split") and not g2.get("persistent"), cfg
    assert cfg["block_m"] == 128 and cfg["pairs"] is False and len(cfg["ms"]) == 3
    n1, n2 = len(ops.gemm_candidates(128, True)), len(ops.gemm_candidates(128, False))
    assert len(timed) == n1 + 1 + n2  # every candidate, plus GEMM1's best again with x sorted
    assert ops.autotune_moe_config(x, w1, w2, tw, ids, options=[(128, False)], timer=timer) is cfg  # cached
    monkeypatch.setattr(ops, "moe_config", lambda *a: cfg)
    with poisoned_allocations():
        out = fused_moe(x, w1, w2, tw, ids)
    check_layer("fused_moe autotuned", out, x, w1, w2, tw, ids, pipeline=False)


def test_launch_rules(monkeypatch):
    """The one-program align and the PDL chain go where they measured faster (see the rules'
    docstrings); PDL never off sm_90, on CPU or under the interpreter."""
    assert ops.align_one_program(1024, 16) and not ops.align_one_program(2048, 16)  # 8 experts
    assert ops.align_one_program(256, 256) and not ops.align_one_program(512, 256)  # 128 experts
    assert ops.align_one_program(128, 512) and not ops.align_one_program(256, 512)  # 256 experts
    assert not ops.moe_pdl("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_config, "interpreting", lambda: False)
    _config.sm_major.cache_clear()
    try:
        assert ops.moe_pdl("cuda", True, 14336, 4096)  # pair path (T=1): any size
        assert ops.moe_pdl("cuda", False, 192, 2048)  # Qwen3-sized experts
        assert not ops.moe_pdl("cuda", False, 512, 7168) and not ops.moe_pdl("cuda", False, 7168, 4096)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        _config.sm_major.cache_clear()
        assert not ops.moe_pdl("cuda", True, 192, 2048)
        # decode in one launch, shipped size rule: Qwen3's decode layers (T = 1..4: 8..32 pairs of
        # 192 x 2048 experts; the pair path ends at T*k*4 > E), not DeepSeek's or Mixtral's T=1
        for var in ("FLASHOPS_MOE_DECODE_ONE_LAUNCH", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
            monkeypatch.delenv(var, raising=False)  # the switches are tested below, not inherited
        assert all(ops.decode_one_launch("cuda", n, 192, 2048) for n in (8, 16, 32))
        assert not ops.decode_one_launch("cuda", 8, 512, 7168) and not ops.decode_one_launch("cuda", 2, 7168, 4096)
        assert not ops.decode_one_launch("cpu", 8, 192, 2048)
        monkeypatch.setattr(ops, "DECODE_MAX_ELEMS", 1 << 22)
        assert ops.decode_one_launch("cuda", 8, 192, 2048) and not ops.decode_one_launch("cuda", 16, 192, 2048)
        monkeypatch.setenv("FLASHOPS_MOE_DECODE_ONE_LAUNCH", "0")  # the user's switch, e.g. under MPS SM limits
        assert not ops.decode_one_launch("cuda", 8, 192, 2048)
        monkeypatch.setenv("FLASHOPS_MOE_DECODE_ONE_LAUNCH", "1")
        assert ops.decode_one_launch("cuda", 8, 192, 2048)
        for pct, on in (("50", False), ("100", True), ("", True), ("abc", False)):  # MPS SM share
            monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", pct)
            assert ops.decode_one_launch("cuda", 8, 192, 2048) == on, pct
        monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
        monkeypatch.setattr(ops, "DECODE_ONE_LAUNCH", False)
        assert not ops.decode_one_launch("cuda", 8, 192, 2048)
    finally:
        _config.sm_major.cache_clear()  # the next test sees the real device


def test_selfcheck(device):
    from torch_flashops import _selfcheck

    results = _selfcheck._CHECKS["moe"](device)
    assert {r.op for r in results} == {"silu_and_mul", "silu_and_mul_out", "gelu_and_mul", "gelu_and_mul_out",
                                       "gelu_tanh_and_mul", "gelu_tanh_and_mul_out", "moe_sum", "moe_grouped_gemm",
                                       "fused_moe"}
    for r in results:
        assert r.ok, r


# ------------------------------------------------------------- kernels compile for the GPU
def aot_compile_decode_sm90() -> dict:
    """The decode kernel for an H100 (sm_90), specialised as the Qwen3 layer's launch, in each
    phase: PTX facts the grid barrier depends on. Needs the real JIT (run_without_interpreter)."""
    fn = ops._moe_decode_kernel
    ptrs = {"ids_ptr": "*i32", "map_ptr": "*i32", "sync_ptr": "*i32", "tw_ptr": "*fp32"}
    info = {}
    for phase in (0, 1, 2, "gen"):
        cst = dict(TOP_K=8, HAS_MAP=False, ON_INPUT=False, PHASE=0 if phase == "gen" else phase,
                   PREFETCH=phase in (0, "gen"), PIPE1=True, GEN_BARRIER=phase == "gen", UP_FIRST=False,
                   **ops.decode_tiles(1, 8, 192, 2048))
        sig = {n: ptrs.get(n, "*bf16") if n.endswith("_ptr") else "fp32" if n == "scale" else "i32"
               for n in fn.arg_names if n not in cst}
        out = compile_sm90(fn, sig, cst, [n for n in sig if n not in ("T", "scale")], 4)  # the shipped warps
        ptx = out["ptx"]
        info[phase] = {"cubin_bytes": out["cubin_bytes"], "shared": out["shared"],
                       "atomics": sorted(set(re.findall(r"\batom\.[\w.]+|\bred\.global\.[\w.]+", ptx))),
                       "acquire_loads": len(re.findall(r"ld\.global\.gpu\.acquire", ptx)),
                       "volatile_loads": len(re.findall(r"ld\.volatile\.global", ptx)),
                       "cg_loads": ptx.count("ld.global.cg"), "vector_loads": ptx.count("ld.global.v4")}
    return info


def test_decode_kernel_compiles_for_sm90_without_gpu():
    """One launch (phase 0): a release arrival, an acquire spin and the last program's reset, h
    read past L1 (.cg), a few KB of shared memory (the default grid's programs fit an SM
    together); in the generation form an acq_rel arrival, a volatile read of the generation, an
    acquire poll and a release of the next one; the two-launch phases carry no atomics at all."""
    info = run_without_interpreter("import json; from tests.test_moe import aot_compile_decode_sm90; "
                                   "print(json.dumps(aot_compile_decode_sm90()))")
    one = info["0"]
    assert one["cubin_bytes"] > 0 and one["acquire_loads"] >= 1, one
    # DECODE_PROGRAMS_PER_SM programs must be resident together: shared memory is no limit
    assert ops.DECODE_PROGRAMS_PER_SM * one["shared"] <= 64 * 1024, one
    # (triton 3.9 emits the arrival, whose result is unused, as a ``red``)
    assert {"atom.global.gpu.release.add.u32", "red.global.gpu.release.add.u32"} & set(one["atomics"]), one
    assert "atom.global.gpu.relaxed.exch.b32" in one["atomics"], one
    gen = info["gen"]  # generation form: volatile read, acq_rel arrival, acquire poll, release of the next one
    assert gen["cubin_bytes"] > 0 and gen["volatile_loads"] >= 1 and gen["acquire_loads"] >= 1, gen
    assert "atom.global.gpu.acq_rel.add.u32" in gen["atomics"], gen
    assert "atom.global.gpu.release.exch.b32" in gen["atomics"], gen
    assert ops.DECODE_PROGRAMS_PER_SM * gen["shared"] <= 64 * 1024, gen
    for phase in ("1", "2"):
        assert info[phase]["cubin_bytes"] > 0 and not info[phase]["atomics"] and not info[phase]["acquire_loads"]
    assert info["2"]["cg_loads"] >= 1 and info["1"]["vector_loads"] >= 1 and info["2"]["vector_loads"] >= 1, info


def _compile_block_gemm_sm90(cst: dict, descs: dict) -> dict:
    """``ops._moe_gemm_kernel`` for sm_90 with constexprs ``cst`` and descriptor types ``descs``:
    bf16 operands, fp32 weights and partial tiles, int32 routing, aligned pointers and strides."""
    sig = {}
    for n in ops._moe_gemm_kernel.arg_names:
        if n in cst:
            continue
        if n in descs:
            sig[n] = descs[n]
        elif n.endswith("_ptr"):
            sig[n] = ("*bf16" if n in ("a_ptr", "w_ptr", "c_ptr") else
                      "*fp32" if n in ("topk_w_ptr", "part_ptr") else "*i32")
        else:
            sig[n] = "fp32" if n == "scale" else "i32"
    return compile_sm90(ops._moe_gemm_kernel, sig, cst, [n for n in sig if n.endswith("_ptr") or n.startswith("stride")],
                        8)


def aot_compile_tail_split_sm90() -> dict:
    """The aligned block GEMM for an H100 (sm_90) as Mixtral's layer launches it at T=1024
    (128-row blocks, A and the weights by descriptor), with and without a tail split: PTX facts
    the split's fold depends on. Needs the real JIT (run_without_interpreter)."""
    info = {}
    for role, split in (("gemm1", 4), ("gemm2", 4), ("gemm2", 0)):
        bn = 128 if role == "gemm1" else 256
        cst = dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=16, MUL_WEIGHT=role == "gemm2",
                   FUSE_SILU=role == "gemm1", WRITE_SKIP=role == "gemm2", PAIRS=False, HAS_MAP=False, EVEN_K=True,
                   W_TMA=True, A_SORTED=True, A_TMA=True, C_SORTED=role == "gemm1", HALF_TAIL=True,
                   DOT_F32=False, PRECISION="tf32", PDL_TRIGGER=False, PDL_WAIT=False, TAIL_SPLIT=split,
                   GU_ONE=False, UP_FIRST=False)
        descs = {"a_desc": "tensordesc<bf16[128, 64]>", "a_desc_half": "tensordesc<bf16[64, 64]>",
                 "w_desc": f"tensordesc<bf16[1, {bn}, 64]>"}
        out = _compile_block_gemm_sm90(cst, descs)
        ptx = out["ptx"]
        info[f"{role}-{split}"] = {"cubin_bytes": out["cubin_bytes"], "shared": out["shared"],
                                   "atomics": sorted(set(re.findall(r"\batom\.[\w.]+|\bred\.global\.[\w.]+", ptx))),
                                   "cg_loads": len(re.findall(r"ld\.global\.cg", ptx))}
    return info


def aot_compile_one_dot_sm90() -> dict:
    """GEMM1 of Mixtral's layer at T=4096 as the H100 table launches it (128-row blocks, 2 x 128
    columns, A and w1 by descriptor, fused silu * up), in the two-dot and the one-dot ("one_dot")
    form, each with w1 as [gate; up] and as [up; gate] (UP_FIRST): MMA ops, layout conversions
    and shared memory of each."""
    info = {}
    for one, up_first in ((False, False), (True, False), (False, True), (True, True)):
        cst = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=16, MUL_WEIGHT=False, FUSE_SILU=True,
                   WRITE_SKIP=False, PAIRS=False, HAS_MAP=False, EVEN_K=True, W_TMA=True, A_SORTED=True, A_TMA=True,
                   C_SORTED=True, HALF_TAIL=True, DOT_F32=False, PRECISION="tf32", PDL_TRIGGER=False,
                   PDL_WAIT=False, TAIL_SPLIT=0, GU_ONE=one, UP_FIRST=up_first)
        descs = {"a_desc": "tensordesc<bf16[128, 64]>", "a_desc_half": "tensordesc<bf16[64, 64]>",
                 "w_desc": "tensordesc<bf16[1, 2, 128, 64]>" if one else "tensordesc<bf16[1, 128, 64]>"}
        out = _compile_block_gemm_sm90(cst, descs)
        ttgir = out["ttgir"]
        key = str(int(one)) + ("-up-first" if up_first else "")
        info[key] = {"cubin_bytes": out["cubin_bytes"], "shared": out["shared"],
                     "dots": ttgir.count("ttng.warp_group_dot "),
                     "converts": ttgir.count("ttg.convert_layout"),
                     "mma_n": sorted(set(re.findall(r"-> tensor<\d+x(\d+)xf32, #mma", ttgir)))}
    return info


def test_one_dot_gemm1_compiles_for_sm90_without_gpu():
    """The one-dot GEMM1 issues one 256-column MMA per K step where the two-dot form issues two
    of 128 (per block and half block), and its gate/up split adds no layout conversion (columns
    j and 128 + j sit in the same thread) and no shared memory. With w1 as [up; gate]
    (cutlass_fused_moe's order, read in place) both forms compile to the same MMAs, layout
    conversions and shared memory: the order costs nothing but the tile coordinates."""
    info = run_without_interpreter("import json; from tests.test_moe import aot_compile_one_dot_sm90; "
                                   "print(json.dumps(aot_compile_one_dot_sm90()))")
    for form in ("0", "1"):
        mine, other = info[form], info[form + "-up-first"]
        assert other["cubin_bytes"] > 0, info
        assert {k: v for k, v in mine.items() if k != "cubin_bytes"} == \
            {k: v for k, v in other.items() if k != "cubin_bytes"}, info
    two, one = info["0"], info["1"]
    assert one["cubin_bytes"] > 0 and two["cubin_bytes"] > 0
    assert one["dots"] * 2 == two["dots"], info
    assert "256" in one["mma_n"] and "256" not in two["mma_n"], info
    assert one["converts"] == two["converts"], info
    assert one["shared"] <= two["shared"], info


def test_tail_split_gemm_compiles_for_sm90_without_gpu():
    """With a tail split each piece counts itself with one acq_rel atomic and the folding piece
    reads the partial tiles past L1 (.cg: other SMs wrote them); without it the kernel has no
    atomics. Shared memory stays the unsplit kernel's (the pieces reuse its pipeline)."""
    info = run_without_interpreter("import json; from tests.test_moe import aot_compile_tail_split_sm90; "
                                   "print(json.dumps(aot_compile_tail_split_sm90()))")
    for key in ("gemm1-4", "gemm2-4"):
        assert info[key]["cubin_bytes"] > 0 and info[key]["atomics"] == ["atom.global.gpu.acq_rel.add.u32"], info
        assert info[key]["cg_loads"] >= 1, info
    plain = info["gemm2-0"]
    assert plain["cubin_bytes"] > 0 and not plain["atomics"], plain
    assert info["gemm2-4"]["shared"] <= plain["shared"], info


def test_decode_barrier_slot_per_stream(monkeypatch):
    """The one-launch decode kernel's barrier counters (``_decode_sync``), with CUDA's stream
    and capture queries faked on the CPU: one slot per (device, stream), 128 bytes apart in one
    per-device buffer; a capture before the buffer exists gets None (two launches), a new
    stream inside a capture takes a free slot without allocating; past the last slot, None."""
    state = {"stream": 11, "capturing": False, "allocs": 0}

    def zeros(n, idx):
        state["allocs"] += 1
        return torch.zeros(n, dtype=torch.int32)

    monkeypatch.setattr(ops, "_zeros_int32", zeros)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda idx: state["stream"], raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    monkeypatch.setattr(ops, "_DECODE_SYNC", {})
    monkeypatch.setattr(ops, "_DECODE_SLOT", {})
    state["capturing"] = True
    assert ops._decode_sync(0) is None and state["allocs"] == 0
    state["capturing"] = False
    a = ops._decode_sync(0)
    assert a.shape == (3,) and a.dtype == torch.int32 and state["allocs"] == 1
    assert ops._decode_sync(0) is a
    buf = ops._DECODE_SYNC[0]
    state["stream"], state["capturing"] = 22, True
    b = ops._decode_sync(0)
    assert state["allocs"] == 1 and b.data_ptr() - a.data_ptr() == 128
    assert ops._decode_sync(1) is None  # another device: no buffer yet, capturing
    state["capturing"] = False
    c = ops._decode_sync(1)
    assert state["allocs"] == 2 and c.data_ptr() != b.data_ptr()
    ptrs = {a.data_ptr(), b.data_ptr()}
    for s in range(100, 100 + ops._DECODE_SLOTS - 2):
        state["stream"] = s
        v = ops._decode_sync(0)
        assert v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        ptrs.add(v.data_ptr())
    assert len(ptrs) == ops._DECODE_SLOTS
    assert max(ptrs) + 8 <= buf.data_ptr() + buf.numel() * 4
    state["stream"] = 999
    assert ops._decode_sync(0) is None  # every slot taken: the caller launches the two phases


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_gpu_cuda_graph_replay_new_ids():
    """fused_moe captured in a CUDA graph (with the alignment inside it) and replayed with new
    ids and weights copied into the static inputs: results follow the new routing."""
    dev = "cuda"
    for T, E in ((64, 8), (2, 64)):  # aligned path and decode pair path
        x, w1, w2, tw, ids = make_moe(T, 128, 64, E, 2, torch.bfloat16, dev, seed=17)
        fused_moe(x, w1, w2, tw, ids)  # warm-up: compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fused_moe(x, w1, w2, tw, ids)
        for seed in (18, 19):
            _, _, _, tw2, ids2 = make_moe(T, 128, 64, E, 2, torch.bfloat16, dev, seed=seed)
            ids2[0] = -1
            ids.copy_(ids2)
            tw.copy_(tw2)
            g.replay()
            torch.cuda.synchronize()
            check_layer(f"graph replay T={T}", out, x, w1, w2, tw2, ids2, pipeline=False)


def _barrier_idle(sync: torch.Tensor) -> bool:
    """Whether every slot's barrier state is as a launch of either form must find it: both
    counters 0 (the generation form's word, sync[2] of a slot, moves on)."""
    return not sync[0::ops._SLOT_INTS].any() and not sync[1::ops._SLOT_INTS].any()


@pytest.mark.gpu
@pytest.mark.parametrize("gen_barrier", [False, True])
def test_gpu_decode_one_launch_grid_barrier(monkeypatch, gen_barrier):
    """The decode kernel's grid barrier at full size (the default grid, two programs per SM),
    model-like shapes, both barrier forms: a capture before any eager call falls back to two
    launches; afterwards one launch, repeated eagerly and by graph replay, bitwise equal every
    time, with the barrier's counters back at 0 after each launch."""
    dev = "cuda"
    monkeypatch.setattr(ops, "DECODE_MAX_ELEMS", 1 << 40)  # every decode layer here, not only the rule's
    monkeypatch.setattr(ops, "DECODE_GEN_BARRIER", gen_barrier)
    shapes = [(1, 2048, 192, 128, 8), (4, 2048, 192, 128, 8), (1, 1024, 256, 64, 6), (2, 7168, 128, 64, 8)]
    layers = [make_moe(*s, torch.bfloat16, dev, seed=30 + i) for i, s in enumerate(shapes)]
    for x, w1, w2, tw, ids in layers:
        assert ops._pairs_rule(x.shape[0], ids.shape[1], w1.shape[0])
    ops._DECODE_SYNC.clear()
    ops._DECODE_SLOT.clear()
    ops._DECODE_COOP.clear()
    sm = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    x, w1, w2, tw, ids = layers[0]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g = fused_moe(x, w1, w2, tw, ids)
    assert not ops._DECODE_SYNC  # no counters made inside a capture: the two-launch form was captured
    g.replay()
    torch.cuda.synchronize()
    check_layer("captured two-launch decode", out_g, x, w1, w2, tw, ids, pipeline=False)
    firsts = []
    for x, w1, w2, tw, ids in layers:
        with poisoned_allocations():
            out = fused_moe(x, w1, w2, tw, ids)
        check_layer(f"one-launch decode T={x.shape[0]} H={x.shape[1]}", out, x, w1, w2, tw, ids, pipeline=False)
        firsts.append(out)
    sync = ops._DECODE_SYNC[torch.cuda.current_device()]
    for rep in range(20):
        for (x, w1, w2, tw, ids), first in zip(layers, firsts):
            assert torch.equal(fused_moe(x, w1, w2, tw, ids), first)
    torch.cuda.synchronize()
    assert _barrier_idle(sync)  # every slot's counters
    assert bool((sync[2::ops._SLOT_INTS] != 0).any()) == gen_barrier  # the generation form moved its word
    assert ops._DECODE_COOP[(torch.cuda.current_device(), ops.DECODE_PROGRAMS_PER_SM * sm)] is True  # cooperative
    x, w1, w2, tw, ids = layers[1]
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        out_g2 = fused_moe(x, w1, w2, tw, ids)
    for _ in range(10):
        out_g2.fill_(float("nan"))
        g2.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_g2, firsts[1])
    assert _barrier_idle(sync)  # every slot's counters


@pytest.mark.gpu
def test_gpu_decode_barrier_forms_alternate(monkeypatch):
    """The two barrier forms one after the other on one stream's slot (each leaves the words the
    other reads at their launch values): results bitwise equal, counters back at 0."""
    monkeypatch.setattr(ops, "DECODE_MAX_ELEMS", 1 << 40)
    for var in ("FLASHOPS_MOE_DECODE_ONE_LAUNCH", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        monkeypatch.delenv(var, raising=False)
    layer = make_moe(2, 2048, 192, 128, 8, torch.bfloat16, "cuda", seed=61)
    monkeypatch.setattr(ops, "DECODE_GEN_BARRIER", False)
    want = fused_moe(*layer)
    check_layer("alternating forms", want, *layer, pipeline=False)
    for i in range(12):
        monkeypatch.setattr(ops, "DECODE_GEN_BARRIER", i % 3 != 0)
        assert torch.equal(fused_moe(*layer), want)
    torch.cuda.synchronize()
    assert _barrier_idle(ops._DECODE_SYNC[torch.cuda.current_device()])


@pytest.mark.gpu
def test_gpu_decode_one_launch_two_streams(monkeypatch):
    """Decode layers launched on two streams at once, eagerly and captured in one graph that
    forks onto both: each stream has its own barrier counters, and every result equals the
    single-stream one bitwise."""
    dev = "cuda"
    idx = torch.cuda.current_device()
    monkeypatch.setattr(ops, "DECODE_MAX_ELEMS", 1 << 40)
    for var in ("FLASHOPS_MOE_DECODE_ONE_LAUNCH", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        monkeypatch.delenv(var, raising=False)
    a = make_moe(1, 2048, 192, 128, 8, torch.bfloat16, dev, seed=51)
    b = make_moe(4, 2048, 192, 128, 8, torch.bfloat16, dev, seed=52)
    want_a, want_b = fused_moe(*a), fused_moe(*b)
    check_layer("stream a", want_a, *a, pipeline=False)
    check_layer("stream b", want_b, *b, pipeline=False)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both(main):  # fork onto s1 and s2, eight layers each, join
        s1.wait_stream(main)
        s2.wait_stream(main)
        outs = []
        for s, layer in ((s1, a), (s2, b)):
            with torch.cuda.stream(s):
                outs.append([fused_moe(*layer) for _ in range(8)])
        main.wait_stream(s1)
        main.wait_stream(s2)
        return outs

    outs = both(torch.cuda.current_stream())
    torch.cuda.synchronize()
    views = {ops._DECODE_SLOT[(idx, s.cuda_stream)].data_ptr() for s in (s1, s2)}
    assert len(views) == 2  # one slot each
    for o in outs[0]:
        assert torch.equal(o, want_a)
    for o in outs[1]:
        assert torch.equal(o, want_b)
    g = torch.cuda.CUDAGraph()
    cap = torch.cuda.Stream()
    with torch.cuda.graph(g, stream=cap):
        g_outs = both(cap)
    for _ in range(5):
        for o in g_outs[0] + g_outs[1]:
            o.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        for o in g_outs[0]:
            assert torch.equal(o, want_a)
        for o in g_outs[1]:
            assert torch.equal(o, want_b)
    assert _barrier_idle(ops._DECODE_SYNC[idx])


@pytest.mark.gpu
def test_gpu_decode_refused_cooperative_grid(monkeypatch):
    """A one-launch grid that cannot be resident at once (40 programs per SM: more blocks than
    an SM holds) is refused by the driver's cooperative-launch check, not left to hang at the
    barrier: that call and later ones (eager, and a graph captured afterwards) run the two
    phases, against the oracle, the capture bitwise equal to the eager call."""
    from torch_flashops import _config

    dev = "cuda"
    idx = torch.cuda.current_device()
    monkeypatch.setattr(ops, "DECODE_MAX_ELEMS", 1 << 40)
    for var in ("FLASHOPS_MOE_DECODE_ONE_LAUNCH", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        monkeypatch.delenv(var, raising=False)
    x, w1, w2, tw, ids = make_moe(2, 2048, 192, 128, 8, torch.bfloat16, dev, seed=41)
    ref_out = fused_moe(x, w1, w2, tw, ids)  # default grid: one cooperative launch
    default = ops.DECODE_PROGRAMS_PER_SM * _config.sm_count(idx)
    assert ops._DECODE_COOP[(idx, default)] is True
    big = 40 * _config.sm_count(idx)
    ops._DECODE_COOP.pop((idx, big), None)
    real, phases = ops._moe_decode_kernel, []

    class Spy:  # records the PHASE of each launch of the decode kernel
        def __getitem__(self, grid):
            def launch(*a, **kw):
                phases.append(kw["PHASE"])
                return real[grid](*a, **kw)
            return launch

    monkeypatch.setattr(ops, "_moe_decode_kernel", Spy())
    real_decode = ops._moe_decode
    monkeypatch.setattr(ops, "_moe_decode", lambda *a, **k: real_decode(*a, **k, programs=big))
    with poisoned_allocations():
        out = fused_moe(x, w1, w2, tw, ids)
    torch.cuda.synchronize()
    assert phases == [0, 1, 2] and ops._DECODE_COOP[(idx, big)] is False  # refused, then two launches
    check_layer("refused cooperative grid", out, x, w1, w2, tw, ids, pipeline=False)
    check_layer("default grid", ref_out, x, w1, w2, tw, ids, pipeline=False)
    phases.clear()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g = fused_moe(x, w1, w2, tw, ids)
    assert phases == [1, 2]
    out_g.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_g, out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("block_size", ops.GEMM_BLOCK_SIZES)
def test_gpu_grouped_gemm_block_sizes(dtype, block_size):
    """Every BLOCK_M with its default GPU tiles, K and N not multiples of the tiles."""
    check_grouped_gemm("cuda", dtype, block_size, 2, True, M=300, K=200, N=176, E=6)


@pytest.mark.gpu
def test_gpu_fused_moe_every_shipped_config():
    """Each distinct tile config of the shipped tables (and the defaults) on a mid-size layer."""
    import glob
    import json
    import os

    seen = []
    for f in sorted(glob.glob(os.path.join(ops.CONFIG_DIR, "*.json"))):
        for cfg in json.loads(pathlib.Path(f).read_text()).values():
            c = {k: cfg[k] for k in ("block_m", "gemm1", "gemm2")}
            if c not in seen:
                seen.append(c)
    for bm, (g1, g2) in ops._DEFAULTS.items():
        c = {"block_m": bm, "gemm1": g1, "gemm2": g2}
        if c not in seen:
            seen.append(c)
    x, w1, w2, tw, ids = make_moe(384, 512, 384, 16, 4, torch.bfloat16, "cuda", seed=20)
    ids[5] = -1
    exp = ref.ref_fused_moe_dense(x.float(), w1.float(), w2.float(), tw, ids)
    real = ops.moe_config
    try:
        for c in seen:
            ops.moe_config = lambda *a, c=c: {**c, "pairs": False}
            with poisoned_allocations():
                out = fused_moe(x, w1, w2, tw, ids)
            assert_close(f"config {c}", out, exp, **MOE_TOL[torch.bfloat16])
    finally:
        ops.moe_config = real


@pytest.mark.gpu
def test_gpu_int64_row_offsets():
    """Output rows past 2**31 elements: row offsets must be computed in int64 (vLLM #5938)."""
    dev = "cuda"
    M, K, N, E = 270_000, 16, 8192, 2  # M*N = 2.2e9 > 2**31
    a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) * 0.25
    ids = (torch.arange(M, device=dev, dtype=torch.int32) % 2).view(M, 1)
    sid, eid, ntp = torch.ops.flashops.moe_align_block_size(ids, 64, E, None, False)
    c = fo.moe_grouped_gemm(a, w, sid, eid, ntp, 64, 1)
    rows = torch.tensor([0, 1, M // 2, M - 2, M - 1], device=dev)
    exp = torch.stack([a[r].float() @ w[r % 2].float().T for r in rows.tolist()])
    assert_close("int64 rows", c[rows], exp.to(torch.bfloat16).float(), dtype=torch.bfloat16)


# ----------------------------------------------------------------------- schema snapshots
@needs_expecttest
class TestSchemas(SchemaTestCase):
    def _schema(self, name):
        return str(getattr(torch.ops.flashops, name).default._schema)

    def test_moe_grouped_gemm(self):
        self.assertExpectedInline(self._schema("moe_grouped_gemm"), """flashops::moe_grouped_gemm(Tensor a, Tensor w, Tensor sorted_token_ids, Tensor expert_ids, Tensor num_tokens_post_pad, int block_size, int top_k, Tensor? topk_weights=None, bool mul_routed_weight=False) -> Tensor""")

    def test_silu_and_mul(self):
        self.assertExpectedInline(self._schema("silu_and_mul"), """flashops::silu_and_mul(Tensor input) -> Tensor""")

    def test_silu_and_mul_out(self):
        self.assertExpectedInline(self._schema("silu_and_mul_out"), """flashops::silu_and_mul_out(Tensor input, Tensor(a!) out) -> ()""")

    def test_gelu_and_mul(self):
        self.assertExpectedInline(self._schema("gelu_and_mul"), """flashops::gelu_and_mul(Tensor input, bool approximate_tanh=False) -> Tensor""")

    def test_gelu_and_mul_out(self):
        self.assertExpectedInline(self._schema("gelu_and_mul_out"), """flashops::gelu_and_mul_out(Tensor input, Tensor(a!) out, bool approximate_tanh=False) -> ()""")

    def test_moe_sum(self):
        self.assertExpectedInline(self._schema("moe_sum"), """flashops::moe_sum(Tensor input, float routed_scaling_factor=1.) -> Tensor""")

    def test_fused_moe(self):
        self.assertExpectedInline(self._schema("fused_moe"), """flashops::fused_moe(Tensor hidden_states, Tensor w1, Tensor w2, Tensor topk_weights, Tensor topk_ids, str activation="silu", bool apply_router_weight_on_input=False, float routed_scaling_factor=1., Tensor? expert_map=None, int global_num_experts=-1, bool w1_up_first=False) -> Tensor""")
