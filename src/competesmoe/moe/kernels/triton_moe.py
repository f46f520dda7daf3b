"""Fused sparse dispatch in Triton (ScatterMoE-style): gather → grouped GEMM → scatter, no [T·K, D] gather.

The (token, choice) pairs are sorted by expert once; every kernel then reads its rows through an index
(the token of a pair, or the pair itself) instead of a materialised gathered copy, and writes through one:
  forward   h_MH  = x[t_m] · W1_e^T (+ b1_e)                        gather fused into GEMM 1
            y_t   = Σ_k w_tk (φ(h) · W2_e^T + b2_e)                  weights folded into GEMM 2, pair-order store
  backward  G_MH  = g[t_m] · W2_e                                    gather fused
            ∂w_m  = ⟨G_m, φ(h_m)⟩ (+ ⟨g_t, b2_e⟩),  ∂φ = w_m G_m,  ∂h = φ'ᵀ ∂φ   (elementwise, torch)
            ∂x_t  = Σ_k ∂h_m · W1_e                                  pair-order store, summed over K
            ∂W1_e = Σ_m ∂h_mᵀ x[t_m],  ∂W2_e = Σ_m (w_m g[t_m])ᵀ φ(h_m)   grouped outer products, gather fused
The same kernels give the unweighted per-pair outputs [T, K, D] (the competition needs them).
Accumulation is float32; inputs and outputs keep the compute dtype (bf16 under autocast, or fp32).

Forward and backward are `torch.library` custom operators (`competesmoe::triton_experts[_backward]`) with
fake implementations: `torch.compile` traces a model through them without a graph break. φ and dφ come from
one `Activation` (looked up by key); frozen weights get no gradient computed. Every row, column and expert
offset is computed in 64 bits (`_at`): an expert's slice of W2's gradient starts at e·P·Q, past 2³¹ at
64 experts × 14336 × 4096.

Runs on CUDA, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1), which is how the tests
cover it without a GPU. Shapes: T tokens, D d_in, O d_out, N experts, K choices, H_in = W1 rows, M = T·K pairs.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from ..activations import lookup
from . import contract
from .plan import SortedPairs

# The interpreter computes bf16 tl.dot wrongly (triton 3.9); it gets float32 operands, which hold the
# bf16 values exactly, so the products and the float32 accumulation are those of the GPU path.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the fused kernels can run on tensors of `device`."""
    return device.type == "cuda" or (_INTERPRET and device.type == "cpu")


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _at(i, stride):
    """Offset i·stride in 64 bits (i: an index tensor or scalar of any integer type)."""
    return i.to(tl.int64) * stride


@triton.jit
def _gmm_kernel(x_ptr, src_ptr, w_ptr, b_ptr, scale_ptr, dst_ptr, out_ptr,
                blk_e_ptr, blk_start_ptr, blk_end_ptr, KD, ND,
                s_xm, s_xk, s_we, s_wk, s_wn, s_be, s_bn, s_om, s_on,
                HAS_SRC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DST: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """out[dst_m] = scale_m · (x[src_m] · W_e + b_e) for a block of sorted rows m of one expert e.

    W_e is read as a [KD, ND] matrix through the strides (so W1 and W2 serve both orientations).
    """
    blk = tl.program_id(0)
    e = tl.load(blk_e_ptr + blk)
    if e < 0:                      # past the last real block (the grid is an upper bound: no host sync)
        return
    rows = tl.load(blk_start_ptr + blk) + tl.arange(0, BM)
    rmask = rows < tl.load(blk_end_ptr + blk)
    if HAS_SRC:
        src = tl.load(src_ptr + rows, mask=rmask, other=0)
    else:
        src = rows
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = cols < ND
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, KD, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < KD
        xt = tl.load(x_ptr + _at(src, s_xm)[:, None] + _at(ks, s_xk)[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + _at(e, s_we) + _at(ks, s_wk)[:, None] + _at(cols, s_wn)[None, :],
                     mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(xt, wt, acc, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + _at(e, s_be) + _at(cols, s_bn), mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    if HAS_DST:
        dst = tl.load(dst_ptr + rows, mask=rmask, other=0)
    else:
        dst = rows
    tl.store(out_ptr + _at(dst, s_om)[:, None] + _at(cols, s_on)[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _outer_kernel(a_ptr, a_src_ptr, a_scale_ptr, b_ptr, b_src_ptr, out_ptr, start_ptr, count_ptr, P, Q,
                  s_am, s_ap, s_bm, s_bq, s_oe, s_op, s_oq,
                  HAS_ASRC: tl.constexpr, HAS_ASCALE: tl.constexpr, HAS_BSRC: tl.constexpr,
                  BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """out[e] = Σ_{m of expert e} (scale_m · a[asrc_m])ᵀ b[bsrc_m]: [P, Q] per expert (weight gradients)."""
    e = tl.program_id(0)
    ps = tl.program_id(1) * BP + tl.arange(0, BP)
    qs = tl.program_id(2) * BQ + tl.arange(0, BQ)
    pmask, qmask = ps < P, qs < Q
    start = tl.load(start_ptr + e)
    n = tl.load(count_ptr + e)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for k0 in range(0, n, BK):
        ks = k0 + tl.arange(0, BK)
        rmask = ks < n
        rows = start + ks
        if HAS_ASRC:
            asrc = tl.load(a_src_ptr + rows, mask=rmask, other=0)
        else:
            asrc = rows
        if HAS_BSRC:
            bsrc = tl.load(b_src_ptr + rows, mask=rmask, other=0)
        else:
            bsrc = rows
        at = tl.load(a_ptr + _at(asrc, s_am)[None, :] + _at(ps, s_ap)[:, None],
                     mask=pmask[:, None] & rmask[None, :], other=0.0)
        if HAS_ASCALE:
            sc = tl.load(a_scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            at = (at.to(tl.float32) * sc[None, :]).to(at.dtype)
        bt = tl.load(b_ptr + _at(bsrc, s_bm)[:, None] + _at(qs, s_bq)[None, :],
                     mask=rmask[:, None] & qmask[None, :], other=0.0)
        acc = _dot(at, bt, acc, IEEE, UPCAST)
    tl.store(out_ptr + _at(e, s_oe) + _at(ps, s_op)[:, None] + _at(qs, s_oq)[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & qmask[None, :])


# --- launchers ------------------------------------------------------------------------------------------
def block_sizes(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BM, BN, BK) of the kernels for `dtype`: rows, columns and reduction per program."""
    if _INTERPRET:
        return 16, 16, 16           # the interpreter's cost is per program and per block element alike
    return (64, 64, 32) if dtype == torch.float32 else (64, 128, 64)


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


class Routing:
    """The shared sort-by-expert plan (int32 indices for the kernels) and the row blocks of the grouped
    GEMMs, all on the device without a host sync."""

    def __init__(self, idx_TK: torch.Tensor, n_experts: int, block_m: int) -> None:
        T, K = idx_TK.shape
        self.plan = plan = SortedPairs.of(idx_TK, n_experts)
        start_N = plan.start_N
        self.pair_M, self.token_M = plan.pair_M.to(torch.int32), plan.token_M.to(torch.int32)
        self.expert_M = plan.expert_M
        self.count_N, self.start_N = plan.count_N.to(torch.int32), start_N.to(torch.int32)
        nblk_N = (plan.count_N + block_m - 1) // block_m
        last_N = nblk_N.cumsum(0)
        n_blocks = triton.cdiv(T * K, block_m) + n_experts                # upper bound on the real blocks
        b = torch.arange(n_blocks, device=idx_TK.device)
        e = torch.searchsorted(last_N, b, right=True)
        ec = e.clamp(max=n_experts - 1)
        self.blk_e = torch.where(e < n_experts, ec, -1).to(torch.int32)
        self.blk_start = (start_N[ec] + (b - (last_N[ec] - nblk_N[ec])) * block_m).to(torch.int32)
        self.blk_end = (start_N[ec] + plan.count_N[ec]).to(torch.int32)
        self.n_blocks, self.block_m, self.T, self.K = n_blocks, block_m, T, K


def gmm(x, w_kn, routing: Routing, out_rows: int, src=None, bias=None, scale=None, dst=None) -> torch.Tensor:
    """out[dst_m] = scale_m (x[src_m] · W_e + b_e); `w_kn` is a [N, KD, ND] view of the weights."""
    _, KD, ND = w_kn.shape
    out = torch.empty(out_rows, ND, device=x.device, dtype=x.dtype)
    BM, BN, BK = block_sizes(x.dtype)
    assert BM == routing.block_m
    dummy = routing.blk_e
    _gmm_kernel[(routing.n_blocks, triton.cdiv(ND, BN))](
        x, dummy if src is None else src, w_kn, dummy if bias is None else bias,
        dummy if scale is None else scale, dummy if dst is None else dst, out,
        routing.blk_e, routing.blk_start, routing.blk_end, KD, ND,
        x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1), w_kn.stride(2),
        0 if bias is None else bias.stride(0), 0 if bias is None else bias.stride(1), out.stride(0), out.stride(1),
        HAS_SRC=src is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_DST=dst is not None,
        BM=BM, BN=BN, BK=BK, IEEE=_ieee(x.dtype), UPCAST=_INTERPRET)
    return out


def outer(a, b, routing: Routing, a_src=None, a_scale=None, b_src=None) -> torch.Tensor:
    """[N, P, Q]: per expert, Σ over its sorted rows m of (a_scale_m a[a_src_m])ᵀ b[b_src_m]."""
    P, Q = a.shape[1], b.shape[1]
    n = routing.count_N.shape[0]
    out = torch.empty(n, P, Q, device=a.device, dtype=a.dtype)
    BP, BQ, BK = block_sizes(a.dtype)
    dummy = routing.blk_e
    _outer_kernel[(n, triton.cdiv(P, BP), triton.cdiv(Q, BQ))](
        a, dummy if a_src is None else a_src, dummy if a_scale is None else a_scale,
        b, dummy if b_src is None else b_src, out, routing.start_N, routing.count_N, P, Q,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        HAS_ASRC=a_src is not None, HAS_ASCALE=a_scale is not None, HAS_BSRC=b_src is not None,
        BP=BP, BQ=BQ, BK=BK, IEEE=_ieee(a.dtype), UPCAST=_INTERPRET)
    return out


# --- custom operators -----------------------------------------------------------------------------------
@torch.library.custom_op("competesmoe::triton_experts", mutates_args=())
def triton_experts(x_TD: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                   w_TK: Optional[Tensor], idx_TK: Tensor, act: str, keep: bool) -> tuple[Tensor, Tensor]:
    """(out, h): weighted (w_TK given) y_TD = Σ_k w_tk g_{idx_tk}(x_t), else out_TKO = g_{idx_tk}(x_t);
    h = the sorted pre-activations [T·K, H_in] kept for backward (`keep`), else [0, H_in]."""
    T, K = idx_TK.shape
    r = Routing(idx_TK, w1.shape[0], block_sizes(x_TD.dtype)[0])
    x_TD = x_TD.contiguous()
    h_MH = gmm(x_TD, w1.transpose(1, 2), r, T * K, src=r.token_M, bias=b1)          # sorted rows
    a_MH = lookup(act)(h_MH)
    out_PO = gmm(a_MH, w2.transpose(1, 2), r, T * K, bias=b2, scale=r.plan.sorted_weights(w_TK, x_TD.dtype), dst=r.pair_M)
    out_TKO = out_PO.view(T, K, -1)
    out = out_TKO if w_TK is None else out_TKO.sum(dim=1)
    return out, (h_MH if keep else h_MH.new_empty(0, h_MH.shape[1]))


@torch.library.custom_op("competesmoe::triton_experts_backward", mutates_args=())
def triton_experts_backward(g: Tensor, x_TD: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                            b2: Optional[Tensor], w_TK: Optional[Tensor], idx_TK: Tensor, h_MH: Tensor, act: str,
                            needs: list[bool]) -> list[Tensor]:
    """[dx, dW1, db1, dW2, db2, dw_TK]; an input that `needs` no gradient gets an empty tensor."""
    phi = lookup(act)
    need_x, need_w1, need_b1, need_w2, need_b2, need_w = needs
    T, K = idx_TK.shape
    r = Routing(idx_TK, w1.shape[0], block_sizes(x_TD.dtype)[0])
    x_TD = x_TD.contiguous()
    scale_M = r.plan.sorted_weights(w_TK, x_TD.dtype)
    weighted = w_TK is not None
    g = g.contiguous().to(x_TD.dtype)
    g_rows = g if weighted else g.reshape(-1, g.shape[-1])         # [T, O] or [T·K, O]
    g_src = r.token_M if weighted else r.pair_M
    G_MH = gmm(g_rows, w2, r, T * K, src=g_src)                    # g · W2_e (unscaled)
    a_MH = phi(h_MH)
    grads: list[Optional[Tensor]] = [None] * 6
    if need_x or need_w1 or need_b1:
        d_h = phi.grad(h_MH, G_MH if scale_M is None else G_MH * scale_M[:, None])
        if need_x:
            grads[0] = gmm(d_h, w1, r, T * K, dst=r.pair_M).view(T, K, -1).sum(dim=1)   # x_t feeds its K pairs
        if need_w1:
            grads[1] = outer(d_h, x_TD, r, b_src=r.token_M)
        if need_b1:
            grads[2] = torch.zeros_like(b1).index_add_(0, r.expert_M, d_h.to(b1.dtype))
    if need_w2:
        grads[3] = outer(g_rows, a_MH, r, a_src=g_src, a_scale=scale_M)
    gy_MO = g_rows.index_select(0, g_src.long()) if b2 is not None and (need_b2 or (weighted and need_w)) else None
    if need_b2:
        rows = gy_MO if scale_M is None else gy_MO * scale_M[:, None]
        grads[4] = torch.zeros_like(b2).index_add_(0, r.expert_M, rows.to(b2.dtype))
    if weighted and need_w:
        gw_M = (G_MH.float() * a_MH.float()).sum(-1)
        if b2 is not None:
            gw_M = gw_M + (gy_MO.float() * b2.index_select(0, r.expert_M).float()).sum(-1)
        grads[5] = torch.empty(T * K, device=gw_M.device, dtype=w_TK.dtype).index_copy_(
            0, r.pair_M.long(), gw_M.to(w_TK.dtype)).view_as(w_TK)
    return [t if t is not None else x_TD.new_empty(0) for t in grads]



contract.register(triton_experts, triton_experts_backward)


def fused_experts(x_TD, w1, b1, w2, b2, idx_TK, act: str, w_TK=None) -> torch.Tensor:
    """y_TD = Σ_k w_tk g_{idx_tk}(x_t) when `w_TK` is given, else out_TKO = g_{idx_tk}(x_t).

    w1: [N, H_in, D] and w2: [N, O, H] as stored (nn.Linear layout), all in the compute dtype;
    `act` is an `Activation` key (`moe.activations`).
    """
    return contract.call(triton_experts, x_TD, w1, b1, w2, b2, idx_TK, act, w_TK)
