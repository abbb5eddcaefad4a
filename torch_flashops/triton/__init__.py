"""``flashinfer.triton`` module paths: ``torch_flashops.triton.cascade`` (spec attention.md §7)."""
from . import cascade  # noqa: F401
