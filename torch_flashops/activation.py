"""FlashInfer's ``flashinfer.activation`` module path, so ``import torch_flashops as flashinfer;
flashinfer.activation.silu_and_mul(x)`` works as it does with FlashInfer (whose package imports
that module). The op itself lives with the MoE family (``torch_flashops/fused_moe.py``, moe.md §3).
"""
from .fused_moe import silu_and_mul

__all__ = ["silu_and_mul"]
