"""FlashInfer's ``flashinfer.activation`` module path, so ``import torch_flashops as flashinfer;
flashinfer.activation.silu_and_mul(x)`` (and ``gelu_and_mul``, ``gelu_tanh_and_mul``) works as it
does with FlashInfer (whose package imports that module). The ops themselves live with the MoE
family (``torch_flashops/fused_moe.py``, moe.md §3).
"""
from .fused_moe import gelu_and_mul, gelu_tanh_and_mul, silu_and_mul

__all__ = ["silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"]
