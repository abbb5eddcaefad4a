"""A/B of grouped-GEMM variants on whole fused_moe layers, alternating in one process (CUDA-graph
replays of one routing per point): the shipped configs, half-tail blocks
(``ops.HALF_TAIL_MIN_BLOCK_M``), and the persistent GEMM ("persistent" config key; GEMM2 only,
or both, GEMM1 gathering x rows or reading them sorted). Outputs compared with the shipped path's; the
torch._grouped_mm forward of the same inputs timed once per point for the ratio.

    PYTHONPATH=. python scripts/ab_gemm_modes.py [--rounds 2] [--points Qwen3-4GPU:4096,...] [--modes base,half]
"""
import argparse
import re
import time

import torch

from benchmarks.harness import time_fn
from benchmarks.suites.moe import MODELS, grouped_mm_forward, make_batches, make_layer
from torch_flashops.fused_moe import fused_moe
from torch_flashops.ops import moe as ops

POINTS = ("Qwen3-4GPU:4096,Qwen3-4GPU:1024,Mixtral-2GPU:1024,Mixtral-2GPU:4096,DeepSeek-4GPU:4096,"
          "DeepSeek-4GPU:16384")


def _pers(g, **extra):
    return {**g, "tma": True, "persistent": True, **extra}


def _legacy(c):  # the thirteenth session's path: no persistent GEMM (half tails off below)
    return {**c, "gemm1": {k: v for k, v in c["gemm1"].items() if k != "persistent"},
            "gemm2": {k: v for k, v in c["gemm2"].items() if k != "persistent"}}


def _bm64(c):  # BLOCK_M 64 with 64x(2x128) GEMM1 and 64x256 GEMM2 TMA tiles (big-N layers)
    return {**c, "block_m": 64, "gemm1": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                                          "num_stages": 4, "tma": True},
            "gemm2": {"BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4, "tma": True}}


MODES = {  # name -> (config transform, HALF_TAIL_MIN_BLOCK_M; None: as shipped)
    "shipped": (lambda c: c, None),
    "legacy": (_legacy, 1 << 30),
    "bm64-half": (_bm64, 64),
    "g2-bn128": (lambda c: {**c, "gemm2": {**c["gemm2"], "BLOCK_N": 128}}, None),
    "base": (lambda c: c, 1 << 30),
    "half": (lambda c: c, 64),
    "pers2": (lambda c: {**c, "gemm2": _pers(c["gemm2"])}, 1 << 30),
    "pers2-noflat": (lambda c: {**c, "gemm2": _pers(c["gemm2"], flatten=False)}, 1 << 30),
    "pers12": (lambda c: {**c, "gemm1": _pers(c["gemm1"]), "gemm2": _pers(c["gemm2"])}, 1 << 30),
    "pers12-sortx": (lambda c: {**c, "gemm1": _pers(c["gemm1"], sort_x=True), "gemm2": _pers(c["gemm2"])}, 1 << 30),
    "pers2+half1": (lambda c: {**c, "gemm2": _pers(c["gemm2"])}, 64),
}
DEFAULT_MODES = "base,half,pers2,pers12,pers2+half1"
_KEYS = {"BN": "BLOCK_N", "BK": "BLOCK_K", "G": "GROUP_M", "W": "num_warps", "S": "num_stages", "P": "progs_per_sm",
         "TS": "tail_split", "OD": "one_dot"}


def _spec_mode(spec):
    """A mode written inline: ``p2/BN128/BK64/S4/P2`` makes GEMM2 persistent (TMA) with those
    overrides (BN, BK, G = GROUP_M, W = warps, S = stages, P = programs per SM, TS = tail_split,
    OD = one_dot, NF = no flatten); ``p1/...`` the same for GEMM1; ``t2/...`` / ``t1/...`` keep the block GEMM
    but take TMA and the overrides; ``b2/...`` / ``b1/...`` only the overrides. Several parts join
    with ``+`` (``p2/BN128+t1/BN64``)."""
    parts = []
    for part in spec.split("+"):
        head, *toks = part.split("/")
        which = "gemm" + head[1]
        ov = {} if head[0] == "b" else {"tma": True}
        if head[0] == "p":
            ov["persistent"] = True
        for t in toks:
            if t == "NF":
                ov["flatten"] = False
            else:
                k = re.match(r"[A-Z]+", t).group(0)
                ov[_KEYS[k]] = int(t[len(k):])
        parts.append((which, ov))

    def fn(c):
        c = dict(c)
        for which, ov in parts:
            c[which] = {**c[which], **ov}
        return c
    return fn, None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--points", default=POINTS)
    p.add_argument("--modes", default=DEFAULT_MODES)
    a = p.parse_args()
    modes = {m: MODES[m] if m in MODES else _spec_mode(m) for m in a.modes.split(",")}
    real_config, real_half = ops.moe_config, ops.HALF_TAIL_MIN_BLOCK_M

    def use(mode):
        fn, half = modes[mode]
        ops.moe_config = lambda *args, **kw: fn(real_config(*args, **kw))
        ops.HALF_TAIL_MIN_BLOCK_M = real_half if half is None else half

    try:
        for point in a.points.split(","):
            t0 = time.time()
            name, T = point.split(":")
            T = int(T)
            cfg = MODELS[name]
            w1, w2, bias = make_layer(cfg, "cuda", torch.bfloat16)
            x, _, tw, ids = make_batches(cfg, T, 1, "cuda", torch.bfloat16, bias)[0]
            args = [(x, w1, w2, tw, ids)]
            flops = 6 * cfg["H"] * cfg["I"] * ids.numel()
            shipped = real_config(T, cfg["k"], cfg["E"], cfg["I"], cfg["H"], torch.bfloat16, x.device)
            outs, times = {}, {m: [] for m in modes}
            for m in modes:
                use(m)
                outs[m] = fused_moe(*args[0])
            for _ in range(a.rounds):
                for m in modes:
                    use(m)
                    times[m].append(time_fn(fused_moe, args, device="cuda", graph=True) * 1e3)
            ops.moe_config, ops.HALF_TAIL_MIN_BLOCK_M = real_config, real_half
            gmm = time_fn(grouped_mm_forward, args, device="cuda", graph=True) * 1e3
            ref = outs[next(iter(modes))].float()
            print(f"[modes] {name} T={T} block_m={shipped['block_m']} grouped_mm {gmm:.1f} us"
                  f" ({time.time() - t0:.0f} s)", flush=True)
            for m, ts in times.items():
                print(f"    {m:13s} " + " ".join(f"{t:8.1f}" for t in ts) + f" us  {flops / min(ts) / 1e6:6.1f} TFLOP/s"
                      f"  {gmm / min(ts):.3f}x grouped_mm  max diff {(outs[m].float() - ref).abs().max().item():.2e}",
                      flush=True)
            del w1, w2, x, outs
            torch.cuda.empty_cache()
    finally:
        ops.moe_config, ops.HALF_TAIL_MIN_BLOCK_M = real_config, real_half


if __name__ == "__main__":
    main()
