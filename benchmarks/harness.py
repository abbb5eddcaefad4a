"""The one timing utility and report writer every benchmark suite uses.

How a number is made (DESIGN.md "Benchmarks"): device time with CUDA events via
``triton.testing.do_bench`` (median of many repeats, warm-up first) or CUDA-graph replay for small
launches; inputs rotated through several argument sets so the working set exceeds L2 (cold
cache); random data, never zeros. The machine's ceilings (device copy bandwidth, read
bandwidth, bf16 GEMM rate) are measured in the same run and every row is reported against them
and against the peers recorded for the same case.

A suite is ``benchmarks/suites/<name>.py`` with ``run(ctx: Context)``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch


def _progress(iterable, desc=""):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bench extra is optional; fall back to plain lines
        items = list(iterable)
        for i, x in enumerate(items):
            print(f"[{desc}] {i + 1}/{len(items)}", flush=True)
            yield x
        return
    yield from tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def time_fn(fn: Callable, arg_sets: Sequence[tuple], *, device: str, graph: bool = False,
            warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn(*args)``, cycling through ``arg_sets`` (cold L2 when the sets
    together exceed the cache). CPU: wall clock (perf_counter), for smoke runs only."""
    arg_sets = list(arg_sets) or [()]
    n = len(arg_sets)
    if device != "cuda":
        for a in arg_sets[: min(n, 2)]:
            fn(*a)
        times = []
        reps = max(3, min(20, n * 2))
        for i in range(reps):
            t0 = time.perf_counter()
            fn(*arg_sets[i % n])
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    import triton

    if graph:
        # One graph replays all n argument sets once; its time / n is one call.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for a in arg_sets:
                fn(*a)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for a in arg_sets:
                fn(*a)
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(g.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return ms / n

    state = {"i": 0}

    def step():
        a = arg_sets[state["i"] % n]
        state["i"] += 1
        fn(*a)

    return triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median")


_READ_BLOCK, _READ_ITERS = 4096, 8


def stream_read_programs(n: int) -> int:
    """Programs (and ``sink`` entries) ``stream_read`` uses for ``n`` elements."""
    return -(-n // (_READ_BLOCK * _READ_ITERS))


def _stream_read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ITERS):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc))

    return kernel


_STREAM_READ = None


def stream_read(x: torch.Tensor, sink: torch.Tensor) -> None:
    """Read every element of contiguous ``x`` once (each program sums 32k elements into ``sink``)."""
    global _STREAM_READ
    if _STREAM_READ is None:
        _STREAM_READ = _stream_read_kernel()
    n = x.numel()
    _STREAM_READ[(stream_read_programs(n),)](x, sink, n, BLOCK=_READ_BLOCK, ITERS=_READ_ITERS, num_warps=8)


def measure_ceilings(device: str, quick: bool = False) -> dict:
    """Device copy bandwidth (read+write bytes), read bandwidth (the faster of ``torch.sum`` and
    a streaming Triton read), bf16 GEMM rate — this run."""
    if device != "cuda":
        return {"copy_GBps": float("nan"), "read_GBps": float("nan"), "gemm_bf16_TFLOPs": float("nan")}
    nbytes = (256 if quick else 1024) << 20
    src = [torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_() for _ in range(2)]
    dst = torch.empty_like(src[0])
    ms = time_fn(lambda s: dst.copy_(s), [(s,) for s in src], device=device)
    copy = 2 * nbytes / ms / 1e6
    # Read-only: a sum reduction reads every byte once and writes almost nothing. torch.sum
    # stops short of what HBM gives a plain streaming read (H100, 2026-12-07: 2877-3026 GB/s
    # against 3055-3144 for _stream_read_kernel and 3039-3141 for SDPA decode over 1-2 GB of
    # dense KV, scripts/decode_read_probe.py), so the ceiling is the faster of the two.
    ms_r = time_fn(lambda s: s.sum(dtype=torch.float32), [(s,) for s in src], device=device)
    sink = torch.empty(stream_read_programs(src[0].numel()), dtype=torch.float32, device=device)
    ms_t = time_fn(lambda s: stream_read(s, sink), [(s,) for s in src], device=device)
    read = nbytes / min(ms_r, ms_t) / 1e6
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms_g = time_fn(lambda: torch.mm(a, b), [()], device=device)
    gemm = 2 * n ** 3 / ms_g / 1e9
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy, "read_GBps": read, "gemm_bf16_TFLOPs": gemm}


@dataclasses.dataclass
class Row:
    suite: str
    case: str
    impl: str
    ms: float
    bytes: Optional[float] = None
    flops: Optional[float] = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def gbps(self) -> Optional[float]:
        return self.bytes / self.ms / 1e6 if self.bytes else None

    @property
    def tflops(self) -> Optional[float]:
        return self.flops / self.ms / 1e9 if self.flops else None


def environment(device: str) -> dict:
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = "none (CPU)"
    return env


class Context:
    """What a suite sees: device, quick flag, ceilings, progress, time, record."""

    def __init__(self, suite: str, device: str, quick: bool, ceilings: dict):
        self.suite = suite
        self.device = device
        self.quick = quick
        self.ceilings = ceilings
        self.rows: list[Row] = []

    def progress(self, iterable: Iterable, desc: str = ""):
        return _progress(iterable, desc or self.suite)

    def time(self, fn: Callable, arg_sets: Sequence[tuple] = ((),), *, graph: bool = False) -> float:
        return time_fn(fn, arg_sets, device=self.device, graph=graph and self.device == "cuda")

    def peers(self, peer: Callable, ours: Callable, *, dynamic: bool = False) -> list[tuple[str, Callable]]:
        """``[("torch-eager", peer), ("torch-compile", compiled peer), ("flashops", ours)]`` in the
        order the table expects (peer first). The compiled peer is left out of CPU smoke runs:
        Inductor on CPU costs ~10 s per shape."""
        out = [("torch-eager", peer)]
        if self.device == "cuda" or not self.quick:
            out.append(("torch-compile", torch.compile(peer, dynamic=dynamic)))
        out.append(("flashops", ours))
        return out

    def record(self, case: str, impl: str, ms: float, *, bytes: Optional[float] = None,
               flops: Optional[float] = None, **extra: Any) -> Row:
        row = Row(self.suite, case, impl, float(ms), bytes, flops, extra)
        self.rows.append(row)
        return row


# ----------------------------------------------------------------------------------- reports
def table(rows: list[Row], ceilings: dict) -> str:
    """Markdown table: time, GB/s or TFLOP/s, % of the ceiling, speed vs the case's first impl."""
    first: dict[str, Row] = {}
    for r in rows:
        first.setdefault(r.case, r)
    lines = [
        "| case | impl | time (us) | GB/s | % copy bw | TFLOP/s | % bf16 GEMM | speed vs first |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    cbw, gemm = ceilings.get("copy_GBps"), ceilings.get("gemm_bf16_TFLOPs")

    def pct(x, c):
        return f"{100 * x / c:.0f}%" if x is not None and c and c == c else ""

    for r in rows:
        base = first[r.case]
        speed = f"{base.ms / r.ms:.2f}x ({base.impl})" if r is not base else "1.00x"
        lines.append(
            f"| {r.case} | {r.impl} | {r.ms * 1e3:.1f} | "
            f"{'' if r.gbps is None else f'{r.gbps:.0f}'} | {pct(r.gbps, cbw)} | "
            f"{'' if r.tflops is None else f'{r.tflops:.1f}'} | {pct(r.tflops, gemm)} | {speed} |"
        )
    return "\n".join(lines)


def write_json(path: str, suite: str, env: dict, ceilings: dict, rows: list[Row]) -> None:
    data = {
        "suite": suite,
        "env": env,
        "ceilings": ceilings,
        "rows": [
            dict(case=r.case, impl=r.impl, ms=r.ms, bytes=r.bytes, flops=r.flops,
                 GBps=r.gbps, TFLOPs=r.tflops, **r.extra)
            for r in rows
        ],
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def write_png(path: str, suite: str, env: dict, ceilings: dict, rows: list[Row]) -> bool:
    """Grouped bar chart: per case, each impl's GB/s (or TFLOP/s), ceiling as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # One unit per plot: GB/s where rows carry bytes (memory-bound suites), else TFLOP/s, else
    # calls per ms; rows without the chosen quantity are left out rather than mixed in.
    if any(r.bytes for r in rows) and not all(r.flops for r in rows):
        unit, metric, ceil_key = "GB/s", (lambda r: r.gbps), "copy_GBps"
    elif any(r.flops for r in rows):
        unit, metric, ceil_key = "TFLOP/s", (lambda r: r.tflops), "gemm_bf16_TFLOPs"
    else:
        unit, metric, ceil_key = "calls/ms", (lambda r: 1e3 / r.ms), None
    rows = [r for r in rows if metric(r) is not None]
    if not rows:
        return False
    cases = list(dict.fromkeys(r.case for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases) * max(1, len(impls)) / 2), 4.5))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for i, c in enumerate(cases):
            for r in rows:
                if r.case == c and r.impl == impl:
                    xs.append(i + k * width)
                    ys.append(metric(r) or 0)
        ax.bar(xs, ys, width, label=impl)
    ceil = ceilings.get(ceil_key) if ceil_key else None
    if ceil and ceil == ceil:
        ax.axhline(ceil, color="k", ls="--", lw=1, label=f"measured ceiling {ceil:.0f}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(unit)
    ax.set_title(f"{suite} on {env.get('gpu')} (torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date')})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_suite(name: str, *, device: Optional[str] = None, quick: bool = False, out_dir: str = "bench_out",
              ceilings: Optional[dict] = None) -> tuple[str, list[Row]]:
    import importlib

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = quick or device != "cuda"
    mod = importlib.import_module(f"benchmarks.suites.{name}")
    if ceilings is None:
        ceilings = measure_ceilings(device, quick)
    ctx = Context(name, device, quick, ceilings)
    mod.run(ctx)
    env = environment(device)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{name}.json"), name, env, ceilings, ctx.rows)
    png = write_png(os.path.join(out_dir, f"{name}.png"), name, env, ceilings, ctx.rows)
    if device == "cuda":
        ceil = (f"Ceilings this run: copy {ceilings['copy_GBps']:.0f} GB/s, read {ceilings['read_GBps']:.0f} GB/s, "
                f"bf16 GEMM {ceilings['gemm_bf16_TFLOPs']:.0f} TFLOP/s.")
    else:
        ceil = "No ceilings on CPU: the timings check that the suite runs, not the kernels' speed."
    head = f"### {name}\n\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. {ceil}\n\n"
    text = head + table(ctx.rows, ceilings) + "\n"
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    if png:
        text += f"\n(plot: {os.path.join(out_dir, name + '.png')})\n"
    return text, ctx.rows
