"""torch_flashops: FlashInfer-compatible LLM inference kernels in Triton, as torch.library ops.

``import torch_flashops as flashinfer`` is meant to work for the covered APIs. Every op lives
in namespace ``torch.ops.flashops``; see ``torch_flashops.registered_ops()``.

On a machine without a GPU, ops on CPU tensors run the plain-PyTorch reference
implementations; with ``FLASHOPS_INTERPRET=1`` set before torch_flashops and triton are
imported (or ``TRITON_INTERPRET=1`` in the environment), they run the Triton kernels themselves in
Triton's interpreter.
"""
import os as _os

if _os.environ.get("FLASHOPS_INTERPRET", "0") not in ("", "0"):
    # Must happen before any @triton.jit decorator runs (it reads the variable then), including
    # those of triton.language's own helpers (tl.zeros, ...), which run when triton is imported.
    import sys as _sys

    if "triton" in _sys.modules and _os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        import warnings as _warnings

        _warnings.warn("FLASHOPS_INTERPRET=1: triton was imported before torch_flashops (directly or through "
                       "torch._dynamo / torch._inductor), so its own jit helpers were built for the GPU and some "
                       "kernels will fail in the interpreter; import torch_flashops first, or set "
                       "TRITON_INTERPRET=1 in the environment", RuntimeWarning, stacklevel=2)
    _os.environ["TRITON_INTERPRET"] = "1"

from ._config import checks_enabled, cpu_backend, interpreting, set_checks, set_cpu_backend  # noqa: E402
from ._registry import registered_ops  # noqa: E402

if interpreting():
    from ._config import warn_if_interpreter_too_old as _warn_old

    _warn_old()

# Families (each import registers its ops).
# (each family adds one line here: `from .<family> import *  # noqa: E402,F401,F403`)
from .rope import *  # noqa: E402,F401,F403
from .page import *  # noqa: E402,F401,F403
from .cascade import *  # noqa: E402,F401,F403
from .quantization import *  # noqa: E402,F401,F403
from .prefill import *  # noqa: E402,F401,F403
from .decode import *  # noqa: E402,F401,F403
from .cascade_wrapper import *  # noqa: E402,F401,F403
from .moe_routing import *  # noqa: E402,F401,F403
from .fused_moe import *  # noqa: E402,F401,F403
from . import activation, moe_utils, triton  # noqa: E402,F401  (FlashInfer's module paths, as attributes)

# FlashInfer has a *module* flashinfer.fused_moe (cutlass_fused_moe, ...): keep the name bound to
# our module so `import torch_flashops as flashinfer` works; the vLLM-style layer function is
# torch_flashops.fused_moe.fused_moe.
import sys as _sys  # noqa: E402

fused_moe = _sys.modules[__name__ + ".fused_moe"]
# (FlashInfer's flashinfer.tllm_enums holds ActivationType and RoutingMethodType, and
# flashinfer.dsv3_ops re-exports fused_topk_deepseek: here both are that module too)
tllm_enums = dsv3_ops = fused_moe

__version__ = "0.1.0"
