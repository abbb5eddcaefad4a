"""Process-wide switches: checked mode, interpreter detection, the CPU backend choice.

Checked mode (``set_checks(True)`` or ``FLASHOPS_CHECKS=1``) turns on validation that has to
read tensor *data* (indptr values, page ids, positions) and therefore synchronises with the
device. It is skipped while torch.compile traces and while a CUDA graph is being captured, so
the fast path never syncs. Checks on shapes, dtypes, devices and options always run.
"""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["set_checks", "checks_enabled", "interpreting", "cpu_backend", "set_cpu_backend", "sm_major"]

_checks = os.environ.get("FLASHOPS_CHECKS", "0") not in ("", "0", "false", "False")
_cpu_backend = os.environ.get("FLASHOPS_CPU_BACKEND", "auto")


def set_checks(enabled: bool) -> None:
    """Turn checked mode on or off for this process (see the module docstring)."""
    global _checks
    _checks = bool(enabled)


def checks_enabled() -> bool:
    """True when data-reading checks should run now (never while tracing or capturing)."""
    if not _checks:
        return False
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``).

    The variable is read by ``@triton.jit`` when a kernel is decorated, so it must be set
    before ``torch_flashops`` is imported; ``FLASHOPS_INTERPRET=1`` asks the package to set it.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton's interpreter before 3.6 checks a tensor descriptor's strides in elements where the
# hardware (and 3.6's interpreter) needs 16 bytes, so it refuses valid bf16/fp16 descriptors
# (a stride of 8 elements); the MoE GEMMs' descriptor paths then fail when interpreted. The
# compiled GPU path is not affected.
MIN_INTERPRETER_TRITON = (3, 6)


def triton_version(version: str | None = None) -> tuple[int, int] | None:
    """``(major, minor)`` of Triton ``version`` (the installed one by default); None when it does
    not parse (a development build), which callers treat as new enough."""
    if version is None:
        import triton

        version = triton.__version__
    try:
        major, minor = version.split("+")[0].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def warn_if_interpreter_too_old(version: str | None = None) -> bool:
    """Warn (``RuntimeWarning``) and return True when Triton ``version`` (the installed one by
    default) is older than the first release whose interpreter runs every kernel here."""
    if version is None:
        import triton

        version = triton.__version__
    parsed = triton_version(version)
    if parsed is None or parsed >= MIN_INTERPRETER_TRITON:
        return False
    import warnings

    need = ".".join(map(str, MIN_INTERPRETER_TRITON))
    warnings.warn(f"Triton's interpreter (TRITON_INTERPRET=1) needs triton >= {need} to run every torch_flashops "
                  f"kernel; triton {version}'s refuses valid tensor descriptors, so the MoE GEMMs' descriptor "
                  f"paths fail when interpreted (GPU runs are not affected). requirements-cpu.txt pins a tested "
                  f"triton.", RuntimeWarning, stacklevel=3)
    return True


@functools.lru_cache(maxsize=None)
def sm_major(index: int) -> int:
    """Compute-capability major of CUDA device ``index``, queried once per device (launch paths
    ask on every call: TMA eligibility, programmatic dependent launches)."""
    return torch.cuda.get_device_capability(index)[0]


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Multiprocessors of CUDA device ``index``, queried once per device (grid sizing: the
    split-KV planner, the persistent decode MoE kernel)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def set_cpu_backend(name: str) -> None:
    """Choose what runs ops on CPU tensors: ``"reference"`` (plain PyTorch), ``"triton"``
    (the Triton kernels in the interpreter; needs ``TRITON_INTERPRET=1`` at import) or
    ``"auto"`` (triton when interpreting, else reference)."""
    global _cpu_backend
    if name not in ("auto", "reference", "triton"):
        raise ValueError(f"cpu backend must be 'auto', 'reference' or 'triton', got {name!r}")
    if name == "triton" and not interpreting():
        raise ValueError("cpu backend 'triton' needs TRITON_INTERPRET=1 set before import")
    _cpu_backend = name


def cpu_backend() -> str:
    """The backend CPU tensors use now: ``"triton"`` or ``"reference"``."""
    if _cpu_backend == "auto":
        return "triton" if interpreting() else "reference"
    return _cpu_backend
