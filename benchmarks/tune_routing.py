"""Launch-config sweep for the routing kernels (topk_softmax / topk_sigmoid / grouped_topk), one
device call: for each model shape and token count, every (tokens per program, warps) candidate
is checked against the plain-PyTorch oracle (sorted weights, as the routing suite does) and
timed by CUDA-graph replay; "default" is ``ops.moe_routing._routing_config`` unpatched.

    PYTHONPATH=. python -m benchmarks.tune_routing [model ...]
"""
from __future__ import annotations

import sys
from unittest import mock

import torch

import torch_flashops as fo
from benchmarks.harness import time_fn
from benchmarks.suites.moe_routing import MODELS, _check_routing, _routing_fns
from torch_flashops.ops import moe_routing as R

TOKENS = (1, 7, 256, 4097, 16384)
# (name, BLOCK_T, num_warps); None: the heuristic
CANDIDATES = [("default", None, None), ("before 2026-12-04: 4096/lanes tokens, 4 warps", "old", None),
              ("bt=1 w=1", 1, 1), ("bt=2 w=1", 2, 1), ("bt=8 w=1", 8, 1), ("bt=4 w=2", 4, 2), ("bt=16 w=4", 16, 4)]


def main(argv):
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for name in argv or ["deepseek-v3", "qwen3-30b-a3b", "kimi-k2", "deepseek-v2", "mixtral-8x7b"]:
        E, k, kind, kw = MODELS[name]
        bias = torch.randn(E, device="cuda") * 0.1 if kw.get("bias") else None
        peer, ours = _routing_fns(fo, kind, k, kw, bias)
        for T in TOKENS:
            sets = [(torch.randn(T, E, device="cuda", dtype=torch.bfloat16),) for _ in range(4)]
            want = peer(sets[0][0])
            row = [f"{name} T={T}"]
            for label, bt, nw in CANDIDATES:
                if bt is None:
                    patch = mock.patch.object(R, "_routing_config", R._routing_config)
                elif bt == "old":
                    patch = mock.patch.object(R, "_routing_config", R.packed_routing_config)
                else:
                    fixed = dict(BLOCK_T=bt, num_warps=nw)
                    patch = mock.patch.object(R, "_routing_config", lambda lanes, _c=fixed: _c)
                with patch:
                    _check_routing(f"{name} T={T} {label}", ours(sets[0][0]), want)
                    ms = time_fn(ours, sets, device="cuda", graph=True)
                row.append(f"{label}: {ms * 1e3:.1f} us")
            print("\n  ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
