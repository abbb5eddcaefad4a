"""A small Llama-style decoder, twice: on torch_flashops ops over a paged KV cache, and in
plain PyTorch (SDPA over dense per-request KV) as the oracle. Both read one ``LlamaWeights``.

Shapes: ``N`` tokens in a step (ragged over ``B`` requests), hidden ``H``, ``Hq`` query heads,
``Hkv`` KV heads, head dim ``D``; paged cache per layer ``[P, 2, page_size, Hkv, D]`` (NHD),
held as module buffers (so ``mode="reduce-overhead"`` can capture the step in a CUDA graph).
Dense MLP ``down(silu(gate(x)) * up(x))`` or, with ``num_experts > 0``, a top-k softmax-routed
MoE (renormalised, Mixtral/Qwen3 style) through ``fused_moe``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 512
    num_experts: int = 0  # 0: dense MLP
    top_k: int = 2
    rope_theta: float = 1e4
    rms_eps: float = 1e-5

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.num_experts and not (1 <= self.top_k <= self.num_experts):
            raise ValueError(f"top_k must be in [1, num_experts], got {self.top_k}")


class LlamaWeights(nn.Module):
    """Random weights (scaled so activations stay O(1) through the layers)."""

    def __init__(self, cfg: LlamaConfig, dtype=torch.float32, device="cpu", seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size

        def rnd(*shape, fan_in):
            return nn.Parameter((torch.randn(*shape, generator=g) / math.sqrt(fan_in)).to(device, dtype), requires_grad=False)

        self.cfg = cfg
        self.embed = rnd(cfg.vocab_size, H, fan_in=1)
        self.layers = nn.ModuleList()
        for _ in range(cfg.num_layers):
            blk = nn.Module()
            blk.attn_norm = nn.Parameter(torch.ones(H, device=device, dtype=dtype), requires_grad=False)
            blk.mlp_norm = nn.Parameter(torch.ones(H, device=device, dtype=dtype), requires_grad=False)
            blk.wqkv = rnd((cfg.num_heads + 2 * cfg.num_kv_heads) * D, H, fan_in=H)
            blk.wo = rnd(H, cfg.num_heads * D, fan_in=cfg.num_heads * D)
            if cfg.num_experts:
                blk.router = rnd(cfg.num_experts, H, fan_in=H)
                blk.w1 = rnd(cfg.num_experts, 2 * I, H, fan_in=H)  # [gate; up]
                blk.w2 = rnd(cfg.num_experts, H, I, fan_in=I)
            else:
                blk.w1 = rnd(2 * I, H, fan_in=H)
                blk.w2 = rnd(H, I, fan_in=I)
            self.layers.append(blk)
        self.final_norm = nn.Parameter(torch.ones(H, device=device, dtype=dtype), requires_grad=False)
        self.lm_head = rnd(cfg.vocab_size, H, fan_in=H)


def rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _split_qkv(qkv, cfg):
    N, D = qkv.shape[0], cfg.head_dim
    q = qkv[:, : cfg.num_heads * D].view(N, cfg.num_heads, D)
    k = qkv[:, cfg.num_heads * D : (cfg.num_heads + cfg.num_kv_heads) * D].view(N, cfg.num_kv_heads, D)
    v = qkv[:, (cfg.num_heads + cfg.num_kv_heads) * D :].view(N, cfg.num_kv_heads, D)
    return q, k, v


# --------------------------------------------------------------------------- torch_flashops
class PagedLlama(nn.Module):
    """The model on torch_flashops ops. ``forward`` is one step (prefill or decode) and is
    meant to run under ``torch.compile(fullgraph=True)``: every attention, RoPE, cache-append
    and MoE call is a ``torch.ops.flashops`` op; the wrapper's ``run`` only launches ops."""

    def __init__(self, weights: LlamaWeights, num_pages: int, page_size: int):
        super().__init__()
        self.w = weights
        cfg = weights.cfg
        self.cfg, self.page_size = cfg, page_size
        dev, dt = weights.embed.device, weights.embed.dtype
        for i in range(cfg.num_layers):
            self.register_buffer(
                f"kv_cache_{i}", torch.zeros(num_pages, 2, page_size, cfg.num_kv_heads, cfg.head_dim, device=dev, dtype=dt)
            )

    def kv_cache(self, i):
        return getattr(self, f"kv_cache_{i}")

    def _mlp(self, blk, h):
        import torch_flashops as fo

        cfg = self.cfg
        if not cfg.num_experts:
            return fo.silu_and_mul(h @ blk.w1.T) @ blk.w2.T
        topk_w, topk_ids = fo.topk_softmax(h @ blk.router.T, cfg.top_k, renormalize=True)
        return fo.fused_moe.fused_moe(h, blk.w1, blk.w2, topk_w, topk_ids)

    def forward(self, input_ids, pos_ids, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, attn):
        import torch_flashops as fo

        cfg, w = self.cfg, self.w
        x = w.embed[input_ids]
        for i, blk in enumerate(w.layers):
            h = rms_norm(x, blk.attn_norm, cfg.rms_eps)
            qkv = h @ blk.wqkv.T
            q, k, v = _split_qkv(qkv, cfg)
            fo.apply_rope_pos_ids_inplace(q, k, pos_ids, rope_theta=cfg.rope_theta)
            cache = self.kv_cache(i)
            fo.append_paged_kv_cache(k, v, batch_indices, positions, cache, kv_indices, kv_indptr, kv_last_page_len)
            o = attn.run(q, cache)
            x = x + o.reshape(x.shape[0], -1) @ blk.wo.T
            x = x + self._mlp(blk, rms_norm(x, blk.mlp_norm, cfg.rms_eps))
        return rms_norm(x, w.final_norm, cfg.rms_eps) @ w.lm_head.T


# --------------------------------------------------------------------------- plain PyTorch
def _rope_ref(x, pos, theta):
    """Rotate-half RoPE in fp32, x [L, heads, D], pos [L]."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D // 2, dtype=torch.float64, device=x.device) * 2 / D)
    ang = pos.float()[:, None] * inv.float()[None, :]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    a, b = x[..., : D // 2].float(), x[..., D // 2 :].float()
    return torch.cat([a * c - b * s, b * c + a * s], -1).to(x.dtype)


class DenseLlama:
    """The oracle: per-request dense K/V lists, SDPA, plain-PyTorch RoPE/MLP/MoE."""

    def __init__(self, weights: LlamaWeights):
        self.w, self.cfg = weights, weights.cfg
        self.kv: dict[int, list] = {}

    def _mlp(self, blk, h):
        cfg = self.cfg
        if not cfg.num_experts:
            g, u = (h @ blk.w1.T).chunk(2, -1)
            return (F.silu(g.float()) * u.float()).to(h.dtype) @ blk.w2.T
        p = (h @ blk.router.T).float().softmax(-1)
        tw, ti = p.topk(cfg.top_k, -1)
        tw = tw / tw.sum(-1, keepdim=True)
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for e in range(cfg.num_experts):
            t, j = (ti == e).nonzero(as_tuple=True)
            if t.numel():
                g, u = (h[t].float() @ blk.w1[e].float().T).chunk(2, -1)
                out.index_add_(0, t, ((F.silu(g) * u) @ blk.w2[e].float().T) * tw[t, j][:, None])
        return out.to(h.dtype)

    @torch.no_grad()
    def step(self, rid: int, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [L] to request ``rid`` and return its logits [L, vocab]."""
        cfg, w = self.cfg, self.w
        cache = self.kv.setdefault(rid, [[None, None] for _ in range(cfg.num_layers)])
        start = 0 if cache[0][0] is None else cache[0][0].shape[0]
        L = tokens.shape[0]
        pos = torch.arange(start, start + L, device=tokens.device)
        x = w.embed[tokens]
        rep = cfg.num_heads // cfg.num_kv_heads
        for i, blk in enumerate(w.layers):
            h = rms_norm(x, blk.attn_norm, cfg.rms_eps)
            q, k, v = _split_qkv(h @ blk.wqkv.T, cfg)
            q, k = _rope_ref(q, pos, cfg.rope_theta), _rope_ref(k, pos, cfg.rope_theta)
            K = k if cache[i][0] is None else torch.cat([cache[i][0], k])
            V = v if cache[i][1] is None else torch.cat([cache[i][1], v])
            cache[i] = [K, V]
            # bottom-right causal: query r sees keys j <= start + r
            mask = torch.arange(K.shape[0], device=x.device)[None, :] <= pos[:, None]
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1).float(), K.repeat_interleave(rep, 1).transpose(0, 1).float(),
                V.repeat_interleave(rep, 1).transpose(0, 1).float(), attn_mask=mask,
            ).transpose(0, 1).to(x.dtype)
            x = x + o.reshape(L, -1) @ blk.wo.T
            x = x + self._mlp(blk, rms_norm(x, blk.mlp_norm, cfg.rms_eps))
        return rms_norm(x, w.final_norm, cfg.rms_eps) @ w.lm_head.T


# --------------------------------------------------------------------------- page table
class PageTable:
    """Host-side page allocator: which pages each request owns, and the CSR for a step."""

    def __init__(self, num_pages: int, page_size: int, device):
        self.page_size, self.device = page_size, device
        self.free = list(range(num_pages - 1, -1, -1))
        self.pages: list[list[int]] = []
        self.lens: list[int] = []

    def add_request(self) -> int:
        self.pages.append([])
        self.lens.append(0)
        return len(self.pages) - 1

    def extend(self, rid: int, n: int) -> None:
        need = -(-(self.lens[rid] + n) // self.page_size) - len(self.pages[rid])
        if need > len(self.free):
            raise RuntimeError(f"out of KV pages: need {need}, {len(self.free)} free")
        self.pages[rid] += [self.free.pop() for _ in range(need)]
        self.lens[rid] += n

    def csr(self, rids, append_lens):
        """Tensors for a step appending ``append_lens[b]`` tokens to request ``rids[b]``."""
        import torch_flashops as fo

        for r, n in zip(rids, append_lens):
            self.extend(r, n)
        ps = self.page_size
        indptr, indices, last = [0], [], []
        for r in rids:
            indices += self.pages[r]
            indptr.append(len(indices))
            last.append(self.lens[r] - (len(self.pages[r]) - 1) * ps if self.pages[r] else 0)
        qo = [0]
        for n in append_lens:
            qo.append(qo[-1] + n)
        t = lambda x: torch.tensor(x, dtype=torch.int32, device=self.device)  # noqa: E731
        qo_indptr, kv_indptr, kv_indices, kv_last = t(qo), t(indptr), t(indices), t(last)
        seq_lens = fo.get_seq_lens(kv_indptr, kv_last, ps)
        batch_indices, positions = fo.get_batch_indices_positions(qo_indptr, seq_lens, qo[-1])
        pos_ids = positions.clone()
        return dict(qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices, kv_last_page_len=kv_last,
                    batch_indices=batch_indices, positions=positions, pos_ids=pos_ids)


def make_wrappers(device, workspace_mb: int = 32):
    """One prefill and one decode wrapper sharing a workspace; re-planned every step."""
    import torch_flashops as fo

    ws = torch.empty(workspace_mb << 20, dtype=torch.uint8, device=device)
    return fo.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD"), fo.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")


def plan_step(wrapper, t, cfg: LlamaConfig, page_size: int, dtype, decode: bool):
    if decode:
        wrapper.plan(t["kv_indptr"], t["kv_indices"], t["kv_last_page_len"], cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim, page_size, q_data_type=dtype)
    else:
        wrapper.plan(t["qo_indptr"], t["kv_indptr"], t["kv_indices"], t["kv_last_page_len"], cfg.num_heads,
                     cfg.num_kv_heads, cfg.head_dim, page_size, causal=True, q_data_type=dtype)


def step_args(t):
    return (t["pos_ids"], t["batch_indices"], t["positions"], t["kv_indices"], t["kv_indptr"], t["kv_last_page_len"])


def check_sizes(cfg: LlamaConfig, prompt_lens, decode_steps: int, page_size: int) -> int:
    """Pages needed for the whole run."""
    return sum(-(-(L + decode_steps) // page_size) for L in prompt_lens) + 1


def greedy(logits: torch.Tensor, last_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    rows = logits if last_rows is None else logits[last_rows]
    return rows.argmax(-1)


# --------------------------------------------------------------------------- dense-KV peer
class StaticCacheLlama(nn.Module):
    """The peer for timing: the same model over a dense, statically sized KV cache
    ``[B, Hkv, max_len, D]`` per layer (what HF's static cache does), SDPA with a length mask.
    Decode only: one token per request at ``positions`` [B]. Compiles whole
    (``mode="reduce-overhead"``): the cache is a module buffer written with ``index_copy_``."""

    def __init__(self, weights: LlamaWeights, batch: int, max_len: int):
        super().__init__()
        self.w, self.cfg, self.max_len = weights, weights.cfg, max_len
        cfg = weights.cfg
        dev, dt = weights.embed.device, weights.embed.dtype
        for i in range(cfg.num_layers):
            self.register_buffer(f"k_{i}", torch.zeros(batch, cfg.num_kv_heads, max_len, cfg.head_dim, device=dev, dtype=dt))
            self.register_buffer(f"v_{i}", torch.zeros(batch, cfg.num_kv_heads, max_len, cfg.head_dim, device=dev, dtype=dt))

    def forward(self, input_ids, positions):
        cfg, w = self.cfg, self.w
        B = input_ids.shape[0]
        x = w.embed[input_ids]
        keep = torch.arange(self.max_len, device=x.device)[None, None, None, :] <= positions[:, None, None, None]
        rows = torch.arange(B, device=x.device)
        for i, blk in enumerate(w.layers):
            h = rms_norm(x, blk.attn_norm, cfg.rms_eps)
            q, k, v = _split_qkv(h @ blk.wqkv.T, cfg)
            q, k = _rope_ref(q, positions, cfg.rope_theta), _rope_ref(k, positions, cfg.rope_theta)
            kc, vc = getattr(self, f"k_{i}"), getattr(self, f"v_{i}")
            kc[rows, :, positions] = k
            vc[rows, :, positions] = v
            o = F.scaled_dot_product_attention(q[:, :, None, :], kc, vc, attn_mask=keep, enable_gqa=True)
            x = x + o.reshape(B, -1) @ blk.wo.T
            hm = rms_norm(x, blk.mlp_norm, cfg.rms_eps)
            g, u = (hm @ blk.w1.T).chunk(2, -1)
            x = x + (F.silu(g) * u) @ blk.w2.T
        return rms_norm(x, w.final_norm, cfg.rms_eps) @ w.lm_head.T
