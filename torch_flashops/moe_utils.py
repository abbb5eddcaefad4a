"""FlashInfer's ``flashinfer.moe_utils`` module path (``moe_sort``, ``moe_permute``,
``moe_unpermute``), so attribute access through ``import torch_flashops as flashinfer`` reaches
them as the import path does under ``install_as_flashinfer()``. They live with the routing family
(``torch_flashops/moe_routing.py``, moe.md §2).
"""
from .moe_routing import moe_permute, moe_sort, moe_unpermute

__all__ = ["moe_sort", "moe_permute", "moe_unpermute"]
