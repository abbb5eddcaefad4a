"""Device helpers that some Triton releases ship broken, with working stand-ins for those
releases; the kernel modules import them from here.

``gdc_wait`` / ``gdc_launch_dependents`` (programmatic dependent launch, sm_90+): triton 3.4.0's
own versions still take a ``_builder`` argument after its code generator moved to passing
``_semantic``, so any kernel that calls them fails to compile there ("unexpected keyword argument
'_semantic'"). The stand-ins emit the same ``griddepcontrol`` instructions through
``tl.inline_asm_elementwise``; for sm_90 their PTX instructions equal those of triton 3.5's and
3.6's own, and only the debug line info differs. Triton 3.5 and later use their own helpers
(3.5.1's compile).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._config import triton_version

__all__ = ["gdc_wait", "gdc_launch_dependents", "NATIVE_GDC"]


@triton.jit
def asm_gdc_wait():
    """Wait until the grids this one depends on have finished and their writes are visible."""
    tl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def asm_gdc_launch_dependents():
    """Let the dependent grid launch once every program of this one has called this (or ended)."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


_version = triton_version()
NATIVE_GDC = _version is None or _version >= (3, 5)

if NATIVE_GDC:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
else:
    gdc_wait, gdc_launch_dependents = asm_gdc_wait, asm_gdc_launch_dependents
