"""The one registration helper every op goes through.

An op is defined once, in namespace ``flashops``, from
  * a schema string without alias annotations, e.g.
    ``"rope_inplace(Tensor q, Tensor k, Tensor pos_ids, int rotary_dim) -> ()"``;
  * ``mutates``: the names of the arguments the op writes in place (their ``(a!)``
    annotations are added here, so schemas stay readable and the list is the single source);
  * ``cuda``: the Triton launcher, used for CUDA (and ROCm, which PyTorch also calls "cuda");
  * ``reference``: the plain-PyTorch implementation with the same signature and the same
    output contract (dtypes, fresh contiguous outputs, in-place writes), used for CPU tensors
    unless the Triton interpreter is on (then the launcher runs on CPU too, see
    ``_config.cpu_backend``);
  * ``fake``: the shape-only implementation from ``meta/`` (FakeTensor / meta tensors).

Why ``torch.library.Library.define/impl`` rather than ``@custom_op`` or ``triton_op``: on an
H100 (torch 2.11, triton 3.6) it adds ~5 us per eager call over a raw Triton launch, against
~21 us for ``custom_op`` and ~25 us for ``triton_op`` (DESIGN.md, and the ``registration``
benchmark suite), while opcheck, torch.compile(fullgraph=True) and in-place mutation inside
compiled code all work (the op stays opaque to Inductor, which is what we want: no data-
dependent internals leak into the graph). Ops are inference-only: no autograd formula.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Iterable, Optional

import torch

from . import _config

NAMESPACE = "flashops"
_LIB = torch.library.Library(NAMESPACE, "DEF")
_REGISTERED: dict[str, dict] = {}

_ARG_RE = re.compile(r"^\s*(Tensor(?:\[\])?)(\??)\s+(\w+)(.*)$", re.S)


def _annotate_mutations(schema: str, mutates: Iterable[str]) -> str:
    """Insert ``(a!)``, ``(b!)``, ... after ``Tensor`` for every argument named in ``mutates``."""
    mutates = list(mutates)
    if not mutates:
        return schema
    head, rest = schema.split("(", 1)
    args, ret = rest.rsplit(")", 1)
    out, seen, depth, cur = [], set(), 0, ""
    parts = []
    for ch in args:  # split on top-level commas (defaults such as [] contain none at depth 0)
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    for p in parts:
        m = _ARG_RE.match(p)
        if m and m.group(3) in mutates:
            alias = chr(ord("a") + len(seen))
            seen.add(m.group(3))
            p = f" {m.group(1)}({alias}!){m.group(2)} {m.group(3)}{m.group(4)}"
        out.append(p)
    missing = set(mutates) - seen
    if missing:
        raise ValueError(f"mutated arguments {sorted(missing)} are not Tensor arguments of {schema!r}")
    return f"{head}({','.join(out).strip()}){ret}"


def _cuda_index(args) -> Optional[int]:
    """Device index of the first CUDA tensor among ``args`` (tensor lists included)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_cuda:
                return a.device.index
        elif isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    return t.device.index
    return None


def _checked(check: Callable, impl: Callable) -> Callable:
    @functools.wraps(impl)
    def impl_after_check(*args, **kwargs):
        check(*args, **kwargs)
        return impl(*args, **kwargs)
    return impl_after_check


def register_op(
    schema: str,
    *,
    cuda: Callable,
    reference: Callable,
    fake: Optional[Callable] = None,
    mutates: Iterable[str] = (),
    check: Optional[Callable] = None,
) -> "torch._ops.OpOverload":
    """Define ``flashops::<name>`` and register its CUDA, CPU and fake implementations.

    Returns the ``OpOverload`` (``torch.ops.flashops.<name>.default``); public Python
    functions call it directly. ``fake`` may be omitted only for ops that return nothing.
    ``check``, if given, takes the op's arguments and raises ``ValueError`` for ones that
    would make a kernel read out of bounds or disagree with its reference or fake. It runs
    before every implementation (so ``torch.ops.flashops.<name>`` called directly, without
    the public function's checks, is still memory-safe); it must be cheap (ints, options,
    sizes: no tensor data) because a compiled graph pays it on every call.
    """
    mutates = tuple(mutates)
    name = schema.split("(", 1)[0].strip()
    if name in _REGISTERED:
        raise RuntimeError(f"flashops::{name} is already registered")
    full = _annotate_mutations(schema, mutates)
    _LIB.define(full)

    if check is not None:
        cuda, reference = _checked(check, cuda), _checked(check, reference)

    def cpu_impl(*args, **kwargs):
        if _config.cpu_backend() == "triton":
            return cuda(*args, **kwargs)
        return reference(*args, **kwargs)

    def cuda_impl(*args, **kwargs):
        # Python kernels registered through Library.impl get no device guard from the
        # dispatcher, and Triton launches on the *current* device: switch to the inputs' one.
        idx = _cuda_index(args)
        if idx is not None and idx != torch.cuda.current_device():
            with torch.cuda.device(idx):
                return cuda(*args, **kwargs)
        return cuda(*args, **kwargs)

    cpu_impl.__name__ = f"{name}_cpu"
    cuda_impl.__name__ = f"{name}_cuda"
    _LIB.impl(name, cuda_impl, "CUDA")
    _LIB.impl(name, cpu_impl, "CPU")
    if fake is None:
        if not full.rstrip().endswith("-> ()"):
            raise ValueError(f"flashops::{name} returns tensors and needs a fake implementation")

        def fake(*args, **kwargs):  # mutating op with no outputs: nothing to compute
            return None
    if check is not None:
        fake = _checked(check, fake)

    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    _REGISTERED[name] = dict(schema=full, mutates=mutates, cuda=cuda, reference=reference, fake=fake)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def registered_ops() -> dict[str, dict]:
    """Name -> registration record, for the self-check and the schema snapshot tests."""
    return dict(_REGISTERED)
