"""MoE layer: ``fused_moe`` (alignment included) and its phases against torch peers (issue 4).

Shapes (H, I per GPU, E, k), bf16:
  Mixtral-2GPU   4096, 7168 (14336 / TP 2),  8, 2   topk_softmax renorm
  Mixtral-1GPU   4096, 14336,                 8, 2   topk_softmax renorm
  Qwen3-4GPU     2048,  192 (  768 / TP 4), 128, 8   topk_softmax renorm
  DeepSeek-4GPU  7168,  512 ( 2048 / TP 4), 256, 8   grouped_topk sigmoid+bias, 8 groups keep 4
T from decode (1) to prefill (16384), the issue's list.

Rows per (model, T):
  case "<model> T=<T>": the whole layer from routing weights and ids to the output, impls
    torch-reference   the per-expert loop of plain PyTorch (eager; host syncs)
    torch-grouped_mm  sort pairs by expert, torch._grouped_mm for both GEMMs, silu*mul,
                      weights, unpermute and sum over k (graph-capturable)
    flashops          fused_moe (align -> GEMM1+silu_and_mul -> GEMM2 x weight -> moe_sum)
  case "<model> T=<T> | <phase>", impl flashops: routing (router logits -> weights, ids),
    align, GEMM1+act, GEMM2, finalize, each launched alone with the config fused_moe uses.
flops = 6*H*I per routed pair; bytes = weights of the experts the ids touch (3*H*I each) +
x read + out written (what decode must move). T <= 256 is timed as CUDA-graph replays (launch
gaps out) over 16 routings, so the touched experts change and come from HBM.

Set ``FLASHOPS_BENCH_MOE=Mixtral-1GPU,Qwen3-4GPU`` (names from MODELS) to run only those models,
``FLASHOPS_BENCH_MOE_T=1024,16384`` to run only those T (values from TOKENS).

``python -m benchmarks.suites.moe --tune --out DIR`` times launch configs on the device and
writes ``torch_flashops/configs/moe/*.json`` (the shipped tables) and a copy into DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

MODELS = {
    "Mixtral-2GPU": dict(H=4096, I=7168, E=8, k=2, routing="softmax"),
    "Mixtral-1GPU": dict(H=4096, I=14336, E=8, k=2, routing="softmax"),
    "Qwen3-4GPU": dict(H=2048, I=192, E=128, k=8, routing="softmax"),
    "DeepSeek-4GPU": dict(H=7168, I=512, E=256, k=8, routing="grouped"),
}
TOKENS = {m: [1, 16, 64, 256, 1024, 4096, 16384] for m in MODELS}
QUICK_MODELS = {"tiny": dict(H=64, I=32, E=8, k=2, routing="softmax")}
QUICK_TOKENS = {"tiny": [1, 40]}
DECODE_T = 256  # at or below: graph replay, TB/s over touched weights


# ------------------------------------------------------------------------------------ peers
def grouped_mm_forward(x, w1, w2, topk_weights, topk_ids):
    """The layer through torch._grouped_mm: pairs sorted by expert, two grouped GEMMs over the
    per-expert row ranges, silu*mul, routing weights, unpermute, sum over k. No host sync."""
    T, k = topk_ids.shape
    E, I, H = w1.shape[0], w2.shape[2], x.shape[1]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x.index_select(0, order // k)
    h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)
    h = F.silu(h[:, :I]) * h[:, I:]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    y = y * topk_weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    full = torch.empty_like(y)
    full[order] = y
    return full.view(T, k, H).sum(1)


def reference_forward(x, w1, w2, topk_weights, topk_ids):
    """Plain PyTorch, expert by expert (what a model without fused kernels runs)."""
    out = torch.zeros_like(x)
    I = w2.shape[2]
    for e in range(w1.shape[0]):
        t, j = (topk_ids == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        h = x[t] @ w1[e].T
        y = (F.silu(h[:, :I]) * h[:, I:]) @ w2[e].T
        out.index_add_(0, t, y * topk_weights[t, j].unsqueeze(1).to(x.dtype))
    return out


# ----------------------------------------------------------------------------------- inputs
def _route_fn(cfg):
    import torch_flashops as fo

    if not hasattr(fo, "topk_softmax"):  # routing family not installed: plain PyTorch
        def torch_route(logits, bias):
            w, ids = logits.float().softmax(-1).topk(cfg["k"], -1)
            return w / w.sum(-1, keepdim=True), ids.int()
        return torch_route
    if cfg["routing"] == "grouped":
        return lambda logits, bias: fo.grouped_topk(logits, cfg["k"], 8, 4, bias=bias, scoring_func="sigmoid",
                                                    renormalize=True, routed_scaling_factor=2.5)
    return lambda logits, bias: fo.topk_softmax(logits, cfg["k"], renormalize=True)


def make_layer(cfg, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    H, I, E = cfg["H"], cfg["I"], cfg["E"]
    w1 = (torch.randn(E, 2 * I, H, device=device, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device, generator=g) * I ** -0.5).to(dtype)
    bias = torch.randn(E, device=device, generator=g) * 0.1
    return w1, w2, bias


def make_batches(cfg, T, n, device, dtype, bias, seed=1):
    """n routings (logits -> weights, ids through the routing op) with their inputs."""
    g = torch.Generator(device=device).manual_seed(seed + T)
    route = _route_fn(cfg)
    out = []
    for _ in range(n):
        x = torch.randn(T, cfg["H"], device=device, generator=g).to(dtype)
        logits = torch.randn(T, cfg["E"], device=device, generator=g)
        tw, ids = route(logits, bias)
        out.append((x, logits, tw, ids))
    return out


def _work(cfg, batches, itemsize):
    """Mean flops and bytes per call over the batches (touched experts counted per call)."""
    H, I = cfg["H"], cfg["I"]
    flops = bytes_ = 0.0
    for x, _, _, ids in batches:
        flops += 6 * H * I * int((ids >= 0).sum())
        bytes_ += int(torch.unique(ids[ids >= 0]).numel()) * 3 * H * I * itemsize + 2 * x.numel() * itemsize
    return flops / len(batches), bytes_ / len(batches)


# -------------------------------------------------------------------------------------- run
def _selected_models():
    """MODELS, or the ones named in FLASHOPS_BENCH_MOE (comma-separated); unknown names fail."""
    names = [n.strip() for n in os.environ.get("FLASHOPS_BENCH_MOE", "").split(",") if n.strip()]
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise ValueError(f"FLASHOPS_BENCH_MOE: unknown model(s) {bad}; known: {sorted(MODELS)}")
    return {n: MODELS[n] for n in names} if names else MODELS


def _selected_tokens():
    """TOKENS, or per model only the T listed in FLASHOPS_BENCH_MOE_T (comma-separated ints,
    each one of TOKENS' values); anything else fails."""
    text = os.environ.get("FLASHOPS_BENCH_MOE_T", "").strip()
    if not text:
        return TOKENS
    try:
        want = {int(t) for t in text.split(",") if t.strip()}
    except ValueError:
        raise ValueError(f"FLASHOPS_BENCH_MOE_T: expected comma-separated integers, got {text!r}") from None
    known = set().union(*TOKENS.values())
    if not want or want - known:
        raise ValueError(f"FLASHOPS_BENCH_MOE_T: unknown T {sorted(want - known)}; known: {sorted(known)}")
    return {m: [t for t in ts if t in want] for m, ts in TOKENS.items()}


def run(ctx):
    from torch_flashops import _config
    from torch_flashops.fused_moe import fused_moe as layer_fn
    from torch_flashops.ops import moe as ops

    dev = ctx.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    record = ctx.record

    def loud_record(*a, **kw):  # rows also go to stdout as they come (a cut-off run keeps them)
        row = record(*a, **kw)
        print(f"[moe] {row.case} | {row.impl} | {row.ms * 1e3:.1f} us"
              + (f" | {row.tflops:.1f} TFLOP/s" if row.tflops else "") + (f" | {row.gbps:.0f} GB/s" if row.bytes else ""),
              flush=True)
        return row

    ctx.record = loud_record
    models, tokens = (QUICK_MODELS, QUICK_TOKENS) if ctx.quick else (_selected_models(), _selected_tokens())
    has_gmm = dev == "cuda" and hasattr(torch, "_grouped_mm")
    for name, cfg in models.items():
        w1, w2, bias = make_layer(cfg, dev, dtype)
        H, I, E, k = cfg["H"], cfg["I"], cfg["E"], cfg["k"]
        for T in ctx.progress(tokens[name], desc=f"moe {name}"):
            decode = T <= DECODE_T
            n = 16 if decode else (2 if T * H >= 2 ** 26 else 4)
            batches = make_batches(cfg, T, n, dev, dtype, bias)
            flops, nbytes = _work(cfg, batches, w1.element_size())
            layer_args = [(x, w1, w2, tw, ids) for x, _, tw, ids in batches]
            case = f"{name} T={T}"
            graph = decode and dev == "cuda"
            if not decode or ctx.quick:
                ctx.record(case, "torch-reference", ctx.time(reference_forward, layer_args), bytes=nbytes, flops=flops)
            if has_gmm:
                ctx.record(case, "torch-grouped_mm", ctx.time(grouped_mm_forward, layer_args, graph=graph),
                           bytes=nbytes, flops=flops)
            ctx.record(case, "flashops", ctx.time(layer_fn, layer_args, graph=graph), bytes=nbytes, flops=flops)
            if dev == "cuda" or _config.interpreting():  # the phases launch kernels directly
                _phases(ctx, ops, cfg, batches, w1, w2, bias, case, graph)
            del batches, layer_args
        del w1, w2
        if dev == "cuda":
            torch.cuda.empty_cache()


def _phases(ctx, ops, cfg, batches, w1, w2, bias, case, graph):
    """Each phase of fused_moe alone, with the launch config fused_moe picks for this T."""
    T, k, E, H, I = batches[0][0].shape[0], cfg["k"], cfg["E"], cfg["H"], cfg["I"]
    x0 = batches[0][0]
    mc = ops.moe_config(T, k, E, I, H, x0.dtype, x0.device)
    block_m = 16 if mc["pairs"] else mc["block_m"]
    route = _route_fn(cfg)
    ctx.record(f"{case}: routing", "flashops", ctx.time(route, [(lg, bias) for _, lg, _, _ in batches], graph=graph))
    routes = [ops._route(mc, ids, block_m, E, None) for _, _, _, ids in batches]
    if not mc["pairs"]:
        ctx.record(f"{case}: align B={block_m}", "flashops",
                   ctx.time(lambda ids: ops._route(mc, ids, block_m, E, None), [(b[3],) for b in batches], graph=graph))
    numel = T * k
    hs = [ops._intermediate(b[0], r, numel, I) for b, r in zip(batches, routes)]
    ys = [x.new_empty((numel, H)) for x, *_ in batches]
    outs = [x.new_empty((T, H)) for x, *_ in batches]

    def g1(x, h, tw, r):
        ops._gemm1(x, w1, h, mc["gemm1"], r, block_m, k, ops._flat(tw), False)

    def g2(h, y, tw, r):
        ops._gemm2(h, w2, y, mc["gemm2"], r, block_m, numel, ops._flat(tw), False)

    sets = list(zip(batches, hs, ys, outs, routes))
    f1 = 4 * H * I * numel
    tag = "pairs" if mc["pairs"] else f"B={block_m}"
    ctx.record(f"{case}: GEMM1+act {tag}", "flashops",
               ctx.time(g1, [(b[0], h, b[2], r) for b, h, _, _, r in sets], graph=graph), flops=f1)
    ctx.record(f"{case}: GEMM2 {tag}", "flashops",
               ctx.time(g2, [(h, y, b[2], r) for b, h, y, _, r in sets], graph=graph), flops=f1 / 2)
    ctx.record(f"{case}: finalize", "flashops",
               ctx.time(lambda y, o: ops._launch_moe_sum(y.view(T, k, H), o, 1.0), [(y, o) for _, _, y, o, _ in sets],
                        graph=graph), bytes=(numel + T) * H * x0.element_size())


# ------------------------------------------------------------------------------------- tune
def _compile_job(job):
    """Worker: launch every candidate once on a small problem with the real H, I, k (same
    kernel specialisations as the real shapes), so the Triton cache is warm for the timing."""
    name, cfg, T, options, dev = job
    import torch_flashops  # noqa: F401
    from torch_flashops.ops import moe as ops

    E = 4
    w1, w2, _ = make_layer(dict(cfg, E=E), dev, torch.bfloat16)
    x = torch.randn(64, cfg["H"], device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, E, (64, cfg["k"]), device=dev, dtype=torch.int32)
    tw = torch.rand(64, cfg["k"], device=dev)
    t0 = time.time()
    ops.autotune_moe_config(x, w1, w2, tw, ids, options=options, timer=lambda fn: 0.0, cache=False)
    if dev == "cuda":
        torch.cuda.synchronize()
    return name, T, time.time() - t0


def tune(out_dir, models=None, budget_s=200.0, workers=12, *, shapes=MODELS, tokens=TOKENS, timer=None,
         candidates=None, write_package=True):
    """Time candidate configs for each model and T; write the tables (package and ``out_dir``)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    import torch_flashops  # noqa: F401
    from torch_flashops.ops import moe as ops

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.time()
    models = models or list(shapes)
    order = [4096, 1, 256, 16384, 1024, 64, 16]
    plan = []
    for name in models:
        cfg = shapes[name]
        for T in sorted(tokens[name], key=lambda t: order.index(t) if t in order else len(order)):
            opts = ([(16, True)] if ops._pairs_rule(T, cfg["k"], cfg["E"]) else [])
            opts += [(b, False) for b in ops.block_m_choices(T, cfg["k"], cfg["E"])]
            plan.append((name, T, opts))
    # warm the Triton cache in parallel (one job per distinct (model, options))
    jobs, seen = [], set()
    for name, T, opts in plan:
        key = (name, tuple(opts))
        if key not in seen and dev == "cuda":
            seen.add(key)
            jobs.append((name, shapes[name], T, opts, dev))
    if jobs:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for name, T, secs in pool.map(_compile_job, jobs):
                print(f"[tune] compiled {name} T={T} candidates in {secs:.1f} s", flush=True)
    print(f"[tune] warm-up done at {time.time() - t_start:.0f} s", flush=True)
    tables = {name: {} for name in models}
    dev_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    for name in models:
        cfg = shapes[name]
        w1, w2, bias = make_layer(cfg, dev, torch.bfloat16)
        for pname, T, opts in plan:
            if pname != name:
                continue
            if time.time() - t_start > budget_s:
                print(f"[tune] budget spent: {name} T={T} not tuned", flush=True)
                continue
            x, _, tw, ids = make_batches(cfg, T, 1, dev, torch.bfloat16, bias)[0]
            best = ops.autotune_moe_config(x, w1, w2, tw, ids, options=opts, cache=False, timer=timer,
                                           candidates=candidates)
            tables[name][T] = best
            print(f"[tune] {name} T={T}: {json.dumps(best)}", flush=True)
        del w1, w2
        if dev == "cuda":
            torch.cuda.empty_cache()
        if tables[name]:
            fname = ops.config_file_name(cfg["E"], cfg["I"], cfg["H"], dev_name, torch.bfloat16)
            old = ops._load_table(fname) if write_package else None  # keep entries not re-tuned now
            merged = {**(old or {}), **tables[name]}
            data = {str(t): merged[t] for t in sorted(merged)}
            for d in (ops.CONFIG_DIR, out_dir) if write_package else (out_dir,):
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, fname), "w") as f:
                    json.dump(data, f, indent=1)
            ops._load_table.cache_clear()
    print(f"[tune] done in {time.time() - t_start:.0f} s", flush=True)
    return tables


def diagnose(points=(("Qwen3-4GPU", 4096), ("Qwen3-4GPU", 1024), ("Mixtral-2GPU", 4096), ("DeepSeek-4GPU", 4096),
                      ("DeepSeek-4GPU", 16384)), profile=("Qwen3-4GPU", 4096)):
    """Host cost vs device time of fused_moe at the headline shapes: eager (do_bench) and
    CUDA-graph replay, TFLOP/s, torch._grouped_mm forward for the ratio, host microseconds per
    call, and for one shape the top host functions (cProfile)."""
    import cProfile
    import pstats

    import triton

    from torch_flashops.fused_moe import fused_moe as layer_fn

    for name, T in points:
        cfg = MODELS[name]
        w1, w2, bias = make_layer(cfg, "cuda", torch.bfloat16)
        x, _, tw, ids = make_batches(cfg, T, 1, "cuda", torch.bfloat16, bias)[0]
        flops = 6 * cfg["H"] * cfg["I"] * ids.numel()

        def call():
            return layer_fn(x, w1, w2, tw, ids)

        call()
        eager = triton.testing.do_bench(call, warmup=10, rep=100, return_mode="median")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        graph = triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median")
        gmm = triton.testing.do_bench(lambda: grouped_mm_forward(x, w1, w2, tw, ids), warmup=10, rep=100,
                                      return_mode="median")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            call()
        host = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
        print(f"[diag] {name} T={T}: eager {eager * 1e3:.1f} us = {flops / eager / 1e9:.0f} TFLOP/s, graph "
              f"{graph * 1e3:.1f} us = {flops / graph / 1e9:.0f} TFLOP/s, grouped_mm {gmm * 1e3:.1f} us "
              f"(x{gmm / eager:.2f}), host {host * 1e3:.1f} us/call", flush=True)
        if (name, T) == profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(20):
                call()
            pr.disable()
            torch.cuda.synchronize()
            pstats.Stats(pr).sort_stats("tottime").print_stats(14)
        del w1, w2, g
        torch.cuda.empty_cache()


def sum_sweep(shapes=((4096, 8, 2048), (4096, 8, 7168), (4096, 2, 4096), (16384, 8, 7168)),
              configs=((1, 1024, 4), (1, 2048, 8), (2, 1024, 8), (2, 512, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4),
                       (1, 512, 4), (1, 256, 2))):
    """moe_sum tile configs (BLOCK_T, BLOCK_H, warps) on [T, k, H] bf16: GB/s of read + write
    against the device copy rate of the same bytes."""
    import triton

    from torch_flashops.ops import moe as ops

    for T, k, H in shapes:
        x = torch.randn(T, k, H, device="cuda", dtype=torch.bfloat16)
        want = x.float().sum(1).to(torch.bfloat16)
        nbytes = x.numel() * 2 + T * H * 2
        src = torch.empty(nbytes // 4, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        cp = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
        row = [f"[sum] T={T} k={k} H={H}: copy of the same bytes {cp * 1e3:.1f} us"]
        default = ops.moe_sum_config
        for cfg in configs:
            ops.moe_sum_config = lambda *a, cfg=cfg: cfg
            out = torch.full((T, H), float("nan"), device="cuda", dtype=torch.bfloat16)
            try:
                ops._launch_moe_sum(x, out, 1.0)
                err = (out.float() - want.float()).abs().max().item()
                ms = triton.testing.do_bench(lambda: ops._launch_moe_sum(x, out, 1.0), warmup=10, rep=50,
                                             return_mode="median")
                row.append(f"{cfg}: {ms * 1e3:.1f} us {nbytes / ms / 1e6:.0f} GB/s err {err:.1e}")
            except Exception as e:  # noqa: BLE001
                row.append(f"{cfg}: failed {type(e).__name__}")
        ops.moe_sum_config = default
        print("\n  ".join(row), flush=True)
        del x, want, src, dst


def sweep(points=(("Qwen3-4GPU", 4096), ("Mixtral-2GPU", 4096))):
    """Whole-layer sweep: the shipped config with one GEMM's tiles swapped for each candidate,
    timed as CUDA-graph replays of ``fused_moe`` (what a captured model runs), then the best
    GEMM1 and GEMM2 together. Prints JSON of the winner; tables are not written."""
    import triton

    from torch_flashops.fused_moe import fused_moe as layer_fn
    from torch_flashops.ops import moe as ops

    for name, T in points:
        cfg = MODELS[name]
        H, I, E, k = cfg["H"], cfg["I"], cfg["E"], cfg["k"]
        w1, w2, bias = make_layer(cfg, "cuda", torch.bfloat16)
        x, _, tw, ids = make_batches(cfg, T, 1, "cuda", torch.bfloat16, bias)[0]
        flops = 6 * H * I * ids.numel()
        base = ops.moe_config(T, k, E, I, H, torch.bfloat16, x.device)
        key = (E, I, H, k, torch.bfloat16, ops._pow2(T))
        want = layer_fn(x, w1, w2, tw, ids)

        def timed(c):
            ops._TUNED[key] = c
            try:
                out = layer_fn(x, w1, w2, tw, ids)
                err = (out.float() - want.float()).abs().max().item()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    layer_fn(x, w1, w2, tw, ids)
                ms = triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median")
                return ms, err
            except Exception as e:  # noqa: BLE001 - a tile that does not fit: skip it
                return float("inf"), type(e).__name__
            finally:
                ops._TUNED.pop(key, None)

        t0, _ = timed(base)
        print(f"[sweep] {name} T={T} shipped: {t0 * 1e3:.1f} us = {flops / t0 / 1e9:.0f} TFLOP/s", flush=True)
        best = {}
        for which in ("gemm1", "gemm2"):
            cands = ops.gemm_candidates(base["block_m"], which == "gemm1")
            if which == "gemm1":
                cands += [{**c, "sort_x": True} for c in cands]
            res = []
            for c in cands:
                ms, err = timed({**base, which: c})
                res.append((ms, c))
                print(f"[sweep]   {which} {json.dumps(c)}: {ms * 1e3:.1f} us err {err}", flush=True)
            best[which] = min(res, key=lambda r: r[0])
        both = {**base, "gemm1": best["gemm1"][1], "gemm2": best["gemm2"][1]}
        t1, err = timed(both)
        print(f"[sweep] {name} T={T} best pair: {t1 * 1e3:.1f} us = {flops / t1 / 1e9:.0f} TFLOP/s (shipped "
              f"{t0 * 1e3:.1f}), err {err}: {json.dumps(both)}", flush=True)
        del w1, w2
        torch.cuda.empty_cache()


def _parse_points(text):
    """``"Qwen3-4GPU:1,DeepSeek-4GPU:16"`` -> ``(("Qwen3-4GPU", 1), ("DeepSeek-4GPU", 16))``."""
    points = []
    for item in text.split(","):
        name, _, t = item.strip().rpartition(":")
        if name not in MODELS or not t.isdigit() or int(t) < 1:
            raise SystemExit(f"--points: {item!r} is not MODEL:T with MODEL in {sorted(MODELS)} and T >= 1")
        points.append((name, int(t)))
    return tuple(points)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tune", action="store_true", help="time launch configs, write configs/moe tables")
    p.add_argument("--out", default="bench_out", help="folder for a copy of the tables")
    p.add_argument("--models", nargs="*", default=None, choices=list(MODELS))
    p.add_argument("--budget", type=float, default=200.0, help="seconds of tuning before stopping")
    p.add_argument("--min-tokens", type=int, default=0, help="tune only token counts at or above this")
    p.add_argument("--diagnose", action="store_true", help="host cost vs device time of fused_moe")
    p.add_argument("--sum", action="store_true", help="moe_sum tile configs")
    p.add_argument("--sweep", action="store_true", help="whole-layer GEMM tile sweep (CUDA-graph replays)")
    p.add_argument("--points", default=None,
                   help="sweep points as MODEL:T[,MODEL:T...] (default: Qwen3-4GPU:4096,Mixtral-2GPU:4096)")
    a = p.parse_args(argv)
    if a.tune:
        tokens = {m: [t for t in ts if t >= a.min_tokens] for m, ts in TOKENS.items()}
        tune(a.out, a.models, a.budget, tokens=tokens)
    if a.sum:
        sum_sweep()
    if a.sweep:
        sweep(_parse_points(a.points)) if a.points else sweep()
    if a.diagnose:
        diagnose()


if __name__ == "__main__":
    main()
