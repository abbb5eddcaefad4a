"""Serve unmodified FlashInfer code: register ``torch_flashops`` under the name ``flashinfer``.

``import torch_flashops as flashinfer`` covers code that only touches ``flashinfer.<name>``.
Code that imports FlashInfer's module paths (``import flashinfer``, ``from flashinfer.decode
import BatchDecodeWithPagedKVCacheWrapper``, ``from flashinfer.fused_moe import
cutlass_fused_moe``) needs ``sys.modules`` entries instead; call this once, before that code
is imported::

    from torch_flashops.compat import install_as_flashinfer
    install_as_flashinfer()
    import flashinfer                      # now torch_flashops under FlashInfer's names

Each registered ``flashinfer.<module>`` is a small module holding FlashInfer's names for that
module (where our code keeps them: ``MultiLevelCascadeAttentionWrapper`` lives in
``cascade_wrapper.py``, ``cutlass_fused_moe`` in ``fused_moe.py``, ``moe_sort`` in
``moe_routing.py``) plus the public names of our module of the same family ([ext] such as
``cascade.variable_length_merge_states``). ``flashinfer`` itself holds every public name of
torch_flashops, with FlashInfer's submodule names bound to those modules (our top-level
``fused_moe`` is a function; FlashInfer's is a module). ``docs/flashinfer_compat.md`` lists what
is covered. A FlashInfer name we do not provide raises ``AttributeError`` naming that document;
a module path we do not provide raises ``ModuleNotFoundError`` as usual.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import torch_flashops as _tf

__all__ = ["install_as_flashinfer", "FLASHINFER_MODULES"]

_ALIAS_MARK = "__torch_flashops_alias__"

# FlashInfer module path -> (our module of that family or None, FlashInfer's names we cover there).
# A name missing from our module is taken from the torch_flashops top level (where it lives in
# another file); a name we do not have at all is left out.
FLASHINFER_MODULES = {
    # (FlashInfer's decode and prefill modules re-export page.get_seq_lens; engines import it from there)
    # (_get_range_buf: FlashInfer's private helper, imported by SGLang's and vLLM's backends)
    "decode": ("torch_flashops.decode", ["single_decode_with_kv_cache", "BatchDecodeWithPagedKVCacheWrapper",
                                          "CUDAGraphBatchDecodeWithPagedKVCacheWrapper", "get_seq_lens",
                                          "fast_decode_plan", "_get_range_buf"]),
    "prefill": ("torch_flashops.prefill", ["single_prefill_with_kv_cache", "single_prefill_with_kv_cache_return_lse",
                                            "BatchPrefillWithPagedKVCacheWrapper",
                                            "BatchPrefillWithRaggedKVCacheWrapper", "get_seq_lens"]),
    "page": ("torch_flashops.page", ["append_paged_kv_cache", "get_batch_indices_positions", "get_seq_lens"]),
    "cascade": ("torch_flashops.cascade", ["merge_state", "merge_state_in_place", "merge_states",
                                            "MultiLevelCascadeAttentionWrapper",
                                            "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
                                            "BatchPrefillWithSharedPrefixPagedKVCacheWrapper"]),
    "rope": ("torch_flashops.rope", ["apply_rope", "apply_rope_inplace", "apply_rope_pos_ids",
                                      "apply_rope_pos_ids_inplace", "apply_llama31_rope",
                                      "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
                                      "apply_llama31_rope_pos_ids_inplace", "apply_rope_with_cos_sin_cache",
                                      "apply_rope_with_cos_sin_cache_inplace"]),
    "quantization": ("torch_flashops.quantization", ["packbits", "segment_packbits"]),
    "activation": ("torch_flashops.activation", ["silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"]),
    "fused_moe": (None, ["cutlass_fused_moe", "ActivationType", "RoutingMethodType", "fused_topk_deepseek"]),
    # (vLLM and SGLang import ActivationType from here)
    "fused_moe.core": (None, ["cutlass_fused_moe", "ActivationType", "RoutingMethodType"]),
    # (where FlashInfer defines fused_topk_deepseek, and its DeepSeek-V3 ops package re-exporting it)
    "fused_moe.fused_routing_dsv3": (None, ["fused_topk_deepseek"]),
    "dsv3_ops": (None, ["fused_topk_deepseek"]),
    # (FlashInfer's current home of both enums; fused_moe.core imports them from here)
    "tllm_enums": (None, ["ActivationType", "RoutingMethodType"]),
    "moe_utils": ("torch_flashops.moe_utils", ["moe_sort", "moe_permute", "moe_unpermute", "allocate_moe_sort_buffers",
                                                "get_max_num_tiles", "get_max_num_permuted_tokens"]),
    "triton": ("torch_flashops.triton", []),
    "triton.cascade": ("torch_flashops.triton.cascade", ["merge_state", "merge_state_in_place", "merge_states",
                                                          "variable_length_merge_states"]),
}


def _new_module(name: str, doc: str, *, package: bool) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    # A real spec keeps importlib.util.find_spec("flashinfer") (used by has_flashinfer()-style
    # probes) working; an empty __path__ makes unknown submodules a plain ModuleNotFoundError.
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []
    setattr(mod, _ALIAS_MARK, True)
    return mod


def _not_covered(name: str):
    def __getattr__(attr: str):
        raise AttributeError(f"module {name!r} (torch_flashops alias) has no attribute {attr!r}: "
                             f"not covered by torch_flashops, see docs/flashinfer_compat.md")
    return __getattr__


def _build() -> dict:
    """All alias modules keyed by FlashInfer module path (``""`` = ``flashinfer``); touches no
    ``sys.modules`` entry."""
    mods = {}
    for path, (ours, names) in FLASHINFER_MODULES.items():
        src = sys.modules[ours] if ours else None
        package = any(p.startswith(path + ".") for p in FLASHINFER_MODULES)
        mod = _new_module(f"flashinfer.{path}", f"FlashInfer's ``flashinfer.{path}`` served by "
                          f"``{ours or 'torch_flashops'}`` (docs/flashinfer_compat.md).", package=package)
        public = list(getattr(src, "__all__", [])) if src else []
        for attr in dict.fromkeys(public + names):
            owner = src if hasattr(src, attr) else _tf  # hasattr(None, attr) is False
            if hasattr(owner, attr):
                setattr(mod, attr, getattr(owner, attr))
        mod.__all__ = [a for a in dict.fromkeys(public + names) if a in vars(mod)]
        mod.__getattr__ = _not_covered(mod.__name__)
        mods[path] = mod
    for path, mod in mods.items():  # parent.child attributes (flashinfer.triton.cascade)
        parent, _, child = path.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    top = _new_module("flashinfer", _tf.__doc__, package=True)
    for attr, value in vars(_tf).items():
        if not attr.startswith("_"):
            setattr(top, attr, value)
    top.__version__ = _tf.__version__
    for path, mod in mods.items():
        if "." not in path:
            setattr(top, path, mod)
    top.__getattr__ = _not_covered("flashinfer")
    mods[""] = top
    return mods


def install_as_flashinfer() -> types.ModuleType:
    """Register torch_flashops as ``flashinfer`` in ``sys.modules`` and return that module.

    Afterwards ``import flashinfer``, ``import flashinfer.decode`` and ``from flashinfer.<module>
    import <name>`` resolve to torch_flashops for the module paths of ``FLASHINFER_MODULES``.
    Calling it again returns the same module.

    Raises
    ------
    RuntimeError
        If a real ``flashinfer`` (or any ``flashinfer.*`` module) is already imported in this
        process: the two cannot share the name, so install before anything imports FlashInfer.
    """
    current = sys.modules.get("flashinfer")
    if current is not None and getattr(current, _ALIAS_MARK, False):
        return current
    taken = sorted(k for k in sys.modules if k == "flashinfer" or k.startswith("flashinfer."))
    if taken:
        raise RuntimeError(f"a real flashinfer is already imported ({', '.join(taken[:3])}); "
                           "call install_as_flashinfer() before anything imports flashinfer")
    mods = _build()
    for path, mod in mods.items():
        sys.modules["flashinfer" + (f".{path}" if path else "")] = mod
    return mods[""]
