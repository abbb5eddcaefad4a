"""What batch-invariant plans cost: decode and prefill planned as usual, with ``fixed_split_size``
and with ``disable_split_kv`` (spec §3), on the same pages.

    PYTHONPATH=. python scripts/fixed_split_cost.py

bf16, D=128, 32 query / 8 KV heads, page 16 (``PAGE`` in the environment, as for
``scripts/cascade_probe.py``, whose batch builder and timing rounds this script shares),
shuffled pages; CUDA-graph replays, two alternating rounds. A fixed-split plan pins its launch
(decode tiles of 64 keys, 4 warps, 2 stages; no TMA, no gathered K/V; 128-row prefill tiles), so
it gives up the shape-tuned choices of a default plan. Decode also runs two CUDA-graph-mode
wrappers planned with ``fixed_split_size=64`` on a 128 MiB workspace: one whose page-id buffer
bounds its frozen split list, and one whose buffer is too large to, so the list takes what the
workspace holds and every replay launches its idle rows. Outputs are checked against the default
plan's, and the fixed-split plans' bits against each other.
"""
from __future__ import annotations

import torch

import torch_flashops as fo
from scripts.cascade_probe import D, DT, HKV, HQ, PAGE, paged_batch, time_rounds


def i32(x):
    return torch.as_tensor(x, dtype=torch.int32, device="cuda")


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    # (a fixed split is never coarsened: the prefill case's 1024-key chunks need 580 MiB)
    ws = [torch.empty(1 << 30, dtype=torch.uint8, device="cuda") for _ in range(3)]
    plans = (("default", {}), ("fixed_split_size=64", {"fixed_split_size": 64}),
             ("disable_split_kv", {"disable_split_kv": True}))
    for B, L in ((1, 32768), (16, 512), (16, 4096), (64, 4096), (256, 4096)):
        per = L // PAGE
        cache, ids = paged_batch(g, B, L)
        q = torch.empty(B, HQ, D, dtype=DT, device="cuda").normal_(generator=g)
        runs = {}
        for (name, kw), w in zip(plans, ws):
            dw = fo.BatchDecodeWithPagedKVCacheWrapper(w)
            dw.plan(i32(range(0, B * per + 1, per)), ids, torch.full((B,), PAGE, dtype=torch.int32, device="cuda"),
                    HQ, HKV, D, PAGE, q_data_type=DT, **kw)
            runs[name] = lambda dw=dw: dw.run(q, cache)
        # CUDA-graph wrappers with a 128 MiB workspace: the frozen split list is sized by the
        # page-id buffer (here exactly the batch's pages), or, with a buffer too large to bound
        # it (1 << 24 ids), by the workspace, whose idle rows every replay launches
        for name, n_ids in (("graph fixed 64, list from page-id buffer", B * per),
                            ("graph fixed 64, list from workspace", 1 << 24)):
            idx = torch.zeros(n_ids, dtype=torch.int32, device="cuda")
            dw = fo.BatchDecodeWithPagedKVCacheWrapper(
                torch.empty(128 << 20, dtype=torch.uint8, device="cuda"), use_cuda_graph=True,
                paged_kv_indptr_buffer=torch.zeros(B + 1, dtype=torch.int32, device="cuda"),
                paged_kv_indices_buffer=idx, paged_kv_last_page_len_buffer=torch.zeros(B, dtype=torch.int32, device="cuda"))
            dw.plan(i32(range(0, B * per + 1, per)), ids, torch.full((B,), PAGE, dtype=torch.int32, device="cuda"),
                    HQ, HKV, D, PAGE, q_data_type=DT, fixed_split_size=64)
            print(f"  ({name}: {dw._t.split_work.shape[0] // 4} split rows)", flush=True)
            runs[name] = lambda dw=dw: dw.run(q, cache)
        report(f"decode B={B} L={L}", cache.numel() * cache.element_size(), None, runs)
        del cache
    B, L = 4, 4096
    per = L // PAGE
    cache, ids = paged_batch(g, B, L)
    q = torch.empty(B * L, HQ, D, dtype=DT, device="cuda").normal_(generator=g)
    ind = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    runs = {}
    for (name, kw), w in zip(plans, ws):
        pw = fo.BatchPrefillWithPagedKVCacheWrapper(w)
        pw.plan(ind * L, ind * per, ids, torch.full((B,), PAGE, dtype=torch.int32, device="cuda"), HQ, HKV, D, PAGE,
                causal=True, q_data_type=DT, **kw)
        runs[name] = lambda pw=pw: pw.run(q, cache)
    report(f"causal paged prefill B={B} L={L}", None, 4 * D * HQ * B * (L * (L + 1) // 2), runs)


def report(title, nbytes, flops, runs):
    outs = [f() for f in runs.values()]
    errs = [(o.float() - outs[0].float()).abs().max().item() for o in outs[1:]]
    fixed = [o for n, o in zip(runs, outs) if "fixed" in n]
    if len(fixed) > 1:  # one fixed split, one result, whatever the mode and launch size
        assert all(torch.equal(o, fixed[0]) for o in fixed[1:]), f"{title}: fixed-split plans differ"
    times = time_rounds(runs)
    row = [f"{title}: max |o - default| {' / '.join(f'{e:.1e}' for e in errs)}"]
    base = min(times["default"])
    for n, ts in times.items():
        t = min(ts)
        rate = f", {nbytes / t / 1e6:.0f} GB/s" if nbytes else f", {flops / t / 1e9:.0f} TFLOP/s"
        row.append(f"{n}: {' / '.join(f'{x * 1e3:.1f}' for x in ts)} us{rate}, {t / base:.2f}x default time")
    print("\n  ".join(row), flush=True)


if __name__ == "__main__":
    main()
