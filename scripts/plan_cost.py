"""Host time of the attention wrappers' plan(), the once-per-step cost an engine pays on the CPU.

    python scripts/plan_cost.py [--device cpu|cuda] [--rounds 7] [--calls 30]

Each case plans the same page table repeatedly (random page ids, page 16, 32/8 heads, D=128);
the time is the best round's mean per call, in microseconds. The page table is passed as vLLM
passes it: indptrs and last-page lengths on the host, the page ids on the device, so with
``--device cuda`` the time includes plan()'s host-to-device copies. ``--busy`` (CUDA) keeps the GPU busy with a
spinning kernel through each round, as a serving step's kernels would be, so a plan() that waits
for the GPU (a blocking copy synchronises the stream) shows the wait. ``--profile`` prints a
cProfile table of one case instead. ``--ab`` times each case with plan()'s host arrays sent in
one packed transfer (the default, ``_attention_plan.Upload``) and one transfer per array
(``PACKED_UPLOADS = False``, how plan() copied before), alternating within each round.
"""
from __future__ import annotations

import argparse
import time

import torch

import torch_flashops as fi
from torch_flashops import _attention_plan as P

CASES = [(1, 32768), (16, 512), (64, 4096), (256, 2048), (1024, 1024)]
PAGE, HQ, HKV, D = 16, 32, 8, 128


def inputs(B, L, device):
    npg = -(-L // PAGE)
    g = torch.Generator().manual_seed(0)
    indptr = torch.arange(B + 1, dtype=torch.int32) * npg
    indices = torch.randperm(B * npg, generator=g).int().to(device)
    last = torch.full((B,), L - (npg - 1) * PAGE, dtype=torch.int32)
    qo = torch.arange(B + 1, dtype=torch.int32)
    return indptr, indices, last, qo


def planners(B, L, device, non_blocking=True):
    indptr, indices, last, qo = inputs(B, L, device)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    dec = fi.BatchDecodeWithPagedKVCacheWrapper(ws)
    pre = fi.BatchPrefillWithPagedKVCacheWrapper(ws)
    nb = dict(q_data_type=torch.bfloat16, non_blocking=non_blocking)
    return {
        "decode": lambda: dec.plan(indptr, indices, last, HQ, HKV, D, PAGE, **nb),
        "prefill (1 row each)": lambda: pre.plan(qo, indptr, indices, last, HQ, HKV, D, PAGE, causal=True, **nb),
    }


def best_us(fn, rounds, calls, busy=False, modes=(None,)):
    """Best round's mean per call (us) of ``fn``, one entry per upload mode in ``modes`` (None:
    as configured; True/False: ``PACKED_UPLOADS``), the modes alternating within each round."""
    saved = P.PACKED_UPLOADS
    best = {m: float("inf") for m in modes}
    try:
        for m in modes:
            P.PACKED_UPLOADS = saved if m is None else m
            for _ in range(3):
                fn()
        for _ in range(rounds):
            for m in modes:
                P.PACKED_UPLOADS = saved if m is None else m
                if busy:
                    torch.cuda.synchronize()
                    torch.cuda._sleep(2 ** 30)  # ~0.5 s of one spinning thread: longer than a round of plans
                t = time.perf_counter()
                for _ in range(calls):
                    fn()
                best[m] = min(best[m], (time.perf_counter() - t) / calls)
    finally:
        P.PACKED_UPLOADS = saved
    if busy:
        torch.cuda.synchronize()
    return [best[m] * 1e6 for m in modes]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="cProfile the decode plan of B=64 L=4096")
    ap.add_argument("--busy", action="store_true", help="CUDA: time plan() while a kernel keeps the GPU busy")
    ap.add_argument("--blocking", action="store_true",
                    help="plan(non_blocking=False): blocking host-to-device copies (how every plan() copied before)")
    ap.add_argument("--ab", action="store_true",
                    help="time packed uploads (default) against one transfer per array, alternating")
    a = ap.parse_args(argv)
    if a.profile:
        import cProfile
        import pstats

        fn = planners(64, 4096, a.device)["decode"]
        fn()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.calls):
            fn()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)
        return
    if a.busy and not a.device.startswith("cuda"):
        ap.error("--busy needs --device cuda")
    busy = (" while the GPU is busy" if a.busy else "") + (", blocking copies" if a.blocking else "")
    print(f"plan() host time{busy}, device {a.device}, torch {torch.__version__}, best of {a.rounds} rounds x "
          f"{a.calls} calls")
    modes = (True, False) if a.ab else (None,)
    kinds = list(planners(1, 16, a.device))
    if a.ab:
        kinds = [f"{k}, {m}" for k in kinds for m in ("packed", "per array")]
    print("| B | kv_len | " + " | ".join(kinds) + " |")
    print("|---:|---:|" + "---:|" * len(kinds))
    for B, L in CASES:
        times = [t for fn in planners(B, L, a.device, not a.blocking).values()
                 for t in best_us(fn, a.rounds, a.calls, a.busy, modes)]
        print(f"| {B} | {L} | " + " | ".join(f"{t:.0f} us" for t in times) + " |")


if __name__ == "__main__":
    main()
