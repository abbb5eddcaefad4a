"""Argument validation shared by every family.

Everything here looks only at metadata (shape, dtype, device, strides) and never syncs, except
the ``*_values`` helpers, which read data and are meant to run only under
``_config.checks_enabled()``. Every failure is a ``ValueError`` whose message starts with the
argument's name.
"""
from __future__ import annotations

import numbers
from typing import Callable, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)
)


def is_int(x) -> bool:
    """A Python or numpy integer (or a SymInt while tracing), not a bool or a float."""
    return isinstance(x, (numbers.Integral, torch.SymInt)) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A Python or numpy real number (or a SymInt / SymFloat while tracing), not a bool."""
    return isinstance(x, (numbers.Real, torch.SymInt, torch.SymFloat)) and not isinstance(x, bool)


def reject_fp8(x, name: str) -> None:
    """fp8 K/V (a tensor or a dtype) is reserved: ``NotImplementedError`` naming ``name``."""
    dt = x.dtype if isinstance(x, torch.Tensor) else x
    if dt in FP8_DTYPES:
        raise NotImplementedError(f"{name}: fp8 KV is not supported yet (dtype {dt})")


def expect(cond: bool, name: str, msg: str, *fmt_args, **fmt_kwargs) -> None:
    """Raise ``ValueError(f"{name}: {msg}")`` unless ``cond``.

    With ``fmt_args``/``fmt_kwargs`` the message is ``msg.format(...)``, and a callable ``msg``
    is called; either way it is built only on failure.
    Prefer those forms for messages that show sizes or scalar options: under
    ``torch.compile(dynamic=True)`` those may be symbolic, and an eagerly built f-string of a
    SymInt/SymFloat is a graph break (dynamo cannot trace BUILD_STRING on them).
    """
    if not cond:
        if callable(msg):
            msg = msg()
        elif fmt_args or fmt_kwargs:
            msg = msg.format(*fmt_args, **fmt_kwargs)
        raise ValueError(f"{name}: {msg}")


def fail_if(cond, name: str, msg: Callable[[], str]) -> None:
    """Raise ``ValueError("name: msg()")`` where ``cond`` surely holds. For the op checks that
    run before every implementation, fakes included: a symbolic size that cannot be decided
    while tracing counts as fine (no guard, no data-dependent error). ``msg`` is a callable so
    the message is only formatted on failure (these checks run on every eager call)."""
    if cond is False:
        return
    if cond is not True:  # a symbolic condition: only tracing makes them, and tracing loaded this module
        # (imported here, not at the top: it pulls in sympy, about 0.5 s of `import torch_flashops`)
        from torch.fx.experimental.symbolic_shapes import guard_or_false

        if not guard_or_false(cond):
            return
    raise ValueError(f"{name}: {msg()}")


def check_tensor(
    t,
    name: str,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    last_contiguous: bool = True,
) -> None:
    """Type, rank, dtype, device and ``stride(-1) == 1`` checks for one tensor argument.

    On the hot path of every eager call: conditions first, messages only on failure."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        if t.dim() != ndim if isinstance(ndim, int) else t.dim() not in ndim:
            dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
            raise ValueError(f"{name}: expected {' or '.join(map(str, dims))}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} not supported (expected one of {', '.join(map(str, dtypes))})")
    if device is not None and t.device != (device if isinstance(device, torch.device) else torch.device(device)):
        raise ValueError(f"{name}: on {t.device}, expected {device} (all tensors of a call share one device)")
    if last_contiguous and t.dim() > 0 and t.stride(-1) != 1 and t.numel() > 1:
        raise ValueError(f"{name}: last dimension must be contiguous (stride(-1) == 1), got strides {t.stride()}")


def check_same(a, b, name_a: str, name_b: str, *, shape: bool = True, dtype: bool = True, device: bool = True) -> None:
    """``a`` and ``b`` agree in shape, dtype and device."""
    if shape:
        expect(a.shape == b.shape, name_b, "shape {} does not match {} {}", tuple(b.shape), name_a, tuple(a.shape))
    if dtype:
        expect(a.dtype == b.dtype, name_b, "dtype {} does not match {} {}", b.dtype, name_a, a.dtype)
    if device:
        expect(a.device == b.device, name_b, "device {} does not match {} {}", b.device, name_a, a.device)


def check_indptr_values(indptr, name: str, *, total: Optional[int] = None) -> None:
    """Data checks for a CSR indptr (a tensor, which syncs, or a host array): at least one
    entry, starts at 0, non-decreasing, optionally ends at ``total``."""
    if isinstance(indptr, torch.Tensor):
        indptr = indptr.detach().to("cpu", torch.int64).numpy()
    h = np.asarray(indptr, dtype=np.int64).reshape(-1)
    if h.size == 0:
        raise ValueError(f"{name}: must have at least one element")
    if h[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {int(h[0])}")
    d = np.diff(h)
    if d.size and d.min() < 0:
        raise ValueError(f"{name}: must be non-decreasing (first decrease at index {int(np.argmax(d < 0)) + 1})")
    if total is not None and int(h[-1]) != total:
        raise ValueError(f"{name}: last value {int(h[-1])} must equal {total}")


def check_range_values(t: torch.Tensor, name: str, lo: int, hi: int) -> None:
    """Data check (syncs): every value in ``[lo, hi)``."""
    if t.numel() == 0:
        return
    mn, mx = int(t.min()), int(t.max())
    expect(lo <= mn and mx < hi, name, f"values must lie in [{lo}, {hi}), got min {mn}, max {mx}")


def check_writable(t, name: str) -> None:
    """An in-place target must not have several elements sharing memory (e.g. from
    ``expand()``): each would be updated more than once, and on a GPU concurrently. Skipped
    while torch.compile traces (dynamo cannot trace the query; ops check inside their
    implementations, on real tensors)."""
    if torch.compiler.is_compiling():
        return
    expect(torch._debug_has_internal_overlap(t) != 1, name,
           "has internally overlapping memory (e.g. from expand()); it cannot be written in place")


def byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """``[first, last + 1)`` byte addresses a strided tensor may touch (``(0, 0)`` if empty)."""
    if t.numel() == 0:
        return 0, 0
    start = t.data_ptr()
    return start, start + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


def spans_intersect(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The byte spans of ``a`` and ``b`` intersect (exact for contiguous tensors; conservative
    for strided ones, whose interleaved views count too). Real tensors only (reads data_ptr)."""
    (a0, a1), (b0, b1) = byte_span(a), byte_span(b)
    return a0 < b1 and b0 < a1


def overlaps_other_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b``'s memory may intersect ``a``'s without being the very same view."""
    same_view = a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
    return spans_intersect(a, b) and not same_view
