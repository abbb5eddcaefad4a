"""The main job: serve a batch of variable-length prompts with a small compiled Llama-style model
on torch_flashops ops, and check it against the same model in plain PyTorch.

    python -m torch_flashops [demo] [--layers 4] [--batch 4] [--steps 16] [--moe] [--device cuda]

Prefill runs through ``BatchPrefillWithPagedKVCacheWrapper`` (causal, append-before-attention),
decode through ``BatchDecodeWithPagedKVCacheWrapper``; every step appends K/V with
``append_paged_kv_cache`` into paged caches held as module buffers, rotates q/k in place with
``apply_rope_pos_ids_inplace``, and (``--moe``) routes with ``topk_softmax`` into ``fused_moe``.
The step is one ``torch.compile(fullgraph=True, dynamic=True)`` graph (``mode="reduce-overhead"``
on CUDA: CUDA graphs). Every step's logits are compared with ``DenseLlama`` (SDPA over dense
per-request K/V), fed the same tokens.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo

from .models.llama import (
    DenseLlama,
    LlamaConfig,
    LlamaWeights,
    PagedLlama,
    PageTable,
    check_sizes,
    make_wrappers,
    plan_step,
    step_args,
)


def _progress(it, desc):
    try:
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)
    except ImportError:
        return it


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _count(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def check_device(device: str) -> str:
    """``device`` if this machine has it, else ``SystemExit`` with what to pass instead."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"--device {device}: only cpu and cuda are supported")
    return device


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=_positive, default=4)
    g.add_argument("--hidden", type=_positive, default=256)
    g.add_argument("--heads", type=_positive, default=8)
    g.add_argument("--kv-heads", type=_positive, default=2)
    g.add_argument("--head-dim", type=_positive, default=32)
    g.add_argument("--intermediate", type=_positive, default=512)
    g.add_argument("--vocab", type=_positive, default=512)
    g.add_argument("--moe", action="store_true", help="MoE MLP (topk_softmax + fused_moe) instead of dense")
    g.add_argument("--experts", type=_positive, default=8)
    g.add_argument("--top-k", type=_positive, default=2)
    g = p.add_argument_group("serving")
    g.add_argument("--batch", type=_positive, default=4, help="number of requests")
    g.add_argument("--min-prompt", type=_positive, default=3)
    g.add_argument("--max-prompt", type=_positive, default=40)
    g.add_argument("--steps", type=_count, default=16, help="decode steps")
    g.add_argument("--page-size", type=_positive, default=16)
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--no-compile", action="store_true", help="run the step eagerly")
    g.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tol", type=float, default=None, help="max relative logit error (default per dtype)")
    g.add_argument("--compare", action="store_true",
                   help="after the run, time one decode step: eager vs compiled, and a compiled SDPA static-cache peer")


def run(a) -> dict:
    """Serve one batch with the demo model (arguments from ``add_args``); returns the summary
    printed at the end (errors, graph counts, timings, generated tokens)."""
    # Sizes of plan/page-table tensors coincide now and then (e.g. the work list and the page
    # list both 8 long); dynamo's duck sizing would then guard on that equality and recompile
    # when it breaks. Independent symbols for independent sizes, for this run only:
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=False):
        return _run(a)


def _run(a) -> dict:
    device = check_device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.min_prompt > a.max_prompt:
        raise SystemExit(f"--min-prompt {a.min_prompt} is larger than --max-prompt {a.max_prompt}")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                      num_kv_heads=a.kv_heads, head_dim=a.head_dim, intermediate_size=a.intermediate,
                      num_experts=a.experts if a.moe else 0, top_k=a.top_k)
    g = torch.Generator().manual_seed(a.seed)
    lens = torch.randint(a.min_prompt, a.max_prompt + 1, (a.batch,), generator=g).tolist()
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).to(device) for n in lens]

    weights = LlamaWeights(cfg, dtype=dtype, device=device, seed=a.seed)
    num_pages = check_sizes(cfg, lens, a.steps, a.page_size)
    model = PagedLlama(weights, num_pages, a.page_size).eval()
    ref = DenseLlama(weights)
    table = PageTable(num_pages, a.page_size, device)
    prefill_w, decode_w = make_wrappers(device)

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    mode = a.mode if a.mode is not None else ("reduce-overhead" if device == "cuda" else None)
    step = model if a.no_compile else torch.compile(model, fullgraph=True, dynamic=True, mode=mode)
    tol = a.tol if a.tol is not None else {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    kind = f"MoE ({cfg.num_experts} experts, top-{cfg.top_k})" if cfg.num_experts else "dense MLP"
    print(f"torch_flashops demo: {cfg.num_layers}-layer Llama-style model, {kind}, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_dim}, {device} {str(dtype).replace('torch.', '')}, "
          f"{'eager' if a.no_compile else f'torch.compile(fullgraph=True, dynamic=True, mode={mode})'}")
    print(f"batch of {a.batch} prompts, lengths {lens}; page size {a.page_size}; {num_pages} pages")

    max_rel = 0.0

    def compare(logits, rows_per_req, ref_tokens):
        nonlocal max_rel
        start = 0
        for rid, n in enumerate(rows_per_req):
            want = ref.step(rid, ref_tokens[rid])
            got = logits[start:start + n]
            err = (got.float() - want.float()).abs().max().item()
            scale = want.float().abs().max().item() or 1.0
            max_rel = max(max_rel, err / scale)
            start += n

    with torch.no_grad():
        rids = [table.add_request() for _ in lens]
        t = table.csr(rids, lens)
        plan_step(prefill_w, t, cfg, a.page_size, dtype, decode=False)
        if not a.no_compile:
            print("compiling the prefill step (the decode step compiles on its first call) ...", flush=True)
        t0 = time.perf_counter()
        logits = step(torch.cat(prompts), *step_args(t), prefill_w)
        if device == "cuda":
            torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        compare(logits, lens, prompts)
        last = torch.tensor(lens, device=device).cumsum(0) - 1
        tokens = logits[last].argmax(-1)

        step_s, generated = [], [tokens]
        for _ in _progress(range(a.steps), "decode"):
            t = table.csr(rids, [1] * a.batch)
            plan_step(decode_w, t, cfg, a.page_size, dtype, decode=True)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = step(tokens, *step_args(t), decode_w)
            if device == "cuda":
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t0)
            compare(logits, [1] * a.batch, [tok.view(1) for tok in tokens])
            tokens = logits.argmax(-1)
            generated.append(tokens)
        decode_s = sum(step_s)

    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    skips = counters["inductor"].get("cudagraph_skips", 0)
    expected = 2 if a.steps else 1  # prefill + decode graphs
    res = dict(
        device=device, dtype=str(dtype), max_rel_err=max_rel, tol=tol, ok=max_rel <= tol,
        graph_breaks=breaks, graphs=graphs, recompiles=max(0, graphs - expected) if not a.no_compile else 0,
        cudagraph_skips=skips, prefill_s=prefill_s, decode_s=decode_s,
        decode_tok_s=a.batch * a.steps / decode_s if decode_s else float("nan"),
        generated=torch.stack(generated, 1).tolist(),
    )
    compiling = "" if a.no_compile else " (incl. compile)"
    line = f"prefill{compiling} {prefill_s:.2f} s"
    if a.steps:
        first = "" if a.no_compile else " (incl. the first step's compile)"
        line += (f"; decode {a.steps} steps x {a.batch} requests in {decode_s:.2f} s = {res['decode_tok_s']:.1f} "
                 f"tokens/s{first}")
        if not a.no_compile and a.steps > 1:  # the compiled steady state, without the first step
            res["decode_steady_tok_s"] = a.batch * (a.steps - 1) / sum(step_s[1:])
            line += f", {res['decode_steady_tok_s']:.1f} tokens/s after it"
    print(line)
    print(f"max relative logit error vs plain PyTorch (SDPA, dense KV): {max_rel:.2e} (tol {tol:.0e}) -> "
          f"{'OK' if res['ok'] else 'MISMATCH'}")
    if a.no_compile:
        print("eager run (--no-compile): nothing compiled")
    else:
        print(f"graph breaks: {breaks}; compiled graphs: {graphs} ({'prefill + decode' if a.steps else 'prefill'} = "
              f"{expected} expected); recompiles: {res['recompiles']}; cudagraph skips: {skips}")
    print("first request's tokens:", res["generated"][0])
    if a.compare:
        res.update(_compare(a, model, step, weights, cfg, decode_w, t, tokens, device, dtype, mode))
    return res


def _time_steps(fn, device, iters=20):
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def _compare(a, model, step, weights, cfg, decode_w, t, tokens, device, dtype, mode) -> dict:
    """Per-step decode latency: eager flashops, compiled flashops, compiled SDPA static cache."""
    from .models.llama import StaticCacheLlama

    B = a.batch
    args = (tokens, *step_args(t), decode_w)
    with torch.no_grad():
        eager = _time_steps(lambda: model(*args), device)
        compiled = _time_steps(lambda: step(*args), device)
        out = dict(eager_step_s=eager, compiled_step_s=compiled)
        line = (f"decode step (batch {B}): eager {eager * 1e3:.2f} ms, compiled ({mode or 'default mode'}) "
                f"{compiled * 1e3:.2f} ms "
                f"-> {eager / compiled:.1f}x; {B / compiled:.0f} tokens/s")
        if not cfg.num_experts:
            max_len = a.max_prompt + a.steps + 8
            peer = StaticCacheLlama(weights, B, max_len).eval()
            peer_c = torch.compile(peer, fullgraph=True, mode=mode)
            pos = t["positions"].long().clamp(max=max_len - 1)  # decode: one position per request
            ps = _time_steps(lambda: peer_c(tokens, pos), device)
            out["sdpa_static_step_s"] = ps
            line += f"; SDPA over dense static KV, compiled: {ps * 1e3:.2f} ms = {B / ps:.0f} tokens/s"
    if device == "cpu":
        line += ("\n(CPU: the ops run their plain-PyTorch reference, or the Triton interpreter; these timings say "
                 "nothing about GPU speed)")
    print(line)
    return out



def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m torch_flashops demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="other command: python -m torch_flashops check [--device cpu|cuda] runs every "
                                       "op's self-check against its plain-PyTorch oracle")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_args(p)
    res = run(p.parse_args(argv))
    return 0 if res["ok"] and res["graph_breaks"] == 0 and res["recompiles"] == 0 else 1
