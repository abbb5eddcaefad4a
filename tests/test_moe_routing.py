"""MoE routing family (spec/moe.md §1, §2, §7): routing ops and moe_align_block_size vs the
spec oracles, align invariants, FlashInfer shims, opcheck, torch.compile, schema snapshots
and bad input.

On CPU the Triton kernels run in the interpreter (tests/conftest.py), so shapes stay small.
Outputs are allocated inside the ops; they are poisoned by running with deterministic
algorithms on, which makes ``torch.empty`` fill float memory with NaN and integer memory with
the dtype's max, so unwritten elements show.
"""
from __future__ import annotations


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torch_flashops as fo
from tests.helpers import CompileCounter, SchemaTestCase, assert_close, needs_expecttest
from torch_flashops import _selfcheck
from torch_flashops.ops import moe_routing as ops
from torch_flashops.reference import moe_routing as ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(params=["fused", "two-launch"])
def align_path(request, monkeypatch):
    """Run the align kernels through both paths, with small chunks so several chunks occur."""
    fused = request.param == "fused"
    monkeypatch.setattr(ops, "_align_config", lambda numel: dict(CH=256, fused=fused, num_warps=4))
    return request.param


def tie_free_logits(T, E, dtype=torch.float32, device="cpu", seed=0):
    """Distinct logits per row, exact in bf16/fp16: a permutation of (e - E/2) / 16, plus an
    optional tiny shift that stays distinct. Router outputs without ties: ids compare exactly."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(E, generator=g) for _ in range(T)]
    x = (torch.stack(rows).float() - E // 2) / 16 if T else torch.empty(0, E)
    return x.to(device, dtype)


def align_inputs(T, k, E, *, skip_frac=0.0, seed=0, device="cpu", dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, k), generator=g)
    if skip_frac:
        ids[torch.rand(T, k, generator=g) < skip_frac] = -1
    return ids.to(device, dtype)


def half_remote_map(E, seed=0, device="cpu"):
    """Expert map with a random half of the experts local (local ids 0..E/2-1), the rest -1."""
    g = torch.Generator().manual_seed(seed)
    emap = torch.full((E,), -1, dtype=torch.int32)
    local = torch.randperm(E, generator=g)[: E // 2]
    emap[local.sort().values] = torch.arange(local.numel(), dtype=torch.int32)
    return emap.to(device)


def check_align_invariants(topk_ids, B, E, emap, pad, sid, eid, ntp):
    """Spec §2 contract, checked from the definition (independent of the oracle)."""
    flat = topk_ids.reshape(-1).long().cpu()
    numel = flat.numel()
    cap = numel + (E + 1) * (B - 1)
    if pad:
        cap = -(-cap // B) * B
    sid, eid, ntp = sid.cpu().long(), eid.cpu().long(), ntp.cpu()
    assert sid.shape == (cap,) and eid.shape == (-(-cap // B),) and ntp.shape == (1,)
    n = int(ntp[0])
    assert n % B == 0 and 0 <= n <= cap, f"num_tokens_post_pad {n}"
    local = flat.clone()
    if emap is not None:
        local = torch.where(flat >= 0, emap.cpu().long()[flat.clamp(min=0)], torch.full_like(flat, -1))
    bucket = torch.where(local >= 0, local, torch.full_like(local, E))
    used = sid[:n]
    real = used[used < numel]
    assert torch.equal(real.sort().values, torch.arange(numel)), "each pair exactly once"
    assert (used[used >= numel] == numel).all() and (sid[n:] == numel).all(), "pad value numel"
    prev = -1
    for blk in range(n // B):
        rows = sid[blk * B:(blk + 1) * B]
        rows = rows[rows < numel]
        assert rows.numel() > 0, f"block {blk} holds no pair"
        b = bucket[rows]
        assert (b == b[0]).all(), f"block {blk} mixes buckets"
        assert int(b[0]) >= prev, "buckets ascend"
        prev = int(b[0])
        assert int(eid[blk]) == (int(b[0]) if int(b[0]) < E else -1), f"expert_ids[{blk}]"
    assert (eid[n // B:] == -1).all(), "expert_ids past num_tokens_post_pad"
    counts = torch.bincount(bucket, minlength=E + 1)
    assert n == int(((counts + B - 1) // B * B).sum()), "num_tokens_post_pad = sum of padded buckets"


def assert_align_equal(got, exp):
    for name, a, e in zip(("sorted_token_ids", "expert_ids", "num_tokens_post_pad"), got, exp):
        assert a.dtype == torch.int32 and a.is_contiguous(), name
        assert torch.equal(a.cpu(), e), f"{name}: got {a.tolist()}\nexpected {e.tolist()}"


def assert_routing(name, got, exp, *, exact_ids=True):
    w, ids = got
    rw, rids = exp
    assert w.dtype == torch.float32 and ids.dtype == torch.int32, name
    assert w.shape == rw.shape and ids.shape == rids.shape, name
    assert w.is_contiguous() and ids.is_contiguous(), name
    if exact_ids:
        assert torch.equal(ids.cpu(), rids), f"{name} ids: {ids.tolist()} vs {rids.tolist()}"
    else:
        assert torch.equal(ids.cpu().sort(-1).values, rids.sort(-1).values), f"{name} ids as sets"
    assert_close(f"{name} weights", w, rw, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- routing vs oracles

SOFTMAX_CASES = {  # name: (E, k, renormalize)
    "mixtral-E8-k2-renorm": (8, 2, True),
    "qwen3-E128-k8-renorm": (128, 8, True),
    "qwen2moe-E60-k4": (60, 4, False),
    "gptoss-E32-k4-renorm": (32, 4, True),
    "E3-k3": (3, 3, False),
}


@pytest.mark.parametrize("T,dtype", [(0, "fp32"), (1, "fp32"), (3, "fp32"), (64, "fp32"), (33, "bf16"), (33, "fp16")],
                         ids=["T0", "T1", "T3", "T64", "T33-bf16", "T33-fp16"])
@pytest.mark.parametrize("case", list(SOFTMAX_CASES), ids=list(SOFTMAX_CASES))
def test_topk_softmax(case, T, dtype, device, nan_empty):
    E, k, renorm = SOFTMAX_CASES[case]
    x = tie_free_logits(T, E, DTYPES[dtype], device)
    assert_routing(case, fo.topk_softmax(x, k, renorm), ref.ref_topk_softmax(x.cpu(), k, renorm))


GROUPED_CASES = {  # name: (E, k, n_group, topk_group, bias, scoring_func, renormalize, rsf)
    "deepseek-v3-E256": (256, 8, 8, 4, True, "sigmoid", True, 2.5),
    "deepseek-v2-E160": (160, 6, 8, 3, False, "softmax", False, 16.0),
    "kimi-k2-E384-ng1": (384, 8, 1, 1, True, "sigmoid", True, 2.827),
    "E12-ng3-tg2-softmax-bias": (12, 3, 3, 2, True, "softmax", True, 1.0),
    "E20-ng4-tg4-sigmoid": (20, 5, 4, 4, False, "sigmoid", False, 1.0),
    "E6-ng6-tg2-G1": (6, 2, 6, 2, False, "softmax", True, 1.0),
}


@pytest.mark.parametrize("T", [0, 1, 5, 37], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("case", list(GROUPED_CASES), ids=list(GROUPED_CASES))
def test_grouped_topk(case, T, device, nan_empty):
    E, k, ng, tg, has_bias, sf, renorm, rsf = GROUPED_CASES[case]
    g = torch.Generator().manual_seed(1)
    x = tie_free_logits(T, E, device=device) + torch.rand(T, E, generator=g).to(device) * 1e-3
    bias = (torch.randn(E, generator=g) * 0.2).to(device) if has_bias else None
    got = fo.grouped_topk(x, k, ng, tg, bias=bias, scoring_func=sf, renormalize=renorm, routed_scaling_factor=rsf)
    exp = ref.ref_grouped_topk(x.cpu(), k, ng, tg, None if bias is None else bias.cpu(), sf, renorm, rsf)
    assert_routing(case, got, exp)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_grouped_topk_16bit_logits_and_bias(dtype, device):
    dt = DTYPES[dtype]
    x = tie_free_logits(9, 64, dt, device, seed=3)
    bias = ((torch.arange(64) % 7) / 64).to(device, torch.bfloat16)
    got = fo.grouped_topk(x, 6, 8, 3, bias=bias, routed_scaling_factor=2.0)
    exp = ref.ref_grouped_topk(x.cpu(), 6, 8, 3, bias.cpu(), "sigmoid", True, 2.0)
    assert_routing(dtype, got, exp, exact_ids=False)


@pytest.mark.parametrize("E,k", [(16, 1), (128, 1), (40, 3)], ids=["scout-E16", "maverick-E128", "E40-k3"])
@pytest.mark.parametrize("T", [0, 1, 33], ids=lambda t: f"T{t}")
def test_topk_sigmoid(E, k, T, device, nan_empty):
    x = tie_free_logits(T, E, device=device, seed=2)
    assert_routing(f"E{E} k{k}", fo.topk_sigmoid(x, k), ref.ref_topk_sigmoid(x.cpu(), k))


def test_routing_ties_go_to_lower_id(device):
    """Equal scores: descending order, ties to the lower expert id (kernel and CPU backend)."""
    x = torch.zeros(2, 8, device=device)
    x[1, 5] = x[1, 2] = 1.0
    for w, ids in (fo.topk_softmax(x, 3), fo.topk_sigmoid(x, 3), ref.topk_softmax_cpu(x.cpu(), 3, False)):
        assert ids.tolist() == [[0, 1, 2], [2, 5, 0]]
    # 4 groups of 2, keep 2: row 0 keeps groups 0, 1 (tied); row 1 keeps groups 1, 2 ({2,3}, {4,5}).
    for w, ids in (fo.grouped_topk(x, 3, 4, 2), ref.grouped_topk_cpu(x.cpu(), 3, 4, 2, None, "sigmoid", True, 1.0)):
        assert ids.tolist() == [[0, 1, 2], [2, 5, 3]]


def test_routing_row_strided_logits(device):
    """Logits sliced out of a wider buffer (row stride != E) are read in place."""
    big = tie_free_logits(7, 96, device=device, seed=4)
    x = big[:, 16:80]
    assert x.stride(0) == 96
    assert_routing("softmax", fo.topk_softmax(x, 4, True), ref.ref_topk_softmax(x.cpu(), 4, True))
    exp = ref.ref_grouped_topk(x.cpu(), 4, 8, 2, None, "softmax", True, 1.0)
    assert_routing("grouped", fo.grouped_topk(x, 4, 8, 2, scoring_func="softmax"), exp)


def test_grouped_topk_strided_bias(device):
    """A bias that is a strided view (every other element of a buffer) gives the result of its
    contiguous copy; it used to be refused although the kernel reads a contiguous copy."""
    x = tie_free_logits(5, 32, device=device, seed=15)
    buf = torch.linspace(-0.2, 0.2, 64, device=device)
    got = fo.grouped_topk(x, 4, 4, 2, bias=buf[::2])
    want = fo.grouped_topk(x, 4, 4, 2, bias=buf[::2].contiguous())
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_routed_scaling_factor_is_a_plain_factor(device):
    x = tie_free_logits(5, 64, device=device, seed=5)
    w1, i1 = fo.grouped_topk(x, 4, 8, 2, routed_scaling_factor=1.0)
    w2, i2 = fo.grouped_topk(x, 4, 8, 2, routed_scaling_factor=2.5)
    assert torch.equal(i1, i2)
    assert_close("rsf", w2, w1 * 2.5)


@pytest.mark.parametrize("case", ["softmax", "grouped", "sigmoid"])
def test_cpu_backend_matches_oracle(case):
    """The plain-PyTorch CPU backend (used when the interpreter is off) obeys the same contract."""
    x = tie_free_logits(11, 64, seed=6)
    b = torch.linspace(-0.1, 0.1, 64)
    if case == "softmax":
        got, exp = ref.topk_softmax_cpu(x, 5, True), ref.ref_topk_softmax(x, 5, True)
    elif case == "grouped":
        got, exp = ref.grouped_topk_cpu(x, 5, 8, 3, b, "sigmoid", True, 2.5), ref.ref_grouped_topk(x, 5, 8, 3, b, "sigmoid", True, 2.5)
    else:
        got, exp = ref.topk_sigmoid_cpu(x, 2), ref.ref_topk_sigmoid(x, 2)
    assert_routing(case, got, exp)


# --------------------------------------------------------------------------- align


def test_align_worked_example(device, align_path):
    """Spec §2 example, exactly."""
    ids = torch.tensor([[1, 3], [1, 0], [3, -1]], dtype=torch.int32, device=device)
    sid, eid, ntp = fo.moe_align_block_size(ids, 2, 4)
    assert sid.tolist() == [3, 6, 0, 2, 1, 4, 5, 6, 6, 6, 6]
    assert eid.tolist() == [0, 1, 3, -1, -1, -1]
    assert ntp.tolist() == [8] and ntp.device == ids.device and ntp.dtype == torch.int32


def test_align_takes_vllm_ignore_invalid_experts(device):
    """vLLM's keyword is accepted (code written against vLLM passes it); the layout is ours for
    both values: remote pairs in the skip bucket, no remote pair in an expert's block."""
    ids = align_inputs(9, 3, 16, skip_frac=0.2, device=device, seed=14)
    emap = half_remote_map(16, device=device)
    want = fo.moe_align_block_size(ids, 4, 16, emap)
    for flag in (False, True):
        got = fo.moe_align_block_size(ids, 4, 16, emap, ignore_invalid_experts=flag)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


ALIGN_CASES = {  # name: (T, k, E, B, skip_frac, map, pad)
    "T0": (0, 2, 8, 4, 0.0, False, False),
    "T1-k8-E256-B16": (1, 8, 256, 16, 0.0, False, False),
    "T3-k2-E8-B4": (3, 2, 8, 4, 0.0, False, False),
    "T64-k8-E64-B16-skip": (64, 8, 64, 16, 0.2, False, False),
    "T64-k6-E160-B64-pad": (64, 6, 160, 64, 0.1, False, True),
    "T1000-k2-E8-B128": (1000, 2, 8, 128, 0.0, False, False),
    "T40-k4-E16-B8-map": (40, 4, 16, 8, 0.1, True, False),
    "T40-k4-E17-B1-map-pad": (40, 4, 17, 1, 0.1, True, True),
}


@pytest.mark.parametrize("case", list(ALIGN_CASES), ids=list(ALIGN_CASES))
def test_align_vs_oracle(case, device, align_path, nan_empty):
    T, k, E, B, skip, use_map, pad = ALIGN_CASES[case]
    ids = align_inputs(T, k, E, skip_frac=skip, device=device)
    emap = half_remote_map(E, device=device) if use_map else None
    got = fo.moe_align_block_size(ids, B, E, emap, pad)
    check_align_invariants(ids, B, E, emap, pad, *got)
    assert_align_equal(got, ref.ref_moe_align_block_size(ids.cpu(), B, E, None if emap is None else emap.cpu(), pad))


SPECIAL = ["all-skip-rows", "one-hot-expert", "empty-experts", "all-remote", "int64-ids", "noncontiguous-ids"]


@pytest.mark.parametrize("case", SPECIAL)
def test_align_special_inputs(case, device, align_path, nan_empty):
    T, k, E, B, emap = 37, 4, 16, 8, None
    ids = align_inputs(T, k, E, device=device, seed=7)
    if case == "all-skip-rows":
        ids[::3] = -1  # CUDA-graph padding rows
    elif case == "one-hot-expert":
        ids.fill_(5)
    elif case == "empty-experts":
        ids = ids % 4 * 3  # experts 0, 3, 6, 9 only
    elif case == "all-remote":
        emap = torch.full((E,), -1, dtype=torch.int32, device=device)
    elif case == "int64-ids":
        ids = ids.long()
    elif case == "noncontiguous-ids":
        ids = align_inputs(T, 2 * k, E, device=device, seed=8)[:, ::2]
        assert not ids.is_contiguous()
    got = fo.moe_align_block_size(ids, B, E, emap)
    check_align_invariants(ids, B, E, emap, False, *got)
    assert_align_equal(got, ref.ref_moe_align_block_size(ids.cpu(), B, E, None if emap is None else emap.cpu()))


def test_align_cpu_backend_matches_oracle():
    for seed, (T, k, E, B, use_map, pad) in enumerate([(0, 2, 4, 3, False, True), (50, 3, 9, 4, True, False),
                                                         (70, 8, 64, 16, False, True)]):
        ids = align_inputs(T, k, E, skip_frac=0.2, seed=seed)
        emap = half_remote_map(E, seed) if use_map else None
        assert_align_equal(ref.moe_align_block_size_cpu(ids, B, E, emap, pad),
                           ref.ref_moe_align_block_size(ids, B, E, emap, pad))


@given(
    T=st.integers(0, 48),
    k=st.integers(1, 8),
    E=st.integers(1, 70),
    B=st.sampled_from([1, 2, 3, 4, 7, 16, 64]),
    skip=st.sampled_from([0.0, 0.3, 1.0]),
    use_map=st.booleans(),
    pad=st.booleans(),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_align_hypothesis(T, k, E, B, skip, use_map, pad, fused, seed):
    from tests.conftest import DEVICE

    ids = align_inputs(T, k, E, skip_frac=skip, seed=seed, device=DEVICE)
    emap = half_remote_map(E, seed, DEVICE) if use_map else None
    orig = ops._align_config
    ops._align_config = lambda numel: dict(CH=128, fused=fused, num_warps=4)
    try:
        got = fo.moe_align_block_size(ids, B, E, emap, pad)
    finally:
        ops._align_config = orig
    check_align_invariants(ids, B, E, emap, pad, *got)
    assert_align_equal(got, ref.ref_moe_align_block_size(ids.cpu(), B, E, None if emap is None else emap.cpu(), pad))


def test_align_default_config_paths(device):
    """The real heuristics: a decode-sized call and a prefill-sized call (two-launch)."""
    for T, k, E, B in ((4, 8, 256, 16), (300, 8, 32, 64)):
        ids = align_inputs(T, k, E, skip_frac=0.05, device=device, seed=T)
        got = fo.moe_align_block_size(ids, B, E)
        assert_align_equal(got, ref.ref_moe_align_block_size(ids.cpu(), B, E))


def test_routing_launch_config():
    """Pins the routing launch heuristic (``benchmarks/tune_routing.py`` measured it): from 128
    lanes one token per program on one warp (one more per 1024 lanes); narrow rows packed."""
    assert ops._routing_config(128) == ops._routing_config(512) == dict(BLOCK_T=1, num_warps=1)
    assert ops._routing_config(2048) == dict(BLOCK_T=1, num_warps=2)
    assert ops._routing_config(8) == dict(BLOCK_T=64, num_warps=4)
    assert ops._routing_config(64) == dict(BLOCK_T=64, num_warps=4)


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E,B", [(16384, 8, 256, 64), (4096, 8, 128, 16), (4096, 2, 8, 128), (3000, 6, 160, 64),
                                     (700, 8, 384, 16), (1, 8, 256, 16)])
def test_align_large_gpu(T, k, E, B, nan_empty):
    """Model-sized calls on the GPU (real heuristics, both paths, many chunks)."""
    ids = align_inputs(T, k, E, skip_frac=0.01, device="cuda", seed=T)
    got = fo.moe_align_block_size(ids, B, E)
    check_align_invariants(ids, B, E, None, False, *got)
    assert_align_equal(got, ref.ref_moe_align_block_size(ids.cpu(), B, E))
    hot = torch.full_like(ids, 3)  # every pair to one expert: one huge bucket
    assert_align_equal(fo.moe_align_block_size(hot, B, E), ref.ref_moe_align_block_size(hot.cpu(), B, E))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["softmax", "grouped", "sigmoid"])
def test_routing_large_gpu(case, nan_empty):
    T = 4096
    for E, k in ((8, 2), (128, 8), (256, 8), (384, 8)):
        x = tie_free_logits(T, E, device="cuda", seed=E)
        if case == "softmax":
            assert_routing(f"E{E}", fo.topk_softmax(x, k, True), ref.ref_topk_softmax(x.cpu(), k, True))
        elif case == "sigmoid":
            assert_routing(f"E{E}", fo.topk_sigmoid(x, k), ref.ref_topk_sigmoid(x.cpu(), k))
        else:
            bias = torch.linspace(-0.3, 0.3, E, device="cuda")
            ng = 8 if E >= 16 else 2
            assert_routing(f"E{E}", fo.grouped_topk(x, k, ng, ng // 2, bias=bias, routed_scaling_factor=2.5),
                           ref.ref_grouped_topk(x.cpu(), k, ng, ng // 2, bias.cpu(), "sigmoid", True, 2.5), exact_ids=False)


@pytest.mark.gpu
def test_cuda_graph_capture_route_and_align():
    """Routing + align captured in one CUDA graph, replayed with new logits (no host sync)."""
    T, E, k, B = 64, 256, 8, 16
    bias = torch.linspace(-0.1, 0.1, E, device="cuda")
    static_x = tie_free_logits(T, E, device="cuda", seed=1)

    def step(x):
        w, ids = fo.grouped_topk(x, k, 8, 4, bias=bias, routed_scaling_factor=2.5)
        return (w, ids, *fo.moe_align_block_size(ids, B, E))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step(static_x)
    for seed in (2, 3):
        static_x.copy_(tie_free_logits(T, E, device="cuda", seed=seed))
        g.replay()
        exp = step(static_x)
        for a, b in zip(out, exp):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- FlashInfer shims


def test_fused_topk_deepseek_writes_outputs(device):
    x = tie_free_logits(6, 64, device=device, seed=9).to(torch.bfloat16)
    bias = torch.linspace(-0.2, 0.2, 64, device=device)
    vals = torch.full((6, 4), float("nan"), dtype=torch.bfloat16, device=device)
    idx = torch.full((6, 4), -7, dtype=torch.int32, device=device)
    replay = torch.full((8, 4), -7, dtype=torch.int16, device=device)
    fo.fused_topk_deepseek(x, bias, 8, 2, 4, 2.5, vals, idx, True, replay)
    w, ids = ref.ref_grouped_topk(x.cpu(), 4, 8, 2, bias.cpu(), "sigmoid", True, 2.5)
    assert torch.equal(idx.cpu().sort(-1).values, ids.sort(-1).values)
    assert_close("topk_values", vals.float(), w, dtype=torch.bfloat16)
    assert torch.equal(replay[:6].cpu(), idx.cpu().to(torch.int16)) and (replay[6:] == -7).all()


def test_routing_method_type_values():
    """FlashInfer's current numbering (trtllm fused_moe runner.h): SigmoidRenorm took 6, where
    Unspecified used to be, so a raw 6 must mean SigmoidRenorm."""
    R = fo.RoutingMethodType
    assert {m.name: int(m) for m in R} == dict(Default=0, Renormalize=1, DeepSeekV3=2, Llama4=3, RenormalizeNaive=4,
                                               TopK=5, SigmoidRenorm=6, MiniMax2=7, Sigmoid=8, Unspecified=9)


@pytest.mark.parametrize("ep", [None, (4, 8)], ids=["all-local", "ep-offset4-L8"])
@pytest.mark.parametrize("extra", [0, 3], ids=["flashinfer-sizes", "longer"])
def test_moe_sort_into_preallocated_buffers(ep, extra, device):
    """moe_sort's out_* buffers (FlashInfer's CUDA-graph form): the results land in the given
    buffers, which come back; FlashInfer's sizes (allocate_moe_sort_buffers, at most ours)
    hold every local tile, and longer buffers are padded as past-the-end tiles; poisoned
    buffers are overwritten everywhere."""
    from torch_flashops import moe_utils

    T, k, E, B = 11, 3, 16, 4
    ids = align_inputs(T, k, E, skip_frac=0.15, device=device, seed=13)
    scales = torch.rand(T, k, device=device)
    off, L = ep if ep else (0, E)
    kw = dict(local_expert_offset=off, num_local_experts=L, tile_tokens_dim=B)
    want = [t.cpu() for t in fo.moe_sort(ids, scales, E, k, **kw)]
    bufs = moe_utils.allocate_moe_sort_buffers(T, E, k, L, B, device=device)
    if extra:
        bufs = {n: (torch.empty(b.shape[0] + extra * (B if "permuted_idx_to" in n else 1), dtype=torch.int32,
                                device=device) if b.dim() == 1 and b.shape[0] > 1 else b) for n, b in bufs.items()}
    for b in bufs.values():
        b.fill_(-99)
    tiles = moe_utils.get_max_num_tiles(T, k, L, B)
    assert bufs["out_tile_idx_to_expert_idx"].shape[0] == tiles + extra
    assert moe_utils.get_max_num_permuted_tokens(T, k, L, B) == tiles * B
    got = fo.moe_sort(ids, scales, E, k, **kw, **bufs)
    assert all(g is b for g, b in zip(got, bufs.values()))
    n_tiles = int(want[5])
    assert n_tiles <= tiles <= want[0].shape[0]  # FlashInfer's bound is tighter than ours, and enough
    got = [t.cpu() for t in got]
    for i in (2, 4, 5):
        assert torch.equal(got[i], want[i])
    n = min(got[0].shape[0], want[0].shape[0])
    assert torch.equal(got[0][:n], want[0][:n]) and torch.equal(got[1][:n], want[1][:n])
    assert torch.equal(got[3][: n * B], want[3][: n * B])
    past = torch.arange(n, got[0].shape[0], dtype=torch.int32)  # buffer tiles past ours, if any
    assert (got[0][n:] == -1).all() and torch.equal(got[1][n:], past * B)
    assert (got[3][n * B:] == T * k).all() and got[3].shape[0] == (tiles + extra) * B
    with pytest.raises(ValueError, match="^out_num_non_exiting_tiles:"):
        fo.moe_sort(ids, scales, E, k, **kw, out_num_non_exiting_tiles=torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="^out_tile_idx_to_mn_limit:"):
        fo.moe_sort(ids, scales, E, k, **kw, out_tile_idx_to_mn_limit=torch.zeros(tiles, device=device))


@pytest.mark.parametrize("ep", [None, (4, 8)], ids=["all-local", "ep-offset4-L8"])
def test_moe_sort_permute_unpermute(ep, device):
    T, k, E, B, H = 13, 3, 16, 4, 5
    ids = align_inputs(T, k, E, skip_frac=0.15, device=device, seed=10)
    scales = torch.rand(T, k, device=device)
    off, L = ep if ep else (0, E)
    out = fo.moe_sort(ids, scales, E, k, local_expert_offset=off, num_local_experts=L, tile_tokens_dim=B)
    tile_e, mn_limit, e2p, p2e, total, n_tiles = out
    numel = T * k
    ids_c = ids.cpu().long()
    local = torch.where((ids_c >= off) & (ids_c < off + L), ids_c - off, torch.full_like(ids_c, -1)).reshape(-1)
    counts = torch.bincount(local[local >= 0], minlength=L)
    tot = int(((counts + B - 1) // B * B).sum())
    assert total.tolist() == [tot] and n_tiles.tolist() == [tot // B]
    p2e_c, e2p_c = p2e.cpu().long(), e2p.cpu().long().reshape(-1)
    for i in range(numel):
        if local[i] < 0:
            assert e2p_c[i] == -1
        else:
            p = int(e2p_c[i])
            assert 0 <= p < tot and p2e_c[p] == i and int(tile_e[p // B]) == int(local[i])
            assert p < int(mn_limit[p // B]) <= (p // B + 1) * B
    assert (p2e_c[tot:] == numel).all() and (tile_e.cpu()[tot // B:] == -1).all()

    x = torch.randn(T, H, device=device)
    M = p2e.shape[0]
    permuted = torch.full((M, H), float("nan"), device=device)
    fo.moe_permute(x, permuted, mn_limit, p2e, n_tiles, M, k, B)
    for p in range(M):
        e = int(p2e_c[p])
        if p < tot and e < numel:
            assert torch.equal(permuted[p].cpu(), x[e // k].cpu())
        else:
            assert torch.isnan(permuted[p]).all()
    # no tile row limits at all: nothing is copied (it used to be an IndexError)
    untouched = permuted.clone()
    fo.moe_permute(x, permuted, mn_limit[:0], p2e, n_tiles, M, k, B)
    torch.testing.assert_close(permuted, untouched, atol=0, rtol=0, equal_nan=True)
    # a numpy tile size (read from a config) acts as the int it holds
    import numpy as np

    again = fo.moe_sort(ids, scales, E, k, local_expert_offset=off, num_local_experts=L, tile_tokens_dim=np.int64(B))
    assert all(torch.equal(a, b) for a, b in zip(again, out))
    y = torch.randn(M, H, device=device)
    outp = torch.full((T + 2, H), 7.0, device=device)
    fo.moe_unpermute(y, outp, e2p, scales, T, k)
    expect = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            if int(e2p[t, j]) >= 0:
                expect[t] += scales[t, j].cpu() * y[int(e2p[t, j])].cpu()
    assert_close("unpermuted", outp[:T], expect)
    assert (outp[T:] == 7.0).all()


# --------------------------------------------------------------------------- op checks


def _op_samples(device):
    x = tie_free_logits(5, 32, device=device, seed=11)
    bias = torch.linspace(-0.1, 0.1, 32, device=device)
    ids = align_inputs(9, 4, 16, skip_frac=0.2, device=device, seed=12)
    emap = half_remote_map(16, device=device)
    return [
        (torch.ops.flashops.topk_softmax.default, (x, 4, True)),
        (torch.ops.flashops.grouped_topk.default, (x, 4, 4, 2, bias, "sigmoid", True, 2.5)),
        (torch.ops.flashops.grouped_topk.default, (x.to(torch.bfloat16), 3, 8, 3, None, "softmax", False, 1.0)),
        (torch.ops.flashops.topk_sigmoid.default, (x, 1)),
        (torch.ops.flashops.moe_align_block_size.default, (ids, 4, 16, None, False)),
        (torch.ops.flashops.moe_align_block_size.default, (ids, 8, 16, emap, True)),
    ]


@pytest.mark.parametrize("i", range(6), ids=["topk_softmax", "grouped_topk-bias", "grouped_topk-softmax",
                                             "topk_sigmoid", "align", "align-map-pad"])
def test_opcheck(i, device):
    op, args = _op_samples(device)[i]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_dynamic_routing_and_align(device):
    """Route + align in one compiled graph: 0 breaks, one frame for every T (no recompile)."""
    bias = torch.linspace(-0.1, 0.1, 32, device=device)

    def route(logits):
        w1, i1 = fo.topk_softmax(logits, 2, renormalize=True)
        w2, i2 = fo.grouped_topk(logits, 4, 4, 2, bias=bias, routed_scaling_factor=2.5)
        w3, i3 = fo.topk_sigmoid(logits, 1)
        sid, eid, ntp = fo.moe_align_block_size(i2, 4, 32)
        return w1, i1, w2, w3, i3, sid, eid, ntp

    cc = CompileCounter(route, dynamic=True)
    for T in (3, 6, 11):
        x = tie_free_logits(T, 32, device=device, seed=T)
        got, exp = cc(x), route(x)
        for a, b in zip(got, exp):
            assert a.shape == b.shape and torch.equal(a, b)
    assert cc.frames == 1
    assert cc.graph_ops().count("flashops.moe_align_block_size.default") == 1


def test_selfcheck_passes(device):
    results = _selfcheck._CHECKS["moe_routing"](device)
    assert len(results) >= 10
    bad = [f"{r.op}: {r.max_err} > {r.tol}" for r in results if not r.ok]
    assert not bad, bad


# --------------------------------------------------------------------------- bad input


def _permute(device, top_k=2, tile_size=4, p2e_dtype=torch.int32, n_tiles=None, out=None):
    x = torch.randn(3, 4, device=device)
    z = torch.zeros(8, dtype=torch.int32, device=device)
    out = torch.empty(8, 4, device=device) if out is None else out
    fo.moe_permute(x, out, z, z.to(p2e_dtype), z[:1] if n_tiles is None else n_tiles, 8, top_k, tile_size)


def _logits(device, T=3, E=16):
    return tie_free_logits(T, E, device=device)


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda d: fo.topk_softmax(_logits(d), 17), "topk"),
        (lambda d: fo.topk_softmax(_logits(d), 0), "topk"),
        (lambda d: fo.topk_sigmoid(_logits(d), 20), "topk"),
        (lambda d: fo.topk_softmax(_logits(d).long(), 2), "gating_output"),
        (lambda d: fo.topk_softmax(_logits(d)[0], 2), "gating_output"),
        (lambda d: fo.grouped_topk(_logits(d), 2, 3, 1), "n_group"),
        (lambda d: fo.grouped_topk(_logits(d), 2, 4, 5), "topk_group"),
        (lambda d: fo.grouped_topk(_logits(d), 2, 4, 0), "topk_group"),
        (lambda d: fo.grouped_topk(_logits(d), 9, 4, 2), "topk"),
        (lambda d: fo.grouped_topk(_logits(d), 2, 4, 2, scoring_func="relu"), "scoring_func"),
        (lambda d: fo.grouped_topk(_logits(d), 2, 4, 2, bias=torch.zeros(15, device=d)), "bias"),
        (lambda d: fo.grouped_topk(_logits(d), 2, 16, 2, bias=torch.zeros(16, device=d)), "bias"),
        (lambda d: fo.moe_align_block_size(torch.zeros(3, 2, dtype=torch.int32, device=d), 0, 4), "block_size"),
        (lambda d: fo.moe_align_block_size(torch.zeros(3, 2, device=d), 4, 4), "topk_ids"),
        (lambda d: fo.moe_align_block_size(torch.zeros(3, 2, dtype=torch.int32, device=d), 4, 4,
                                           torch.zeros(5, dtype=torch.int32, device=d)), "expert_map"),
        (lambda d: _permute(d, top_k=0), "top_k"),
        (lambda d: _permute(d, tile_size=0), "tile_size"),
        (lambda d: fo.moe_unpermute(torch.randn(8, 4, device=d), torch.empty(2, 4, device=d),
                                    torch.zeros(2, 2, dtype=torch.int32, device=d),
                                    torch.ones(2, 2, dtype=torch.int64, device=d), 2, 2), "topk_scales"),
        (lambda d: _permute(d, p2e_dtype=torch.float32), "permuted_idx_to_expanded_idx"),
        (lambda d: _permute(d, n_tiles=torch.zeros(2, dtype=torch.int32, device=d)), "num_non_exiting_tiles"),
        (lambda d: _permute(d, n_tiles=torch.zeros(1, dtype=torch.int32, device="meta")), "num_non_exiting_tiles"),
        (lambda d: _permute(d, out=torch.zeros(1, 4, device=d).expand(8, 4)), "permuted_output"),
        (lambda d: fo.moe_unpermute(torch.randn(8, 4, device=d), torch.empty(2, 4, dtype=torch.int32, device=d),
                                    torch.zeros(2, 2, dtype=torch.int32, device=d),
                                    torch.ones(2, 2, device=d), 2, 2), "output"),
        (lambda d: fo.moe_unpermute(torch.randn(8, 4, device=d), torch.zeros(1, 4, device=d).expand(2, 4),
                                    torch.zeros(2, 2, dtype=torch.int32, device=d),
                                    torch.ones(2, 2, device=d), 2, 2), "output"),
        (lambda d: fo.moe_sort(torch.zeros(3, 2, dtype=torch.int32, device=d), torch.ones(3, 2, device=d), 4, 2,
                               tile_tokens_dim=0), "tile_tokens_dim"),
    ],
    ids=["k>E", "k=0", "sigmoid-k>E", "int-logits", "1d-logits", "E%n_group", "topk_group>n_group", "topk_group=0",
         "k>kept-experts", "scoring_func", "bias-shape", "bias-G1", "block_size", "float-ids", "expert_map-size",
         "permute-top_k", "permute-tile_size", "unpermute-int-scales", "permute-float-p2e", "permute-n_tiles-size",
         "permute-n_tiles-device", "permute-overlapping-out", "unpermute-int-output", "unpermute-overlapping-output",
         "sort-tile_tokens_dim"],
)
def test_bad_input_names_argument(call, arg, device):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        call(device)


_DIRECT_BAD = {  # torch.ops.flashops.<op> called directly: no public function's checks in front
    "topk_softmax-k>E": (lambda x, d: torch.ops.flashops.topk_softmax(x, 17, False), "topk"),
    "topk_sigmoid-k=0": (lambda x, d: torch.ops.flashops.topk_sigmoid(x, 0), "topk"),
    "grouped-E%n_group": (lambda x, d: torch.ops.flashops.grouped_topk(x, 2, 3, 1, None, "sigmoid", True, 1.0), "n_group"),
    "grouped-scoring_func": (lambda x, d: torch.ops.flashops.grouped_topk(x, 2, 4, 1, None, "foo", True, 1.0),
                             "scoring_func"),
    "grouped-topk_group": (lambda x, d: torch.ops.flashops.grouped_topk(x, 2, 4, 5, None, "sigmoid", True, 1.0),
                           "topk_group"),
    "grouped-bias": (lambda x, d: torch.ops.flashops.grouped_topk(x, 2, 4, 2, torch.zeros(3, device=d), "sigmoid",
                                                                  True, 1.0), "bias"),
    "align-short-map": (lambda x, d: torch.ops.flashops.moe_align_block_size(
        torch.tensor([[0, 9]], dtype=torch.int32, device=d), 2, 10, torch.zeros(3, dtype=torch.int32, device=d),
        False), "expert_map"),
    "align-block_size": (lambda x, d: torch.ops.flashops.moe_align_block_size(
        torch.tensor([[0, 1]], dtype=torch.int32, device=d), 0, 4, None, False), "block_size"),
}


@pytest.mark.parametrize("case", list(_DIRECT_BAD))
@pytest.mark.parametrize("backend", ["device", "meta"])
def test_direct_op_call_checks_arguments(case, backend, device):
    """The registered ops check the ints their kernels index by, whichever implementation runs
    (kernel, CPU reference, fake): before, a 3-entry expert_map for 10 experts was read out of
    bounds by the kernel, k > E returned [T, k] from the kernel but [T, E] from the reference,
    and an unknown scoring_func ran as sigmoid."""
    call, arg = _DIRECT_BAD[case]
    d = device if backend == "device" else "meta"
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        call(_logits(device).to(d), d)


@pytest.mark.parametrize("bad", [-2, 4], ids=["below-minus-one", "num_experts"])
def test_align_ids_out_of_range_checked(bad, device, checked):
    ids = torch.tensor([[0, 1], [2, bad]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"^topk_ids:"):
        fo.moe_align_block_size(ids, 2, 4)
    with pytest.raises(ValueError, match=r"^expert_map:"):
        fo.moe_align_block_size(ids.clamp(-1, 3), 2, 4, torch.tensor([0, 1, 2, 5], dtype=torch.int32, device=device))


def test_align_out_of_range_ids_unchecked_stay_in_bounds(device):
    """Unchecked mode: out-of-range ids are undefined by contract but land in the skip bucket
    (no out-of-bounds access); the layout stays valid."""
    ids = torch.tensor([[0, 9], [-5, 1]], dtype=torch.int32, device=device)
    got = fo.moe_align_block_size(ids, 2, 4)
    as_skipped = torch.tensor([[0, -1], [-1, 1]], dtype=torch.int32)
    check_align_invariants(as_skipped, 2, 4, None, False, *got)
    assert_align_equal(got, ref.ref_moe_align_block_size(as_skipped, 2, 4))


def test_align_expert_map_out_of_range_unchecked_stays_in_bounds(device, align_path):
    """Unchecked mode: expert_map entries past the expert count (out of contract) must not index
    the per-expert counters; those pairs land in the skip bucket, as remote experts do."""
    g = torch.Generator().manual_seed(3)
    E, B = 8, 4
    ids = torch.randint(0, E, (9, 3), generator=g).int()
    emap = torch.tensor([0, 1, 100, 3, -1, 5, 2 ** 20, 7], dtype=torch.int32)
    as_remote = torch.where((emap >= 0) & (emap < E), emap, torch.full_like(emap, -1))
    got = fo.moe_align_block_size(ids.to(device), B, E, emap.to(device))
    check_align_invariants(ids, B, E, as_remote, False, *got)
    assert_align_equal(got, ref.ref_moe_align_block_size(ids, B, E, as_remote))


def test_fused_topk_deepseek_bad_input_writes_nothing(device):
    x = _logits(device, E=64)
    vals = torch.full((3, 4), 5.0, device=device)
    idx = torch.full((3, 4), 5, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"^bias:"):
        fo.fused_topk_deepseek(x, torch.zeros(63, device=device), 8, 2, 4, 1.0, vals, idx)
    with pytest.raises(ValueError, match=r"^topk_indices:"):
        fo.fused_topk_deepseek(x, torch.zeros(64, device=device), 8, 2, 4, 1.0, vals, idx[:, :3])
    with pytest.raises(NotImplementedError, match="backend"):
        fo.fused_topk_deepseek(x, torch.zeros(64, device=device), 8, 2, 4, 1.0, vals, idx, backend="cutlass")
    assert (vals == 5.0).all() and (idx == 5).all()


# --------------------------------------------------------------------------- schema snapshots


@needs_expecttest
class TestSchemas(SchemaTestCase):
    def test_schemas(self):
        s = {n: str(getattr(torch.ops.flashops, n).default._schema)
             for n in ("topk_softmax", "grouped_topk", "topk_sigmoid", "moe_align_block_size")}
        self.assertExpectedInline(s["topk_softmax"], """flashops::topk_softmax(Tensor gating_output, int topk, bool renormalize) -> (Tensor, Tensor)""")
        self.assertExpectedInline(s["grouped_topk"], """flashops::grouped_topk(Tensor gating_output, int topk, int n_group, int topk_group, Tensor? bias, str scoring_func, bool renormalize, float routed_scaling_factor) -> (Tensor, Tensor)""")
        self.assertExpectedInline(s["topk_sigmoid"], """flashops::topk_sigmoid(Tensor gating_output, int topk) -> (Tensor, Tensor)""")
        self.assertExpectedInline(s["moe_align_block_size"], """flashops::moe_align_block_size(Tensor topk_ids, int block_size, int num_experts, Tensor? expert_map, bool pad_sorted_ids) -> (Tensor, Tensor, Tensor)""")
