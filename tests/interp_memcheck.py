"""Bounds checking for Triton's interpreter: every global load, store and atomic a kernel makes
under ``TRITON_INTERPRET=1`` must lie inside the bytes spanned by one of the tensors it was
launched with (tensor descriptors: their base tensor), or with ``FLASHOPS_INTERP_MEMCHECK=storage``
inside one of their storages.

On a GPU an address past a tensor's allocation is a silent wrong read or a corrupting write
(``scripts/sanitize.sh`` runs compute-sanitizer for that); in the interpreter it reads or writes
whatever host memory sits there. This check turns either into a test failure naming the kernel,
the program and the address, for every kernel the CPU suite runs. Masked-off lanes are not
checked (they do not access memory). ``install()`` patches the interpreter once per process;
``tests/conftest.py`` installs it for CPU runs unless ``FLASHOPS_INTERP_MEMCHECK=0``.

It also checks that no byte is written by plain stores of two different programs of one launch,
nor written by one program and read (plain load) by another without synchronisation. The
interpreter runs programs one after another, so such a race gives one fixed answer on the CPU;
on a GPU the programs run concurrently and the answer depends on timing (atomics are exempt:
they are how programs are meant to share words). A read of another program's bytes counts as
synchronised when the writer, after its last write of them, made a release (or acq_rel) atomic
on some word, and the reader, after that and before its first read of them, an acquire (or
acq_rel) atomic on the same word: the hand-off of the MoE GEMM's tail split, whose last piece
folds the pieces the others stored after an acq_rel count.

Every load, store and atomic mask must also hold booleans (``IntegerMask`` otherwise): triton
3.6's interpreter takes an int32 mask, triton 3.9's refuses it.
"""
from __future__ import annotations

import numpy as np

_ranges = None  # (starts, ends) of the running kernel's argument storages, sorted by start
_kernel = None
_installed = False
# "views" (default): the bytes each argument view spans; "storage": its whole storage (looser:
# a read past a view into the rest of its storage, e.g. a test's guard band, passes)
_VIEWS = __import__("os").environ.get("FLASHOPS_INTERP_MEMCHECK", "views") != "storage"


_writes = None  # [(program, byte addresses)] of the running kernel's plain stores
_reads = None  # the same for its plain loads
_atomics = None  # [(program, word addresses, acquires, releases, seq)] of its atomics
_seq = 0  # order of the events in the interpreter's (sequential) run


class OutOfBoundsAccess(AssertionError):
    pass


class WriteRace(AssertionError):
    pass


class IntegerMask(AssertionError):
    pass


def _check_mask(kind, mask):
    """A load, store or atomic mask must hold booleans. The interpreter turns ``&`` of a
    scalar condition and a block one into an int32 block, which triton 3.6 takes as a mask but
    triton 3.9's interpreter refuses ("mask has unsupported dtype"): caught here on any version."""
    if mask is not None and np.asarray(mask.data).dtype != np.bool_:
        raise IntegerMask(f"{_kernel}: a {kind} mask holds {np.asarray(mask.data).dtype}, not booleans (a scalar "
                          f"condition & a block one?): triton 3.9's interpreter refuses it")


def _program() -> int:
    from triton.runtime.interpreter import interpreter_builder as b

    x, y, z = b.grid_idx
    gx, gy, _ = b.grid_dim
    return (z * gy + y) * gx + x


def _lanes(ptrs, mask):
    addr = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:  # (the interpreter keeps some int1 masks as 0/1 integers: index with booleans)
        addr = addr[np.broadcast_to(np.asarray(mask.data).astype(bool), addr.shape)]
    return addr.reshape(-1)


def _next_seq() -> int:
    global _seq
    _seq += 1
    return _seq


def _record(log, ptrs, mask, nbytes):
    if log is None:
        return
    addr = _lanes(ptrs, mask)
    if addr.size:
        # every byte accessed (an element of nbytes at a covers [a, a + nbytes))
        addr = (addr[:, None] + np.arange(nbytes, dtype=np.uint64)[None, :]).reshape(-1)
        log.append((_program(), np.unique(addr), _next_seq()))


def _record_atomic(ptr, mask, sem):
    if _atomics is None:
        return
    name = str(sem).upper()  # MEM_SEMANTIC.ACQUIRE_RELEASE / ACQUIRE / RELEASE / RELAXED
    addr = np.unique(_lanes(ptr, mask))
    if addr.size:
        _atomics.append((_program(), addr, "ACQUIRE" in name, "RELEASE" in name, _next_seq()))


def _by_program(log, latest):
    """Sorted bytes of ``log`` with their program and event order, one entry per (program,
    byte): the program's last access of the byte if ``latest``, else its first."""
    b = np.concatenate([a for _, a, _ in log])
    p = np.concatenate([np.full(a.size, q, dtype=np.int64) for q, a, _ in log])
    s = np.concatenate([np.full(a.size, t, dtype=np.int64) for _, a, t in log])
    order = np.lexsort((-s if latest else s, p, b))  # by byte, program, then the wanted access first
    b, p, s = b[order], p[order], s[order]
    first = np.ones(b.size, dtype=bool)
    first[1:] = (b[1:] != b[:-1]) | (p[1:] != p[:-1])
    return b[first], p[first], s[first]


def _handed_over(writer: int, reader: int, wrote: int, read: int) -> bool:
    """A release atomic of ``writer`` after event ``wrote`` and an acquire atomic of ``reader`` on
    the same word after it and before event ``read``."""
    rel = [(a, t) for q, a, _, r, t in _atomics if q == writer and r and t > wrote]
    acq = [(a, t) for q, a, g, _, t in _atomics if q == reader and g and t < read]
    return any(t2 > t1 and np.intersect1d(a1, a2).size for a1, t1 in rel for a2, t2 in acq)


def _check_races():
    if not _writes or len({p for p, _, _ in _writes + (_reads or [])}) < 2:
        return
    wb, wo, ws = _by_program(_writes, latest=True)
    dup = np.flatnonzero(wb[1:] == wb[:-1])
    if dup.size:
        i = dup[0]
        raise WriteRace(f"{_kernel}: byte {int(wb[i]):#x} is written by plain stores of programs {int(wo[i])} "
                        f"and {int(wo[i + 1])} of one launch ({dup.size} such bytes): on a GPU the result "
                        f"depends on which program runs last")
    if not _reads:
        return
    rb, ro, rs = _by_program(_reads, latest=False)
    j = np.searchsorted(wb, rb)  # each byte has at most one writer now
    hit = j < wb.size
    hit[hit] = wb[j[hit]] == rb[hit]
    cross = np.flatnonzero(hit)
    cross = cross[wo[j[cross]] != ro[cross]]
    pairs = {}
    for i in cross:  # per (writer, reader): its latest write and earliest read of such bytes
        key = (int(wo[j[i]]), int(ro[i]))
        w, r, n, first = pairs.get(key, (0, 1 << 62, 0, i))
        pairs[key] = (max(w, int(ws[j[i]])), min(r, int(rs[i])), n + 1, first)
    for (writer, reader), (wrote, read, n, i) in pairs.items():
        if not _handed_over(writer, reader, wrote, read):
            raise WriteRace(f"{_kernel}: byte {int(rb[i]):#x} is written by program {writer} and read by program "
                            f"{reader} of one launch ({n} such bytes) with no release/acquire atomic between: on "
                            f"a GPU the read may come before or after the write")


def _storages(args, out):
    from triton.tools.tensor_descriptor import TensorDescriptor

    for a in args:
        if isinstance(a, (tuple, list)):
            _storages(a, out)
        elif isinstance(a, TensorDescriptor):
            _storages([a.base], out)
        elif hasattr(a, "untyped_storage"):
            if _VIEWS:  # the bytes the view itself spans
                start = a.data_ptr()
                n = 1 + sum((d - 1) * st for d, st in zip(a.shape, a.stride())) if a.numel() else 0
                out.append((start, start + n * a.element_size()))
            else:
                s = a.untyped_storage()
                out.append((s.data_ptr(), s.data_ptr() + s.nbytes()))


def _check(kind, ptrs, mask, nbytes):
    if _ranges is None:
        return
    addr = _lanes(ptrs, mask)
    if addr.size == 0:
        return
    starts, ends = _ranges
    i = np.searchsorted(starts, addr, side="right").astype(np.int64) - 1
    ok = (i >= 0) & (addr + np.uint64(nbytes) <= ends[np.maximum(i, 0)])
    if ok.all():
        return
    from triton.runtime.interpreter import interpreter_builder

    bad = int(addr[~ok][0])
    spans = ", ".join(f"[{int(s):#x}, {int(e):#x})" for s, e in zip(starts, ends))
    raise OutOfBoundsAccess(
        f"{_kernel}: {kind} of {nbytes} bytes at {bad:#x} in program {tuple(interpreter_builder.grid_idx)} lies "
        f"outside every argument tensor ({int((~ok).sum())} of {addr.size} active lanes); "
        f"argument {'views' if _VIEWS else 'storages'}: {spans}")


def _elem_bytes(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def install() -> None:
    """Patch Triton's interpreter (idempotent)."""
    global _installed
    if _installed:
        return
    from triton.runtime import interpreter as it

    B, G = it.InterpreterBuilder, it.GridExecutor
    load, store, rmw, cas = B.create_masked_load, B.create_masked_store, B.create_atomic_rmw, B.create_atomic_cas
    init_args, call = G._init_args_hst, G.__call__

    def create_masked_load(self, ptrs, mask, other, *a, **k):
        _check_mask("load", mask)
        _check("load", ptrs, mask, _elem_bytes(ptrs))
        _record(_reads, ptrs, mask, _elem_bytes(ptrs))
        return load(self, ptrs, mask, other, *a, **k)

    def create_masked_store(self, ptrs, value, mask, *a, **k):
        _check_mask("store", mask)
        _check("store", ptrs, mask, _elem_bytes(ptrs))
        _record(_writes, ptrs, mask, _elem_bytes(ptrs))
        return store(self, ptrs, value, mask, *a, **k)

    def create_atomic_rmw(self, op, ptr, val, mask, sem, *a, **k):
        _check_mask("atomic", mask)
        _check("atomic", ptr, mask, _elem_bytes(ptr))
        _record_atomic(ptr, mask, sem)
        return rmw(self, op, ptr, val, mask, sem, *a, **k)

    def create_atomic_cas(self, ptr, cmp, val, sem, *a, **k):
        _check("atomic_cas", ptr, None, _elem_bytes(ptr))
        _record_atomic(ptr, None, sem)
        return cas(self, ptr, cmp, val, sem, *a, **k)

    def _init_args_hst(self, args_dev, kwargs):
        global _ranges, _kernel, _writes, _reads, _atomics
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        spans = []
        _storages(list(args_hst) + list(kwargs_hst.values()), spans)
        merged = []  # the union as disjoint spans (views of one tensor overlap, e.g. K and V of a cache)
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        _ranges = (np.array([a for a, _ in merged], dtype=np.uint64), np.array([b for _, b in merged], dtype=np.uint64))
        _kernel = getattr(self.fn, "__name__", "kernel")
        _writes, _reads, _atomics = [], [], []
        return args_hst, kwargs_hst

    def __call__(self, *a, **k):
        global _ranges, _writes, _reads, _atomics
        try:
            out = call(self, *a, **k)
            _check_races()
            return out
        finally:
            _ranges = _writes = _reads = _atomics = None

    B.create_masked_load, B.create_masked_store = create_masked_load, create_masked_store
    B.create_atomic_rmw, B.create_atomic_cas = create_atomic_rmw, create_atomic_cas
    G._init_args_hst, G.__call__ = _init_args_hst, __call__
    _installed = True
