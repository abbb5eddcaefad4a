"""Probe: does Triton's automatic warp specialization (``tl.range(..., warp_specialize=True)``,
on sm_90 the NVGPUWarpSpecialization pass, which applies at ``num_warps=4`` only) pay for a
grouped GEMM of MoE shape on this card? A minimal persistent block GEMM over sorted rows (A and
the weights by descriptor, one expert per BLOCK_M block, live tiles counted from a device-side
padded row count, GEMM1 with the fused silu(gate) * up epilogue) timed with and without it,
beside the plain dense bf16 GEMM of the same M, N, K (torch.matmul). Every variant is checked
against an fp32 torch product first.

    PYTHONPATH=. python scripts/ws_probe.py [--shapes Mixtral-2GPU:1024,Mixtral-2GPU:4096]

Measured on an H100 (2026-12-06 20:00 UTC, torch 2.11.0+cu130, triton 3.6.0): the plain variants
ran (Mixtral-2GPU T=1024 GEMM1, 4 stages: 514.5 us, 584.4 TFLOP/s; torch.matmul dense 716.6),
but the first warp-specialized variant gave no result within the 150 s limit (a hang or a
compile that long), and the same loops in the persistent MoE GEMM did too; run it with a
timeout. Not a shipped path: the kernel has no skipped-block, pair or half-tail handling (the pass
asserts on a data-dependent early return in its Triton 3.6 form).
"""
import argparse

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.harness import time_fn
from benchmarks.suites.moe import MODELS, _parse_points
from torch_flashops.ops.moe import _grouped_tile


@triton.jit
def _probe_kernel(a_desc, w_desc, c_ptr, eid_ptr, ntp_ptr, N, K, stride_cm,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NPROG: tl.constexpr, GROUP_M: tl.constexpr,
                  WS_OUT: tl.constexpr, WS_IN: tl.constexpr, SILU: tl.constexpr):
    ntp = tl.load(ntp_ptr)
    n_pid_n = tl.cdiv(N, BN)
    m_live = tl.cdiv(ntp, BM)
    for tile in tl.range(tl.program_id(0), m_live * n_pid_n, NPROG, warp_specialize=WS_OUT):
        pid_m, pid_n = _grouped_tile(tile, m_live, n_pid_n, GROUP_M)
        e = tl.load(eid_ptr + pid_m)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc2 = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in tl.range(0, tl.cdiv(K, BK), warp_specialize=WS_IN):
            a = a_desc.load([pid_m * BM, kk * BK])
            b = w_desc.load([e, pid_n * BN, kk * BK]).reshape(BN, BK)
            acc = tl.dot(a, b.T, acc)
            if SILU:
                b2 = w_desc.load([e, pid_n * BN + N, kk * BK]).reshape(BN, BK)
                acc2 = tl.dot(a, b2.T, acc2)
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc2
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], acc.to(tl.bfloat16),
                 mask=offs_n[None, :] < N)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="Mixtral-2GPU:1024,Mixtral-2GPU:4096")
    p.add_argument("--variants", default="")
    args = p.parse_args()
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # (gemm, BN, BK, stages, warps, ws_out, ws_in)
    variants = [(1, 128, 64, 3, 8, False, False), (1, 128, 64, 4, 8, False, False),
                (1, 128, 64, 3, 4, False, True), (1, 128, 64, 4, 4, False, True), (1, 64, 64, 4, 4, False, True),
                (1, 128, 64, 3, 4, True, False), (1, 64, 64, 4, 4, True, False),
                (2, 256, 64, 3, 8, False, False), (2, 128, 64, 4, 8, False, False),
                (2, 256, 64, 3, 4, False, True), (2, 128, 64, 4, 4, False, True), (2, 256, 64, 3, 4, True, False),
                (2, 128, 64, 4, 4, True, False)]
    if args.variants:
        variants = [tuple(int(v) if v.isdigit() else v == "T" for v in s.split("/")) for s in args.variants.split(",")]
    for name, T in _parse_points(args.shapes):
        H, I, E, k = (MODELS[name][key] for key in ("H", "I", "E", "k"))
        counts = torch.bincount(torch.randint(0, E, (T * k,)), minlength=E).tolist()
        BM = 128
        blocks = [e for e, c in enumerate(counts) for _ in range(-(-c // BM))]
        rows = len(blocks) * BM
        eid = torch.tensor(blocks, dtype=torch.int32, device="cuda")
        ntp = torch.tensor([rows], dtype=torch.int32, device="cuda")
        for gemm in (1, 2):
            N, K = (I, H) if gemm == 1 else (H, I)
            a = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(E, 2 * N if gemm == 1 else N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
            ref = torch.empty(rows, N, device="cuda", dtype=torch.float32)
            for m, e in enumerate(blocks):
                r = a[m * BM:(m + 1) * BM].float() @ w[e].float().T
                ref[m * BM:(m + 1) * BM] = torch.nn.functional.silu(r[:, :N]) * r[:, N:] if gemm == 1 else r
            flops = 2 * rows * K * N * (2 if gemm == 1 else 1)
            dense_a = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            dense_w = torch.randn(K, N * (2 if gemm == 1 else 1), device="cuda", dtype=torch.bfloat16)
            ms = time_fn(lambda: torch.matmul(dense_a, dense_w), [()], device="cuda", graph=True)
            print(f"{name} T={T} GEMM{gemm} rows={rows} N={N} K={K}: dense torch.matmul {ms * 1e3:.1f} us "
                  f"{flops / ms / 1e9:.1f} TFLOP/s", flush=True)
            for g, bn, bk, st, nw, wo, wi in variants:
                if g != gemm:
                    continue
                c = torch.full((rows, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [BM, bk])
                w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [1, bn, bk])
                nprog = min(sms, len(blocks) * triton.cdiv(N, bn))

                def run():
                    _probe_kernel[(nprog,)](a_desc, w_desc, c, eid, ntp, N, K, c.stride(0), BM=BM, BN=bn, BK=bk,
                                            NPROG=nprog, GROUP_M=8, WS_OUT=wo, WS_IN=wi, SILU=gemm == 1,
                                            num_warps=nw, num_stages=st)
                tag = f"BN{bn} BK{bk} S{st} W{nw} ws_out={int(wo)} ws_in={int(wi)}"
                try:
                    run()
                    torch.cuda.synchronize()
                    err = (c.float() - ref).abs().max().item()
                    ms = time_fn(run, [()], device="cuda", graph=True)
                    print(f"  {tag}: {ms * 1e3:.1f} us {flops / ms / 1e9:.1f} TFLOP/s max err {err:.3g}", flush=True)
                except Exception as ex:  # a compile failure of one variant: report it, keep going
                    print(f"  {tag}: FAILED {type(ex).__name__}: {str(ex).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    main()
