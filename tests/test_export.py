"""torch.export of models that call torch_flashops: every op exports whole.

Serving stacks export a model with ``torch.export.export`` (then run ``ep.module()``, save/load
it or lower it). Each test exports a small ``nn.Module`` and checks that

  * the exported graph calls our ``torch.ops.flashops`` ops (namespace from ``_registry``), with
    no aten math of a decomposition (softmax, topk, exp2, cos, bmm ... ) in their place;
  * ``ep.module()`` on fresh random inputs (another token count where the export is dynamic)
    equals the eager module exactly (same kernels, deterministic) and the fp64/fp32 oracle
    within tolerance; fresh outputs are poisoned (``torch.empty`` returns NaN) during the run;
  * in-place ops (paged-KV append, in-place RoPE and merge) write the caller's buffer or input,
    in the exported module as in eager, also after ``run_decompositions()`` (which wraps the
    mutating op in ``auto_functionalized``, still our op).

Wrappers (decode/prefill ``run()``) are planned on host data before export: the plan's work
lists and index copies become lifted constants of the exported program and ``block_m``, the
scale and the mask flags literals, so one export serves the plan it was traced with (a
CUDA-graph-mode wrapper re-plans into the same buffers, which the exported module sees).
Strict (dynamo) export works too: run() hands export the plan's tensors without the unbacked
marks it gives torch.compile.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch.export import Dim, export

import torch_flashops as fo
from torch_flashops import _registry
from torch_flashops import prefill as prefill_mod
from torch_flashops.fused_moe import fused_moe  # (top-level torch_flashops.fused_moe is the module)
from torch_flashops.reference import moe as ref_moe
from torch_flashops.reference.attention import ref_attention
from torch_flashops.reference.cascade import ref_merge_state
from torch_flashops.reference.rope import ref_rope_cos_sin_cache, ref_rope_pos_ids, rope_freqs

from .conftest import DEVICE
from .helpers import assert_close
from .test_attention import LSE_TOL, Batch, workspace
from .test_moe import MOE_TOL, poisoned_allocations

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore:divide by zero encountered in log2:RuntimeWarning")

NS = _registry.NAMESPACE

# aten ops that would mean one of our ops was decomposed (its reference math traced) instead of
# kept opaque; the modules' own glue (matmul of the router, views, empty/copy_, slices) is allowed.
DECOMPOSED = {"softmax", "_softmax", "log_softmax", "topk", "sort", "argsort", "sigmoid", "silu", "exp", "exp2",
              "log", "log2", "logsumexp", "amax", "max", "bmm", "baddbmm", "einsum", "cos", "sin", "index_add",
              "index_add_", "scatter", "scatter_", "scatter_add", "gather", "index_put", "index_put_", "cumsum",
              "searchsorted", "repeat_interleave", "where"}


def _targets(gm: torch.fx.GraphModule):
    """The op of every call node; a mutating op wrapped by ``auto_functionalized(_v2)`` (after
    ``run_decompositions``) counts as the op it wraps."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        if isinstance(t, torch._ops.HigherOrderOperator) and node.args and isinstance(node.args[0], torch._ops.OpOverload):
            t = node.args[0]
        if isinstance(t, torch._ops.OpOverload):
            yield t


def flashops_calls(ep) -> list:
    """Names of the ``flashops`` ops the exported graph calls, in graph order."""
    return [t._opname for t in _targets(ep.graph_module) if t.namespace == NS]


def check_graph(ep, expected: list):
    """The graph calls exactly ``expected`` flashops ops, in order, and no decomposition."""
    assert f"torch.ops.{NS}." in ep.graph_module.code
    assert flashops_calls(ep) == expected, ep.graph_module.code
    aten = {t._opname for t in _targets(ep.graph_module) if t.namespace == "aten"}
    assert not aten & DECOMPOSED, f"decomposed ops in the exported graph: {sorted(aten & DECOMPOSED)}\n{ep.graph_module.code}"


def placeholder(ep, name: str):
    return next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name)


def run_poisoned(fn, *args):
    with torch.no_grad(), poisoned_allocations():
        return fn(*args)


def randn(*shape, g, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def assert_same(name, got, want):
    """Exported vs eager: the same kernels on the same inputs, bit for bit."""
    for i, (a, b) in enumerate(zip(got, want) if isinstance(got, (tuple, list)) else [(got, want)]):
        assert not torch.isnan(a).any() if a.is_floating_point() else True, f"{name}[{i}]: NaN (unwritten output)"
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{name}[{i}]: {m}")


# ------------------------------------------------------------------------------------------ MoE


class MoELayer(torch.nn.Module):
    """Router + experts: ``topk_softmax`` (Mixtral/Qwen3) or FlashInfer's ``fused_topk_deepseek``
    (DeepSeek-V3 grouped routing into preallocated outputs), then ``fused_moe``."""

    def __init__(self, routing, H=16, I=16, E=8, k=2, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.routing, self.k = routing, k
        self.register_buffer("gate", randn(E, H, g=g, dtype=dtype))
        self.register_buffer("bias", randn(E, g=g, scale=0.1))
        self.register_buffer("w1", randn(E, 2 * I, H, g=g, scale=H ** -0.5, dtype=dtype))
        self.register_buffer("w2", randn(E, H, I, g=g, scale=I ** -0.5, dtype=dtype))

    def route(self, x):
        logits = x @ self.gate.T
        if self.routing == "topk_softmax":
            return fo.topk_softmax(logits, self.k, renormalize=True)
        w = torch.empty(x.shape[0], self.k, dtype=torch.float32, device=x.device)
        ids = torch.empty(x.shape[0], self.k, dtype=torch.int32, device=x.device)
        fo.fused_moe.fused_topk_deepseek(logits, self.bias, 4, 2, self.k, 2.5, w, ids)
        return w, ids

    def forward(self, x):
        w, ids = self.route(x)
        return fused_moe(x, self.w1, self.w2, w, ids, routed_scaling_factor=0.5)


MOE_CASES = [("topk_softmax", torch.float32, False), ("topk_softmax", torch.float32, True),
             ("topk_softmax", torch.bfloat16, False), ("fused_topk_deepseek", torch.float32, False)]


@pytest.mark.parametrize("routing,dtype,strict", MOE_CASES,
                         ids=[f"{r}-{str(d)[6:]}{'-strict' if s else ''}" for r, d, s in MOE_CASES])
def test_export_moe_dynamic_tokens(routing, dtype, strict):
    k = 4 if routing == "fused_topk_deepseek" else 2
    m = MoELayer(routing, k=k, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    T = Dim("T", min=1, max=4096)
    ep = export(m, (randn(6, 16, g=g, dtype=dtype),), dynamic_shapes={"x": {0: T}}, strict=strict)
    check_graph(ep, ["topk_softmax" if routing == "topk_softmax" else "grouped_topk", "fused_moe"])
    assert isinstance(placeholder(ep, "x").meta["val"].shape[0], torch.SymInt), "token dim was specialised"
    gm = ep.module()
    for T in (1, 3, 11):  # other token counts than the traced 6 (T=1: the decode pair path)
        x = randn(T, 16, g=g, dtype=dtype)
        out = run_poisoned(gm, x)
        assert out.shape == (T, 16) and out.dtype == dtype
        assert_same(f"fused_moe T={T}", out, m(x))
        w, ids = m.route(x)  # the eager routing, then the dense fp32 oracle of the experts
        exp = ref_moe.ref_fused_moe_dense(x.float().cpu(), m.w1.float().cpu(), m.w2.float().cpu(), w.cpu(), ids.cpu(),
                                          rsf=0.5)
        assert_close(f"fused_moe T={T} vs dense", out, exp, **MOE_TOL[dtype])


def test_export_moe_save_load():
    """The serving path: ``torch.export.save`` / ``load`` keeps the ops and the dynamic dim."""
    m = MoELayer("topk_softmax")
    g = torch.Generator().manual_seed(2)
    ep = export(m, (randn(6, 16, g=g),), dynamic_shapes={"x": {0: Dim("T", min=1, max=4096)}})
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    ep2 = torch.export.load(buf)
    check_graph(ep2, ["topk_softmax", "fused_moe"])
    x = randn(9, 16, g=g)
    assert_same("loaded fused_moe", run_poisoned(ep2.module(), x), m(x))


# ------------------------------------------------------------------------------- RoPE, cascade


def _cos_sin_cache(rd, max_pos):
    f = torch.arange(max_pos, dtype=torch.float32)[:, None] * rope_freqs(rd)[None]
    return torch.cat([f.cos(), f.sin()], -1).to(DEVICE)


class Rope(torch.nn.Module):
    """vLLM's cos/sin-cache RoPE on packed ``[T, H*D]`` q/k, and FlashInfer's pos-ids RoPE."""

    def __init__(self, D=16, max_pos=64):
        super().__init__()
        self.D = D
        self.register_buffer("cos_sin_cache", _cos_sin_cache(D, max_pos))

    def forward(self, pos, q, k):
        q1, k1 = fo.apply_rope_with_cos_sin_cache(pos, q, k, self.D, self.cos_sin_cache)
        q3, k3 = q.view(q.shape[0], -1, self.D), k.view(k.shape[0], -1, self.D)
        q2, k2 = fo.apply_rope_pos_ids(q3, k3, pos, rope_theta=500.0)
        return q1, k1, q2, k2


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_rope_dynamic_tokens(strict):
    m = Rope()
    g = torch.Generator().manual_seed(3)
    T = Dim("T", min=1, max=4096)
    args = (torch.randint(0, 64, (5,), generator=g).to(DEVICE), randn(5, 4 * 16, g=g), randn(5, 2 * 16, g=g))
    ep = export(m, args, dynamic_shapes={"pos": {0: T}, "q": {0: T}, "k": {0: T}}, strict=strict)
    check_graph(ep, ["rope_cos_sin_cache", "rope"])
    for T in (1, 7):
        pos = torch.randint(0, 64, (T,), generator=g).to(DEVICE)
        q, k = randn(T, 4 * 16, g=g), randn(T, 2 * 16, g=g)
        out = run_poisoned(ep.module(), pos, q, k)
        assert_same(f"rope T={T}", out, m(pos, q, k))
        rq, rk = ref_rope_cos_sin_cache(pos.cpu(), q.cpu(), k.cpu(), 16, m.cos_sin_cache.cpu())
        assert_close("rope_cos_sin_cache q", out[0], rq)
        assert_close("rope_cos_sin_cache k", out[1], rk)
        freqs = rope_freqs(16, 500.0)
        assert_close("rope_pos_ids q", out[2], ref_rope_pos_ids(q.cpu().view(T, 4, 16), pos.cpu(), 16, freqs))
        assert_close("rope_pos_ids k", out[3], ref_rope_pos_ids(k.cpu().view(T, 2, 16), pos.cpu(), 16, freqs))


class RopeInplace(torch.nn.Module):
    def forward(self, q, k, pos):
        fo.apply_rope_pos_ids_inplace(q, k, pos)
        return q.sum(-1)  # a consumer of the rotated q


@pytest.mark.parametrize("decompose", [False, True], ids=["export", "run_decompositions"])
def test_export_rope_inplace_visible(decompose):
    """In-place RoPE on user inputs: the exported module rotates the caller's q and k."""
    g = torch.Generator().manual_seed(4)
    q, k, pos = randn(6, 4, 16, g=g), randn(6, 2, 16, g=g), torch.randint(0, 100, (6,), generator=g).to(DEVICE)
    ep = export(RopeInplace(), (q.clone(), k.clone(), pos), dynamic_shapes=({0: Dim("T")}, {0: Dim("T")}, {0: Dim("T")}))
    if decompose:
        ep = ep.run_decompositions()
    check_graph(ep, ["rope_inplace"])
    q, k, pos = randn(9, 4, 16, g=g), randn(9, 2, 16, g=g), torch.randint(0, 100, (9,), generator=g).to(DEVICE)
    q1, k1, q2, k2 = q.clone(), k.clone(), q.clone(), k.clone()
    s1 = run_poisoned(ep.module(), q1, k1, pos)
    s2 = RopeInplace()(q2, k2, pos)
    assert_same("rope_inplace", (q1, k1, s1), (q2, k2, s2))
    assert_close("rope_inplace q", q1, ref_rope_pos_ids(q.cpu(), pos.cpu(), 16, rope_freqs(16)))
    assert not torch.equal(q1, q)


class Merge(torch.nn.Module):
    def forward(self, va, sa, vb, sb):
        return fo.merge_state(va, sa, vb, sb)


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_merge_state_dynamic(strict):
    g = torch.Generator().manual_seed(5)

    def state(n):
        return randn(n, 4, 16, g=g), randn(n, 4, g=g, scale=3.0)

    N = Dim("N", min=1, max=1 << 16)
    ep = export(Merge(), (*state(5), *state(5)), dynamic_shapes=({0: N}, {0: N}, {0: N}, {0: N}), strict=strict)
    check_graph(ep, ["merge_state"])
    for n in (1, 12):
        args = (*state(n), *state(n))
        out = run_poisoned(ep.module(), *args)
        assert_same(f"merge_state n={n}", out, Merge()(*args))
        ro, rs = ref_merge_state(*(a.cpu() for a in args))
        assert_close("merge_state v", out[0], ro, dtype=torch.float32)
        assert_close("merge_state s", out[1], rs, **LSE_TOL)


class MergeInplace(torch.nn.Module):
    def forward(self, v, s, v_other, s_other, mask):
        fo.merge_state_in_place(v, s, v_other, s_other, mask)


def test_export_merge_state_in_place_visible():
    g = torch.Generator().manual_seed(6)
    v, s, vo, so = randn(7, 4, 16, g=g), randn(7, 4, g=g), randn(7, 4, 16, g=g), randn(7, 4, g=g)
    mask = (torch.arange(7) % 3 != 1).to(DEVICE)
    ep = export(MergeInplace(), (v.clone(), s.clone(), vo, so, mask))
    check_graph(ep, ["merge_state_in_place"])
    v1, s1, v2, s2 = v.clone(), s.clone(), v.clone(), s.clone()
    ep.module()(v1, s1, vo, so, mask)
    MergeInplace()(v2, s2, vo, so, mask)
    assert_same("merge_state_in_place", (v1, s1), (v2, s2))
    ro, rs = ref_merge_state(v.cpu(), s.cpu(), vo.cpu(), so.cpu())
    keep, v1, s1, v, s = mask.cpu(), v1.cpu(), s1.cpu(), v.cpu(), s.cpu()
    assert torch.equal(v1[~keep], v[~keep]) and torch.equal(s1[~keep], s[~keep])  # masked rows untouched
    assert_close("merged rows v", v1[keep], ro[keep], dtype=torch.float32)
    assert_close("merged rows s", s1[keep], rs[keep], **LSE_TOL)


# ---------------------------------------------------------------------------- attention wrappers


class Run(torch.nn.Module):
    """``wrapper.run(q, paged_kv_cache)``, planned outside the module before export."""

    def __init__(self, wrapper, return_lse=False):
        super().__init__()
        self.w, self.return_lse = wrapper, return_lse

    def forward(self, q, cache):
        return self.w.run(q, cache, return_lse=self.return_lse)


def _fresh(b: Batch, seed):
    """New random q and cache (same shapes and page table) for the exported module."""
    g = torch.Generator().manual_seed(seed)
    q = randn(*b.q.shape, g=g)
    if isinstance(b.cache, tuple):
        return q, tuple(randn(*c.shape, g=g) for c in b.cache)
    return q, randn(*b.cache.shape, g=g)


def _oracle(b: Batch, q, cache, **kw):
    k, v = (cache if isinstance(cache, tuple) else (cache[:, 0], cache[:, 1]))
    return ref_attention(q.cpu(), k.cpu(), v.cpu(), b.qo_indptr, b.kv_indptr, b.kv_indices, b.last, **kw)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("form", ["5d", "tuple"])
def test_export_decode_run(form, strict):
    b = Batch([1, 1, 1, 1], [5, 2, 9, 13], page_size=4, Hq=4, Hkv=2, D=16, seed=7, form=form)
    w = fo.BatchDecodeWithPagedKVCacheWrapper(workspace(DEVICE))
    w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 4, 2, 16, 4, q_data_type=torch.float32)
    m = Run(w, return_lse=True)
    ep = export(m, (b.q, b.cache), strict=strict)
    check_graph(ep, ["paged_attention"])
    q, cache = _fresh(b, 8)
    out = run_poisoned(ep.module(), q, cache)
    assert_same("decode run", out, m(q, cache))
    ro, rl = _oracle(b, q, cache)
    assert_close("decode o", out[0], ro.float())
    assert_close("decode lse", out[1], rl, **LSE_TOL)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("path", ["paged", "gather"])
def test_export_prefill_run(path, strict, monkeypatch):
    """Causal paged prefill; ``gather`` lowers the long-prefill threshold so plan() picks the
    gathered-K/V path (``gather_paged_kv`` + the ragged kernel, a Python branch at run()).
    Strict (dynamo) export too: the plan's tensors, marked unbacked for torch.compile, reach
    export unmarked (``PlanTensors.unmarked``); a lifted constant with an unbacked size fails
    there ("possible memo disaster")."""
    if path == "gather":
        monkeypatch.setattr(prefill_mod, "PAGED_GATHER_MIN_ROWS_PER_KEY", 0)
    b = Batch([3, 5, 1], [6, 9, 4], page_size=4, Hq=4, Hkv=2, D=16, seed=9)
    w = fo.BatchPrefillWithPagedKVCacheWrapper(workspace(DEVICE))
    w.plan(b.dev(b.qo_indptr), b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 4, 2, 16, 4, causal=True,
           q_data_type=torch.float32)
    assert (w._gather is not None) == (path == "gather")
    m = Run(w)
    ep = export(m, (b.q, b.cache), strict=strict)
    check_graph(ep, ["paged_attention"] if path == "paged" else ["gather_paged_kv", "ragged_attention"])
    q, cache = _fresh(b, 10)
    out = run_poisoned(ep.module(), q, cache)
    assert_same("prefill run", out, m(q, cache))
    assert_close("prefill o", out, _oracle(b, q, cache, causal=True)[0].float())


class RunRagged(torch.nn.Module):
    def __init__(self, wrapper):
        super().__init__()
        self.w = wrapper

    def forward(self, q, k, v):
        return self.w.run(q, k, v, return_lse=True)


class RunCascade(RunRagged):
    def forward(self, q, cache):  # (FlashInfer's cascade run() has no return_lse)
        return self.w.run(q, cache)


@pytest.mark.parametrize("strict", [False, True])
def test_export_ragged_and_cascade_run(strict):
    """The ragged wrapper's run() (its own access to the plan's tensors) and the two-level
    cascade (two paged runs and an in-place merge), strict and not."""
    g = torch.Generator().manual_seed(12)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    q, k, v = randn(8, 4, 16, g=g), randn(16, 2, 16, g=g), randn(16, 2, 16, g=g)
    r = fo.BatchPrefillWithRaggedKVCacheWrapper(workspace(DEVICE))
    r.plan(i32([0, 3, 4, 8]), i32([0, 5, 12, 16]), 4, 2, 16, causal=True, q_data_type=torch.float32)
    m = RunRagged(r)
    ep = export(m, (q, k, v), strict=strict)
    check_graph(ep, ["ragged_attention"])
    q2, k2, v2 = randn(8, 4, 16, g=g), randn(16, 2, 16, g=g), randn(16, 2, 16, g=g)
    out = run_poisoned(ep.module(), q2, k2, v2)
    assert_same("ragged run", out, m(q2, k2, v2))
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    ro, rl = ref_attention(q2.cpu(), k2.cpu()[:, None], v2.cpu()[:, None], t([0, 3, 4, 8]), t([0, 5, 12, 16]),
                           torch.arange(16, dtype=torch.int32), t([1, 1, 1]), causal=True)  # (ragged: 1-key pages)
    assert_close("ragged o", out[0], ro.float())
    assert_close("ragged lse", out[1], rl, **LSE_TOL)

    cache = randn(12, 2, 4, 2, 16, g=g)
    c = fo.MultiLevelCascadeAttentionWrapper(2, workspace(DEVICE))
    c.plan([i32([0, 3]), i32([0, 1, 2, 3])], [i32([0, 2]), i32([0, 1, 3, 4])], [i32([5, 1]), i32([0, 7, 2, 9])],
           [i32([4]), i32([3, 1, 2])], 4, 2, 16, 4, causal=True, q_data_type=torch.float32)
    mc = RunCascade(c)
    qc = randn(3, 4, 16, g=g)
    ep = export(mc, (qc, cache), strict=strict)
    check_graph(ep, ["paged_attention", "paged_attention", "merge_state_in_place"])
    qc2, cache2 = randn(3, 4, 16, g=g), randn(12, 2, 4, 2, 16, g=g)
    assert_same("cascade run", run_poisoned(ep.module(), qc2, cache2), mc(qc2, cache2))


def test_export_decode_cuda_graph_mode_replan():
    """A CUDA-graph-mode wrapper re-plans into its frozen buffers, which the exported program
    holds (lifted constants alias them): one export serves a later plan of the same batch size."""
    B, P = 3, 12
    bufs = (torch.zeros(B + 1, dtype=torch.int32, device=DEVICE), torch.zeros(16, dtype=torch.int32, device=DEVICE),
            torch.zeros(B, dtype=torch.int32, device=DEVICE))
    w = fo.BatchDecodeWithPagedKVCacheWrapper(workspace(DEVICE), use_cuda_graph=True, paged_kv_indptr_buffer=bufs[0],
                                              paged_kv_indices_buffer=bufs[1], paged_kv_last_page_len_buffer=bufs[2])
    m = Run(w)
    ep = None
    for i, lens in enumerate(([5, 2, 9], [7, 3, 14])):
        b = Batch([1] * B, lens, page_size=4, Hq=4, Hkv=2, D=16, seed=11 + i, spare_pages=P - sum((n + 3) // 4 for n in lens))
        w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 4, 2, 16, 4, q_data_type=torch.float32)
        if ep is None:
            ep = export(m, (b.q, b.cache))
            check_graph(ep, ["paged_attention"])
        out = run_poisoned(ep.module(), b.q, b.cache)
        assert_same(f"plan {i}", out, m(b.q, b.cache))
        assert_close(f"plan {i} o", out, b.oracle()[0].float())


# ------------------------------------------------------------------------- append, then attend


PAGE, HQ, HKV, D, NPAGES = 4, 4, 2, 16, 12


def _page_table(kv_lens, app_lens, g):
    """Page table (kv lens after the append) and the append CSR, on the host."""
    npg = [(n + PAGE - 1) // PAGE for n in kv_lens]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    kv_indptr = i32([0] + torch.tensor(npg).cumsum(0).tolist())
    kv_indices = torch.randperm(NPAGES, generator=g)[: int(kv_indptr[-1])].int()
    last = i32([(n - 1) % PAGE + 1 for n in kv_lens])
    app_indptr = i32([0] + torch.tensor(app_lens).cumsum(0).tolist())
    return app_indptr, kv_indptr, kv_indices, last


def _expected_cache(k_cache, v_cache, k_new, v_new, kv_lens, app_lens, kv_indptr, kv_indices):
    """The caches with the new rows written at positions ``kv_len - app_len + r`` (NHD)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    t = 0
    for b, (n, a) in enumerate(zip(kv_lens, app_lens)):
        for r in range(a):
            p = n - a + r
            page = int(kv_indices[int(kv_indptr[b]) + p // PAGE])
            k_cache[page, p % PAGE], v_cache[page, p % PAGE] = k_new[t], v_new[t]
            t += 1
    return k_cache, v_cache


class AppendAttend(torch.nn.Module):
    """Chunked prefill step on a cache held as a buffer (5-D NHD): positions from the page
    table, append the new K/V in place, attend over the updated cache."""

    def __init__(self, wrapper, cache):
        super().__init__()
        self.w = wrapper
        self.register_buffer("kv_cache", cache)

    def forward(self, q, k_new, v_new, append_indptr, kv_indices, kv_indptr, last):
        seq = fo.get_seq_lens(kv_indptr, last, PAGE)
        bi, pos = fo.get_batch_indices_positions(append_indptr, seq, k_new.shape[0])
        fo.append_paged_kv_cache(k_new, v_new, bi, pos, self.kv_cache, kv_indices, kv_indptr, last)
        return self.w.run(q, self.kv_cache)


@pytest.mark.parametrize("decompose", [False, True], ids=["export", "run_decompositions"])
def test_export_append_then_prefill_buffer(decompose):
    g = torch.Generator().manual_seed(12)
    kv_lens, app_lens = [6, 9, 3], [2, 3, 1]
    app_indptr, kv_indptr, kv_indices, last = _page_table(kv_lens, app_lens, g)
    w = fo.BatchPrefillWithPagedKVCacheWrapper(workspace(DEVICE))
    w.plan(app_indptr, kv_indptr, kv_indices, last, HQ, HKV, D, PAGE, causal=True, q_data_type=torch.float32)
    cache0 = randn(NPAGES, 2, PAGE, HKV, D, g=g)
    n = sum(app_lens)
    table = tuple(t.to(DEVICE) for t in (app_indptr, kv_indices, kv_indptr, last))

    def inputs():
        return (randn(n, HQ, D, g=g), randn(n, HKV, D, g=g), randn(n, HKV, D, g=g)) + table

    # the exported program shares the module's buffer: export one module, compare with a twin
    exported, eager = AppendAttend(w, cache0.clone()), AppendAttend(w, cache0.clone())
    ep = export(exported, inputs())
    if decompose:
        ep = ep.run_decompositions()
        assert list(ep.graph_signature.buffers_to_mutate.values()) == ["kv_cache"]
    check_graph(ep, ["batch_indices_positions", "append_paged_kv_cache", "paged_attention"])
    assert torch.equal(exported.kv_cache, cache0), "export itself must not write the cache"
    gm = ep.module()
    args = inputs()
    out = run_poisoned(gm, *args)
    assert_same("append+prefill", out, eager(*args))
    assert_same("cache after append", gm.kv_cache, eager.kv_cache)
    k_exp, v_exp = _expected_cache(cache0[:, 0].cpu(), cache0[:, 1].cpu(), args[1].cpu(), args[2].cpu(), kv_lens,
                                   app_lens, kv_indptr, kv_indices)
    assert torch.equal(gm.kv_cache[:, 0].cpu(), k_exp) and torch.equal(gm.kv_cache[:, 1].cpu(), v_exp)
    ro, _ = ref_attention(args[0].cpu(), k_exp, v_exp, app_indptr, kv_indptr, kv_indices, last, causal=True)
    assert_close("append+prefill o", out, ro.float())


class AppendDecode(torch.nn.Module):
    """Decode step on a ``(k_cache, v_cache)`` pair passed in by the caller and written in place."""

    def __init__(self, wrapper):
        super().__init__()
        self.w = wrapper

    def forward(self, q, k_new, v_new, batch_indices, positions, k_cache, v_cache, kv_indices, kv_indptr, last):
        fo.append_paged_kv_cache(k_new, v_new, batch_indices, positions, (k_cache, v_cache), kv_indices, kv_indptr, last)
        return self.w.run(q, (k_cache, v_cache))


@pytest.mark.parametrize("decompose", [False, True], ids=["export", "run_decompositions"])
def test_export_append_then_decode_inputs(decompose):
    g = torch.Generator().manual_seed(13)
    kv_lens, B = [6, 9, 3, 12], 4
    _, kv_indptr, kv_indices, last = _page_table(kv_lens, [1] * B, g)
    w = fo.BatchDecodeWithPagedKVCacheWrapper(workspace(DEVICE))
    w.plan(kv_indptr, kv_indices, last, HQ, HKV, D, PAGE, q_data_type=torch.float32)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    seq = fo.get_seq_lens(dev(kv_indptr), dev(last), PAGE)
    bi, pos = fo.get_batch_indices_positions(dev(torch.arange(B + 1, dtype=torch.int32)), seq, B)
    table = (dev(kv_indices), dev(kv_indptr), dev(last))

    def step_inputs():
        return randn(B, HQ, D, g=g), randn(B, HKV, D, g=g), randn(B, HKV, D, g=g), bi, pos

    kc, vc = randn(NPAGES, PAGE, HKV, D, g=g), randn(NPAGES, PAGE, HKV, D, g=g)
    m = AppendDecode(w)
    ep = export(m, (*step_inputs(), kc.clone(), vc.clone(), *table))
    if decompose:
        ep = ep.run_decompositions()
        assert sorted(ep.graph_signature.user_inputs_to_mutate.values()) == ["k_cache", "v_cache"]
    check_graph(ep, ["append_paged_kv_cache", "paged_attention"])
    step = step_inputs()
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    out = run_poisoned(ep.module(), *step, k1, v1, *table)
    assert_same("append+decode", out, m(*step, k2, v2, *table))
    assert_same("caller's caches after append", (k1, v1), (k2, v2))
    k_exp, v_exp = _expected_cache(kc.cpu(), vc.cpu(), step[1].cpu(), step[2].cpu(), kv_lens, [1] * B, kv_indptr,
                                   kv_indices)
    assert torch.equal(k1.cpu(), k_exp) and torch.equal(v1.cpu(), v_exp)
    ro, _ = ref_attention(step[0].cpu(), k_exp, v_exp, torch.arange(B + 1, dtype=torch.int32), kv_indptr, kv_indices,
                          last)
    assert_close("append+decode o", out, ro.float())


def test_exporting_flag_tells_export_from_compile():
    """``run()`` picks the plan's unmarked tensors only under torch.export. Its test must say
    False under plain torch.compile: dynamo in torch 2.11 folds ``torch.compiler.is_exporting()``
    to True there, which handed compiled graphs tensors that duck sizing ties (a recompile)."""
    from torch_flashops import _attention_plan as P

    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1 if P.exporting() else x - 1

    x = torch.ones(3)
    assert not P.exporting()
    assert torch.equal(torch.compile(M(), backend="eager", fullgraph=True)(x), x - 1)
    for strict in (False, True):
        assert torch.equal(export(M(), (x,), strict=strict).module()(x), x + 1), strict
