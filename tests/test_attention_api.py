"""attention family, API behaviour: opcheck and schema snapshots of every op, torch.compile
(fullgraph, dynamic, append-then-attend, mutation visible), CUDA-graph mode (frozen lists; real
capture/replay and reduce-overhead on the GPU), aliases, and bad input (ValueError naming the
argument, KeyError, NotImplementedError, RuntimeError; nothing written).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import torch_flashops as fi
from torch_flashops.reference.attention import ref_attention

from .helpers import CompileCounter, SchemaTestCase, assert_close, needs_expecttest, poison
from .test_attention import Batch, check_attention, gather_threshold, plan_paged, workspace

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning",
                                        "ignore::DeprecationWarning")
OPS = torch.ops.flashops


# --------------------------------------------------------------------------- opcheck, schemas


def _op_samples(device):
    b = Batch([2, 0, 3], [5, 2, 9], page_size=4, Hq=4, Hkv=2, D=16, seed=2, device=device)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w, b, causal=True, fixed_split_size=1)
    t = w._t
    opts = (True, -1, 0.25, 0.0, "NONE", 1.0, 1e4, 1.0, False)  # + fixed_config for the batch ops
    paged = (b.q, b.cache, None, "NHD", t.work, t.split_work, t.merge, t.qo_indptr, t.kv_indptr, t.kv_indices,
             t.kv_lens, None, None, w._plan.block_m) + opts + (True,)
    N = b.q.shape[0]
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(11, 2, 16, generator=g).to(device) for _ in range(2))
    r = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    r.plan(b.qo_indptr, torch.tensor([0, 4, 4, 11], dtype=torch.int32), 4, 2, 16, causal=False,
           q_data_type="float32")
    rt = r._t
    ragged = (b.q, k, v, rt.work, rt.split_work, rt.merge, rt.qo_indptr, rt.kv_indptr, None, None,
              r._plan.block_m) + opts[:1] + (3,) + opts[2:] + (False,)
    mask = torch.tensor([0b10110101, 0b1], dtype=torch.uint8, device=device)
    single = (b.q[:3], k[:3].transpose(0, 1).contiguous(), v[:3].transpose(0, 1).contiguous(), mask, "HND") + opts
    outs = lambda: (torch.zeros(N, 4, 16, device=device), torch.zeros(N, 4, device=device))  # noqa: E731
    return {
        "single_attention": (OPS.single_attention.default, single),
        "paged_attention": (OPS.paged_attention.default, paged),
        "paged_attention_tuple_hnd": (OPS.paged_attention.default,
                                      (b.q, b.k_nhd.transpose(1, 2).contiguous().to(device),
                                       b.v_nhd.transpose(1, 2).contiguous().to(device), "HND") + paged[4:]),
        "paged_attention_out": (OPS.paged_attention_out.default, paged + outs()),
        "ragged_attention": (OPS.ragged_attention.default, ragged),
        "ragged_attention_out": (OPS.ragged_attention_out.default, ragged + outs()),
    }


SAMPLES = ["single_attention", "paged_attention", "paged_attention_tuple_hnd", "paged_attention_out",
           "ragged_attention", "ragged_attention_out"]


@pytest.mark.parametrize("name", SAMPLES)
def test_opcheck(name, device):
    op, args = _op_samples(device)[name]
    torch.library.opcheck(op, args)


@needs_expecttest
class TestSchemas(SchemaTestCase):
    def test_single_attention(self):
        self.assertExpectedInline(str(OPS.single_attention.default._schema), """\
flashops::single_attention(Tensor q, Tensor k, Tensor v, Tensor? packed_mask, str kv_layout, bool causal, int window_left, float sm_scale, float logits_soft_cap, str pos_encoding_mode, float rope_scale, float rope_theta, float v_scale, bool lse_ln, ScalarType? o_dtype=None) -> (Tensor, Tensor)""")

    def test_paged_attention(self):
        self.assertExpectedInline(str(OPS.paged_attention.default._schema), """\
flashops::paged_attention(Tensor q, Tensor k_cache, Tensor? v_cache, str kv_layout, Tensor work, Tensor split_work, Tensor merge, Tensor qo_indptr, Tensor kv_indptr, Tensor kv_indices, Tensor kv_lens, Tensor? packed_mask, Tensor? mask_indptr, SymInt block_m, bool causal, int window_left, float sm_scale, float logits_soft_cap, str pos_encoding_mode, float rope_scale, float rope_theta, float v_scale, bool lse_ln, bool fixed_config, ScalarType? o_dtype=None) -> (Tensor, Tensor)""")

    def test_paged_attention_out(self):
        self.assertExpectedInline(str(OPS.paged_attention_out.default._schema), """\
flashops::paged_attention_out(Tensor q, Tensor k_cache, Tensor? v_cache, str kv_layout, Tensor work, Tensor split_work, Tensor merge, Tensor qo_indptr, Tensor kv_indptr, Tensor kv_indices, Tensor kv_lens, Tensor? packed_mask, Tensor? mask_indptr, SymInt block_m, bool causal, int window_left, float sm_scale, float logits_soft_cap, str pos_encoding_mode, float rope_scale, float rope_theta, float v_scale, bool lse_ln, bool fixed_config, Tensor(a!) o, Tensor(b!) lse) -> ()""")

    def test_ragged_attention(self):
        self.assertExpectedInline(str(OPS.ragged_attention.default._schema), """\
flashops::ragged_attention(Tensor q, Tensor k, Tensor v, Tensor work, Tensor split_work, Tensor merge, Tensor qo_indptr, Tensor kv_indptr, Tensor? packed_mask, Tensor? mask_indptr, SymInt block_m, bool causal, int window_left, float sm_scale, float logits_soft_cap, str pos_encoding_mode, float rope_scale, float rope_theta, float v_scale, bool lse_ln, bool fixed_config, ScalarType? o_dtype=None) -> (Tensor, Tensor)""")

    def test_ragged_attention_out(self):
        self.assertExpectedInline(str(OPS.ragged_attention_out.default._schema), """\
flashops::ragged_attention_out(Tensor q, Tensor k, Tensor v, Tensor work, Tensor split_work, Tensor merge, Tensor qo_indptr, Tensor kv_indptr, Tensor? packed_mask, Tensor? mask_indptr, SymInt block_m, bool causal, int window_left, float sm_scale, float logits_soft_cap, str pos_encoding_mode, float rope_scale, float rope_theta, float v_scale, bool lse_ln, bool fixed_config, Tensor(a!) o, Tensor(b!) lse) -> ()""")


# --------------------------------------------------------------------------- torch.compile


def _no_duck_sizing():
    """Dynamo's duck sizing ties equal-valued sizes of unrelated inputs (a batch of 4 and 4 heads)
    and then specialises both; the sizes these tests vary must not collide by accident."""
    return torch.fx.experimental._config.patch(use_duck_shape=False)


def _steps():
    # (kv lens after the append, append lens): one batch size and set of lengths per step. The
    # longest append sets the plan's tile height (4 query heads per KV head: 1-3 rows -> 16,
    # longest 7 -> 32, 9 -> 64, 21 -> 128), which must not recompile either.
    return [([7, 12, 3], [1, 1, 1]), ([8, 13, 4, 20, 2], [1, 1, 1, 1, 1]), ([9, 30, 6, 5, 11, 16], [1, 2, 1, 1, 3, 1]),
            ([25, 40, 12], [9, 21, 1]), ([14, 7], [7, 2]), ([30, 9], [9, 2])]


def test_compile_append_then_attend_dynamic(device):
    """One compiled function appends the new tokens' K/V and attends (decode and chunked
    prefill): 1 frame (no graph break) across batch sizes and lengths under dynamic=True, the
    cache write is visible to the caller, and outputs equal the oracle on the updated cache."""
    page, Hq, Hkv, D, P = 5, 8, 2, 16, 48
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(P, 2, page, Hkv, D, generator=g).to(device)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))

    def step(q, k_new, v_new, cache, append_indptr, kv_indices, kv_indptr, last):
        seq = fi.get_seq_lens(kv_indptr, last, page)
        bi, pos = fi.get_batch_indices_positions(append_indptr, seq, k_new.shape[0])
        fi.append_paged_kv_cache(k_new, v_new, bi, pos, cache, kv_indices, kv_indptr, last)
        return w.run(q, cache)

    cc = CompileCounter(step, dynamic=True)
    heights = set()
    with _no_duck_sizing():
        for i, (kv_lens, app) in enumerate(_steps()):
            npg = [(n + page - 1) // page for n in kv_lens]
            kv_indptr = torch.tensor([0] + torch.tensor(npg).cumsum(0).tolist(), dtype=torch.int32)
            kv_indices = torch.randperm(P, generator=g)[: int(kv_indptr[-1])].int()
            last = torch.tensor([(n - 1) % page + 1 for n in kv_lens], dtype=torch.int32)
            app_indptr = torch.tensor([0] + torch.tensor(app).cumsum(0).tolist(), dtype=torch.int32)
            n = int(app_indptr[-1])
            q, k_new, v_new = (torch.randn(n, h, D, generator=g).to(device) for h in (Hq, Hkv, Hkv))
            w.plan(app_indptr, kv_indptr, kv_indices, last, Hq, Hkv, D, page, causal=True, q_data_type="float32")
            heights.add(w._plan.block_m)
            to = lambda t: t.to(device)  # noqa: E731
            o = cc(q, k_new, v_new, cache, to(app_indptr), to(kv_indices), to(kv_indptr), to(last))
            ro, _ = ref_attention(q.cpu(), cache[:, 0].cpu(), cache[:, 1].cpu(), app_indptr, kv_indptr, kv_indices,
                                  last, causal=True)
            assert_close(f"step {i}", o, ro.float())
            # the appended rows are in the caller's cache
            for b in range(len(kv_lens)):
                j = kv_lens[b] - 1
                pg = int(kv_indices[int(kv_indptr[b]) + j // page])
                assert torch.equal(cache[pg, 0, j % page].cpu(), k_new[int(app_indptr[b + 1]) - 1].cpu())
    assert heights == {16, 32, 64, 128}  # the steps cover every tile height
    assert cc.frames == 1, f"{cc.frames} frames (graph break or recompile)"
    assert "flashops.paged_attention.default" in cc.graph_ops()


def test_compile_cascade_batch_grows(device):
    """A batch sharing a prefix: the shared level's tile height follows the batch size (one
    request of N rows). Growing N re-plans with 16..128-row tiles and must not recompile, with
    the default duck sizing too (the tile height reaches the op as an unbacked size)."""
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(100, 2, 4, 2, 16, generator=g).to(device)
    w = fi.MultiLevelCascadeAttentionWrapper(2, workspace(device))
    cc = CompileCounter(lambda q, c: w.run(q, c), dynamic=True)
    heights = []
    for N in (5, 11, 23, 40):  # N single-row requests share 2 pages, then 2 pages each
        w.plan([i32([0, N]), i32(list(range(N + 1)))], [i32([0, 2]), i32(list(range(0, 2 * N + 1, 2)))],
               [i32([0, 1]), i32(list(range(2, 2 + 2 * N)))], [i32([3]), i32([2] * N)], 4, 2, 16, 4,
               causal=True, q_data_type="float32")
        heights.append(w._batch_prefill_wrappers[0]._plan.block_m)
        q = torch.randn(N, 4, 16, generator=g).to(device)
        o = cc(q, cache)
        c = cache.double().cpu()
        for b in range(N):  # oracle: softmax over the request's 7 prefix + 6 own keys, 2 query heads per KV head
            kv = torch.cat([c[0], c[1, :, :3], c[2 + 2 * b], c[3 + 2 * b, :, :2]], dim=1).repeat_interleave(2, dim=2)
            p = torch.softmax(torch.einsum("hd,lhd->hl", q[b].double().cpu(), kv[0]) / 4.0, dim=-1)
            assert_close(f"N={N} row {b}", o[b], torch.einsum("hl,lhd->hd", p, kv[1]).float())
        assert torch.equal(o, w.run(q, cache))
    assert heights == [16, 32, 64, 128]
    assert cc.frames == 1, f"{cc.frames} frames (graph break or recompile)"


def test_compile_replans_default_duck_sizing(device):
    """With dynamo's default duck sizing, the plan's own list lengths (work, split_work, merge)
    coincide now and then; as unbacked sizes they are never tied, so re-plans across batch sizes
    and lengths (split and unsplit schedules) keep one graph."""
    g = torch.Generator().manual_seed(5)
    page, P = 9, 120  # (sizes of q, the cache and qo_indptr chosen apart: those may be tied, and a batch of 1 specialised)
    cache = torch.randn(P, 2, page, 2, 16, generator=g).to(device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    cc = CompileCounter(lambda q, c: w.run(q, c), dynamic=True)
    for lens in ([37, 5, 90], [120, 7, 7, 64, 2], [3, 3, 50, 11], [9, 18, 27, 36, 45, 54]):
        npg = [(n + page - 1) // page for n in lens]
        kv_indptr = torch.tensor([0] + torch.tensor(npg).cumsum(0).tolist(), dtype=torch.int32)
        kv_indices = torch.randperm(P, generator=g)[: int(kv_indptr[-1])].int()
        last = torch.tensor([(n - 1) % page + 1 for n in lens], dtype=torch.int32)
        w.plan(kv_indptr, kv_indices, last, 8, 2, 16, page, q_data_type="float32", fixed_split_size=3)
        q = torch.randn(len(lens), 8, 16, generator=g).to(device)
        ro, rl = ref_attention(q.cpu(), cache[:, 0].cpu(), cache[:, 1].cpu(), torch.arange(len(lens) + 1), kv_indptr,
                               kv_indices, last)
        assert_close(f"lens {lens}", cc(q, cache), ro.float())
    assert cc.frames == 1, f"{cc.frames} frames (graph break or recompile)"


def test_compile_decode_out_variant_and_single(device):
    """Decode wrapper with out=/lse= under fullgraph (the in-place write reaches the caller's
    buffers), and the plan-free single functions compiled."""
    b = Batch([1, 1, 1], [9, 3, 20], page_size=4, Hq=4, Hkv=2, D=16, seed=8, device=device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_data_type="float32")

    def f(q, cache, out, lse):
        w.run(q, cache, out=out, lse=lse)
        return out.sum()

    out, lse = poison(3, 4, 16, device=device), poison(3, 4, device=device)
    cc = CompileCounter(f)
    cc(b.q, b.cache, out, lse)
    ro, rl = b.oracle()
    check_attention("compiled out=", out, lse, ro, rl, torch.float32)
    assert cc.frames == 1 and cc.graph_ops() == ["flashops.paged_attention_out.default"]

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, 16, generator=g).to(device) for n, h in ((5, 4), (11, 2), (11, 2)))

    def single(q, k, v):
        return fi.single_prefill_with_kv_cache(q, k, v, causal=True) + fi.single_decode_with_kv_cache(q[-1], k, v)

    cs = CompileCounter(single)
    got = cs(q, k, v)
    ro, _ = ref_attention(q.cpu(), k.cpu().unsqueeze(1), v.cpu().unsqueeze(1), [0, 5], [0, 11], torch.arange(11), [1],
                          causal=True)
    assert_close("single compiled", got, (ro + ro[-1:]).float())
    assert cs.frames == 1


def test_compile_run_return_lse(device):
    """``run_return_lse`` (FlashInfer's alias) compiles with fullgraph=True on the three
    wrappers: it was a functools.partialmethod, which dynamo cannot trace."""
    b = Batch([1, 1, 1], [9, 3, 20], page_size=4, Hq=4, Hkv=2, D=16, seed=8, device=device)
    ro, rl = b.oracle()
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_data_type="float32")
    p = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(p, b, q_data_type=torch.float32)
    for wrapper in (w, p):
        cc = CompileCounter(lambda q, c: wrapper.run_return_lse(q, c))
        o, lse = cc(b.q, b.cache)
        check_attention(type(wrapper).__name__, o, lse, ro, rl, torch.float32)
        assert cc.frames == 1
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, h, 16, generator=g).to(device) for n, h in ((5, 4), (11, 2), (11, 2)))
    r = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    r.plan(torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 11], dtype=torch.int32), 4, 2, 16, causal=True,
           q_data_type="float32")
    cc = CompileCounter(lambda q, k, v: r.run_return_lse(q, k, v))
    o, lse = cc(q, k, v)
    ro, rl = ref_attention(q.cpu(), k.cpu().unsqueeze(1), v.cpu().unsqueeze(1), [0, 5], [0, 11], torch.arange(11),
                           [1], causal=True)
    check_attention("ragged", o, lse, ro, rl, torch.float32)
    assert cc.frames == 1
    assert r.run_return_lse(q, k, v, return_lse=False).shape == o.shape  # an explicit keyword still wins


def test_tensor_scale_eager_only(device):
    """A one-element tensor scale is read on the host: accepted in eager (equal to the float),
    refused with a message naming it inside torch.compile (it was a SymFloat type error)."""
    b = Batch([1, 1], [9, 3], page_size=4, Hq=4, Hkv=2, D=16, seed=9, device=device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_data_type="float32")
    want = w.run(b.q, b.cache, k_scale=0.5)
    assert torch.equal(w.run(b.q, b.cache, k_scale=torch.tensor(0.5, device=device)), want)
    f = torch.compile(lambda q, c, s: w.run(q, c, k_scale=s), fullgraph=True, dynamic=True)
    with pytest.raises(Exception, match="k_scale: a tensor scale is read on the host"):
        f(b.q, b.cache, torch.tensor(0.5, device=device))


# --------------------------------------------------------------------------- CUDA-graph mode


def _graph_wrapper(device, B, n_indices, kind):
    ws = workspace(device)
    ind = torch.zeros(B + 1, dtype=torch.int32, device=device)
    idx = torch.zeros(n_indices, dtype=torch.int32, device=device)
    last = torch.zeros(B, dtype=torch.int32, device=device)
    if kind == "decode":
        return fi.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(ws, ind, idx, last)
    qo = torch.zeros(B + 1, dtype=torch.int32, device=device)
    return fi.BatchPrefillWithPagedKVCacheWrapper(ws, use_cuda_graph=True, qo_indptr_buf=qo, paged_kv_indptr_buf=ind,
                                                  paged_kv_indices_buf=idx, paged_kv_last_page_len_buf=last)


def _plan_kind(w, b, kind, **kw):
    if kind == "decode":
        w.plan(b.kv_indptr, b.kv_indices, b.last, b.Hq, b.Hkv, b.D, b.page_size, q_data_type="float32", **kw)
    else:
        plan_paged(w, b, causal=True, **kw)


@pytest.mark.parametrize("packed", [True, False])
def test_upload_fills_every_tensor(packed, device, monkeypatch):
    """``Upload``: fresh tensors and buffer heads are written by ``send()`` (one staged block, or
    one copy per array with ``PACKED_UPLOADS`` off), from int64 arrays, CPU tensors and lists,
    zero-padded to ``min_len``; empty arrays add nothing; a buffer's tail is left as it was."""
    from torch_flashops import _attention_plan as P

    monkeypatch.setattr(P, "PACKED_UPLOADS", packed)
    buf = torch.full((9,), 77, dtype=torch.int32, device=device)
    up = P.Upload(device)
    a = up.fresh(np.array([5, -3, 2 ** 31 - 1], dtype=np.int64))
    b = up.fresh(torch.tensor([4, 1], dtype=torch.int64), min_len=5)
    c = up.fresh(np.zeros(0, dtype=np.int64))
    d = up.fresh([7], min_len=2)
    up.into(buf, np.array([1, 2, 3, 4]), "buf")
    up.into(buf[6:], torch.tensor([9], dtype=torch.int16), "buf_tail")
    for t in (a, b, c, d):
        assert t.dtype == torch.int32 and t.device.type == torch.device(device).type and t.is_contiguous()
    assert (a.shape, b.shape, c.shape, d.shape) == ((3,), (5,), (0,), (2,))
    for t in (a, b, d):
        t.fill_(-99)  # poison: everything below must come from send()
    up.send()
    assert a.tolist() == [5, -3, 2 ** 31 - 1] and b.tolist() == [4, 1, 0, 0, 0] and d.tolist() == [7, 0]
    assert buf.tolist() == [1, 2, 3, 4, 77, 77, 9, 77, 77]
    up.send()  # nothing pending: a no-op
    assert buf.tolist() == [1, 2, 3, 4, 77, 77, 9, 77, 77]
    with pytest.raises(ValueError, match="buf: has 10 entries"):
        up.into(buf, np.arange(10), "buf")


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("kind", ["decode", "prefill", "ragged"])
def test_packed_uploads_match_per_array_copies(kind, graph, device, monkeypatch):
    """plan()'s tensors are the same whether its arrays travel in one packed transfer or one by
    one (``PACKED_UPLOADS``), for fresh tensors and for CUDA-graph buffers, over two plans."""
    from torch_flashops import _attention_plan as P

    a = Batch([1] * 3 if kind == "decode" else [2, 1, 3], [30, 2, 9], page_size=4, Hq=4, Hkv=2, D=16, seed=1,
              device=device, spare_pages=20)
    bb = Batch([1] * 3 if kind == "decode" else [1, 3, 1], [3, 40, 17], page_size=4, Hq=4, Hkv=2, D=16, seed=2,
               device=device, spare_pages=10)
    got = {}
    for packed in (True, False):
        monkeypatch.setattr(P, "PACKED_UPLOADS", packed)
        if kind == "ragged":
            ws = workspace(device)
            bufs = [torch.full((4,), -7, dtype=torch.int32, device=device) for _ in range(2)]
            w = (fi.BatchPrefillWithRaggedKVCacheWrapper(ws, use_cuda_graph=True, qo_indptr_buf=bufs[0],
                                                         kv_indptr_buf=bufs[1]) if graph
                 else fi.BatchPrefillWithRaggedKVCacheWrapper(ws))
        else:
            w = _graph_wrapper(device, 3, 64, kind) if graph else (
                fi.BatchDecodeWithPagedKVCacheWrapper if kind == "decode" else fi.BatchPrefillWithPagedKVCacheWrapper)(
                    workspace(device))
        seen = []
        for x in (a, bb):
            if kind == "ragged":
                w.plan(x.qo_indptr, x.kv_indptr * 4, 4, 2, 16, causal=True)
            else:
                _plan_kind(w, x, kind)
            seen.append({k: v.clone() for k, v in vars(w._t).items() if isinstance(v, torch.Tensor) and k != "tile"})
        got[packed] = seen
    for one, per in zip(got[True], got[False]):
        assert one.keys() == per.keys() and {"work", "qo_indptr", "kv_indptr"} <= one.keys()
        for k in one:
            assert torch.equal(one[k], per[k]), k


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_cuda_graph_mode_frozen_lists(kind, device):
    """use_cuda_graph: plan copies into the frozen buffers (same tensors, same sizes across
    plans), and a re-plan with other lengths/pages gives the eager wrapper's result."""
    qo_a, qo_b = ([1] * 3, [1] * 3) if kind == "decode" else ([2, 1, 3], [1, 3, 1])
    a = Batch(qo_a, [30, 2, 9], page_size=4, Hq=4, Hkv=2, D=16, seed=1, device=device, spare_pages=20)
    bb = Batch(qo_b, [3, 40, 17], page_size=4, Hq=4, Hkv=2, D=16, seed=2, device=device, spare_pages=10)
    w = _graph_wrapper(device, 3, 32, kind)
    _plan_kind(w, a, kind)
    tensors = [w._t.work, w._t.split_work, w._t.merge, w._t.kv_indptr, w._t.kv_indices, w._t.kv_lens]
    o_a = w.run(a.q, a.cache).clone()
    _plan_kind(w, bb, kind)
    assert all(x is y for x, y in zip(tensors, [w._t.work, w._t.split_work, w._t.merge, w._t.kv_indptr,
                                                 w._t.kv_indices, w._t.kv_lens]))
    o_b = w.run(bb.q, bb.cache)
    check_attention("graph-mode plan A", o_a, None, *a.oracle(causal=kind != "decode"), torch.float32)
    check_attention("graph-mode plan B", o_b, None, *bb.oracle(causal=kind != "decode"), torch.float32)
    with pytest.raises(ValueError, match="batch size"):
        c = Batch([1] * 4, [3, 4, 5, 6], page_size=4, Hq=4, Hkv=2, D=16, seed=3, device=device)
        _plan_kind(w, c, kind)


# --------------------------------------------------------------------------- aliases, options


def test_aliases_forward_and_deprecated_positional_plan(device):
    b = Batch([1, 1], [13, 6], page_size=4, Hq=4, Hkv=1, D=16, seed=4, device=device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    with pytest.warns(DeprecationWarning):
        #      indptr, indices, last, Hq, Hkv, D, page, pos mode, window, soft cap, q dtype
        w.begin_forward(b.kv_indptr, b.kv_indices, b.last, 4, 1, 16, 4, "NONE", 5, 3.0, "float32")
    o, lse = w.run_return_lse(b.q, b.cache)
    ro, rl = b.oracle(window_left=5, logits_soft_cap=3.0)
    check_attention("positional plan", o, lse, ro, rl, torch.float32)
    with pytest.raises(ValueError, match="window_left"):
        w.run(b.q, b.cache, window_left=3)
    assert w.run(b.q, b.cache, window_left=5, lse_base="ln", return_lse=True)[1].sub(lse * math.log(2)).abs().max() < 1e-5
    assert (w._window_left, w._logits_soft_cap, w._sm_scale) == (5, 3.0, None)  # FlashInfer's attributes
    o2, lse2 = w.forward_return_lse(b.q, b.cache, window_left=5, logits_soft_cap=3.0)
    assert torch.equal(o2, o) and torch.equal(lse2, lse)
    # forward() sets FlashInfer's forward defaults for what it is not given (no window, no cap), for later runs too
    o3 = w.forward(b.q, b.cache)
    check_attention("forward() defaults", o3, None, *b.oracle(), torch.float32)
    assert torch.equal(w.run(b.q, b.cache), o3) and (w._window_left, w._logits_soft_cap) == (-1, 0.0)
    o4 = w.forward(b.q, b.cache, logits_soft_cap=1.0, sm_scale=0.3)
    check_attention("forward(soft cap, scale)", o4, None, *b.oracle(logits_soft_cap=1.0, sm_scale=0.3), torch.float32)
    # positionally, in the order of FlashInfer's decode forward(): pos_encoding_mode, q/k/v scales, window_left,
    # logits_soft_cap, sm_scale
    assert torch.equal(w.forward(b.q, b.cache, "NONE", None, None, None, -1, 1.0, 0.3), o4)
    with pytest.raises(ValueError, match="^causal"):
        w.forward(b.q, b.cache, causal=True)  # not an argument of decode's forward
    w.end_forward()
    # data_type sets kv (and q when q_data_type=None); o_data_type
    w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 1, 16, 4, q_data_type=None, data_type=torch.float32,
           o_data_type="float16")
    assert w.run(b.q, b.cache).dtype == torch.float16


# --------------------------------------------------------------------------- bad input


def _paged_setup(device):
    b = Batch([2, 1], [6, 9], page_size=4, Hq=4, Hkv=2, D=16, seed=12, device=device)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    return b, w


PLAN_ERRORS = [
    # (name, kwargs replacing plan arguments, expected exception, match)
    ("qo_indptr length", dict(qo_indptr=torch.tensor([0, 2], dtype=torch.int32)), ValueError, "qo_indptr"),
    ("qo_indptr start", dict(qo_indptr=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError, "qo_indptr"),
    ("kv_indptr decreasing", dict(paged_kv_indptr=torch.tensor([0, 3, 2], dtype=torch.int32)), ValueError,
     "paged_kv_indptr"),
    ("last_page_len range", dict(paged_kv_last_page_len=torch.tensor([5, 1], dtype=torch.int32)), ValueError,
     "paged_kv_last_page_len"),
    ("indices too short", dict(paged_kv_indices=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "paged_kv_indices"),
    ("heads", dict(num_qo_heads=3), ValueError, "num_qo_heads"),
    ("head dim", dict(head_dim_qk=20), ValueError, "head_dim_qk"),
    ("window", dict(window_left=-2), ValueError, "window_left"),
    ("soft cap", dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap"),
    ("mask size", dict(custom_mask=torch.ones(5, dtype=torch.bool)), ValueError, "custom_mask"),
    ("pos mode", dict(pos_encoding_mode="ROPE"), KeyError, "pos_encoding_mode"),
    ("reserved", dict(block_tables=torch.zeros(2, 3, dtype=torch.int32)), NotImplementedError, "block_tables"),
    ("float page ids", dict(paged_kv_indices=torch.arange(5, dtype=torch.float32) + 0.9), ValueError,
     "^paged_kv_indices: expected an integer dtype"),
    ("int o dtype", dict(o_data_type="int32"), ValueError, "^o_data_type: dtype torch.int32 not supported"),
    ("int q dtype", dict(q_data_type=torch.int8), ValueError, "^q_data_type"),
    ("no q dtype", dict(q_data_type=None), ValueError, "^q_data_type: must be given"),
    ("mixed kv dtype", dict(kv_data_type="float16"), ValueError, "^kv_data_type: torch.float16 differs"),
    ("fp8 kv dtype", dict(kv_data_type=torch.float8_e4m3fn), NotImplementedError, "^kv_data_type: fp8 KV"),
    ("page_size 0", dict(page_size=0), ValueError, "^page_size: must be >= 1"),
    ("last_page_len length", dict(paged_kv_last_page_len=torch.tensor([1], dtype=torch.int32)), ValueError,
     "^paged_kv_last_page_len: length 1"),
    ("empty kv_indptr", dict(paged_kv_indptr=torch.zeros(0, dtype=torch.int32)), ValueError, "^paged_kv_indptr"),
    # integer options given as floats used to be truncated (2.5 -> 2) or to fail inside Triton
    ("float head dim", dict(head_dim_qk=16.0), ValueError, "^head_dim_qk: must be an int, got 16.0"),
    ("float kv heads", dict(num_kv_heads=2.0), ValueError, "^num_kv_heads: must be an int"),
    ("float page size", dict(page_size=4.0), ValueError, "^page_size: must be an int"),
    ("no page size", dict(page_size=None), ValueError, "^page_size: must be an int"),
    ("float window", dict(window_left=2.5), ValueError, "^window_left: must be an int, got 2.5"),
]


@pytest.mark.parametrize("case", PLAN_ERRORS, ids=[c[0] for c in PLAN_ERRORS])
def test_plan_errors(case, device):
    _, repl, exc, match = case
    b, w = _paged_setup(device)
    args = dict(qo_indptr=b.qo_indptr, paged_kv_indptr=b.kv_indptr, paged_kv_indices=b.kv_indices,
                paged_kv_last_page_len=b.last, num_qo_heads=4, num_kv_heads=2, head_dim_qk=16, page_size=4,
                q_data_type="float32")
    args.update(repl)
    with pytest.raises(exc, match=match):
        w.plan(**args)


def test_indptr_that_starts_later_is_refused_with_the_rebase(device):
    """A CSR that starts past 0 (FlashInfer reads it from its first entry; vLLM plans the prefill
    part of a mixed batch with the page table's tail) is refused (spec §0.3, §3), and the error
    names the rebase, which gives the same attention."""
    b = Batch([2, 3], [6, 9], page_size=4, Hq=4, Hkv=2, D=16, seed=21, device=device)
    off = 3  # three pages of other requests before this batch's table
    indptr = b.kv_indptr + off
    indices = torch.cat([torch.tensor([b.P - 1] * off, dtype=torch.int32), b.kv_indices])
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    with pytest.raises(ValueError, match=r"^paged_kv_indptr: must start at 0, got 3; pass paged_kv_indptr - "
                                         r"paged_kv_indptr\[0\] and paged_kv_indices\[paged_kv_indptr\[0\]:\]"):
        w.plan(b.qo_indptr, indptr, b.dev(indices), b.last, 4, 2, 16, 4, q_data_type="float32")
    w.plan(b.qo_indptr, indptr - indptr[0], b.dev(indices[int(indptr[0]):]), b.last, 4, 2, 16, 4,
           q_data_type="float32")
    check_attention("rebased paged table", w.run(b.q, b.cache), None, *b.oracle(), torch.float32)
    with pytest.raises(ValueError, match=r"^qo_indptr: must start at 0, got 1; pass qo_indptr - qo_indptr\[0\] "
                                         r"and q\[qo_indptr\[0\]:\]"):
        w.plan(b.qo_indptr + 1, b.kv_indptr, b.dev(b.kv_indices), b.last, 4, 2, 16, 4, q_data_type="float32")

    d = Batch([1, 1], [6, 9], page_size=4, Hq=4, Hkv=2, D=16, seed=22, device=device)
    wd = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    d_indices = torch.cat([torch.tensor([0] * off, dtype=torch.int32), d.kv_indices])
    with pytest.raises(ValueError, match=r"^indptr: must start at 0, got 3; pass indptr - indptr\[0\] and "
                                         r"indices\[indptr\[0\]:\]"):
        wd.plan(d.kv_indptr + off, d.dev(d_indices), d.last, 4, 2, 16, 4, q_data_type="float32")
    wd.plan(d.kv_indptr, d.dev(d_indices[off:]), d.last, 4, 2, 16, 4, q_data_type="float32")
    check_attention("rebased decode table", wd.run(d.q, d.cache), None, *d.oracle(), torch.float32)

    r = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    with pytest.raises(ValueError, match=r"^kv_indptr: must start at 0, got 2; pass kv_indptr - kv_indptr\[0\] and "
                                         r"k\[kv_indptr\[0\]:\] and v\[kv_indptr\[0\]:\]"):
        r.plan(torch.tensor([0, 2, 5]), torch.tensor([2, 8, 17]), 4, 2, 16, q_data_type="float32")
    # no rebase offered where it would not help: a negative start, or a decrease further on
    for bad, msg in (([-1, 1, 2], r"^indptr: must start at 0, got -1$"), ([2, 1, 3], r"^indptr: must start at 0, got 2$")):
        with pytest.raises(ValueError, match=msg):
            wd.plan(torch.tensor(bad), d.dev(d.kv_indices), d.last, 4, 2, 16, 4, q_data_type="float32")


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-buffers"])
def test_fast_decode_plan(graph, device):
    """FlashInfer's fast_decode_plan as SGLang drives it: the caller writes the page table into the
    CUDA-graph buffers itself and passes them, with the host indptr as global_override_indptr_cpu;
    the plan then matches the oracle, and a second step with another table does too."""
    w = None
    for step, lens in enumerate(([6, 9, 1], [13, 2, 8])):
        b = Batch([1, 1, 1], lens, page_size=4, Hq=4, Hkv=2, D=16, seed=31 + step, device=device)
        if graph:
            if w is None:
                bufs = (torch.zeros(4, dtype=torch.int32, device=device), torch.zeros(16, dtype=torch.int32, device=device),
                        torch.zeros(3, dtype=torch.int32, device=device))
                w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), use_cuda_graph=True,
                                                          paged_kv_indptr_buffer=bufs[0], paged_kv_indices_buffer=bufs[1],
                                                          paged_kv_last_page_len_buffer=bufs[2])
            indptr, indices, last = bufs
            indptr.copy_(b.kv_indptr)
            indices[: b.kv_indices.numel()].copy_(b.kv_indices)
            last.copy_(b.last)
        else:
            w = w or fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
            indptr, indices, last = b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last)
        dtype = dict(q_data_type=torch.float32) if step == 0 else dict(data_type=torch.float32)  # (q and kv)
        fi.fast_decode_plan(w, indptr, indices, last, 4, 2, 16, 4, global_override_indptr_cpu=b.kv_indptr, **dtype)
        check_attention(f"fast_decode_plan step {step}", w.run(b.q, b.cache), None, *b.oracle(), torch.float32)
    with pytest.raises(ValueError, match="^self: must be a BatchDecodeWithPagedKVCacheWrapper"):
        fi.fast_decode_plan(fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device)), indptr, indices, last, 4, 2, 16, 4)


# (FlashInfer's backend names per wrapper: its decode wrapper adds trtllm-gen and cute-dsl, the paged prefill
# wrapper trtllm-gen (and cudnn, which needs plan arguments we refuse), the ragged one cute-dsl (and cudnn, cutlass))
BACKENDS = [("decode", "trtllm-gen"), ("decode", "cute-dsl"), ("paged", "trtllm-gen"), ("paged", "fa3"),
            ("ragged", "cute-dsl"), ("ragged", "fa2")]
REFUSED_BACKENDS = [("decode", "cudnn"), ("paged", "cudnn"), ("paged", "cute-dsl"), ("ragged", "cutlass"),
                    ("ragged", "trtllm-gen"), ("ragged", "cudnn"), ("decode", "TRTLLM-GEN")]
_WRAPPERS = dict(decode=fi.BatchDecodeWithPagedKVCacheWrapper, paged=fi.BatchPrefillWithPagedKVCacheWrapper,
                 ragged=fi.BatchPrefillWithRaggedKVCacheWrapper)


@pytest.mark.parametrize("kind,backend", BACKENDS, ids=[f"{k}-{b}" for k, b in BACKENDS])
def test_flashinfer_backend_names_run_our_kernel(kind, backend, device):
    b = Batch([2, 2] if kind == "decode" else [2, 3], [6, 9], page_size=4, Hq=4, Hkv=2, D=16, seed=23, device=device)
    w = _WRAPPERS[kind](workspace(device), backend=backend)
    assert w._backend == backend
    if kind == "decode":  # (FlashInfer's trtllm-gen and cute-dsl decode imply use_tensor_cores: q_len_per_req 2)
        assert w.use_tensor_cores
        w.plan(b.kv_indptr, b.dev(b.kv_indices), b.last, 4, 2, 16, 4, q_data_type="float32", q_len_per_req=2)
        out = w.run(b.q, b.cache, q_len_per_req=2)
    elif kind == "paged":
        plan_paged(w, b, causal=True)
        out = w.run(b.q, b.cache)
    else:  # the same keys laid out contiguously
        k, v = (torch.cat([t[b.kv_indices[int(b.kv_indptr[i]):int(b.kv_indptr[i + 1])].long()].flatten(0, 1)[:n]
                           for i, n in enumerate(b.kv_lens)]).to(device) for t in (b.k_nhd, b.v_nhd))
        w.plan(b.qo_indptr, torch.tensor([0, 6, 15], dtype=torch.int32), 4, 2, 16, causal=True, q_data_type="float32")
        out = w.run(b.q, k, v)
    check_attention(f"{kind} backend={backend}", out, None, *b.oracle(causal=True), torch.float32)


@pytest.mark.parametrize("kind,backend", REFUSED_BACKENDS, ids=[f"{k}-{b}" for k, b in REFUSED_BACKENDS])
def test_other_backend_names_are_refused(kind, backend, device):
    with pytest.raises(NotImplementedError, match=f"^backend={backend!r}: only 'auto'"):
        _WRAPPERS[kind](workspace(device), backend=backend)


def test_failed_plan_keeps_the_previous_plan(device):
    """A plan() that fails on its options (here q_data_type=None with no data_type) raises
    before anything is committed: the previous plan still runs and gives the same result."""
    b, w = _paged_setup(device)
    plan_paged(w, b, q_data_type=torch.float32)
    o = w.run(b.q, b.cache)
    with pytest.raises(ValueError, match="^q_data_type"):
        w.plan(b.qo_indptr, b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_data_type=None)
    with pytest.raises(ValueError, match="^o_data_type"):
        w.plan(b.qo_indptr, b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_data_type="float32",
               o_data_type=torch.int32)
    assert torch.equal(w.run(b.q, b.cache), o)


def test_custom_mask_any_shape_is_read_flat(device):
    """As FlashInfer's plan() does, a custom_mask of any shape is read flat (row-major): a
    [qo_len, kv_len] mask for one request equals its flattened form."""
    b = Batch([3], [7], page_size=4, Hq=4, Hkv=2, D=16, seed=21, device=device)
    mask = b.random_masks(2)[0]
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w, b, custom_mask=mask.reshape(-1).to(device))
    flat = w.run(b.q, b.cache)
    plan_paged(w, b, custom_mask=mask.to(device))
    assert mask.dim() == 2 and torch.equal(w.run(b.q, b.cache), flat)
    check_attention("2-D mask", flat, None, *b.oracle(masks=[mask], window_left=-1), torch.float32)


def test_run_errors_leave_outputs_untouched(device):
    b, w = _paged_setup(device)
    with pytest.raises(RuntimeError, match="before a successful plan"):
        w.run(b.q, b.cache)
    plan_paged(w, b)
    out, lse = poison(3, 4, 16, device=device), poison(3, 4, device=device)
    bad = [
        (lambda: w.run(b.q.half(), b.cache, out=out, lse=lse), ValueError, "q"),
        (lambda: w.run(b.q, b.cache.half(), out=out, lse=lse), ValueError, "paged_kv_cache"),
        (lambda: w.run(b.q, b.cache[:, :, :2], out=out, lse=lse), ValueError, r"page_size .* \(read as kv_layout NHD\)"),
        (lambda: w.run(b.q, b.cache.to("meta"), out=out, lse=lse), ValueError, "^paged_kv_cache: on meta"),
        (lambda: w.run(b.q, b.cache, out=out[:2], lse=lse), ValueError, "out"),
        (lambda: w.run(b.q, b.cache, out=out, lse=lse.double()), ValueError, "lse"),
        (lambda: w.run(b.q, b.cache, out=out, lse=lse, lse_base="e"), ValueError, "lse_base"),
        (lambda: w.run(b.q, b.cache, out=out, lse=lse, sinks=torch.zeros(4)), NotImplementedError, "sinks"),
        (lambda: w.run(b.q, b.cache, 1.0, out=out, lse=lse), NotImplementedError, "args"),
        (lambda: w.run(b.q, b.cache, out=out, lse=lse, window_left=2), ValueError, "window_left"),
        (lambda: w.run(b.q[:2], b.cache, out=out, lse=lse), ValueError, "q"),
        # rows sharing memory (expand()) would each be written by another program
        (lambda: w.run(b.q, b.cache, out=out[:1, :1].expand(3, 4, 16), lse=lse), ValueError, "^out: has internally"),
        (lambda: w.run(b.q, b.cache, out=out, lse=lse[:1].expand(3, 4)), ValueError, "^lse: has internally"),
    ]
    for fn, exc, match in bad:
        with pytest.raises(exc, match=match):
            fn()
    assert out.isnan().all() and lse.isnan().all()
    # checked mode: page ids are checked against the cache's page count at run()
    b.kv_indices[1] = b.P + 3
    plan_paged(w, b)
    fi.set_checks(True)
    try:
        with pytest.raises(ValueError, match="paged_kv_indices"):
            w.run(b.q, b.cache, out=out, lse=lse)
    finally:
        fi.set_checks(False)
    assert out.isnan().all() and lse.isnan().all()
    w.run(b.q, b.cache, out=out, lse=lse)  # unchecked: memory-safe (ids masked), values unspecified
    assert not out.isnan().any()


def test_constructor_and_single_errors(device):
    ws = workspace(device)
    with pytest.raises(KeyError):
        fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NDH")
    with pytest.raises(ValueError, match="float_workspace_buffer"):
        fi.BatchDecodeWithPagedKVCacheWrapper(ws.float())
    with pytest.raises(ValueError, match="float_workspace_buffer"):
        fi.BatchDecodeWithPagedKVCacheWrapper(ws[1:])
    with pytest.raises(ValueError, match="paged_kv_last_page_len_buffer"):
        fi.BatchDecodeWithPagedKVCacheWrapper(ws, use_cuda_graph=True)
    with pytest.raises(ValueError, match="paged_kv_indptr_buffer"):
        fi.BatchDecodeWithPagedKVCacheWrapper(ws, use_cuda_graph=True, paged_kv_indptr_buffer=torch.zeros(2).int(),
                                              paged_kv_indices_buffer=torch.zeros(4).int(),
                                              paged_kv_last_page_len_buffer=torch.zeros(3).int())
    with pytest.raises(NotImplementedError):
        fi.BatchPrefillWithPagedKVCacheWrapper(ws, backend="cudnn")
    with pytest.raises(NotImplementedError):
        fi.BatchPrefillWithRaggedKVCacheWrapper(ws, jit_args=[1])
    q, k = torch.randn(4, 2, 16, device=device), torch.randn(3, 2, 16, device=device)
    with pytest.raises(ValueError, match="causal"):
        fi.single_prefill_with_kv_cache(q, k, k, causal=True)
    with pytest.raises(NotImplementedError, match="scale_q"):
        fi.single_prefill_with_kv_cache(q, k, k, scale_q=torch.ones(2))
    with pytest.raises(NotImplementedError, match="k_scale"):
        fi.single_decode_with_kv_cache(q[0], k, k, k_scale=torch.ones(2))
    with pytest.raises(ValueError, match="custom_mask"):
        fi.single_prefill_with_kv_cache(q, k, k, custom_mask=torch.ones(4, 4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="^custom_mask: has 16 elements, expected qo_len"):
        fi.single_prefill_with_kv_cache(q, k, k, custom_mask=torch.ones(16, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="packed_custom_mask"):
        fi.single_prefill_with_kv_cache(q, k, k, packed_custom_mask=torch.ones(5, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match="v"):
        fi.single_decode_with_kv_cache(q[0], k, torch.randn(3, 2, 32, device=device))
    with pytest.raises(KeyError):
        fi.single_decode_with_kv_cache(q[0], k, k, pos_encoding_mode="XPOS")
    with pytest.raises(ValueError, match="q"):
        fi.single_prefill_with_kv_cache(q, torch.randn(3, 3, 16, device=device), torch.randn(3, 3, 16, device=device))
    k8 = k.to(torch.float8_e4m3fn)  # fp8 KV is reserved (spec §0.1)
    with pytest.raises(NotImplementedError, match="^k: fp8 KV"):
        fi.single_decode_with_kv_cache(q[0].half(), k8, k8)
    with pytest.raises(NotImplementedError, match="^k: fp8 KV"):
        fi.single_prefill_with_kv_cache(q.half(), k8, k8)
    r = fi.BatchPrefillWithRaggedKVCacheWrapper(ws)
    r.plan(torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), 2, 2, 16,
           q_data_type="float16")
    with pytest.raises(NotImplementedError, match="^k: fp8 KV"):
        r.run(q.half(), k8, k8)


def test_decode_plan_errors(device):
    b = Batch([1, 1], [2, 9], page_size=4, Hq=4, Hkv=2, D=16, seed=5, device=device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    with pytest.raises(ValueError, match="use_tensor_cores"):
        w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_len_per_req=2)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), use_tensor_cores=True)
    with pytest.raises(ValueError, match="q_len_per_req"):
        w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_len_per_req=3)
    with pytest.raises(NotImplementedError):
        w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, window_right=4)
    with pytest.raises(ValueError, match="^indices: expected an integer dtype"):
        w.plan(b.kv_indptr, b.kv_indices.double(), b.last, 4, 2, 16, 4, q_data_type="float32")
    with pytest.raises(ValueError, match="^page_size: must be >= 1"):
        w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 0, q_data_type="float32")
    with pytest.raises(NotImplementedError, match="^kv_data_type: fp8 KV"):
        w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_data_type="float16", kv_data_type="float8_e5m2")
    w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_data_type="float32")
    with pytest.raises(ValueError, match="q_len_per_req"):
        w.run(b.q, b.cache, q_len_per_req=2)
    # decode's own argument names (they used to be the paged prefill's: head_dim_qk, paged_kv_indices)
    with pytest.raises(ValueError, match="^head_dim: must be an int"):
        w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16.0, 4, q_data_type="float32")
    with pytest.raises(ValueError, match="^q_len_per_req: must be an int"):
        w.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_data_type="float32", q_len_per_req=1.0)
    g = _graph_wrapper(device, 2, 3, "decode")
    with pytest.raises(ValueError, match="^indices: has 4 entries, more than its CUDA-graph buffer holds"):
        g.plan(b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4, q_data_type="float32")
    c = Batch([1] * 3, [2, 3, 4], page_size=4, Hq=4, Hkv=2, D=16, seed=6, device=device)
    with pytest.raises(ValueError, match="^indptr: batch size 3 differs from the CUDA-graph batch size 2"):
        g.plan(c.kv_indptr, c.kv_indices, c.last, 4, 2, 16, 4, q_data_type="float32")
    old = fi.checks_enabled()
    fi.set_checks(True)
    try:
        w.plan(b.kv_indptr, b.kv_indices + 100, b.last, 4, 2, 16, 4, q_data_type="float32")
        with pytest.raises(ValueError, match="^indices: values must lie in"):
            w.run(b.q, b.cache)
    finally:
        fi.set_checks(old)


def test_decode_plan_option_given_twice(device):
    """An option passed both positionally (FlashInfer's deprecated order) and by keyword is a
    TypeError even when the keyword holds the default (it used to win silently or lose silently)."""
    b = Batch([1], [7], page_size=4, Hq=4, Hkv=2, D=16, seed=7, device=device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    base = (b.kv_indptr, b.kv_indices, b.last, 4, 2, 16, 4)
    with pytest.raises(TypeError, match="multiple values for argument 'pos_encoding_mode'"):
        w.plan(*base, "ALIBI", pos_encoding_mode="NONE", q_data_type="float32")
    with pytest.raises(TypeError, match="multiple values for argument 'window_left'"):
        w.plan(*base, "NONE", 5, window_left=-1, q_data_type="float32")
    with pytest.warns(DeprecationWarning):  # no overlap: fine
        w.plan(*base, "NONE", 5, logits_soft_cap=2.0, q_data_type="float32")
    check_attention("positional window, keyword cap", w.run(b.q, b.cache), None,
                    *b.oracle(window_left=5, logits_soft_cap=2.0), torch.float32)


# --------------------------------------------------------------------------- self-check


def test_selfcheck(device):
    from torch_flashops._selfcheck import _CHECKS

    results = _CHECKS["attention"](device)
    assert {r.op for r in results} == {"single_attention", "paged_attention", "paged_attention_out",
                                       "ragged_attention", "ragged_attention_out"}
    bad = [(r.op, r.note, r.max_err) for r in results if not r.ok]
    assert not bad, bad


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_gpu_cuda_graph_capture_replan_replay(kind):
    """Capture run() after plan A, re-plan B (same B, other lengths/pages), replay == eager B."""
    a = Batch([1, 1, 1] if kind == "decode" else [3, 1, 5], [300, 2, 40], page_size=16, Hq=32, Hkv=8, D=128,
              dtype=torch.bfloat16, seed=1, device="cuda", spare_pages=60)
    bb = Batch([1, 1, 1] if kind == "decode" else [2, 4, 1], [17, 900, 64], page_size=16, Hq=32, Hkv=8, D=128,
               dtype=torch.bfloat16, seed=2, device="cuda")
    bb.cache = a.cache[: bb.P] if bb.P <= a.P else bb.cache
    w = _graph_wrapper("cuda", 3, 128, kind)
    kw = dict(q_data_type=torch.bfloat16)
    (w.plan(a.kv_indptr, a.kv_indices, a.last, 32, 8, 128, 16, **kw) if kind == "decode"
     else plan_paged(w, a, causal=True))
    q_static = a.q.clone()
    out = torch.empty(q_static.shape[0], 32, 128, dtype=torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        w.run(q_static, a.cache, out=out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(q_static, a.cache, out=out)
    graph.replay()
    check_attention("replay A", out, None, *a.oracle(causal=kind != "decode"), torch.bfloat16)
    (w.plan(bb.kv_indptr, bb.kv_indices, bb.last, 32, 8, 128, 16, **kw) if kind == "decode"
     else plan_paged(w, bb, causal=True))
    if bb.q.shape[0] <= q_static.shape[0]:
        q_static[: bb.q.shape[0]].copy_(bb.q)
    graph.replay()
    eager = w.run(q_static, a.cache)
    torch.cuda.synchronize()
    n = int(bb.qo_indptr[-1])
    assert torch.equal(out[:n], eager[:n])


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_gpu_plan_does_not_wait_for_the_gpu(kind, graph):
    """plan() from host page tables (as engines pass them) returns while earlier kernels still
    run: its host-to-device copies are asynchronous, where a blocking copy would synchronise the
    stream. Two plans made back to back while the GPU is busy each run on their own tables."""
    qo = ([1, 1, 1], [1, 1, 1]) if kind == "decode" else ([3, 1, 5], [2, 4, 1])
    kw = dict(page_size=16, Hq=8, Hkv=2, D=64, dtype=torch.bfloat16, device="cuda")
    a = Batch(qo[0], [300, 2, 40], seed=1, **kw)
    b = Batch(qo[1], [17, 500, 64], seed=2, **kw)
    if graph:
        w = _graph_wrapper("cuda", 3, 128, kind)
    else:
        w = (fi.BatchDecodeWithPagedKVCacheWrapper if kind == "decode" else fi.BatchPrefillWithPagedKVCacheWrapper)(
            workspace("cuda"))

    def plan(x, non_blocking=True):  # CPU page tables
        if kind == "decode":
            w.plan(x.kv_indptr, x.kv_indices, x.last, x.Hq, x.Hkv, x.D, x.page_size, q_data_type=torch.bfloat16,
                   non_blocking=non_blocking)
        else:
            w.plan(x.qo_indptr, x.kv_indptr, x.kv_indices, x.last, x.Hq, x.Hkv, x.D, x.page_size, causal=True,
                   q_data_type=torch.bfloat16, non_blocking=non_blocking)

    def busy_round():
        torch.cuda._sleep(2 ** 28)  # one thread spinning for ~0.1 s
        busy = torch.cuda.Event()
        busy.record()
        plan(a)
        oa = w.run(a.q, a.cache)
        plan(b)
        ob = w.run(b.q, b.cache)
        still_busy = not busy.query()
        torch.cuda.synchronize()
        return oa, ob, still_busy

    busy_round()  # warm-up: kernels compiled, device and pinned host blocks cached as the measured round needs
    oa, ob, still_busy = busy_round()
    assert still_busy, "plan() or run() waited for the GPU"
    check_attention("plan A while busy", oa, None, *a.oracle(causal=kind != "decode"), torch.bfloat16)
    check_attention("plan B while busy", ob, None, *b.oracle(causal=kind != "decode"), torch.bfloat16)
    # non_blocking=False (FlashInfer's flag): blocking copies, done when plan() returns
    torch.cuda._sleep(2 ** 26)
    busy = torch.cuda.Event()
    busy.record()
    plan(a, non_blocking=False)
    assert busy.query(), "plan(non_blocking=False) returned before its copies ran"
    # (and before the scatter of the packed transfer: nothing of the plan is left on the stream)
    assert torch.cuda.current_stream().query(), "plan(non_blocking=False) left work queued"
    # plan() is host code: refused during a capture, leaving the last plan intact
    captured = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The CUDA Graph is empty")  # (the refused plan() recorded nothing)
        with torch.cuda.graph(captured):
            plan(b)
    check_attention("plan A after a refused plan", w.run(a.q, a.cache), None, *a.oracle(causal=kind != "decode"),
                    torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("kind", ["decode", "prefill", "prefill-gathered"])
def test_gpu_plan_makes_one_host_to_device_copy(kind, graph):
    """plan() from host indptrs and lengths and device page ids (as vLLM passes them) moves all
    its host arrays (indptrs, lengths, the three work lists) in one transfer (``Upload``), and
    the planned run is right. The gathered-K/V prefill path sends its token CSR in a second."""
    if kind == "prefill-gathered" and graph:
        pytest.skip("CUDA-graph plans never take the gathered-K/V path")
    from torch.profiler import ProfilerActivity, profile

    x = Batch([1, 1, 1] if kind == "decode" else [3, 1, 5], [300, 2, 40], page_size=16, Hq=8, Hkv=2, D=64,
              dtype=torch.bfloat16, seed=1, device="cuda")
    ids = x.kv_indices.cuda()
    w = _graph_wrapper("cuda", 3, 128, kind) if graph else (
        fi.BatchDecodeWithPagedKVCacheWrapper if kind == "decode" else fi.BatchPrefillWithPagedKVCacheWrapper)(
            workspace("cuda"))
    kw = dict(q_data_type=torch.bfloat16)
    plan = lambda: (w.plan(x.kv_indptr, ids, x.last, 8, 2, 64, 16, **kw) if kind == "decode"  # noqa: E731
                    else w.plan(x.qo_indptr, x.kv_indptr, ids, x.last, 8, 2, 64, 16, causal=True, **kw))
    with gather_threshold(0 if kind == "prefill-gathered" else None):
        plan()  # warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            plan()
            torch.cuda.synchronize()
    assert (w._gather is not None) == (kind == "prefill-gathered")
    names = [e.name for e in prof.events()]
    htod = [n for n in names if "HtoD" in n]
    assert len(htod) == 1 + (w._gather is not None), names
    check_attention("planned run", w.run(x.q, x.cache), None, *x.oracle(causal=kind != "decode"), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_reduce_overhead_cache_buffer_no_cudagraph_skips():
    from torch._dynamo.utils import counters

    page, Hq, Hkv, D = 16, 32, 8, 128
    b = Batch([1] * 4, [40, 300, 7, 64], page_size=page, Hq=Hq, Hkv=Hkv, D=D, dtype=torch.bfloat16, seed=3,
              device="cuda")
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace("cuda"))
    w.plan(b.kv_indptr, b.kv_indices, b.last, Hq, Hkv, D, page, q_data_type=torch.bfloat16)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("kv_cache", b.cache.clone())

        def forward(self, q, k_new, v_new, bi, pos, kv_indices, kv_indptr, last):
            fi.append_paged_kv_cache(k_new, v_new, bi, pos, self.kv_cache, kv_indices, kv_indptr, last)
            return w.run(q, self.kv_cache)

    layer = Layer()
    seq = fi.get_seq_lens(b.kv_indptr.cuda(), b.last.cuda(), page)
    bi, pos = fi.get_batch_indices_positions(torch.arange(5, dtype=torch.int32, device="cuda"), seq, 4)
    k_new = torch.randn(4, Hkv, D, device="cuda").bfloat16()
    v_new = torch.randn(4, Hkv, D, device="cuda").bfloat16()
    args = (b.q, k_new, v_new, bi, pos, b.kv_indices.cuda(), b.kv_indptr.cuda(), b.last.cuda())
    counters.clear()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        o = compiled(*args).clone()
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    eager = w.run(b.q, layer.kv_cache)
    assert_close("reduce-overhead", o, eager.float(), dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("page,layout", [(16, "NHD"), (1, "NHD"), (16, "HND")])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_model_shapes(page, layout, dtype):
    """Model-sized heads (32/8, D=128), long and empty requests, decode and causal prefill."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for qo in ([1] * 5, [17, 1, 0, 64, 3]):
        b = Batch(qo, [4099, 1, 0, 257, 16], page_size=page, Hq=32, Hkv=8, D=128, dtype=dt, layout=layout,
                  seed=page, device="cuda", shared_pages=True)
        w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace("cuda", 128 << 20), layout)
        plan_paged(w, b, causal=True)
        o, lse = w.run(b.q, b.cache, return_lse=True)
        ro, rl = b.oracle(causal=True)
        check_attention(f"gpu {qo}", o, lse, ro, rl, dt)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [dict(fixed_split_size=8), dict(disable_split_kv=True)])
def test_gpu_fixed_split_batch_invariant(split):
    """On the GPU the launch rules read the grid (whole requests in 128-key tiles, 8 warps for
    small grids, TMA or gathered K/V for long prefills): under a fixed split none may apply, so a
    request's bits are the same alone as in a batch that would trigger them."""
    kw = dict(page_size=16, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16, device="cuda", seed=5)
    # decode: request 0 alone (8 programs) vs in a batch of 16 x ~700 keys (128 programs)
    lens = [700 + 13 * i for i in range(16)]
    b = Batch([1] * 16, lens, **kw)
    b0 = Batch([1], lens[:1], **kw)
    b0.cache, b0.kv_indices, b0.q = b.cache, b.kv_indices[: int(b.kv_indptr[1])], b.q[:1]
    outs = []
    for bb in (b, b0):
        w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace("cuda", 128 << 20))
        w.plan(bb.dev(bb.kv_indptr), bb.dev(bb.kv_indices), bb.dev(bb.last), 32, 8, 128, 16,
               q_data_type=torch.bfloat16, **split)
        outs.append(w.run(bb.q, bb.cache, return_lse=True))
    assert torch.equal(outs[0][0][:1], outs[1][0]) and torch.equal(outs[0][1][:1], outs[1][1])
    # prefill: a 3-row request alone vs beside a 4096-row one (gathered K/V otherwise); 128-row
    # tiles (32 query rows x 4 heads) in 8-page chunks: 2132 partial tiles of 516 KiB, 1.05 GiB
    # of workspace (a fixed split is never coarsened to fit)
    b = Batch([3, 4096], [3000, 4096], **kw)
    b0 = Batch([3], [3000], **kw)
    b0.cache, b0.kv_indices, b0.q = b.cache, b.kv_indices[: int(b.kv_indptr[1])], b.q[:3]
    b0.k_nhd, b0.v_nhd = b.k_nhd, b.v_nhd  # (the oracle's copy of the shared cache)
    outs = []
    for bb in (b, b0):
        w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace("cuda", 1200 << 20))
        plan_paged(w, bb, causal=True, **split)
        assert w._gather is None
        outs.append(w.run(bb.q, bb.cache, return_lse=True))
    assert torch.equal(outs[0][0][:3], outs[1][0]) and torch.equal(outs[0][1][:3], outs[1][1])
    ro, rl = b0.oracle(causal=True)
    check_attention("alone", outs[1][0], outs[1][1], ro, rl, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,hkv", [(16, 512, 8), (16, 1000, 4), (32, 1600, 4)])
def test_gpu_whole_request_decode(B, L, hkv):
    """Decode batches the planner runs as whole requests in 128-key tiles (``whole_requests``:
    48..num_SMs programs of 512..2048 keys; lengths spread around L, partial last pages) equal the
    oracle and a split plan of the same batch; a CUDA-graph wrapper keeps split capacity."""
    from torch_flashops.ops import attention as A

    g = torch.Generator().manual_seed(B + L)
    lens = (L + torch.randint(0, L // 4, (B,), generator=g)).tolist()
    b = Batch([1] * B, lens, page_size=16, Hq=32, Hkv=hkv, D=128, dtype=torch.bfloat16, seed=L, device="cuda")
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace("cuda", 128 << 20))
    w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 32, hkv, 128, 16, q_data_type=torch.bfloat16)
    keys = b.kv_indices.numel() * 16 // B
    assert A.whole_requests(B * hkv, keys, 16, False, "cuda", 32 // hkv)
    assert int((w._t.split_work[::4] >= 0).sum()) == 0  # whole requests, no merge
    o, lse = w.run(b.q, b.cache, return_lse=True)
    check_attention(f"whole B={B} L={L}", o, lse, *b.oracle(), torch.bfloat16)
    w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 32, hkv, 128, 16, q_data_type=torch.bfloat16,
           fixed_split_size=8)
    assert int((w._t.split_work[::4] >= 0).sum()) > 0
    o2, lse2 = w.run(b.q, b.cache, return_lse=True)
    assert_close("whole vs split", o, o2, dtype=torch.bfloat16)
    n = B * hkv
    bufs = (torch.zeros(B + 1, dtype=torch.int32, device="cuda"), torch.zeros(b.kv_indices.numel(), dtype=torch.int32,
            device="cuda"), torch.zeros(B, dtype=torch.int32, device="cuda"))
    wg = fi.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(workspace("cuda", 128 << 20), *bufs)
    wg.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 32, hkv, 128, 16, q_data_type=torch.bfloat16)
    assert wg._t.split_work.numel() >= 3 * 4 and n > 0  # frozen split capacity stays
    og = wg.run(b.q, b.cache)
    check_attention("graph-mode wrapper", og, None, *b.oracle(), torch.bfloat16)


def test_compile_multilevel_cascade(device):
    """The cascade run (per-level ops + in-place merges) compiles to one graph."""
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(12, 2, 4, 2, 16, generator=g).to(device)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    w = fi.MultiLevelCascadeAttentionWrapper(2, workspace(device))
    q = torch.randn(3, 4, 16, generator=g).to(device)
    with pytest.raises(RuntimeError, match=r"^MultiLevelCascadeAttentionWrapper\.run\(\) called before"):
        w.run(q, cache)
    w.plan([i32([0, 3]), i32([0, 1, 2, 3])], [i32([0, 2]), i32([0, 1, 3, 4])], [i32([5, 1]), i32([0, 7, 2, 9])],
           [i32([4]), i32([3, 1, 2])], 4, 2, 16, 4, causal=True, q_data_type="float32")
    cc = CompileCounter(lambda q, c: w.run(q, c))
    assert_close("compiled cascade", cc(q, cache), w.run(q, cache))
    assert cc.frames == 1
    assert cc.graph_ops().count("flashops.merge_state_in_place.default") == 1


def test_cascade_wrapper_int_like_levels_and_empty_qo_indptr(device):
    """num_levels may be any int-like (a NumPy integer from a config), as in FlashInfer; bool,
    float and 0 are refused. An empty qo_indptr tensor is a ValueError naming the argument
    (it was a bare IndexError), and the earlier plan stays usable."""
    import numpy as np

    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    w = fi.MultiLevelCascadeAttentionWrapper(np.int64(2), workspace(device))
    assert len(w._batch_prefill_wrappers) == 2
    for bad in (True, 2.0, 0):
        with pytest.raises(ValueError, match=r"^num_levels:"):
            fi.MultiLevelCascadeAttentionWrapper(bad, workspace(device))
    args = ([i32([0, 3]), i32([0, 1, 2, 3])], [i32([0, 1]), i32([0, 1, 2, 3])], [i32([0]), i32([1, 2, 1])],
            [i32([3]), i32([2, 4, 1])], 4, 2, 16, 4)
    w.plan(*args[:4], *args[4:], q_data_type="float32")
    g = torch.Generator().manual_seed(4)
    cache = torch.randn(3, 2, 4, 2, 16, generator=g).to(device)
    q = torch.randn(3, 4, 16, generator=g).to(device)
    before = w.run(q, cache)
    with pytest.raises(ValueError, match=r"^qo_indptr_arr: level 1"):
        w.plan([args[0][0], i32([])], *args[1:4], *args[4:], q_data_type="float32")
    w.plan(*args[:4], *args[4:], q_data_type="float32")
    assert torch.equal(w.run(q, cache), before)


def test_launch_heuristics_h100(monkeypatch):
    """The launch decisions measured on an H100 (132 SMs; ops/attention.py docstrings), pinned
    so a change to them shows up in review. Pure host arithmetic: no GPU needed."""
    from torch_flashops.ops import attention as A

    monkeypatch.setattr(A, "num_sms", lambda device: 132)
    cfg = lambda bm, n=None, keys=None: A.attn_config(bm, 128, 128, torch.bfloat16, "cuda", n, keys)  # noqa: E731
    assert cfg(128) == (64, 8, 3) and cfg(64) == (64, 4, 3)  # prefill tiles
    assert cfg(16, 512, 4096) == (64, 4, 2)  # a full machine: occupancy hides latency
    assert cfg(16, 256, 4096) == (64, 8, 3)  # ~2 programs per SM: pipeline, 8 warps per tile
    assert cfg(16, 256, 64) == (64, 8, 2)  # one key tile per program: nothing to pipeline
    assert cfg(16, 256) == (64, 8, 3)  # keys unknown: pipeline
    assert cfg(16) == (64, 4, 2)  # launch unknown
    assert cfg(16, 256, 128) == (64, 8, 2)  # two key tiles per program: little to overlap
    assert cfg(16, 8, 128) == (128, 8, 2)  # unsplit, 65..128 keys a program: one 128-key tile
    assert A.attn_config(16, 128, 128, torch.bfloat16, "cuda", 256, 128, split=True) == (64, 8, 2)
    assert A.kv_eviction(True, "cuda") == "evict_first" and A.kv_eviction(False, "cuda") == ""
    # live programs: B=1 decode has one item in its 2-row list (plus 2 idle split rows)
    assert A.live_items(4, 2, False, 1, 1) == 1 and A.live_items(10, 2, False, 8, 1) == 8
    assert A.live_items(36, 32, True, 1, 1) == 36 and A.live_items(4, 2, False, 1, 2) == 2
    # split floors (decode tiles): past 16 programs, ranges of 256 keys stay whole, past 64
    # programs 384; taller tiles keep 8 key tiles
    assert A.split_min_keys(64, "cuda", 16) == 0 and A.split_min_keys(64, "cuda", 64) == 256
    assert A.split_min_keys(64, "cuda", 128) == 384 and A.split_min_keys(64, "cuda", 128, block_m=64) == 512
    assert A.split_min_keys(64, "cuda", 96, group=8) == 512 and A.split_min_keys(64, "cuda", 64, group=8) == 256
    from torch_flashops._attention_plan import build_schedule

    def n_split(B, L):  # decode, 8 KV heads, GQA 4 (16-row tiles)
        ones = np.ones(B, dtype=np.int64)
        s = build_schedule(ones, ones * L, group=4, block_m=16, block_n=64, num_kv_heads=8, d_vo=128, causal=False,
                           window_left=-1, has_mask=False, device="cuda", workspace_bytes=256 << 20)
        return int((s.split_work[:, 0] >= 0).sum())
    assert n_split(16, 512) == 64 and n_split(16, 1024) == 64 and n_split(1, 4096) == 32
    assert n_split(8, 256) == 0 and n_split(8, 384) == 48 and n_split(4, 1024) == 64  # 64-key chunk floor
    # merge programs: ~4 per SM, at most one per 16-column chunk
    assert A.merge_d_split(128, 8, "cuda") == 4 and A.merge_d_split(8, 8, "cuda") == 8
    assert A.merge_d_split(4096, 8, "cuda") == 1
    # merge kernel by programmatic dependent launch on sm_90+: allowed at the attention
    # programs' start while tiles average <= 16 partials, else after their key loop
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    A._sm_major.cache_clear()
    assert A.merge_pdl(64, 16, "cuda") == 1 and A.merge_pdl(32, 2, "cuda") == 1
    assert A.merge_pdl(64, 2, "cuda") == 2 and A.merge_pdl(128, 1, "cuda") == 2
    assert A.merge_pdl(64, 16, "cpu") == 0
    # 4-warp decode tiles with page ids two ahead capped at 128 registers (4 programs per SM)
    assert A.register_cap(16, 4, 2, "cuda") == 128 and A.register_cap(32, 4, 2, "cuda") == 128
    assert A.register_cap(16, 8, 2, "cuda") is None and A.register_cap(16, 4, 1, "cuda") is None
    assert A.register_cap(64, 4, 2, "cuda") is None and A.register_cap(16, 4, 2, "cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    A._sm_major.cache_clear()
    assert A.merge_pdl(64, 16, "cuda") == 0
    A._sm_major.cache_clear()  # the next test sees the real device
    assert A.attn_config(16, 256, 256, torch.bfloat16, "cuda", 8, 4096) == (32, 4, 2)  # wide head dims
    # split-KV: only below one program per SM, aiming at one wave of resident programs
    assert A.split_target(8, 16, "cuda") == 132 * 4
    assert A.split_target(128, 16, "cuda") == 132 * 4
    assert A.split_target(256, 16, "cuda") == 0
    assert A.split_target(32, 128, "cuda") == 132 and A.split_target(100, 128, "cuda") == 0
    assert A.split_min_chunk(64, "cuda", 8) == 128 and A.split_min_chunk(64, "cuda", 64) == 64
    assert A.split_min_chunk(64, "cuda", 128) == 64 and A.split_min_chunk(64, "cuda", 128, block_m=64) == 256
    assert A.split_min_chunk(64, "cuda", 96, group=8) == 256 and A.split_min_chunk(64, "cuda", 64, group=8) == 64
    assert A.split_min_chunk(64, "cpu", 128) == 128  # the interpreter keeps short chunks
    # page ids two tiles ahead only for unpipelined decode tiles of about one wave, short ranges
    assert A.page_ahead(16, 2, 512, 512, "cuda") == 2 and A.page_ahead(16, 2, 1024, 512, "cuda") == 1
    assert A.page_ahead(16, 2, 512, 1024, "cuda") == 2 and A.page_ahead(16, 2, 512, 4096, "cuda") == 1
    assert A.page_ahead(16, 3, 128, 512, "cuda") == 1 and A.page_ahead(128, 2, 128, 512, "cuda") == 1
    # ragged key tiles by TMA on CUDA: 128-row 16-bit prefill tiles, D <= 128, long requests,
    # then 128-key tiles
    assert A.tma_pays(128, 128, 2, 4096) and A.tma_pays(128, 64, 2, 16384)
    assert not A.tma_pays(128, 128, 2, 1024) and not A.tma_pays(64, 128, 2, 4096)
    assert not A.tma_pays(128, 256, 2, 4096) and not A.tma_pays(128, 128, 4, 4096)
    assert A.attn_config(128, 128, 128, torch.bfloat16, "cuda", tma=True) == (128, 8, 3)
    assert A.attn_config(128, 256, 256, torch.bfloat16, "cuda", tma=True) == (32, 8, 2)
    # merge: one GQA group (>= 4 rows) per program, 16 columns, 64 partials a step (batch-free)
    assert A.merge_config(16, 128, 4) == (4, 64, 16, 4) and A.merge_config(32, 128, 1) == (4, 64, 16, 4)
    assert A.merge_config(128, 128, 4) == (128, 1, 64, 8) and A.merge_config(64, 64, 1) == (64, 2, 64, 8)
    assert A.merge_config(16, 128, 8) == (8, 32, 16, 4) and A.merge_config(16, 64, 16) == (16, 16, 16, 4)


# --------------------------------------------------------------------- plans that fail midway


def test_failed_plan_leaves_the_previous_plan(device):
    """A plan() that raises (an option checked late, a page table too big for a CUDA-graph
    buffer, a work list past the frozen size) changes nothing: run() keeps giving the previous
    plan's results, and CUDA-graph buffers keep its contents."""
    a = Batch([1, 1, 1], [9, 20, 5], page_size=4, Hq=4, Hkv=1, D=16, seed=1)
    c = Batch([1, 1, 1], [30, 2, 60], page_size=4, Hq=4, Hkv=1, D=16, seed=2)
    ro, rl = a.oracle()
    # eager wrappers: bad options rejected after the schedule could have been built
    for bad in (dict(logits_soft_cap=-1.0), dict(rope_scale=0.0)):
        for w in (fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device)),
                  fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))):
            if isinstance(w, fi.BatchDecodeWithPagedKVCacheWrapper):
                plan = lambda b, **kw: w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 4, 1, 16, 4,  # noqa: E731
                                              q_data_type="float32", **kw)
            else:
                plan = lambda b, **kw: plan_paged(w, b, **kw)  # noqa: E731
            plan(a)
            with pytest.raises(ValueError):
                plan(c, **bad)
            o, lse = w.run(a.q, a.cache, return_lse=True)
            check_attention(f"{type(w).__name__} after failed plan {bad}", o, lse, ro, rl, torch.float32)
    # CUDA-graph decode: 24 page ids for a 16-entry buffer (decode names them indices)
    ind, idx, last = (torch.zeros(n, dtype=torch.int32, device=device) for n in (4, 16, 3))
    w = fi.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(workspace(device), ind, idx, last)
    w.plan(a.dev(a.kv_indptr), a.dev(a.kv_indices), a.dev(a.last), 4, 1, 16, 4, q_data_type="float32")
    before = [t.clone() for t in (ind, idx, last, *w._t.work, )]
    with pytest.raises(ValueError, match="^indices: has 24 entries, more than its CUDA-graph buffer holds \\(16\\)"):
        w.plan(c.dev(c.kv_indptr), c.dev(c.kv_indices), c.dev(c.last), 4, 1, 16, 4, q_data_type="float32")
    assert all(torch.equal(x, y) for x, y in zip(before, (ind, idx, last, *w._t.work)))
    o, lse = w.run(a.q, a.cache, return_lse=True)
    check_attention("graph decode after failed plan", o, lse, ro, rl, torch.float32)
    # CUDA-graph prefill: a GQA group of 32 needs more tiles than the first plan froze
    qo, ind2, idx2, last2 = (torch.zeros(n, dtype=torch.int32, device=device) for n in (4, 4, 64, 3))
    b = Batch([2, 1, 3], [9, 20, 5], page_size=4, Hq=2, Hkv=2, D=16, seed=3)
    wp = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device), use_cuda_graph=True, qo_indptr_buf=qo,
                                                paged_kv_indptr_buf=ind2, paged_kv_indices_buf=idx2,
                                                paged_kv_last_page_len_buf=last2)
    plan_paged(wp, b, causal=True)
    before = [t.clone() for t in (qo, ind2, idx2, last2)]
    g32 = Batch([3, 2, 1], [40, 7, 3], page_size=4, Hq=32, Hkv=1, D=16, seed=4)
    with pytest.raises(ValueError, match="frozen CUDA-graph size"):
        plan_paged(wp, g32, causal=True)
    assert all(torch.equal(x, y) for x, y in zip(before, (qo, ind2, idx2, last2)))
    o, lse = wp.run(b.q, b.cache, return_lse=True)
    check_attention("graph prefill after failed plan", o, lse, *b.oracle(causal=True), torch.float32)


def test_failed_first_graph_plan_freezes_nothing(device):
    """In CUDA-graph mode the first *successful* plan sets the frozen sizes."""
    qo, ind, idx, last = (torch.zeros(n, dtype=torch.int32, device=device) for n in (4, 4, 64, 3))
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device), use_cuda_graph=True, qo_indptr_buf=qo,
                                               paged_kv_indptr_buf=ind, paged_kv_indices_buf=idx,
                                               paged_kv_last_page_len_buf=last)
    small = Batch([1, 0, 1], [9, 3, 5], page_size=4, Hq=4, Hkv=1, D=16, seed=5)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        plan_paged(w, small, logits_soft_cap=-1.0)
    big = Batch([6, 5, 5], [9, 20, 5], page_size=4, Hq=4, Hkv=1, D=16, seed=6)
    plan_paged(w, big, causal=True)
    o, lse = w.run(big.q, big.cache, return_lse=True)
    check_attention("first successful graph plan", o, lse, *big.oracle(causal=True), torch.float32)


def test_cascade_failed_level_plan_unplans_every_level(device):
    """A multi-level plan whose second level fails leaves no level planned (a run would
    otherwise merge a new level with an old one)."""
    b = Batch([1, 1], [12, 7], page_size=4, Hq=4, Hkv=1, D=16, seed=7)
    w = fi.MultiLevelCascadeAttentionWrapper(2, workspace(device))
    qo = b.dev(torch.tensor([0, 1, 2], dtype=torch.int32))
    w.plan([qo, qo], [b.dev(b.kv_indptr)] * 2, [b.dev(b.kv_indices)] * 2, [b.dev(b.last)] * 2, 4, 1, 16, 4,
           q_data_type="float32")
    w.run(b.q, b.cache)
    bad_last = b.dev(torch.tensor([4, 7], dtype=torch.int32))  # 7 > page_size
    with pytest.raises(ValueError, match="last_page_len"):
        w.plan([qo, qo], [b.dev(b.kv_indptr)] * 2, [b.dev(b.kv_indices)] * 2, [b.dev(b.last), bad_last], 4, 1, 16,
               4, q_data_type="float32")
    with pytest.raises(RuntimeError, match="successful plan"):
        w.run(b.q, b.cache)


def test_ragged_without_key_rows(device):
    """Ragged prefill over K/V with no rows at all (every kv_len 0): o = 0, lse = -inf."""
    q = torch.randn(4, 2, 16, device=device)
    k = v = torch.empty(0, 2, 16, device=device)
    w = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(torch.tensor([0, 1, 4], dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 2, 2, 16,
           q_data_type="float32")
    o, lse = w.run(q, k, v, return_lse=True)
    assert (o == 0).all() and torch.isneginf(lse).all()
    o1 = fi.single_decode_with_kv_cache(q[0], k, v)
    assert (o1 == 0).all()


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_fixed_split_is_never_coarsened(kind, device):
    """A fixed split is never coarsened to fit: that would make a request's bits depend on its
    batch. Chunks beyond the workspace are refused at plan() with the bytes they need (a default
    plan on the same workspace coarsens its own chunks and runs), and in CUDA-graph mode the frozen
    split list takes what the workspace holds, so a later plan with longer requests than the
    first keeps every request's bits equal to the request planned alone."""
    kw = dict(page_size=4, Hq=4, Hkv=2, D=16, seed=21, device=device, spare_pages=8)
    qo = [1, 1, 1] if kind == "decode" else [1, 3, 2]
    big = Batch(qo, [150, 37, 90], **kw)
    for fs in (1, None):
        w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1 << 15)) if kind == "decode" else \
            fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1 << 15))
        if fs is None:
            _plan_kind(w, big, kind)
            check_attention("coarsened default plan", w.run(big.q, big.cache), None,
                            *big.oracle(causal=kind != "decode"), torch.float32)
        else:
            with pytest.raises(ValueError, match=r"fixed_split_size: this batch splits into \d+ partial tiles.*"
                                                 r"float_workspace_buffer of 32768 bytes"):
                _plan_kind(w, big, kind, fixed_split_size=fs)
    g = _graph_wrapper(device, 3, 80, kind)
    _plan_kind(g, Batch(qo, [5, 6, 7], **kw), kind, fixed_split_size=1)  # freezes the lists
    _plan_kind(g, big, kind, fixed_split_size=1)
    assert int((g._t.split_work[::4] >= 0).sum()) >= 60  # one-page chunks: 38 + 10 + 23 tiles' worth
    o = g.run(big.q, big.cache)
    n0 = big.qo_indptr[1]
    alone = Batch(qo[:1], [150], **kw)
    alone.cache, alone.kv_indices, alone.q = big.cache, big.kv_indices[: int(big.kv_indptr[1])], big.q[:n0]
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device)) if kind == "decode" else \
        fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    _plan_kind(w, alone, kind, fixed_split_size=1)
    assert torch.equal(o[:n0], w.run(alone.q, alone.cache))
    check_attention("graph-mode fixed split", o, None, *big.oracle(causal=kind != "decode"), torch.float32)
    g = _graph_wrapper(device, 3, 4096, kind)
    _plan_kind(g, Batch(qo, [5, 6, 7], **kw), kind)  # a default first plan freezes a short split list
    rows = g._t.split_work.shape[0] // 4  # (its size follows the machine's SM count)
    longer = Batch(qo, [4 * (rows + 1), 5, 6], **kw)  # one-page chunks: more than the list holds
    with pytest.raises(ValueError, match="split list frozen by the first CUDA-graph plan"):
        _plan_kind(g, longer, kind, fixed_split_size=1)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_graph_fixed_split_list_bounded_by_page_buffer(kind, device):
    """A CUDA-graph plan with ``fixed_split_size`` freezes a split list sized by the most chunks
    its page-id buffer allows (not by the whole workspace, whose idle rows every replay would
    launch), and every later batch that fits the buffers plans and keeps each request's bits:
    all pages in one request, and every request ending one key into its last page."""
    B, n_idx, fs = 3, 24, 2
    kw = dict(page_size=4, Hq=4, Hkv=2, D=16, device=device, spare_pages=2)
    qo = [1, 1, 1] if kind == "decode" else [1, 3, 2]
    g = _graph_wrapper(device, B, n_idx, kind)
    _plan_kind(g, Batch(qo, [5, 6, 7], seed=31, **kw), kind, fixed_split_size=fs)  # freezes the lists
    rows = g._t.split_work.shape[0] // 4
    item = g._plan.block_m * 2 * 17 * 4  # partial_item_bytes(2 KV heads, block_m, 16)
    cap = g._float_workspace_buffer.numel() // item  # what the workspace holds (decode 1927, prefill 240)
    # decode: one tile per request, ceil(24 / 2) chunks over the buffer + one per request;
    # prefill: at most 3 tiles (6 rows), each with at most ceil(24 / 2) chunks
    assert rows == (12 + B if kind == "decode" else 3 * 12) and rows < cap // 5
    for seed, kv_lens in ((32, [96, 0, 0]), (33, [0, 0, 96]), (34, [29, 29, 29]), (35, [33, 0, 57])):
        big = Batch(qo, kv_lens, seed=seed, **kw)
        _plan_kind(g, big, kind, fixed_split_size=fs)
        assert g._t.split_work.shape[0] // 4 == rows  # the frozen size
        o = g.run(big.q, big.cache)
        check_attention(f"graph-mode fixed split {kv_lens}", o, None, *big.oracle(causal=kind != "decode"),
                        torch.float32)
        b0 = next(i for i, n in enumerate(kv_lens) if n)
        r0, r1 = int(big.qo_indptr[b0]), int(big.qo_indptr[b0 + 1])
        alone = Batch(qo[b0:b0 + 1], kv_lens[b0:b0 + 1], seed=seed, **kw)
        p0, p1 = int(big.kv_indptr[b0]), int(big.kv_indptr[b0 + 1])
        alone.cache, alone.kv_indices, alone.q = big.cache, big.kv_indices[p0:p1], big.q[r0:r1]
        w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device)) if kind == "decode" else \
            fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
        _plan_kind(w, alone, kind, fixed_split_size=fs)
        assert torch.equal(o[r0:r1], w.run(alone.q, alone.cache)), kv_lens


# ------------------------------------------------------------- how serving engines call plan()


def test_fixed_split_size_nonpositive_means_off(device):
    """vLLM passes ``fixed_split_size=-1`` on every plan (FlashInfer: None, 0 or negative = off):
    the schedule equals the default one, not one-page chunks."""
    b = Batch([1] * 4, [300, 77, 1, 150], page_size=4, Hq=8, Hkv=2, D=16, seed=11)
    plans = []
    for fs in (None, -1, 0):
        w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
        w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 8, 2, 16, 4, q_data_type="float32",
               fixed_split_size=fs)
        plans.append((w._t.work.cpu(), w._t.split_work.cpu()))
        p = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
        plan_paged(p, b, fixed_split_size=fs)
        plans.append((p._t.work.cpu(), p._t.split_work.cpu()))
    for i in (0, 1):  # decode, prefill: -1 and 0 plan as None does
        for j in (i + 2, i + 4):
            assert torch.equal(plans[i][0], plans[j][0]) and torch.equal(plans[i][1], plans[j][1])


def test_requests_without_pages_ignore_last_page_len(device):
    """A request with no pages has kv_len 0 whatever its last_page_len (FlashInfer's rule):
    SGLang plans cache-less prefills with 0 pages and last_page_len 1, vLLM pads CUDA-graph
    decode batches the same way. Output 0, LSE -inf for those rows; the others as the oracle."""
    b = Batch([1, 2, 1], [9, 0, 20], page_size=4, Hq=4, Hkv=1, D=16, seed=12)
    last = b.last.clone()
    last[1] = 1  # 0 pages, last_page_len 1
    ro, rl = b.oracle()
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    w.plan(b.dev(b.qo_indptr), b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(last), 4, 1, 16, 4,
           q_data_type="float32")
    o, lse = w.run(b.q, b.cache, return_lse=True)
    check_attention("prefill, 0 pages with last_page_len 1", o, lse, ro, rl, torch.float32)
    assert (o[1:3] == 0).all() and torch.isneginf(lse[1:3]).all()
    d = Batch([1, 1, 1], [9, 0, 20], page_size=4, Hq=4, Hkv=1, D=16, seed=13)
    last = d.last.clone()
    last[1] = 1
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(d.dev(d.kv_indptr), d.dev(d.kv_indices), d.dev(last), 4, 1, 16, 4, q_data_type="float32")
    o, lse = w.run(d.q, d.cache, return_lse=True)
    check_attention("decode, 0 pages with last_page_len 1", o, lse, *d.oracle(), torch.float32)
    with pytest.raises(ValueError, match="last_page_len"):  # with pages, the range still holds
        bad = d.last.clone()
        bad[0] = 5
        w.plan(d.dev(d.kv_indptr), d.dev(d.kv_indices), d.dev(bad), 4, 1, 16, 4, q_data_type="float32")


def test_forward_replaces_plan_options_as_flashinfer(device):
    """SGLang and TGI plan without causal/scale and pass them to forward(): forward's options
    replace the plan's (its defaults where not given), keeping the schedule where it covers them
    (causal, a narrower window) and re-planning otherwise; paged and ragged."""
    b = Batch([3, 1, 4], [9, 6, 20], page_size=4, Hq=4, Hkv=2, D=16, seed=21)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    plan_paged(w, b)  # not causal
    o, lse = w.forward_return_lse(b.q, b.cache, causal=True, sm_scale=0.2)
    check_attention("plan non-causal, forward causal", o, lse, *b.oracle(causal=True, sm_scale=0.2), torch.float32)
    assert w._causal is True and w._sm_scale == 0.2
    o, lse = w.run(b.q, b.cache, return_lse=True)  # the options stay
    check_attention("run after forward", o, lse, *b.oracle(causal=True, sm_scale=0.2), torch.float32)
    o, lse = w.forward_return_lse(b.q, b.cache, window_left=3)  # causal back to False: re-planned
    check_attention("forward window, not causal", o, lse, *b.oracle(window_left=3), torch.float32)
    o, lse = w.forward_return_lse(b.q, b.cache, causal=True)  # window -1 again: re-planned
    check_attention("forward causal, no window", o, lse, *b.oracle(causal=True), torch.float32)
    g = torch.Generator().manual_seed(22)
    k, v = (torch.randn(35, 2, 16, generator=g).to(device) for _ in range(2))
    kv_indptr = torch.tensor([0, 9, 15, 35], dtype=torch.int32)
    r = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    r.plan(b.qo_indptr, kv_indptr, 4, 2, 16, q_data_type="float32")
    ref_k, ref_v = k.cpu().unsqueeze(1), v.cpu().unsqueeze(1)
    last = torch.ones(3, dtype=torch.int32)
    ro, rl = ref_attention(b.q.cpu(), ref_k, ref_v, b.qo_indptr, kv_indptr, torch.arange(35, dtype=torch.int32), last,
                           causal=True, logits_soft_cap=5.0)
    o, lse = r.forward_return_lse(b.q, k, v, causal=True, logits_soft_cap=5.0)
    check_attention("ragged forward causal", o, lse, ro, rl, torch.float32)
    # FlashInfer's forward() takes its options positionally too, in its own order per wrapper
    o2, lse2 = r.forward_return_lse(b.q, k, v, True, "NONE", False, -1, 5.0)  # causal, ..., logits_soft_cap
    assert torch.equal(o2, o) and torch.equal(lse2, lse)
    o, lse = w.forward_return_lse(b.q, b.cache, causal=True, sm_scale=0.2, v_scale=2.0)
    o2, lse2 = w.forward_return_lse(b.q, b.cache, True, "NONE", False, None, 2.0, -1, None, 0.2)
    assert torch.equal(o2, o) and torch.equal(lse2, lse)
    check_attention("paged forward, v_scale", o / 2, lse, *b.oracle(causal=True, sm_scale=0.2), torch.float32)
    assert torch.equal(w.forward(b.q, b.cache, True, "NONE", False, None, 2.0, -1, None, 0.2), o)
    with pytest.raises(TypeError, match="multiple values for argument 'causal'"):
        w.forward(b.q, b.cache, True, causal=True)
    with pytest.raises(TypeError, match="at most 12 positional arguments"):
        w.forward(b.q, b.cache, *([None] * 11))
    with pytest.raises(TypeError, match="at most 11 positional arguments"):
        r.forward(b.q, k, v, *([None] * 9))


def test_ragged_hnd_layout(device):
    """Ragged K/V in HND (``[H_kv, rows, D]``, as vLLM's DCP prefill passes it) equals NHD bitwise."""
    g = torch.Generator().manual_seed(31)
    qo = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    kv = torch.tensor([0, 9, 15, 35], dtype=torch.int32)
    q = torch.randn(8, 4, 16, generator=g).to(device)
    k, v = (torch.randn(35, 2, 16, generator=g).to(device) for _ in range(2))
    outs = []
    for layout in ("NHD", "HND"):
        w = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(device), layout)
        w.plan(qo, kv, 4, 2, 16, causal=True, q_data_type="float32")
        kk, vv = (k, v) if layout == "NHD" else (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
        outs.append(w.run(q, kk, vv, return_lse=True))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    ro, rl = ref_attention(q.cpu(), k.cpu().unsqueeze(1), v.cpu().unsqueeze(1), qo, kv,
                           torch.arange(35, dtype=torch.int32), torch.ones(3, dtype=torch.int32), causal=True)
    check_attention("ragged HND", outs[1][0], outs[1][1], ro, rl, torch.float32)


def test_dropped_wrapper_frees_its_workspace(device):
    """A planned wrapper holds no reference cycle (forward()'s re-plan data is plain data), so
    dropping it frees the workspace at once, without the cycle collector."""
    import gc
    import weakref

    b = Batch([1, 1], [13, 6], page_size=4, Hq=4, Hkv=1, D=16, seed=41)

    def use(ws):
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(b.last), 4, 1, 16, 4, q_data_type="float32")
        w.forward(b.q, b.cache, window_left=2)  # options applied in place
        w.forward(b.q, b.cache)  # a re-plan

    # A warm-up first: the process's first plan() imports torch._dynamo (through the wrapper's
    # disable-dynamo decorator), and that import keeps its caller's frames, this test's wrapper
    # among them, in cycles until the collector runs (seen when this test ran alone, under
    # compute-sanitizer and on the CPU). Those cycles belong to the import, not to the wrapper.
    use(workspace(device))
    gc.collect()
    gc.disable()
    try:
        ws = workspace(device)
        ref = weakref.ref(ws)
        use(ws)
        del ws
        assert ref() is None
    finally:
        gc.enable()


def test_q_len_per_req_with_padding_requests(device):
    """Speculative verify (q_len_per_req 2) with CUDA-graph-style padding requests (0 pages,
    last_page_len 1): planned, the padding rows give 0 / -inf, the others the oracle."""
    L = 2
    b = Batch([L, L, L], [7, 0, 12], page_size=4, Hq=4, Hkv=1, D=16, seed=42)
    last = b.last.clone()
    last[1] = 1
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), use_tensor_cores=True)
    w.plan(b.dev(b.kv_indptr), b.dev(b.kv_indices), b.dev(last), 4, 1, 16, 4, q_data_type=torch.float32,
           q_len_per_req=L)
    o, lse = w.run(b.q, b.cache, return_lse=True, q_len_per_req=L)
    check_attention("q_len_per_req with padding", o, lse, *b.oracle(causal=True), torch.float32)
    assert (o[2:4] == 0).all() and torch.isneginf(lse[2:4]).all()
