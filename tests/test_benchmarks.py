"""The benchmark harness runs end to end on CPU (smoke sizes) and writes its three outputs."""
import json
import os

import pytest

from benchmarks import harness
from benchmarks.__main__ import available, main


def test_suites_discovered():
    assert "registration" in available()


def test_time_fn_cpu_median():
    calls = []
    ms = harness.time_fn(lambda a: calls.append(a), [(1,), (2,)], device="cpu")
    assert ms >= 0 and set(calls) == {1, 2}


def test_table_ratios():
    rows = [harness.Row("s", "c", "peer", 2.0, bytes=2e6), harness.Row("s", "c", "ours", 1.0, bytes=2e6)]
    t = harness.table(rows, {"copy_GBps": 4.0, "gemm_bf16_TFLOPs": 1.0})
    assert "2.00x (peer)" in t and "| 2 | 50% |" in t


def test_cli_registration_quick(tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["registration", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "registration.json").read_text())
    assert data["suite"] == "registration" and data["rows"]
    assert {r["impl"] for r in data["rows"]} >= {"library", "custom_op", "sdpa"}
    assert os.path.getsize(tmp_path / "registration.png") > 1000
    assert "| case |" in (tmp_path / "registration.md").read_text()


def test_cli_unknown_suite():
    with pytest.raises(SystemExit):
        main(["no-such-suite"])


def test_moe_suite_model_filter(monkeypatch):
    import pytest

    from benchmarks.suites import moe

    monkeypatch.delenv("FLASHOPS_BENCH_MOE", raising=False)
    assert list(moe._selected_models()) == list(moe.MODELS)
    monkeypatch.setenv("FLASHOPS_BENCH_MOE", "Mixtral-1GPU, Qwen3-4GPU")
    assert list(moe._selected_models()) == ["Mixtral-1GPU", "Qwen3-4GPU"]
    monkeypatch.setenv("FLASHOPS_BENCH_MOE", "Mixtral-3GPU")
    with pytest.raises(ValueError, match="Mixtral-3GPU"):
        moe._selected_models()


def test_moe_suite_token_filter(monkeypatch):
    import pytest

    from benchmarks.suites import moe

    monkeypatch.delenv("FLASHOPS_BENCH_MOE_T", raising=False)
    assert moe._selected_tokens() == moe.TOKENS
    assert all(ts[-1] == 16384 for ts in moe.TOKENS.values())  # the T list, every model
    monkeypatch.setenv("FLASHOPS_BENCH_MOE_T", "16384, 1")
    assert moe._selected_tokens() == {m: [1, 16384] for m in moe.MODELS}
    for bad in ("5", "1,x", ","):
        monkeypatch.setenv("FLASHOPS_BENCH_MOE_T", bad)
        with pytest.raises(ValueError, match="FLASHOPS_BENCH_MOE_T"):
            moe._selected_tokens()
