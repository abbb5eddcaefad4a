"""The README's quick-start snippet runs as written and its decode output is right."""
import os

import torch

import torch_flashops as fo
from tests.helpers import assert_close


def test_quick_start_snippet():
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as fh:
        readme = fh.read()
    code = readme.split("## Quick start")[1].split("```python")[1].split("```")[0]
    ns = {}
    exec(compile(code, "README.md quick start", "exec"), ns)
    o, q, cache = ns["o"], ns["q"], ns["cache"]
    assert o.shape == (2, 32, 128) and o.dtype == torch.bfloat16
    # the new tokens (positions 22 and 11) were appended, rotated, where the page table says
    k_new, v_new = ns["k"], ns["v"]
    assert torch.equal(cache[9, 0, 22 % 16], k_new[0]) and torch.equal(cache[9, 1, 22 % 16], v_new[0])
    assert torch.equal(cache[1, 0, 11], k_new[1]) and torch.equal(cache[1, 1, 11], v_new[1])
    # request b attends over its pages, in order, up to its length (the appended K/V included)
    for b, (pages, n) in enumerate([([5, 9], 23), ([1], 12)]):
        kv = cache[pages]                                   # [pages, 2, page, Hkv, D]
        k = kv[:, 0].reshape(-1, 8, 128)[:n]
        v = kv[:, 1].reshape(-1, 8, 128)[:n]
        want = fo.single_decode_with_kv_cache(q[b], k, v)
        assert_close(f"request {b}", o[b], want, dtype=torch.bfloat16)
