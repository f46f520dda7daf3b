"""Sparse experts one expert at a time, with a hand-written backward: the CPU dispatch.

Same contract as `triton_moe.fused_experts`. For each expert e, its pairs' tokens are gathered into a
small buffer, pushed through W1_e → φ → W2_e and added into the output; only the pre-activations
h [M, H_in] are kept for backward, which gathers each expert's rows again. Every buffer is one expert's
size (≈ 2 MiB at the paper's fine shape), so it stays in cache and in the allocator's free lists: the
full-size [T·K, D] buffers of the grouped path (gathered tokens, pair outputs and their gradients) are
page-faulted in again at every step on CPU, and autograd keeps them alive until backward.

Any dtype and stride (float64 too: gradcheck runs on it). Forward values are bit-identical to the
`grouped_mm` path, which runs the same per-expert GEMMs on CPU.

Shapes: T tokens, D d_model, K choices, M = T·K pairs, H_in = W1's rows (2H for swiglu), n one expert's pairs.
"""
from __future__ import annotations

from functools import partial

import torch


def _plan(idx_TK: torch.Tensor, n_experts: int, weighted: bool):
    """Per expert: the token rows its pairs read, the output rows they write, its slice of the sorted pairs."""
    T, K = idx_TK.shape
    flat_M = idx_TK.reshape(-1)
    order_M = flat_M.argsort(stable=True)                       # pairs sorted by expert
    counts = torch.bincount(flat_M, minlength=n_experts).tolist()
    tok_M = order_M // K
    dst_M = tok_M if weighted else order_M                      # weighted: summed into tokens; else pair rows
    return order_M, counts, tok_M.split(counts), dst_M.split(counts)


class _LoopedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w1, b1, w2, b2, w_TK, idx_TK, act, act_grad, keep: bool):
        T, K = idx_TK.shape
        D, weighted = x_TD.shape[1], w_TK is not None
        order_M, counts, tok_e, dst_e = _plan(idx_TK, w1.shape[0], weighted)
        scale_M = None if not weighted else w_TK.reshape(-1).index_select(0, order_M).to(x_TD.dtype)
        fold = weighted and w2.shape[2] <= D   # weights scale the narrower side of GEMM 2, as the grouped path
        n_max = max(counts, default=0)
        h_MH = x_TD.new_empty(T * K if keep else n_max, w1.shape[1])   # without a graph: one expert's rows
        out = x_TD.new_zeros(T if weighted else T * K, D)
        x_buf, y_buf = (x_TD.new_empty(n_max, D) for _ in range(2))   # reused by every expert
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            start += n
            x_e = torch.index_select(x_TD, 0, tok_e[e], out=x_buf[:n])
            h = torch.mm(x_e, w1[e].t(), out=h_MH[rows] if keep else h_MH[:n])
            if b1 is not None:
                h += b1[e]
            a = act(h)
            s = None if scale_M is None else scale_M[rows, None]
            y = torch.mm(a.mul_(s) if fold else a, w2[e].t(), out=y_buf[:n])   # a is a fresh buffer
            if b2 is not None:
                y += b2[e] * s if fold else b2[e]
            if s is not None and not fold:
                y *= s
            out.index_add_(0, dst_e[e], y)
        ctx.save_for_backward(x_TD, w1, b1, w2, b2, w_TK, h_MH, scale_M, order_M)
        ctx.plan, ctx.act, ctx.act_grad, ctx.fold = (counts, tok_e, dst_e), act, act_grad, fold
        return out if weighted else out.view(T, K, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x_TD, w1, b1, w2, b2, w_TK, h_MH, scale_M, order_M = ctx.saved_tensors
        (counts, tok_e, dst_e), act, act_grad = ctx.plan, ctx.act, ctx.act_grad
        g_rows = g.to(x_TD.dtype).reshape(-1, g.shape[-1])           # [T, D] or [T·K, D]
        need = ctx.needs_input_grad
        gx = torch.zeros_like(x_TD) if need[0] else None
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)       # every expert's slice is written below
        gb1 = None if b1 is None else torch.empty_like(b1)
        gb2 = None if b2 is None else torch.empty_like(b2)
        gs_M = None if scale_M is None else torch.empty_like(scale_M)
        D = x_TD.shape[1]
        gy_buf, x_buf, gx_buf = (x_TD.new_empty(max(counts, default=0), D) for _ in range(3))
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                for grad in (gw1, gw2, gb1, gb2):
                    if grad is not None:
                        grad[e] = 0
                continue
            rows = slice(start, start + n)
            start += n
            gy = torch.index_select(g_rows, 0, dst_e[e], out=gy_buf[:n])   # dL/dy of this expert's pairs
            s = None if scale_M is None else scale_M[rows, None]
            h = h_MH[rows]
            a_ = act(h)
            gu = torch.mm(gy, w2[e])                                  # dL/d(a or s·a), [n, H]
            if gs_M is not None:                                      # dL/ds = gy · (a W2ᵀ + b2)
                gs = torch.linalg.vecdot(gu, a_)
                gs_M[rows] = gs if b2 is None else gs + gy @ b2[e]
            if s is None:
                torch.mm(gy.t(), a_, out=gw2[e])
            elif ctx.fold:                                            # y = (s·a) W2ᵀ + s·b2
                torch.mm(gy.t(), a_.mul_(s), out=gw2[e])
            else:                                                     # y = s·(a W2ᵀ + b2)
                torch.mm((gy * s).t(), a_, out=gw2[e])
            if gb2 is not None:
                gb2[e] = gy.sum(0) if s is None else (gy * s).sum(0)
            ga = gu if s is None else gu.mul_(s)
            gh = act_grad(h, ga)
            if gb1 is not None:
                gb1[e] = gh.sum(0)
            x_e = torch.index_select(x_TD, 0, tok_e[e], out=x_buf[:n])
            torch.mm(gh.t(), x_e, out=gw1[e])
            if gx is not None:
                gx.index_add_(0, tok_e[e], torch.mm(gh, w1[e], out=gx_buf[:n]))
        gw_TK = None
        if gs_M is not None and need[5]:
            gw_TK = torch.empty_like(gs_M).index_copy_(0, order_M, gs_M).view_as(w_TK).to(w_TK.dtype)
        return gx, gw1, gb1, gw2, gb2, gw_TK, None, None, None, None


@torch.compiler.disable   # a Python loop over data-dependent sizes: dynamo runs it eagerly
def looped_experts(x_TD, w1, b1, w2, b2, idx_TK, act, w_TK=None, act_grad=None) -> torch.Tensor:
    """y_TD = Σ_k w_tk g_{idx_tk}(x_t) when `w_TK` is given, else out_TKD = g_{idx_tk}(x_t).

    w1: [N, H_in, D] and w2: [N, D, H] as stored (nn.Linear layout), all in x's dtype;
    `act` maps the [n, H_in] pre-activations to a new [n, H] tensor (swiglu halves H_in); `act_grad(h, dL/da)` gives
    dL/dh (default: autograd through `act`, one call per expert, which costs ~3% of a step at the fine shape).
    """
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_TD, w1, b1, w2, b2, w_TK))
    return _LoopedExperts.apply(x_TD, w1, b1, w2, b2, w_TK, idx_TK, act, act_grad or partial(_autograd_vjp, act), keep)


def _autograd_vjp(act, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        return torch.autograd.grad(act(h), h, g)[0]
