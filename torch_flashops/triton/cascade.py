"""FlashInfer's ``flashinfer.triton.cascade`` module path, served by our merge ops.

Same functions as ``torch_flashops.cascade`` (these are our Triton kernels too) [diff:
``variable_length_merge_states`` returns ``0 / -inf`` for an empty segment where FlashInfer's
Triton kernel returns an LSE of -5e4].
"""
from ..cascade import merge_state, merge_state_in_place, merge_states, variable_length_merge_states

__all__ = ["merge_state", "merge_state_in_place", "merge_states", "variable_length_merge_states"]
