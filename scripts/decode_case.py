"""Run one paged decode call a few times (for Nsight Compute / nsys on the GPU machine).

    ncu --kernel-name regex:_attn_fwd --launch-skip 3 --launch-count 1 --section WarpStateStats \
        python scripts/decode_case.py B L HQ HKV

Builds the same random page table as the attention benchmark (page 16, bf16, D=128)."""
from __future__ import annotations

import sys

import torch

import torch_flashops as fo
from benchmarks.suites.attention import _Paged


def main(argv):
    B, L, Hq, Hkv = (int(a) for a in argv[:4])
    g = torch.Generator(device="cuda").manual_seed(0)
    d = _Paged(B, L, Hq, Hkv, 128, 16, torch.bfloat16, "cuda", g, 1, dense=False)
    w = fo.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(d.indptr, d.indices, d.last, Hq, Hkv, 128, 16, q_data_type=torch.bfloat16)
    q, cache = d.sets[0][0], d.sets[0][1]
    for _ in range(6):
        w.run(q, cache)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1:])
