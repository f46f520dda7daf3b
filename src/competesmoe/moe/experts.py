"""Expert weights and router-agnostic dispatch.

`Experts` holds N feed-forward experts as stacked weights and applies them four ways:
  * `forward(x_TD, idx_TK)`  -> out_TKD: expert idx[t, k] applied to token t (dropless, sparse);
  * `mix(x_TD, idx_TK, w_TK)` -> y_TD:  the routing-weighted sum of those, Eq. (1);
  * `forward_all(x_TD)`      -> out_NTD: every expert on every token (competition, analysis);
  * `combine(out_TKD, w_TK)` -> y_TD:   the routing-weighted sum of given outputs.
Sparse dispatch, by `backend`:
  * "triton" (chosen by "auto" on CUDA when Triton is installed): fused gather → grouped GEMM → scatter
    kernels with the routing weights folded into the second GEMM (`kernels/triton_moe.py`);
  * "loop" (chosen by "auto" on CPU from 256 pairs per expert): one expert at a time through cache-sized
    buffers, keeping only the pre-activations for a hand-written backward (`kernels/looped.py`); any dtype;
  * "grouped_mm" (chosen by "auto" on CUDA without Triton, and on CPU for fewer pairs, where dtype and
    strides allow it): pairs sorted by expert, one `torch.nn.functional.grouped_mm` per weight, plain
    autograd: the reference path.
All three take the same weights and routing and agree with a naive per-token loop (tests/test_dispatch.py).

Shapes: T tokens, D d_model, N experts, K choices per token, H expert width, M = T·K (pairs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import triton_moe
from .kernels.looped import looped_experts
from .precision import compute_dtype

_ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
_ACT_GRADS = {  # (dL/da, h) -> dL/dh, aten's own backward formulas
    "relu": lambda g, h: torch.ops.aten.threshold_backward(g, h, 0),
    "gelu": torch.ops.aten.gelu_backward,
    "silu": torch.ops.aten.silu_backward,
}


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned base pointers and strides (apart from the unit stride)."""
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in t.stride() if s != 1)


class Experts(nn.Module):
    """N FFN experts `g_i(x) = W2_i φ(W1_i x)`; `swiglu`: `W2_i (silu(G_i x) ⊙ U_i x)`."""

    LOOP_MIN_PAIRS = 256   # "auto" on CPU: the loop from this many pairs per expert on average
    exchanges_tokens = False   # expert parallelism: forward exchanges tokens between ranks (its own dispatch)

    def __init__(self, n_experts: int, d_model: int, d_expert: int, activation: str = "gelu",
                 bias: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.n_experts, self.d_model, self.d_expert = n_experts, d_model, d_expert
        self.activation, self.backend = activation, backend
        self.gated = activation == "swiglu"
        h_in = 2 * d_expert if self.gated else d_expert  # swiglu: [gate | up]
        # Stored [out, in] per expert (nn.Linear's layout, also transformers' MoE layout): grouped_mm on
        # the transposed views is ~30x faster on CPU than on [in, out] storage.
        self.w1 = nn.Parameter(torch.empty(n_experts, h_in, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.b1 = nn.Parameter(torch.zeros(n_experts, h_in)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per expert.
        nn.init.uniform_(self.w1, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w2, -1 / math.sqrt(self.d_expert), 1 / math.sqrt(self.d_expert))
        for b in (self.b1, self.b2):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, d_model={self.d_model}, d_expert={self.d_expert}, "
                f"activation={self.activation}, bias={self.b1 is not None}, backend={self.backend}")

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return _ACTS[self.activation](h)

    def _act_grad(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """dL/dh from dL/dφ(h), without autograd (the looped dispatch's backward, one call per expert)."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return torch.cat([torch.ops.aten.silu_backward(g * up, gate),
                              g * F.silu(gate)], dim=-1)
        return _ACT_GRADS[self.activation](g, h)

    # --- all experts on all tokens ---------------------------------------------------------------
    def forward_all(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert applied to every token: [N, T, D]."""
        dt = compute_dtype(x_TD)
        h_NTH = torch.matmul(x_TD.to(dt), self.w1.to(dt).transpose(1, 2))
        if self.b1 is not None:
            h_NTH = h_NTH + self.b1.to(dt)[:, None, :]
        out_NTD = torch.matmul(self._act(h_NTH), self.w2.to(dt).transpose(1, 2))
        if self.b2 is not None:
            out_NTD = out_NTD + self.b2.to(dt)[:, None, :]
        return out_NTD

    # --- sparse dispatch ---------------------------------------------------------------------------
    def mix(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """y_t = Σ_k w[t, k] · g_{idx[t, k]}(x_t)  (Eq. (1)), [T, D].

        The weights scale φ(h) before the second matmul when it is the narrower ([M, H] vs the outputs'
        [M, D]), and the pairs are summed into their tokens: no [T, K, D] outputs, no un-sorting.
        """
        if self.exchanges_tokens:   # expert parallelism keeps its own dispatch
            return self.combine(self(x_TD, idx_TK), w_TK)
        return self._dispatch(x_TD, idx_TK, w_TK)

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        """Expert `idx_TK[t, k]` applied to token t: [T, K, D] (unweighted)."""
        return self._dispatch(x_TD, idx_TK)

    def _dispatch(self, x_TD, idx_TK, w_TK=None) -> torch.Tensor:
        dt = compute_dtype(x_TD)
        path = self.path(x_TD.device, dt, idx_TK.numel()) if x_TD.shape[0] else "loop"
        x_TD = x_TD.to(dt)
        if path == "grouped_mm":
            return self._sorted(x_TD, idx_TK, w_TK)
        cast = [None if p is None else p.to(dt) for p in (self.w1, self.b1, self.w2, self.b2)]
        with torch.autocast(x_TD.device.type, enabled=False):     # the kernels take the compute dtype
            if path == "triton":
                return triton_moe.fused_experts(x_TD, *cast, idx_TK, self._act, w_TK)
            return looped_experts(x_TD, *cast, idx_TK, self._act, w_TK, self._act_grad)

    def path(self, device: torch.device, dtype: torch.dtype, pairs: int | None = None) -> str:
        """The dispatch `backend` resolves to for `pairs` (token, expert) pairs on `device` in `dtype`:
        "triton", "grouped_mm" or "loop".

        "auto": Triton on CUDA; on CPU the loop once the experts average `LOOP_MIN_PAIRS` pairs each (as fast
        as grouped_mm or faster from there, and lighter: docs/results/moe_layer-cpu.md), grouped_mm below
        (the loop's per-expert overhead dominates); grouped_mm elsewhere where it can run, else the loop.
        """
        if self.backend == "loop":
            return "loop"
        if self.backend == "triton" or (self.backend == "auto" and device.type == "cuda"):
            if triton_moe is not None and triton_moe.available(device):
                return "triton"
            if self.backend == "triton":
                why = "Triton is not installed" if triton_moe is None else (
                    f"device {device.type} needs CUDA (or TRITON_INTERPRET=1 on CPU)")
                raise RuntimeError(f"backend='triton' is not possible here: {why}; use 'auto'")
        gmm_ok = self._grouped_mm_ok(device, dtype)
        if self.backend == "grouped_mm" and not gmm_ok:
            raise RuntimeError(
                f"backend='grouped_mm' is not possible here (device={device.type}, dtype={dtype}, "
                f"d_model={self.d_model}, d_expert={self.d_expert}, weights 16-byte aligned: "
                f"{_aligned(self.w1) and _aligned(self.w2)}: sizes must give 16-byte strides); use 'auto'")
        loop_first = (self.backend == "auto" and device.type == "cpu"
                      and (pairs is None or pairs >= self.LOOP_MIN_PAIRS * self.n_experts))
        return "grouped_mm" if gmm_ok and not loop_first else "loop"

    def _grouped_mm_ok(self, device: torch.device, dtype: torch.dtype) -> bool:
        es = torch.empty(0, dtype=dtype).element_size()
        return (hasattr(F, "grouped_mm") and dtype in (torch.float32, torch.bfloat16)
                # CUDA takes bf16 only, and so does its meta kernel, which torch.compile uses on CPU too
                and (dtype == torch.bfloat16 or (device.type == "cpu" and not torch.compiler.is_compiling()))
                and (self.d_expert * es) % 16 == 0 and (self.d_model * es) % 16 == 0
                and _aligned(self.w1) and _aligned(self.w2))

    def _sorted(self, x_TD, idx_TK, w_TK=None) -> torch.Tensor:
        """Pairs sorted by expert, one grouped matmul per weight: Σ_k-weighted [T, D], or [T, K, D]."""
        T, K = idx_TK.shape
        dt = x_TD.dtype
        flat_M = idx_TK.reshape(-1)
        order_M = flat_M.argsort(stable=True)                 # pairs sorted by expert
        e_M = flat_M.index_select(0, order_M)                 # expert of each sorted pair
        tok_M = order_M // K                                  # token of each sorted pair
        offs = torch.bincount(flat_M, minlength=self.n_experts).cumsum(0).to(torch.int32)
        x_MD = x_TD.index_select(0, tok_M)
        scale_M = None if w_TK is None else w_TK.reshape(-1).index_select(0, order_M).to(dt)
        w1, w2 = self.w1.to(dt).transpose(1, 2), self.w2.to(dt).transpose(1, 2)   # [N, in, out] views
        h_MH = F.grouped_mm(x_MD, w1, offs=offs)
        if self.b1 is not None:
            h_MH = h_MH + self.b1.to(dt).index_select(0, e_M)
        a_MH = self._act(h_MH)
        # The weights scale the narrower side of the second matmul: φ(h) [M, H] or its output [M, D].
        fold = scale_M is not None and a_MH.shape[1] <= self.d_model
        out_MD = F.grouped_mm(a_MH * scale_M[:, None] if fold else a_MH, w2, offs=offs)
        if self.b2 is not None:
            b2_MD = self.b2.to(dt).index_select(0, e_M)
            out_MD = out_MD + (b2_MD * scale_M[:, None] if fold else b2_MD)
        if scale_M is not None and not fold:
            out_MD = out_MD * scale_M[:, None]
        if w_TK is None:                                      # back to pair order: one scatter
            return torch.empty_like(out_MD).index_copy_(0, order_M, out_MD).view(T, K, -1)
        return out_MD.new_zeros(T, out_MD.shape[1]).index_add(0, tok_M, out_MD)

    @staticmethod
    def combine(out_TKD: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """y_t = Σ_k w[t, k] · out[t, k]  (Eq. (1))."""
        return torch.bmm(w_TK.to(out_TKD.dtype).unsqueeze(1), out_TKD).squeeze(1)


class FFN(nn.Module):
    """A dense FFN with the experts' parametrisation (shared experts, dense baselines)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "gelu", bias: bool = False) -> None:
        super().__init__()
        self.inner = Experts(1, d_model, d_hidden, activation, bias, backend="loop")

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_all(x_TD)[0]
