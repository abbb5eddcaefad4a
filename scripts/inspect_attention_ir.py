"""Compile the attention kernel for Hopper (sm_90) on any machine, no GPU needed, and report
how Triton's software pipeliner laid out its key loops: async copies, the ``async_wait`` counts
in program order (each loop has an in-loop wait, where ``num = 0`` means no load/compute overlap,
and a ``num = 0`` drain after it), K/V buffers in shared memory, and ptxas's register and spill
counts.

    python scripts/inspect_attention_ir.py paged 128 64 8 3 [--dump FILE]
    python scripts/inspect_attention_ir.py merge 16

Arguments: ``paged`` or ``ragged``, then BLOCK_M BLOCK_N num_warps num_stages (decode tiles are
BLOCK_M 16, prefill tiles 64/128). The kernel is specialised like a bf16 D=128 GQA-4 causal
launch with 16-byte aligned pointers and strides, as the JIT would see it; ``PDL`` (default 1)
sets where the attention programs allow the merge kernel's programmatic dependent launch (0
never, 1 at their start, 2 after their key loop) and whether the merge kernel waits for it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from torch_flashops.ops import attention as A
from torch_flashops.ops._host import COMPILE_OPTIONS

_PTRS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "PO": "*fp32", "PLSE": "*fp32",
         "FREQS": "*fp32", "MASK": "*u8"}
_FLOATS = {"sm_scale", "soft_cap", "v_scale", "lse_scale"}


def compile_sm90(fn, const: dict, warps: int, stages: int = 1, types: dict | None = None):
    """Compile Triton kernel ``fn`` for sm_90 on any machine: ``const`` holds its constexprs;
    pointer arguments are typed by name (``_PTRS``, other upper-case names are int32 tables),
    scale-like floats by ``_FLOATS``, everything else int32, pointers and strides 16-aligned."""
    names = fn.arg_names
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if types and n in types:
            sig[n] = types[n]
        elif n in const:
            sig[n] = "constexpr"
        elif n in _PTRS:
            sig[n] = _PTRS[n]
        elif n.isupper():
            sig[n] = "*i32"  # plan lists and index tensors
        elif n in _FLOATS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
        if sig[n].startswith("*") or n.startswith("stride") or n == "num_kv_heads":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages,
                                                                                **COMPILE_OPTIONS))


def compile_kernel(paged: bool, block_m: int, block_n: int, warps: int, stages: int):
    """The attention kernel; ``TMA=1`` in the environment (ragged only) loads key tiles through
    tensor descriptors."""
    tma = not paged and os.environ.get("TMA", "0") == "1"
    types = {n: f"tensordesc<bf16[{block_n}, 1, 128]>" for n in ("K_DESC", "V_DESC")} if tma else None
    const = dict(K_DESC=None, V_DESC=None) if not tma else {}
    const.update(GROUP=4, PAGE_SIZE=16 if paged else 1, D_QK=128, D_VO=128, BLOCK_DQK=128,
                 BLOCK_DVO=128, BLOCK_M=block_m, BLOCK_N=block_n, WORKLIST=True, PAGED=paged, CAUSAL=True,
                 WINDOW=False, HAS_MASK=False, POS=0, SOFTCAP=False, UPCAST=False, PREC="tf32",
                 PAGE_AHEAD=int(os.environ.get("PAGE_AHEAD", "2")), FOLD_SCALE=True,
                 KV_EVICT=os.environ.get("KV_EVICT", ""), TMA=tma, PDL=int(os.environ.get("PDL", "1")),
                 LEAN=os.environ.get("LEAN", "1") == "1", KV_SAME=os.environ.get("KV_SAME", "1") == "1")
    return compile_sm90(A._attn_fwd_kernel, const, warps, stages, types)


def compile_merge(block_m: int, group: int = 4, d_vo: int = 128):
    """The merge kernel as the launcher configures it for ``block_m``-row tiles."""
    rows, split_block, block_d, warps = A.merge_config(block_m, d_vo, group)
    const = dict(GROUP=group, D_VO=d_vo, BLOCK_M=block_m, ROWS=rows, BLOCK_D=block_d, SPLIT_BLOCK=split_block,
                 WORKLIST=True, PDL=int(os.environ.get("PDL", "1")))
    return compile_sm90(A._merge_kernel, const, warps)


def report(k) -> str:
    ttgir = k.asm["ttgir"]
    waits = re.findall(r"async_wait[^\n]*\{num = (\d+)", ttgir)
    bufs = sorted(set(re.findall(r"memdesc<(\d+)x(\d+)x128xbf16", ttgir)))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    try:
        out = subprocess.run(["ptxas", "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True).stderr
        regs = "; ".join(l.split(":", 1)[-1].strip() for l in out.splitlines() if "registers" in l or "spill" in l)
    except FileNotFoundError:
        regs = "ptxas not on PATH"
    return (f"griddepcontrol: {k.asm['ptx'].count('griddepcontrol.')}; "
            f"async copies: {ttgir.count('async_copy_global_to_local')}; async_wait nums (in-loop, drain per loop): "
            f"{' '.join(waits) or '-'}; K/V buffers (stages x keys): {' '.join('x'.join(b) for b in bufs) or '-'}; "
            f"shared memory {k.metadata.shared} B; {regs}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["paged", "ragged", "merge"])
    p.add_argument("config", nargs="+", type=int, metavar="N",
                   help="BLOCK_M BLOCK_N num_warps num_stages (merge: BLOCK_M of the tiles it combines)")
    p.add_argument("--dump", help="write the TTGIR here")
    a = p.parse_args(argv)
    if a.kind == "merge":
        k = compile_merge(a.config[0])
    else:
        if len(a.config) != 4:
            p.error("paged/ragged take BLOCK_M BLOCK_N num_warps num_stages")
        k = compile_kernel(a.kind == "paged", *a.config)
    if a.dump:
        with open(a.dump, "w") as f:
            f.write(k.asm["ttgir"])
    print(report(k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
