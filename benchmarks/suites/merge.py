"""Attention-state merging (cascade family) against plain PyTorch, eager and torch.compile'd.

Cases (H=32 heads, D=128, bf16 unless noted; LSEs fp32):
  merge_state / merge_state_in_place   N rows in {128, 4096, 65536} (+ fp16 at 65536)
  merge_states                         N=16384, S in {2, 4, 8}
  variable_length_merge_states         N=16384 segments of 1..8 rows (M ~ 74k rows)
Bytes that must move: every input state read once (values + LSEs, indptr), the merged state
written once. Memory-bound: compare GB/s with the copy ceiling (read+write). Small cases are
timed as CUDA-graph replays (launch overhead out), large ones with input sets rotated past L2.

Peers: ``torch-eager`` is a careful plain-PyTorch implementation of the same math (fp32, no
Python loops; the varlen peer is handed its row->segment map precomputed, which favours it);
``torch-compile`` is the same function under ``torch.compile`` (Inductor fuses it).
"""
from __future__ import annotations

import math

import torch

INF = math.inf


# ------------------------------------------------------------------ plain-PyTorch peers
def torch_merge_state(v_a, s_a, v_b, s_b):
    s_a, s_b = s_a.float(), s_b.float()
    m = torch.maximum(s_a, s_b)
    shift = torch.where(m == -INF, 0.0, m)
    w_a, w_b = torch.exp2(s_a - shift), torch.exp2(s_b - shift)
    d = w_a + w_b
    inv = 1.0 / torch.where(d == 0, 1.0, d)
    v = torch.addcmul(v_a.float() * (w_a * inv).unsqueeze(-1), v_b.float(), (w_b * inv).unsqueeze(-1))
    return v.to(v_a.dtype), m + torch.log2(d)


def torch_merge_state_in_place(v, s, v_other, s_other):
    o, lse = torch_merge_state(v, s, v_other, s_other)
    v.copy_(o)
    s.copy_(lse)


def torch_merge_states(v, s):
    s = s.float()
    m = s.amax(1)
    shift = torch.where(m == -INF, 0.0, m)
    w = torch.exp2(s - shift.unsqueeze(1))
    d = w.sum(1)
    o = torch.einsum("nsh,nshd->nhd", w, v.float()) / torch.where(d == 0, 1.0, d).unsqueeze(-1)
    return o.to(v.dtype), m + torch.log2(d)


def torch_variable_length_merge_states(v, s, seg, n_seg):
    """``seg [M]``: the segment of each row (precomputed from indptr outside the timing)."""
    H = v.shape[1]
    s = s.float()
    m = torch.full((n_seg, H), -INF, device=v.device).scatter_reduce(0, seg[:, None].expand(-1, H), s, "amax")
    shift = torch.where(m == -INF, 0.0, m)
    w = torch.exp2(s - shift[seg])
    d = torch.zeros(n_seg, H, device=v.device).index_add_(0, seg, w)
    acc = torch.zeros(n_seg, H, v.shape[2], device=v.device).index_add_(0, seg, v.float() * w.unsqueeze(-1))
    return (acc / torch.where(d == 0, 1.0, d).unsqueeze(-1)).to(v.dtype), m + torch.log2(d)


# ------------------------------------------------------------------------------ helpers
_COLD_BYTES = 256 << 20  # rotate input sets until a round trip moves this much (> 50 MB L2)
_GRAPH_BELOW = 64 << 20  # calls moving less than this are timed as CUDA-graph replays


def _dt_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _n_sets(nbytes: int, quick: bool) -> int:
    return 1 if quick else max(1, min(32, math.ceil(_COLD_BYTES / nbytes)))


def _states(lead, H, D, dtype, device, g):
    v = torch.randn(*lead, H, D, generator=g, device=device).to(dtype)
    s = torch.randn(*lead, H, generator=g, device=device) * 4
    return v, s


def _check(name, got, want, dtype):
    """Peers must agree with the op before their time means anything."""
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for a, b in zip(got, want):
        err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
        if not err <= tol * (1 + b.float().abs().max().item()):
            raise AssertionError(f"merge suite: {name} disagrees with flashops (max |err| {err})")


def _time_all(ctx, case, impls, arg_sets, nbytes, **extra):
    """Time each (name, fn) on the same argument sets and record the peers first."""
    graph = ctx.device == "cuda" and nbytes < _GRAPH_BELOW
    for name, fn in impls:
        ms = ctx.time(fn, arg_sets, graph=graph)
        ctx.record(case, name, ms, bytes=nbytes, **extra)


# -------------------------------------------------------------------------------- cases
def run(ctx):
    import torch_flashops as fo

    dev, quick = ctx.device, ctx.quick
    g = torch.Generator(device=dev).manual_seed(0)
    H, D = (4, 64) if quick else (32, 128)
    big = torch.bfloat16 if dev == "cuda" else torch.float32
    pair_cases = [(64, big)] if quick else [(128, big), (4096, big), (65536, big), (65536, torch.float16)]

    for N, dt in ctx.progress(pair_cases, desc="merge_state"):
        es = torch.tensor([], dtype=dt).element_size()
        nbytes = 3 * N * H * (D * es + 4)  # two states read, one written
        sets = [(*_states((N,), H, D, dt, dev, g), *_states((N,), H, D, dt, dev, g))
                for _ in range(_n_sets(nbytes, quick))]
        case = f"merge_state N={N} H={H} D={D} {_dt_name(dt)}"
        impls = ctx.peers(torch_merge_state, fo.merge_state)
        for label, fn in impls[:-1]:
            _check(label, fn(*sets[0]), fo.merge_state(*sets[0]), dt)
        _time_all(ctx, case, impls, sets, nbytes)

        case = f"merge_state_in_place N={N} H={H} D={D} {_dt_name(dt)}"
        impls = ctx.peers(torch_merge_state_in_place, fo.merge_state_in_place)
        _time_all(ctx, case, impls, sets, nbytes)  # values drift across calls; bytes do not
        del sets

    N = 64 if quick else 16384
    dt = big
    es = torch.tensor([], dtype=dt).element_size()
    for S in ctx.progress([2, 3] if quick else [2, 4, 8], desc="merge_states"):
        nbytes = (S + 1) * N * H * (D * es + 4)
        sets = [_states((N, S), H, D, dt, dev, g) for _ in range(_n_sets(nbytes, quick))]
        impls = ctx.peers(torch_merge_states, fo.merge_states)
        for label, fn in impls[:-1]:
            _check(label, fn(*sets[0]), fo.merge_states(*sets[0]), dt)
        _time_all(ctx, f"merge_states N={N} S={S} H={H} D={D} {_dt_name(dt)}", impls, sets, nbytes)
        del sets

    lens = torch.randint(1, 9, (N,), generator=torch.Generator().manual_seed(1))
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    M = int(indptr[-1])
    seg = torch.repeat_interleave(torch.arange(N), lens).to(dev)
    indptr = indptr.to(dev)
    nbytes = (M + N) * H * (D * es + 4) + (N + 1) * 4
    sets = [(*_states((M,), H, D, dt, dev, g), indptr) for _ in range(_n_sets(nbytes, quick))]

    def peer(v, s, indptr):
        return torch_variable_length_merge_states(v, s, seg, N)

    impls = [("torch-eager", peer)]
    if dev == "cuda" or not quick:
        compiled = torch.compile(torch_variable_length_merge_states, dynamic=False)
        impls.append(("torch-compile", lambda v, s, indptr: compiled(v, s, seg, N)))
    impls.append(("flashops", fo.variable_length_merge_states))
    for label, fn in impls[:-1]:
        _check(label, fn(*sets[0]), fo.variable_length_merge_states(*sets[0]), dt)
    _time_all(ctx, f"variable_length_merge_states N={N} M={M} (1..8 rows) H={H} D={D} {_dt_name(dt)}",
              impls, sets, nbytes)
