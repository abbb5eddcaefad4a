"""Host cost of the ways plan() can move its small int32 arrays to the GPU (a probe for packing
plan()'s host-to-device copies; CUDA only).

    python scripts/h2d_cost.py [--rounds 7] [--calls 30] [--busy]

Six host arrays of the sizes a decode plan of B=64 x 4096 keys makes (three work lists, two
indptrs, the lengths) go to six separate device tensors, four ways:

- ``each``: a pinned staging block, a device tensor and one asynchronous copy per array (how
  plan() copied before ``_attention_plan.Upload``; ``PACKED_UPLOADS = False``);
- ``one pinned``: one pinned block for all six, then one device tensor and one asynchronous copy
  per array;
- ``one copy + foreach``: one pinned block, one device block, one asynchronous copy, then
  ``torch._foreach_copy_`` from the device block's slices into six fresh tensors (one kernel;
  what ``Upload`` does);
- ``one copy, views``: one pinned block and one copy, the arrays as views of the device block (the
  floor; dynamo guards views of one base, so plan() cannot hand these out as they are).

Times are the best round's mean per call in microseconds; ``--busy`` queues a spinning kernel
before each round, as a serving step's kernels would be queued while the next plan() runs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

SIZES = (4 * 520, 4 * 260, 3 * 70, 65, 65, 64)  # work, split_work, merge, qo_indptr, kv_indptr, kv_lens


def _host_arrays():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 1 << 20, n).astype(np.int32) for n in SIZES]


def each(arrs, dev):
    outs = []
    for a in arrs:
        staged = torch.empty(a.shape, dtype=torch.int32, pin_memory=True)
        staged.numpy()[:] = a
        out = torch.empty(a.shape, dtype=torch.int32, device=dev)
        out.copy_(staged, non_blocking=True)
        outs.append(out)
    return outs


def _pinned(arrs):
    total = sum(a.size for a in arrs)
    staged = torch.empty(total, dtype=torch.int32, pin_memory=True)
    host = staged.numpy()
    off = 0
    for a in arrs:
        host[off:off + a.size] = a
        off += a.size
    return staged


def one_pinned(arrs, dev):
    staged = _pinned(arrs)
    outs, off = [], 0
    for a in arrs:
        out = torch.empty(a.shape, dtype=torch.int32, device=dev)
        out.copy_(staged[off:off + a.size], non_blocking=True)
        outs.append(out)
        off += a.size
    return outs


def one_copy_foreach(arrs, dev):
    staged = _pinned(arrs)
    block = torch.empty(staged.shape, dtype=torch.int32, device=dev)
    block.copy_(staged, non_blocking=True)
    outs = [torch.empty(a.shape, dtype=torch.int32, device=dev) for a in arrs]
    torch._foreach_copy_(outs, list(block.split([a.size for a in arrs])))
    return outs


def one_copy_views(arrs, dev):
    staged = _pinned(arrs)
    block = torch.empty(staged.shape, dtype=torch.int32, device=dev)
    block.copy_(staged, non_blocking=True)
    return list(block.split([a.size for a in arrs]))


WAYS = {"each": each, "one pinned": one_pinned, "one copy + foreach": one_copy_foreach,
        "one copy, views": one_copy_views}


def best_us(fn, rounds, calls, busy):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        if busy:
            torch.cuda._sleep(2 ** 28)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
        torch.cuda.synchronize()
    return best * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--busy", action="store_true")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (pinned host memory and host-to-device copies are what it times)")
    dev = torch.device("cuda")
    arrs = _host_arrays()
    ref = [torch.from_numpy(x).to(dev) for x in arrs]
    for name, way in WAYS.items():  # each way delivers the same arrays
        got = way(arrs, dev)
        torch.cuda.synchronize()
        assert all(torch.equal(g, r) for g, r in zip(got, ref)), name
    print(f"host cost of moving {len(SIZES)} int32 arrays ({sum(SIZES)} entries) to {torch.cuda.get_device_name()}"
          f"{' while the GPU is busy' if a.busy else ''}, torch {torch.__version__}, best of {a.rounds} x {a.calls}")
    parts = {
        "torch.empty pinned": lambda: torch.empty(SIZES[0], dtype=torch.int32, pin_memory=True),
        "torch.empty cuda": lambda: torch.empty(SIZES[0], dtype=torch.int32, device=dev),
    }
    staged = _pinned(arrs)
    dst = torch.empty(staged.shape, dtype=torch.int32, device=dev)
    parts["copy_ pinned->cuda non_blocking"] = lambda: dst.copy_(staged, non_blocking=True)
    for name, fn in list(WAYS.items()):
        print(f"{name}: {best_us(lambda: fn(arrs, dev), a.rounds, a.calls, a.busy):.1f} us")
    for name, fn in parts.items():
        print(f"  ({name}: {best_us(fn, a.rounds, a.calls, a.busy):.1f} us)")


if __name__ == "__main__":
    main()
