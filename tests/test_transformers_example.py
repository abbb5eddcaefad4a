"""The transformers integration example (skipped when transformers is not installed)."""
import importlib.util
import os
import sys

import pytest

pytest.importorskip("transformers")

import torch_flashops as fo  # noqa: E402

if not hasattr(fo, "BatchPrefillWithPagedKVCacheWrapper"):
    pytest.skip("attention wrappers not registered", allow_module_level=True)

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "transformers_attention.py")
spec = importlib.util.spec_from_file_location("transformers_attention", _PATH)
example = importlib.util.module_from_spec(spec)
sys.modules["transformers_attention"] = example
spec.loader.exec_module(example)


def test_matches_sdpa_prefill_and_generate():
    err, same = example.main()
    assert err < 1e-4
    assert same
