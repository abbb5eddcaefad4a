"""MoE routing family (spec/moe.md §1, §2, §7): routing ops and moe_align_block_size vs the
spec oracles, align invariants, FlashInfer shims, opcheck, torch.compile, schema snapshots
and bad input.

On CPU the Triton kernels run in the interpreter (tests/conftest.py), so shapes stay small.
"""
from __future__ import annotations

import pytest
import torch

import torch_flashops as fo
from torch_flashops.reference import moe_routing as ref


def test_align_worked_example(device):
    """Spec §2 example, exactly."""
    ids = torch.tensor([[1, 3], [1, 0], [3, -1]], dtype=torch.int32, device=device)
    sid, eid, ntp = fo.moe_align_block_size(ids, 2, 4)
    assert sid.tolist() == [3, 6, 0, 2, 1, 4, 5, 6, 6, 6, 6]
    assert eid.tolist() == [0, 1, 3, -1, -1, -1]
    assert ntp.tolist() == [8] and ntp.device == ids.device and ntp.dtype == torch.int32
