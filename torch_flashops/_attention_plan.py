"""Host-side planning shared by the batch attention wrappers (decode, paged/ragged prefill).

``plan()`` of every wrapper ends here: the CSR arrays are brought to the host once, validated
(spec attention.md §3, always on), and turned into the kernel's work lists (see the banner of
``ops/attention.py``):

  work       int32 [Wd, 4]  (b, m_start, kv_lo, kv_hi): one program per item and KV head,
                            writes o directly; sorted longest first (load balance)
  split_work int32 [Ws, 4]  the chunks of KV ranges split across programs (split-KV); each
                            writes a partial state to scratch
  merge      int32 [Ms, 4]  (b, m_start, first split item, count): partials to combine

On the device each list is flattened to 1-D int32 ``[4 * rows]``. Lists are padded with idle
items (b = -1) to at least 2 rows, so a compiled ``run()`` never specialises on a list being
empty or of length 1. A plan without split-KV has split/merge lists of exactly 2 idle rows, one
with splits at least 3: the launcher skips the merge launch on that shape. In CUDA-graph mode
lists are padded to the sizes frozen at the first plan (split/merge >= 3 rows, so the captured
merge launch is always there), and a captured launch grid stays valid for every later plan.
Everything a
run needs that changes from plan to plan lives in device tensors (``PlanTensors``); Python
ints kept on the wrapper are only the frozen options and tile sizes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import numpy as np
import torch

from ._checks import FLOAT_DTYPES, check_indptr_values, expect, is_int, reject_fp8
from .meta.attention import check_pos_encoding_mode
from .ops import attention as attn_ops

__all__ = [
    "PlanTensors",
    "Schedule",
    "build_schedule",
    "check_fits",
    "Upload",
    "check_list_sizes",
    "to_host_int",
    "check_indptr",
    "validate_qo_indptr",
    "validate_paged_csr",
    "pack_custom_masks",
    "parse_dtype",
    "check_page_ids",
    "tile_tensor",
    "unbacked_plan",
    "check_backend",
    "reject",
    "resolve_sm_scale",
    "check_window_left",
    "check_int",
    "check_soft_cap",
    "rope_defaults",
    "check_lse_base",
]


# ``plan()`` reads host data: under torch.compile it must run eagerly, never be traced. This is
# ``torch.compiler.disable`` with torch._dynamo imported at the first call instead of when the
# decorator runs, which kept ``import torch_flashops`` ~1.3 s longer for eager users. (A private
# torch helper; a torch without it gets the public decorator.)
try:
    from torch._compile import _disable_dynamo as host_only
except ImportError:  # pragma: no cover
    host_only = torch.compiler.disable

MIN_LIST_ROWS = 2


# ------------------------------------------------------------------------- option parsing
def parse_dtype(x, name: str) -> Optional[torch.dtype]:
    """A floating ``torch.dtype`` the kernels take (float16, bfloat16, float32) or its string
    name (``"float16"``, ``"torch.bfloat16"``); None passes. Anything else (an integer dtype
    would silently truncate the attention output) raises ``ValueError`` naming ``name``."""
    if x is None:
        return x
    dt = x
    if isinstance(x, str):
        dt = getattr(torch, x.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{name}: expected a torch.dtype or its name, got {x!r}")
    reject_fp8(dt, name)
    if dt not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {dt} not supported (expected float16, bfloat16 or float32)")
    return dt


def check_backend(backend, extra: Tuple[str, ...] = ()) -> None:
    """``backend`` picks one of FlashInfer's kernels; every name the function or wrapper accepts
    there (``extra``: those beyond auto / fa2 / fa3) runs our Triton kernel here."""
    names = ("auto", "fa2", "fa3", "triton") + tuple(extra)
    if backend not in names:
        raise NotImplementedError(f"backend={backend!r}: only {', '.join(repr(n) for n in names)} "
                                  f"(all our Triton kernels)")


def reject(**kwargs) -> None:
    """``NotImplementedError`` for every reserved argument given a non-default value."""
    for name, value in kwargs.items():
        if value is not None and value is not False and not (isinstance(value, (tuple, list, dict)) and len(value) == 0):
            raise NotImplementedError(f"{name} is not supported by torch_flashops (got a non-default value)")


def resolve_sm_scale(sm_scale, head_dim: int, q_scale=None, k_scale=None) -> float:
    """``sm_scale`` (default 1/sqrt(D)) times the scalar q/k scales (spec §0.4 step 2)."""
    s = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    for name, x in (("q_scale", q_scale), ("k_scale", k_scale)):
        s *= scalar_scale(x, name)
    return s


def scalar_scale(x, name: str) -> float:
    """A scalar scale as float (None -> 1). Tensors with more than one element (per-head
    scales) are reserved: ``NotImplementedError``. A one-element tensor is read on the host
    (a device sync), so it is refused where that cannot happen: inside ``torch.compile`` and
    during CUDA-graph capture; pass a Python float there."""
    if x is None:
        return 1.0
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise NotImplementedError(f"{name}: per-head scale tensors are not supported (scalar scales only)")
        # (is_compiling first: dynamo cannot trace is_current_stream_capturing)
        if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            raise ValueError(f"{name}: a tensor scale is read on the host, which cannot happen inside torch.compile "
                             f"or a CUDA-graph capture; pass a Python float (e.g. layer.k_scale_float)")
        return float(x)
    return float(x)


def check_int(value, name: str) -> int:
    """An integer option (Python or numpy int; a SymInt while tracing) as ``int``. Floats and
    bools are refused by name: ``int(2.5)`` would quietly plan a different value."""
    expect(is_int(value), name, "must be an int, got {!r}", value)
    return int(value)


def check_window_left(window_left, name: str = "window_left") -> int:
    w = -1 if window_left is None else check_int(window_left, name)
    expect(w >= -1, name, "must be >= -1 (-1 = no window), got {}", w)
    return w


def check_soft_cap(logits_soft_cap) -> float:
    c = 0.0 if logits_soft_cap is None else float(logits_soft_cap)
    expect(c >= 0.0, "logits_soft_cap", "must be None, 0 or positive, got {}", c)
    return c


def rope_defaults(rope_scale, rope_theta) -> tuple[float, float]:
    rs = 1.0 if rope_scale is None else float(rope_scale)
    rt = 1e4 if rope_theta is None else float(rope_theta)
    expect(rs > 0, "rope_scale", "must be positive, got {}", rs)
    expect(rt > 0, "rope_theta", "must be positive, got {}", rt)
    return rs, rt


def check_lse_base(lse_base) -> bool:
    """True for natural-log LSEs (``"ln"``), False for base 2 (``"log2"``)."""
    expect(lse_base in ("log2", "ln"), "lse_base", "must be 'log2' or 'ln', got {!r}", lse_base)
    return lse_base == "ln"


def check_pos_mode(pos_encoding_mode) -> str:
    check_pos_encoding_mode(pos_encoding_mode)
    return pos_encoding_mode


# ------------------------------------------------------------------------- CSR validation
def to_host_int(t, name: str) -> np.ndarray:
    """An index tensor (or sequence) as a host int64 array (one device-to-host copy)."""
    if isinstance(t, torch.Tensor):
        expect(t.dim() == 1, name, "expected 1-D, got shape {}", tuple(t.shape))
        expect(not t.is_floating_point() and not t.is_complex(), name, "expected an integer dtype, got {}", t.dtype)
        return t.detach().to("cpu", torch.int64).numpy()
    return np.asarray(t, dtype=np.int64).reshape(-1)


def check_page_ids(t, name: str) -> None:
    """A page table's ``indices``: a 1-D tensor of an integer dtype (float ids would be
    truncated to other pages without a word)."""
    expect(isinstance(t, torch.Tensor) and t.dim() == 1, name, "expected a 1-D int32 tensor")
    expect(not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool, name,
           "expected an integer dtype, got {}", t.dtype)


def check_indptr(h: np.ndarray, name: str, length: Optional[int] = None, indexes: Tuple[str, ...] = ()) -> None:
    """A host CSR indptr: the expected length (when given), starts at 0, non-decreasing.
    ``indexes`` names what it points into, for the error of an indptr that starts later:
    FlashInfer reads such a CSR from its first entry on (vLLM plans the prefill part of a mixed
    batch with the page table's tail), which the spec (§0.3, §3) refuses here."""
    if length is not None:
        expect(h.size == length, name, "length {} does not match the batch (expected {})", h.size, length)
    if indexes and h.size and int(h[0]) > 0 and (h.size < 2 or int(np.diff(h).min()) >= 0):
        rest = " and ".join(f"{a}[{name}[0]:]" for a in indexes)
        raise ValueError(f"{name}: must start at 0, got {int(h[0])}; pass {name} - {name}[0] and {rest} "
                         f"instead (the same attention)")
    check_indptr_values(h, name)


def validate_qo_indptr(qo_h: np.ndarray, batch: int, name: str = "qo_indptr") -> None:
    check_indptr(qo_h, name, batch + 1, indexes=("q",))


def validate_paged_csr(kv_indptr_h, last_h, n_indices: int, page_size: int, *, indptr_name="paged_kv_indptr",
                       last_name="paged_kv_last_page_len", indices_name="paged_kv_indices") -> np.ndarray:
    """§0.3 rules for a page table; returns ``kv_len`` per request (int64)."""
    expect(page_size >= 1, "page_size", "must be >= 1, got {}", page_size)
    check_indptr(kv_indptr_h, indptr_name, indexes=(indices_name,))
    B = kv_indptr_h.size - 1
    expect(last_h.size == B, last_name, "length {} does not match len({}) - 1 = {}", last_h.size, indptr_name, B)
    expect(n_indices >= int(kv_indptr_h[-1]), indices_name,
           "has {} entries, fewer than {}[-1] = {}", n_indices, indptr_name, int(kv_indptr_h[-1]))
    n = np.diff(kv_indptr_h)
    # A request without pages has kv_len 0 whatever its last_page_len says (FlashInfer's rule:
    # engines pad CUDA-graph batches and plan cache-less prefills with 0 pages and last_page_len 1)
    ok = (n == 0) | ((last_h >= 1) & (last_h <= page_size))
    if not ok.all():
        b = int(np.argmin(ok))
        raise ValueError(f"{last_name}: request {b} has {int(n[b])} pages and last_page_len {int(last_h[b])} "
                         f"(must be in [1, {page_size}] for a request with pages)")
    return np.where(n > 0, (n - 1) * page_size + last_h, 0)


def pack_custom_masks(custom_mask, packed_custom_mask, qo_lens: np.ndarray, kv_lens: np.ndarray, device,
                      non_blocking: bool = True):
    """Per-request packed masks (little-endian, each from a byte boundary) and their byte
    offsets ``mask_indptr [B+1]`` (int32), or ``(None, None)`` when no mask is given."""
    if custom_mask is None and packed_custom_mask is None:
        return None, None
    nbits = qo_lens * kv_lens
    nbytes = (nbits + 7) // 8
    indptr = np.concatenate([[0], np.cumsum(nbytes)]).astype(np.int64)
    if packed_custom_mask is not None:
        expect(packed_custom_mask.dim() == 1 and packed_custom_mask.dtype == torch.uint8, "packed_custom_mask",
               "expected 1-D uint8, got {} of shape {}", packed_custom_mask.dtype, tuple(packed_custom_mask.shape))
        expect(packed_custom_mask.shape[0] == int(indptr[-1]), "packed_custom_mask",
               "has {} bytes, expected sum ceil(qo_len*kv_len/8) = {}", packed_custom_mask.shape[0], int(indptr[-1]))
        packed = to_device(packed_custom_mask, device, non_blocking).contiguous()
    else:
        custom_mask = custom_mask.reshape(-1)  # any shape, read flat (row-major), as FlashInfer's plan() does
        expect(custom_mask.shape[0] == int(nbits.sum()), "custom_mask",
               "has {} elements, expected sum qo_len*kv_len = {}", custom_mask.shape[0], int(nbits.sum()))
        bits = custom_mask.detach().to("cpu").bool().numpy()
        starts = np.concatenate([[0], np.cumsum(nbits)])
        chunks = [np.packbits(bits[starts[b]:starts[b + 1]], bitorder="little") for b in range(len(nbits))]
        host = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
        packed = to_device(torch.from_numpy(np.ascontiguousarray(host, dtype=np.uint8)), device, non_blocking)
    if packed.shape[0] == 0:  # keep a valid pointer for the kernel
        packed = torch.zeros(1, dtype=torch.uint8, device=device)
    return packed, to_device(torch.from_numpy(indptr.astype(np.int32)), device, non_blocking)


# ------------------------------------------------------------------------- the schedule
@dataclasses.dataclass
class Schedule:
    work: np.ndarray  # [Wd, 4] int32
    split_work: np.ndarray  # [Ws, 4]
    merge: np.ndarray  # [Ms, 4]


@dataclasses.dataclass
class Bounds:
    """Frozen list sizes of a CUDA-graph wrapper (rows of work / split_work / merge)."""

    work: int
    split_work: int
    merge: int


def tile_bound(total_rows: int, batch: int, group: int, block_m: int) -> int:
    """Most m tiles a batch of ``batch`` requests and ``total_rows`` query rows can have."""
    return max(MIN_LIST_ROWS, (total_rows * group + batch * (block_m - 1)) // block_m)


def fixed_split_bound(tiles: int, batch: int, max_keys: Optional[int], step: int,
                      tiles_per_request: Optional[int] = None) -> int:
    """Most split items a fixed split of ``step`` keys per chunk can produce for any batch of
    ``batch`` requests with at most ``tiles`` m tiles and ``max_keys`` keys in all (None: no
    bound). A tile of request b has at most ``ceil(kv_b / step)`` chunks, so the items number at
    most ``tiles * ceil(max_keys / step)``; when every request has ``tiles_per_request`` tiles
    (decode), at most ``tiles_per_request * (ceil(max_keys / step) + batch)``."""
    if max_keys is None:
        return 2 ** 31 - 1
    chunks = -(-int(max_keys) // max(1, int(step)))
    bound = tiles * chunks
    if tiles_per_request is not None:
        bound = min(bound, tiles_per_request * (chunks + batch))
    return bound


def build_schedule(qo_lens: np.ndarray, kv_lens: np.ndarray, *, group: int, block_m: int, block_n: int,
                   num_kv_heads: int, d_vo: int, causal: bool, window_left: int, has_mask: bool, device,
                   workspace_bytes: int, disable_split_kv: bool = False, fixed_split_keys: Optional[int] = None,
                   bounds: Optional[Bounds] = None, whole: bool = False) -> Schedule:
    """Tile every request's (row x group head) index into ``block_m`` tiles, clip each tile's
    key range by causality and window, and split long ranges into chunks when the tiles alone
    leave the machine idle (or when ``fixed_split_keys`` asks for it). ``whole``: the launch
    runs whole requests in wide key tiles instead (``attn_ops.whole_requests``), so no split."""
    B = qo_lens.size
    qo_lens = qo_lens.astype(np.int64)
    kv_lens = kv_lens.astype(np.int64)
    n_tiles = -(-(qo_lens * group) // block_m)
    tb = np.repeat(np.arange(B, dtype=np.int64), n_tiles)
    first_tile = np.repeat(np.cumsum(n_tiles) - n_tiles, n_tiles)
    m_start = (np.arange(tb.size, dtype=np.int64) - first_tile) * block_m
    qo, kv = qo_lens[tb], kv_lens[tb]
    r_first = m_start // group
    r_last = np.minimum((m_start + block_m - 1) // group, qo - 1)
    hi = kv.copy()
    if causal and not has_mask:
        hi = np.clip(kv - qo + r_last + 1, 0, kv)
    lo = np.zeros_like(hi)
    if window_left >= 0:
        lo = np.clip(kv - qo + r_first - window_left, 0, None)
    lo = np.minimum(lo, hi)
    length = hi - lo

    item_elems = attn_ops.partial_item_bytes(num_kv_heads, block_m, d_vo) // 4
    max_split_items = ws_items = max(0, min(workspace_bytes // (4 * item_elems), (2 ** 31 - 1) // item_elems))
    if bounds is not None:
        max_split_items = min(max_split_items, bounds.split_work)
    n_s = np.ones_like(length)
    if not disable_split_kv and not (whole and fixed_split_keys is None) and tb.size and length.max(initial=0) > 0:
        if fixed_split_keys is not None:  # fixed keys per chunk: a request's chunks ignore the batch
            step = np.full_like(length, max(1, int(fixed_split_keys)))
            n_s = np.maximum(1, -(-length // step))
            need = int(n_s[n_s > 1].sum())
            if need > max_split_items:  # coarser chunks would tie a request's bits to its batch
                item = attn_ops.partial_item_bytes(num_kv_heads, block_m, d_vo)
                held = (f"the split list frozen by the first CUDA-graph plan holds {max_split_items}"
                        if max_split_items < ws_items
                        else f"a float_workspace_buffer of {workspace_bytes} bytes holds {max_split_items}")
                raise ValueError(
                    f"fixed_split_size: this batch splits into {need} partial tiles of {item} bytes "
                    f"({need * item} bytes of float_workspace_buffer), but {held}; a fixed split is never "
                    f"coarsened to fit, since that would make a request's result depend on its batch. Pass "
                    f"a larger float_workspace_buffer or fixed_split_size, or disable_split_kv=True")
        else:
            target = attn_ops.split_target(tb.size * num_kv_heads, block_m, device)
            if target:  # one full wave: chunks per tile in proportion to its keys, rounded down
                per_head = target // num_kv_heads
                n_s = np.maximum(1, length * per_head // max(int(length.sum()), 1))
                n_prog = tb.size * num_kv_heads
                floors = (block_n, device, n_prog, block_m, group)
                n_s = np.minimum(n_s, np.maximum(1, length // attn_ops.split_min_chunk(*floors)))
                n_s = np.where(length > attn_ops.split_min_keys(*floors), n_s, 1)
        while int(n_s[n_s > 1].sum()) > max_split_items:  # workspace (or frozen list) too small
            n_s = np.where(n_s > 1, np.maximum(1, n_s // 2), 1)
        if fixed_split_keys is None:  # balanced chunks, multiples of block_n
            step = np.maximum(1, -(-(-(-length // n_s)) // block_n) * block_n)
            n_s = np.maximum(1, -(-length // step))
    if not (n_s > 1).any():
        step = np.maximum(length, 1)
    split = n_s > 1

    direct = np.flatnonzero(~split)
    direct = direct[np.argsort(-length[direct], kind="stable")]  # longest first
    work = _rows(tb[direct], m_start[direct], lo[direct], hi[direct])

    st = np.flatnonzero(split)
    cnt = n_s[st]
    first = np.cumsum(cnt) - cnt
    merge = _rows(tb[st], m_start[st], first, cnt)
    owner = np.repeat(st, cnt)
    s_idx = np.arange(owner.size, dtype=np.int64) - np.repeat(first, cnt)
    s_lo = np.minimum(lo[owner] + s_idx * step[owner], hi[owner])
    s_hi = np.minimum(s_lo + step[owner], hi[owner])
    split_work = _rows(tb[owner], m_start[owner], s_lo, s_hi)
    return Schedule(work, split_work, merge)


def _rows(*cols: np.ndarray) -> np.ndarray:
    """The four columns of a work list as one contiguous int32 ``[n, 4]`` array (filled column by
    column: ``np.stack`` then a cast cost about three times as much host time)."""
    out = np.empty((cols[0].shape[0], 4), dtype=np.int32)
    for j, c in enumerate(cols):
        out[:, j] = c
    return out


def padded(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` followed by idle rows (b = -1) up to ``rows`` rows."""
    out = np.full((rows, a.shape[1] if a.ndim == 2 else 1), -1, dtype=np.int32)
    out[: a.shape[0]] = a
    out[a.shape[0]:, 1:] = 0
    return out


# ------------------------------------------------------------------------- device state
@dataclasses.dataclass
class PlanTensors:
    """The device tensors a planned ``run()`` passes to the op (all int32 except the mask)."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: Optional[torch.Tensor]  # paged only
    kv_lens: Optional[torch.Tensor]  # paged only
    work: torch.Tensor
    split_work: torch.Tensor
    merge: torch.Tensor
    packed_mask: Optional[torch.Tensor] = None
    mask_indptr: Optional[torch.Tensor] = None
    tile: Optional[torch.Tensor] = None  # [block_m], never read: its size carries block_m (``tile_tensor``)

    def unmarked(self) -> "PlanTensors":
        """The same tensors as new tensor objects (``detach()``: same storage, not views) without
        the unbacked marks, for ``torch.export``: strict export lifts the plan's tensors into
        constants and fails on an unbacked constant ("possible memo disaster")."""
        return PlanTensors(**{name: None if t is None else t.detach() for name, t in vars(self).items()})


def exporting() -> bool:
    """Whether ``torch.export`` is tracing (not ``torch.compile``). Reads the flag that
    ``torch.compiler.is_exporting()`` returns: dynamo in torch 2.11 folds that call to True under
    plain ``torch.compile`` too (2.13 reads the flag), which would hand a compiled ``run()`` the
    unmarked tensors and let duck sizing tie and recompile them. A global read is guarded like
    any other, on every version."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def tile_tensor(cache: dict, block_m: int, device) -> torch.Tensor:
    """An (uninitialised, never read) ``[block_m]`` tensor whose *size* hands the plan's tile
    height to ``run()``. A plan-time Python int read inside a compiled ``run()`` becomes a guard,
    and a later plan with another tile height (a longer prefill, a bigger batch sharing a cascade
    prefix) would recompile; a size marked unbacked reaches the op as a symbol instead, with no
    guard and no duck-sizing against equal sizes. ``cache`` is the wrapper's own (one tensor
    per value: plans allocate once per height, and two wrappers never share one, which would
    add an aliasing guard)."""
    t = cache.get(int(block_m))
    if t is None:
        t = _unbacked(torch.empty((int(block_m),), dtype=torch.uint8, device=device))
        cache[int(block_m)] = t
    return t


def check_list_sizes(sched: Schedule, bounds: Bounds) -> None:
    """CUDA-graph mode: every work list of ``sched`` fits its frozen size."""
    for a, n, name in ((sched.work, bounds.work, "work"), (sched.split_work, bounds.split_work, "split_work"),
                       (sched.merge, bounds.merge, "merge")):
        expect(a.shape[0] <= n, "plan", "{} list of {} items exceeds the frozen CUDA-graph size {}", name, a.shape[0], n)


def list_tensors(sched: Schedule, up: "Upload", bounds: Optional[Bounds] = None, into: Optional[PlanTensors] = None):
    """Device tensors of the three lists, added to ``up`` (filled at ``up.send()``): fresh
    (padded to >= 2 rows) or, in CUDA-graph mode, the frozen buffers of ``into`` (padded to
    ``bounds``). Each list is its own tensor, never a view of a shared block: dynamo guards a
    view's base and offset."""
    if bounds is None:
        has_split = sched.split_work.shape[0] > 0
        none = attn_ops.NO_SPLIT_ROWS  # the launcher reads this list size as "no split-KV"
        rows = [max(MIN_LIST_ROWS, sched.work.shape[0])] + [
            max(none + 1, a.shape[0]) if has_split else none for a in (sched.split_work, sched.merge)]
    else:
        rows = [bounds.work, bounds.split_work, bounds.merge]
        check_list_sizes(sched, bounds)
    host = [padded(a, n).reshape(-1) for a, n in zip((sched.work, sched.split_work, sched.merge), rows)]
    if into is not None:
        for dst, h, name in zip((into.work, into.split_work, into.merge), host, ("work", "split_work", "merge")):
            up.into(dst, h, name)
        return into.work, into.split_work, into.merge
    return tuple(up.fresh(h) for h in host)


def _unbacked(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` (a tensor the plan owns) with its length marked unbacked for dynamo. The lengths
    of one plan's tensors coincide now and then with each other or with the caller's sizes
    (work and split_work both 8 long, 16 pages and head_dim 16), and dynamo's default duck
    sizing would tie them and recompile when a later plan separates them. Unbacked sizes are
    never tied nor specialised; the fakes check them with ``torch._check`` (``check_len``)."""
    if t is not None:
        torch._dynamo.decorators.mark_unbacked(t, 0)
    return t


def unbacked_plan(t: "PlanTensors") -> None:
    """Mark the tensors a (non-CUDA-graph) plan owns, its work lists and its index copies,
    unbacked (``_unbacked``); CUDA-graph plans keep frozen sizes, which never change."""
    for x in (t.work, t.split_work, t.merge, t.qo_indptr, t.kv_indptr, t.kv_indices, t.kv_lens):
        _unbacked(x)


def check_not_capturing() -> None:
    """plan() is host code: refuse it while the current stream captures a CUDA graph."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("plan() cannot run while a CUDA graph is being captured: plan before the capture (its "
                           "host-to-device copies would be recorded into the graph and replayed with stale data)")


def to_device(t: torch.Tensor, device, non_blocking: bool = True) -> torch.Tensor:
    """``t`` on ``device``; from host memory to a CUDA device without making the host wait for
    the GPU unless ``non_blocking`` is False (``copy_to``)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    copy_to(out, t, non_blocking)
    return out


def copy_to(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = True) -> None:
    """``dst.copy_(src)``; from host memory to a CUDA device without making the host wait for
    the GPU unless ``non_blocking`` is False.

    A blocking copy from host memory to a CUDA device synchronises the stream, so a plan()
    made while the previous step's kernels still run would wait for all of them and lose the
    host's lead over the GPU. FlashInfer's plan() copies asynchronously by default
    (``non_blocking=True``), and so does this: the data goes through a fresh pinned buffer of
    PyTorch's caching host allocator, which does not hand the buffer out again until the copy
    has run, so ``src`` itself may be reused or freed at once. As with FlashInfer, the copy is
    ordered on the current stream only: a caller that runs on another stream synchronises the
    two, or plans with ``non_blocking=False`` (a blocking copy, done when plan() returns).
    plan() refuses to run during a CUDA-graph capture (``check_not_capturing``, once per plan),
    which would record these copies into the graph."""
    if non_blocking and dst.device.type == "cuda" and src.device.type == "cpu":
        staged = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        staged.copy_(src)
        src = staged
    dst.copy_(src, non_blocking=non_blocking)


def device_int32(a, device, min_len: int = 0, copy: bool = False, non_blocking: bool = True) -> torch.Tensor:
    """Host array or tensor -> contiguous int32 device tensor of at least ``min_len`` entries
    (the given tensor itself where it already is one, unless ``copy``); host data is copied
    without waiting for the GPU (``to_device``)."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.device == torch.device(device) and t.dtype == torch.int32 and t.is_contiguous() and t.numel() >= min_len:
            return t.clone() if copy else t
        t = t.to(torch.int32)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))
    if t.numel() < min_len:  # (padded where t is: no device-to-host read)
        t = torch.cat([t.reshape(-1), torch.zeros(min_len - t.numel(), dtype=torch.int32, device=t.device)])
    return to_device(t.contiguous(), device, non_blocking)


# True: ``Upload.send`` moves all of a plan's host arrays in one pinned block, one transfer and
# one scatter kernel. False: a pinned block and a transfer per array (``copy_to``), as plan() did
# before; kept for same-run A/B timing (``scripts/plan_cost.py --ab``).
PACKED_UPLOADS = True


def host_int32(a, min_len: int = 0) -> np.ndarray:
    """A host array or CPU tensor as a contiguous 1-D int32 array, zero-padded to at least
    ``min_len`` entries."""
    h = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    h = np.ascontiguousarray(np.asarray(h).reshape(-1), dtype=np.int32)
    if h.size < min_len:
        h = np.concatenate([h, np.zeros(min_len - h.size, dtype=np.int32)])
    return h


class Upload:
    """One plan()'s host-to-device copies of small int32 arrays, made as one.

    ``fresh`` (a new device tensor) and ``into`` (the head of a CUDA-graph buffer) return at
    once, and ``send`` writes the contents of every tensor they named; nothing may read those
    tensors before ``send`` (plan() sends before it launches anything or returns). ``send``
    stages all the arrays in one pinned host block, copies it to one device block in one
    asynchronous transfer, and scatters it into the tensors with one ``torch._foreach_copy_``
    kernel. Copied one by one, six arrays cost six pinned allocations and six transfers, the
    largest share of plan()'s host time in a cProfile on an H100 (benchmarks/RESULTS.md,
    thirtieth session). Sources already on the device (page ids an engine keeps on the GPU)
    are copied device to device at once, outside the block. Custom masks (device tensors by
    then) and the gathered-K/V path's token CSR (built after the plan) are copied on their own.

    Everything is ordered on the current stream, as ``copy_to``'s copies are. With
    ``non_blocking=False`` the transfer blocks and ``send`` waits for the scatter, so the data
    is in place when plan() returns. On a CPU device the same staging runs unpinned, so the CPU
    suite tests this code."""

    def __init__(self, device, non_blocking: bool = True):
        self.device = torch.device(device)
        self.non_blocking = bool(non_blocking)
        self._host: list = []
        self._dst: list = []

    def fresh(self, a, min_len: int = 0, copy: bool = False) -> torch.Tensor:
        """A new int32 device tensor holding ``a`` (host array or tensor; zero-padded to at least
        ``min_len`` entries). A tensor already on the device is returned as it is, or cloned
        with ``copy``, when it is int32, contiguous and long enough. Host data that already is
        contiguous int32 is read at ``send()``, not here: do not change it in between."""
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            return device_int32(a, self.device, min_len, copy, self.non_blocking)
        h = host_int32(a, min_len)
        t = torch.empty(h.shape, dtype=torch.int32, device=self.device)
        self._add(h, t)
        return t

    def into(self, buf: torch.Tensor, a, name: str) -> None:
        """Write ``a`` into the head of the int32 buffer ``buf`` (CUDA-graph mode; ``check_fits``)."""
        n = a.numel() if isinstance(a, torch.Tensor) else np.asarray(a).size
        check_fits(buf, n, name)
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            buf[:n].copy_(a.reshape(-1))  # (device to device: stream-ordered, nothing to stage)
            return
        self._add(host_int32(a), buf[:n])

    def _add(self, h: np.ndarray, dst: torch.Tensor) -> None:
        if h.size:
            self._host.append(h)
            self._dst.append(dst)

    def send(self) -> None:
        """Copy every array added so far to its tensor (see the class)."""
        host, dst = self._host, self._dst
        self._host, self._dst = [], []
        if not host:
            return
        cuda = self.device.type == "cuda"
        if not PACKED_UPLOADS:
            for h, d in zip(host, dst):
                copy_to(d, torch.from_numpy(h), self.non_blocking)
            return
        sizes = [h.size for h in host]
        staged = torch.empty(sum(sizes), dtype=torch.int32, pin_memory=cuda and self.non_blocking)
        np.concatenate(host, out=staged.numpy())
        block = torch.empty(staged.shape, dtype=torch.int32, device=self.device)
        block.copy_(staged, non_blocking=cuda and self.non_blocking)
        torch._foreach_copy_(dst, list(block.split(sizes)))
        if cuda and not self.non_blocking:
            torch.cuda.current_stream(self.device).synchronize()


def check_fits(buf: torch.Tensor, n: int, name: str) -> None:
    """CUDA-graph mode: ``n`` entries fit the frozen buffer ``buf``."""
    expect(n <= buf.numel(), name, "has {} entries, more than its CUDA-graph buffer holds ({})", n, buf.numel())


def copy_into(buf: torch.Tensor, src, name: str, non_blocking: bool = True) -> None:
    """CUDA-graph mode: write ``src`` into the head of the frozen buffer ``buf``."""
    src_t = src if isinstance(src, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(src, dtype=np.int64))
    check_fits(buf, src_t.numel(), name)
    copy_to(buf[: src_t.numel()], src_t.reshape(-1).to(buf.dtype), non_blocking)
