"""Shared test utilities: named closeness checks, poisoning, compile counters, tolerances."""
from __future__ import annotations

import unittest

import torch

try:
    import expecttest
except ImportError:  # the GPU machine's image has no expecttest: schema snapshots skip there
    expecttest = None

# Base class and skip decorator of the schema-snapshot tests (``assertExpectedInline``).
SchemaTestCase = expecttest.TestCase if expecttest is not None else unittest.TestCase
needs_expecttest = unittest.skipIf(expecttest is None, "expecttest is not installed")

# Tolerances per output dtype (DESIGN.md / spec): fp16 ~1e-3, bf16 ~1e-2, fp32 1e-5.
TOL = {
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-9, rtol=1e-9),
}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, *, atol=None, rtol=None, dtype=None):
    """Compare in fp64 on CPU with the tolerance of ``dtype`` (default ``actual.dtype``).

    NaN anywhere in ``actual`` fails (outputs are poisoned with NaN before each run), and the
    message names the tensor, the worst element and its index.
    """
    tol = TOL[dtype or actual.dtype] if (atol is None or rtol is None) else {}
    atol = tol.get("atol", atol) if atol is None else atol
    rtol = tol.get("rtol", rtol) if rtol is None else rtol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    nan_ok = torch.isnan(a) & torch.isnan(e)
    err = (a - e).abs().masked_fill(both_inf | nan_ok, 0.0)
    bound = atol + rtol * e.abs().masked_fill(torch.isinf(e), 0.0)
    bad = ~(err <= bound) & ~(both_inf | nan_ok)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        worst = float(err.masked_fill(~bad, 0).nan_to_num(nan=float("inf")).max())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"first at {idx}: got {float(a[idx])}, expected {float(e[idx])}; worst |err| {worst}"
        )


def poison(*shape, dtype=torch.float32, device="cpu"):
    """A NaN-filled tensor: anything a kernel forgets to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


class CompileCounter:
    """Wrap ``torch.compile`` and count frames compiled (1 == no graph break, no recompile)."""

    def __init__(self, fn, *, dynamic=None, fullgraph=True, backend="inductor", mode=None):
        import torch._dynamo.testing

        self.counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        self.compiled = torch.compile(fn, backend=self.counter, fullgraph=fullgraph, dynamic=dynamic, mode=mode)

    def __call__(self, *args, **kwargs):
        return self.compiled(*args, **kwargs)

    @property
    def frames(self) -> int:
        """Graphs compiled. A dynamo *restart* of one frame (e.g. when a Python float becomes a
        symbolic input under dynamic=True) hands the backend an empty graph first; it is neither
        a graph break nor a recompile, so empty graphs are not counted."""
        return sum(1 for gm in self.counter.graphs if len(gm.graph.nodes) > 0)

    def graph_ops(self, namespace="flashops"):
        """Names of ``torch.ops.<namespace>`` calls in the captured graphs, in order."""
        names = []
        for gm in self.counter.graphs:
            for node in gm.graph.nodes:
                t = getattr(node, "target", None)
                s = str(t)
                if node.op == "call_function" and s.startswith(f"{namespace}."):
                    names.append(s)
        return names


def graph_break_count() -> int:
    """Graph breaks dynamo recorded so far in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


# --------------------------------------------------------- kernels compiled for sm_90 without a GPU
def compile_sm90(fn, sig: dict, constexprs: dict, aligned, num_warps: int) -> dict:
    """Compile one ``@triton.jit`` kernel for an H100 (sm_90) without a GPU: PTX, then a cubin
    through Triton's bundled ptxas. ``sig``: Triton type per non-constexpr argument;
    ``aligned``: arguments specialised as 16-divisible (as a launch with aligned pointers and
    strides would be). Needs the real JIT, so call it in a process without TRITON_INTERPRET
    (``run_without_interpreter``). Returns {"ptx": str, "ttgir": str, "cubin_bytes": int, "shared":
    bytes of shared memory per program}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # constexpr parameters left out take their defaults (as a launch would), not a type from sig
    constexprs = {**{p.name: p.default for p in fn.params
                     if p.is_constexpr and p.has_default and p.name not in constexprs}, **constexprs}
    full = {n: "constexpr" if n in constexprs else sig[n] for n in fn.arg_names}
    idx = {n: i for i, n in enumerate(fn.arg_names)}
    src = ASTSource(fn, full, constexprs={(idx[k],): v for k, v in constexprs.items()},
                    attrs={(idx[n],): [["tt.divisibility", 16]] for n in aligned if n not in constexprs})
    from torch_flashops.ops._host import COMPILE_OPTIONS  # as every launch passes them

    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **COMPILE_OPTIONS})
    return {"ptx": out.asm["ptx"], "ttgir": out.asm["ttgir"], "cubin_bytes": len(out.asm.get("cubin", b"")),
            "shared": out.metadata.shared}


def run_without_interpreter(code: str):
    """Run ``code`` in a fresh interpreter-free Python (the repo on its path) and return the JSON
    its last stdout line prints; skips the test where triton has no ptxas, and on GPU machines
    (whose tests compile the kernels for real)."""
    import json
    import os
    import subprocess
    import sys

    import pytest

    if torch.cuda.is_available():
        pytest.skip("the GPU tests compile the kernels for real")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHOPS_INTERPRET")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and "ptxas" in p.stderr.lower() and "not found" in p.stderr.lower():
        pytest.skip("this triton install has no ptxas")
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
