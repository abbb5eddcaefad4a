"""FlashInfer's ``flashinfer.moe_utils`` module path (``moe_sort``, ``moe_permute``,
``moe_unpermute`` and ``moe_sort``'s buffer helpers), so attribute access through ``import
torch_flashops as flashinfer`` reaches them as the import path does under
``install_as_flashinfer()``. They live with the routing family
(``torch_flashops/moe_routing.py``, moe.md §2).
"""
from .moe_routing import (allocate_moe_sort_buffers, get_max_num_permuted_tokens, get_max_num_tiles, moe_permute,
                          moe_sort, moe_unpermute)

__all__ = ["moe_sort", "moe_permute", "moe_unpermute", "allocate_moe_sort_buffers", "get_max_num_tiles",
           "get_max_num_permuted_tokens"]
