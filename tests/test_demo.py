"""The main job's model: compiled on torch_flashops ops == plain PyTorch; graph structure."""
import pytest
import torch

import torch_flashops as fo
from torch_flashops.models.llama import (
    DenseLlama, LlamaConfig, LlamaWeights, PagedLlama, PageTable, make_wrappers, plan_step, step_args,
)
from tests.helpers import CompileCounter

pytestmark = pytest.mark.skipif(
    not all(hasattr(fo, n) for n in ("BatchPrefillWithPagedKVCacheWrapper", "append_paged_kv_cache",
                                     "apply_rope_pos_ids_inplace", "silu_and_mul")),
    reason="attention/page/rope/moe families not all registered yet",
)

CFG = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
           intermediate_size=32)


@pytest.fixture(autouse=True)
def _no_duck_shapes():
    # as the demo does: plan/page-table sizes that happen to coincide must not become guards
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=False):
        yield


def _serve(cfg, lens, steps, page_size=4, step=None, device="cpu", pages=64):
    """Prefill ``lens`` prompts then ``steps`` decode steps; max |logit error| vs DenseLlama."""
    if step is None:
        step = CompileCounter(PagedLlama(LlamaWeights(cfg, device=device), pages, page_size), dynamic=True)
    model = step.compiled._orig_mod if hasattr(step, "compiled") else step
    ref = DenseLlama(model.w)
    table = PageTable(pages, page_size, device)
    pre, dec = make_wrappers(device, 4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).to(device) for n in lens]
    rids = [table.add_request() for _ in lens]
    worst = 0.0
    with torch.no_grad():
        t = table.csr(rids, lens)
        plan_step(pre, t, cfg, page_size, torch.float32, decode=False)
        logits = step(torch.cat(prompts), *step_args(t), pre)
        start = 0
        for r, n in enumerate(lens):
            worst = max(worst, (logits[start:start + n] - ref.step(r, prompts[r])).abs().max().item())
            start += n
        tok = logits[torch.tensor(lens).cumsum(0) - 1].argmax(-1)
        for _ in range(steps):
            t = table.csr(rids, [1] * len(lens))
            plan_step(dec, t, cfg, page_size, torch.float32, decode=True)
            logits = step(tok, *step_args(t), dec)
            for r in range(len(lens)):
                worst = max(worst, (logits[r] - ref.step(r, tok[r].view(1))[0]).abs().max().item())
            tok = logits.argmax(-1)
    return worst, step


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_compiled_matches_plain_pytorch(moe):
    if moe and not hasattr(fo, "fused_moe"):
        pytest.skip("moe family not registered yet")
    cfg = LlamaConfig(**CFG, num_experts=4 if moe else 0, top_k=2)
    worst, step = _serve(cfg, [5, 1, 9], steps=3)
    assert worst < 1e-3
    assert step.frames == 2  # prefill + decode graphs; no graph break, no recompile across steps


def test_no_recompile_when_batch_changes():
    cfg = LlamaConfig(**CFG)
    worst, step = _serve(cfg, [3, 6], steps=2)
    w2, _ = _serve(cfg, [4, 2, 7, 1], steps=2, step=step)  # same compiled model, batch 2 -> 4
    assert worst < 1e-3 and w2 < 1e-3
    assert step.frames == 2


def test_captured_graph_ops_snapshot():
    expecttest = pytest.importorskip("expecttest")
    cfg = LlamaConfig(**{**CFG, "num_layers": 1})
    _, step = _serve(cfg, [3, 2], steps=1)
    ops = sorted(set(step.graph_ops()))

    class T(expecttest.TestCase):
        def runTest(self):
            self.assertExpectedInline("\n".join(ops), """\
flashops.append_paged_kv_cache.default
flashops.paged_attention.default
flashops.rope_inplace.default
flashops.silu_and_mul.default""")

    T().runTest()
