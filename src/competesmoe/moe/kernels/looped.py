"""Sparse experts one expert at a time, with a hand-written backward: the CPU dispatch.

Same contract as `triton_moe.fused_experts`. For each expert e, its pairs' tokens are gathered into a
small buffer, pushed through W1_e → φ → W2_e and added into the output; only the pre-activations
h [M, H_in] are kept for backward, which gathers each expert's rows again. Every buffer is one expert's
size (≈ 2 MiB at the paper's fine shape), so it stays in cache and in the allocator's free lists: the
full-size [T·K, D] buffers of the grouped path (gathered tokens, pair outputs and their gradients) are
page-faulted in again at every step on CPU, and autograd keeps them alive until backward.

Forward and backward are `torch.library` custom operators (`competesmoe::loop_experts[_backward]`) with
fake implementations, so `torch.compile` traces a model through them without a graph break. φ and dφ
come from one `Activation` (looked up by key). Frozen weights get no gradient computed.

Any dtype and stride (float64 too: gradcheck runs on it). Forward values are bit-identical to the
`grouped_mm` path, which runs the same per-expert GEMMs on CPU.

Shapes: T tokens, D d_in, O d_out, K choices, M = T·K pairs, H_in = W1's rows (2H gated), n one expert's pairs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..activations import lookup
from . import contract
from .plan import SortedPairs

class _Segments:
    """The shared plan cut per expert: pair counts, the token rows each expert reads, the output rows it
    writes (weighted: summed into tokens; else pair rows), the sorted pairs' weights, and whether the
    weights scale the narrower side of GEMM 2 (φ(h) [n, H] or its output [n, O]) as the grouped path does."""

    def __init__(self, idx_TK: Tensor, w1: Tensor, w2: Tensor, w_TK: Optional[Tensor], dtype: torch.dtype) -> None:
        self.plan = SortedPairs.of(idx_TK, w1.shape[0])
        self.counts = self.plan.counts()
        weighted = w_TK is not None
        self.tok_e = self.plan.token_M.split(self.counts)
        self.dst_e = (self.plan.token_M if weighted else self.plan.pair_M).split(self.counts)
        self.scale_M = self.plan.sorted_weights(w_TK, dtype)
        self.fold = weighted and w2.shape[2] <= w2.shape[1]
        self.n_max = max(self.counts, default=0)

    def experts(self):
        """(expert, its pair count n, its rows of the sorted pairs) for every expert with pairs."""
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                yield e, n, slice(start, start + n)
                start += n


@torch.library.custom_op("competesmoe::loop_experts", mutates_args=())
def loop_experts(x_TD: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                 w_TK: Optional[Tensor], idx_TK: Tensor, act: str, keep: bool) -> tuple[Tensor, Tensor]:
    """(out, h): out = Σ_k w_tk g_{idx_tk}(x_t) [T, O] if w_TK is given, else g_{idx_tk}(x_t) [T, K, O];
    h = the sorted pre-activations [T·K, H_in] kept for backward (`keep`), else [0, H_in]."""
    phi = lookup(act)
    T, K = idx_TK.shape
    O, weighted = w2.shape[1], w_TK is not None
    seg = _Segments(idx_TK, w1, w2, w_TK, x_TD.dtype)
    tok_e, dst_e, scale_M, fold, n_max = seg.tok_e, seg.dst_e, seg.scale_M, seg.fold, seg.n_max
    h_MH = x_TD.new_empty(T * K if keep else n_max, w1.shape[1])   # without a graph: one expert's rows
    out = x_TD.new_zeros(T if weighted else T * K, O)
    x_buf, y_buf = x_TD.new_empty(n_max, x_TD.shape[1]), x_TD.new_empty(n_max, O)   # reused by every expert
    for e, n, rows in seg.experts():
        x_e = torch.index_select(x_TD, 0, tok_e[e], out=x_buf[:n])
        h = torch.mm(x_e, w1[e].t(), out=h_MH[rows] if keep else h_MH[:n])
        if b1 is not None:
            h += b1[e]
        a = phi(h)
        s = None if scale_M is None else scale_M[rows, None]
        y = torch.mm(a.mul_(s) if fold else a, w2[e].t(), out=y_buf[:n])   # a is a fresh buffer
        if b2 is not None:
            y += b2[e] * s if fold else b2[e]
        if s is not None and not fold:
            y *= s
        out.index_add_(0, dst_e[e], y)
    out = out if weighted else out.view(T, K, O)
    return out, (h_MH if keep else h_MH.new_empty(0, w1.shape[1]))


@torch.library.custom_op("competesmoe::loop_experts_backward", mutates_args=())
def loop_experts_backward(g: Tensor, x_TD: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                          b2: Optional[Tensor], w_TK: Optional[Tensor], idx_TK: Tensor, h_MH: Tensor, act: str,
                          needs: list[bool]) -> list[Tensor]:
    """[dx, dW1, db1, dW2, db2, dw_TK]; an input that `needs` no gradient gets an empty tensor."""
    phi = lookup(act)
    need_x, need_w1, need_b1, need_w2, need_b2, need_w = needs
    seg = _Segments(idx_TK, w1, w2, w_TK, x_TD.dtype)
    tok_e, dst_e, scale_M, fold, n_max = seg.tok_e, seg.dst_e, seg.scale_M, seg.fold, seg.n_max
    g_rows = g.to(x_TD.dtype).reshape(-1, g.shape[-1])              # [T, O] or [T·K, O]
    gx = torch.zeros_like(x_TD) if need_x else None
    gw1 = torch.zeros_like(w1) if need_w1 else None                  # unused experts: exact zeros
    gw2 = torch.zeros_like(w2) if need_w2 else None
    gb1 = torch.zeros_like(b1) if need_b1 else None
    gb2 = torch.zeros_like(b2) if need_b2 else None
    gs_M = torch.empty_like(scale_M) if scale_M is not None and need_w else None
    D, O = x_TD.shape[1], w2.shape[1]
    gy_buf, x_buf, gx_buf = x_TD.new_empty(n_max, O), x_TD.new_empty(n_max, D), x_TD.new_empty(n_max, D)
    for e, n, rows in seg.experts():
        gy = torch.index_select(g_rows, 0, dst_e[e], out=gy_buf[:n])   # dL/dy of this expert's pairs
        s = None if scale_M is None else scale_M[rows, None]
        h = h_MH[rows]
        a_ = phi(h)
        gu = torch.mm(gy, w2[e])                                      # dL/d(a or s·a), [n, H]
        if gs_M is not None:                                          # dL/ds = gy · (a W2ᵀ + b2)
            gs = torch.linalg.vecdot(gu, a_)
            gs_M[rows] = gs if b2 is None else gs + gy @ b2[e]
        if gw2 is not None:
            if s is None:
                torch.mm(gy.t(), a_, out=gw2[e])
            elif fold:                                                # y = (s·a) W2ᵀ + s·b2
                torch.mm(gy.t(), a_.mul_(s), out=gw2[e])      # a_ is not used again
            else:                                                     # y = s·(a W2ᵀ + b2)
                torch.mm((gy * s).t(), a_, out=gw2[e])
        if gb2 is not None:
            gb2[e] = gy.sum(0) if s is None else (gy * s).sum(0)
        if not (need_x or need_w1 or need_b1):
            continue
        gh = phi.grad(h, gu if s is None else gu.mul_(s))
        if gb1 is not None:
            gb1[e] = gh.sum(0)
        if gw1 is not None:
            torch.mm(gh.t(), torch.index_select(x_TD, 0, tok_e[e], out=x_buf[:n]), out=gw1[e])
        if gx is not None:
            gx.index_add_(0, tok_e[e], torch.mm(gh, w1[e], out=gx_buf[:n]))
    gw_TK = None
    if gs_M is not None:
        gw_TK = torch.empty_like(gs_M).index_copy_(0, seg.plan.pair_M, gs_M).view_as(w_TK).to(w_TK.dtype)
    return [t if t is not None else x_TD.new_empty(0) for t in (gx, gw1, gb1, gw2, gb2, gw_TK)]



contract.register(loop_experts, loop_experts_backward)


def looped_experts(x_TD, w1, b1, w2, b2, idx_TK, act: str, w_TK=None) -> Tensor:
    """y_TD = Σ_k w_tk g_{idx_tk}(x_t) when `w_TK` is given, else out_TKD = g_{idx_tk}(x_t).

    w1: [N, H_in, D] and w2: [N, O, H] as stored (nn.Linear layout), all in x's dtype; `act` is an
    `Activation` key (`moe.activations`).
    """
    return contract.call(loop_experts, x_TD, w1, b1, w2, b2, idx_TK, act, w_TK)
