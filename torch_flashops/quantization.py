"""Bit packing of boolean masks (FlashInfer's ``flashinfer.quantization``), plain PyTorch.

Bit orders, as in ``numpy.packbits``:
* ``"big"`` (the default, FlashInfer's default too): element ``8*i + k`` is bit ``7 - k`` of
  byte i (the first element is the most significant bit);
* ``"little"``: element ``8*i + k`` is bit ``k`` of byte i (the first element is the least
  significant bit).

The attention kernels read packed custom masks **little-endian** (spec/attention.md §0.4), one
request after another, each from a byte boundary. That layout is exactly
``segment_packbits(mask_flat, mask_indptr, bitorder="little")[0]`` with
``mask_indptr[b+1] - mask_indptr[b] = qo_len_b * kv_len_b``. The big-endian default exists
for FlashInfer compatibility of these two functions, not for the attention masks.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ._checks import check_tensor, expect

__all__ = ["packbits", "segment_packbits"]


def _bit_weights(bitorder: str, device) -> torch.Tensor:
    expect(bitorder in ("big", "little"), "bitorder", f"must be 'big' or 'little', got {bitorder!r}")
    shifts = torch.arange(8, device=device, dtype=torch.int32)
    return 1 << (7 - shifts if bitorder == "big" else shifts)


def packbits(x: torch.Tensor, bitorder: str = "big") -> torch.Tensor:
    """Pack a binary array into bits of a uint8 array (``numpy.packbits`` with ``axis=None``).

    Parameters
    ----------
    x : torch.Tensor
        Any shape (flattened in row-major order), any dtype; nonzero elements are 1.
    bitorder : str
        ``"big"`` (default) or ``"little"``, see the module docstring.

    Returns
    -------
    torch.Tensor
        uint8, shape ``[ceil(x.numel() / 8)]``, same device; the last byte is padded with 0 bits.
        No host sync (traceable by torch.compile).

    Examples
    --------
    >>> packbits(torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool))
    tensor([179], dtype=torch.uint8)
    >>> packbits(torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool), bitorder="little")
    tensor([205], dtype=torch.uint8)
    """
    check_tensor(x, "x", last_contiguous=False)
    w = _bit_weights(bitorder, x.device)
    bits = (x.reshape(-1) != 0).to(torch.int32)
    bits = torch.nn.functional.pad(bits, (0, (-bits.shape[0]) % 8)).view(-1, 8)
    return (bits * w).sum(1).to(torch.uint8)


def segment_packbits(x: torch.Tensor, indptr: torch.Tensor, bitorder: str = "big") -> Tuple[torch.Tensor, torch.Tensor]:
    """Pack each segment ``x[indptr[i]:indptr[i+1]]`` separately, each from a byte boundary.

    Parameters
    ----------
    x : torch.Tensor
        1-D (or any shape, flattened), any dtype (nonzero = 1), at least ``indptr[-1]`` elements.
    indptr : torch.Tensor
        int32 or int64, shape ``[B + 1]``, starts at 0, non-decreasing, same device as ``x``.
    bitorder : str
        ``"big"`` (default) or ``"little"`` (the layout the attention kernels read).

    Returns
    -------
    packed : torch.Tensor
        uint8, shape ``[new_indptr[-1]]``: ``packed[new_indptr[i]:new_indptr[i+1]]`` holds the bits
        of segment i, its last byte padded with 0 bits.
    new_indptr : torch.Tensor
        int32, shape ``[B + 1]``, with ``new_indptr[i+1] - new_indptr[i] = ceil(seglen_i / 8)``.

    Notes
    -----
    The output size depends on ``indptr``'s values: one host sync, so (as in FlashInfer) this
    is a host-side preparation step, not for torch.compile'd or CUDA-graph-captured code.

    Examples
    --------
    >>> segment_packbits(torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1]), torch.tensor([0, 4, 7, 11]))
    (tensor([176, 32, 208], dtype=torch.uint8), tensor([0, 1, 2, 3], dtype=torch.int32))
    """
    check_tensor(x, "x", last_contiguous=False)
    check_tensor(indptr, "indptr", ndim=1, dtypes=(torch.int32, torch.int64), device=x.device)
    expect(indptr.shape[0] >= 1, "indptr", "must have at least one element")
    w = _bit_weights(bitorder, x.device)
    x = x.reshape(-1)
    ind = indptr.to(torch.int64)
    seglen = ind[1:] - ind[:-1]
    expect(bool((seglen >= 0).all()) and int(ind[0]) == 0, "indptr", "must start at 0 and be non-decreasing")
    expect(int(ind[-1]) <= x.shape[0], "x", f"has {x.shape[0]} elements, indptr[-1] needs {int(ind[-1])}")
    new_indptr = torch.zeros_like(ind)
    torch.cumsum((seglen + 7) // 8, 0, out=new_indptr[1:])
    total = int(new_indptr[-1])
    byte = torch.arange(total, device=x.device)
    seg = torch.searchsorted(new_indptr[1:], byte, right=True)  # segment owning each byte
    src = ind[seg, None] + 8 * (byte - new_indptr[seg])[:, None] + torch.arange(8, device=x.device)
    inside = src < ind[seg + 1, None]
    bits = ((x[src.clamp(max=max(x.shape[0] - 1, 0))] != 0) & inside).to(torch.int32) if x.shape[0] else inside.to(torch.int32)
    return (bits * w).sum(1).to(torch.uint8), new_indptr.to(torch.int32)
