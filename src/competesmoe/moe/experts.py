"""Expert weights and router-agnostic dispatch.

`Experts` holds N feed-forward experts as stacked weights and applies them four ways:
  * `forward(x_TD, idx_TK)`  -> out_TKO: expert idx[t, k] applied to token t (dropless, sparse);
  * `mix(x_TD, idx_TK, w_TK)` -> y_TO:  the routing-weighted sum of those, Eq. (1);
  * `forward_all(x_TD)`      -> out_NTO: every expert on every token (competition, analysis);
  * `combine(out_TKO, w_TK)` -> y_TO:   the routing-weighted sum of given outputs.
An expert maps d_in to d_out (the same for an FFN; a LLaVA connector maps the vision width to the text width).
Sparse dispatch, by `backend`:
  * "grouped_mm" (chosen by "auto" on CUDA, and on CPU in bf16 or for few pairs, where dtype and strides
    allow it): pairs sorted by expert, one `torch.nn.functional.grouped_mm` per weight, plain autograd: the
    reference path;
  * "loop" (chosen by "auto" on CPU in fp32/fp64 from 256 pairs per expert, and wherever grouped_mm cannot
    run): one expert at a time through cache-sized buffers, keeping only the pre-activations for a
    hand-written backward (`kernels/looped.py`); any dtype;
  * "triton" (asked for explicitly): fused gather → grouped GEMM → scatter kernels with the routing weights
    folded into the second GEMM (`kernels/triton_moe.py`). "auto" does not pick it until the kernels have
    been measured on a GPU (`benchmarks/gpu_suite.sh`): they are tested under the Triton interpreter only.
All three take the same weights, routing and `Activation` (φ and dφ from one definition) and agree with a
naive per-token loop (tests/test_dispatch.py). The loop and Triton paths are `torch.library` custom operators.

Shapes: T tokens, D d_in, O d_out, N experts, K choices per token, H expert width, M = T·K (pairs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import activations
from .activations import Activation
from .kernels import triton_moe
from .kernels.looped import looped_experts
from .kernels.plan import SortedPairs
from .precision import compute_dtype


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned base pointers and strides (apart from the unit stride).
    (torch.compile cannot read a pointer: there the base is taken as aligned, as `from_pretrained` makes it.)"""
    es = t.element_size()
    base_ok = torch.compiler.is_compiling() or t.data_ptr() % 16 == 0
    return base_ok and all((s * es) % 16 == 0 for s in t.stride() if s != 1)


class Experts(nn.Module):
    """N FFN experts `g_i(x) = W2_i φ(W1_i x)`; gated (`swiglu`, or an upcycled gated MLP):
    `W2_i (φ(G_i x) ⊙ U_i x)`. `activation` is a config name ("gelu", "swiglu", ...) or an `Activation`."""

    LOOP_MIN_PAIRS = 256   # "auto" on CPU: the loop from this many pairs per expert on average
    exchanges_tokens = False   # expert parallelism: forward exchanges tokens between ranks (its own dispatch)

    def __init__(self, n_experts: int, d_model: int, d_expert: int, activation: str | Activation = "gelu",
                 bias: bool = False, backend: str = "auto", d_out: int | None = None) -> None:
        super().__init__()
        self.act = activation if isinstance(activation, Activation) else activations.named(activation)
        self.n_experts, self.d_model, self.d_expert = n_experts, d_model, d_expert
        self.d_out = d_model if d_out is None else d_out
        self.activation, self.backend = self.act.key, backend
        self.gated = self.act.gated
        h_in = 2 * d_expert if self.gated else d_expert  # gated: [gate | up]
        # Stored [out, in] per expert (nn.Linear's layout, also transformers' MoE layout): grouped_mm on
        # the transposed views is ~30x faster on CPU than on [in, out] storage.
        self.w1 = nn.Parameter(torch.empty(n_experts, h_in, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, self.d_out, d_expert))
        self.b1 = nn.Parameter(torch.zeros(n_experts, h_in)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(n_experts, self.d_out)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per expert.
        nn.init.uniform_(self.w1, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w2, -1 / math.sqrt(self.d_expert), 1 / math.sqrt(self.d_expert))
        for b in (self.b1, self.b2):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        out = "" if self.d_out == self.d_model else f", d_out={self.d_out}"
        return (f"n_experts={self.n_experts}, d_model={self.d_model}, d_expert={self.d_expert}{out}, "
                f"activation={self.activation}, bias={self.b1 is not None}, backend={self.backend}")

    # --- all experts on all tokens ---------------------------------------------------------------
    def forward_all(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert applied to every token: [N, T, O]."""
        dt = compute_dtype(x_TD)
        h_NTH = torch.matmul(x_TD.to(dt), self.w1.to(dt).transpose(1, 2))
        if self.b1 is not None:
            h_NTH = h_NTH + self.b1.to(dt)[:, None, :]
        out_NTO = torch.matmul(self.act(h_NTH), self.w2.to(dt).transpose(1, 2))
        if self.b2 is not None:
            out_NTO = out_NTO + self.b2.to(dt)[:, None, :]
        return out_NTO

    # --- sparse dispatch ---------------------------------------------------------------------------
    def mix(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """y_t = Σ_k w[t, k] · g_{idx[t, k]}(x_t)  (Eq. (1)), [T, O].

        The weights scale φ(h) before the second matmul when it is the narrower ([M, H] vs the outputs'
        [M, O]), and the pairs are summed into their tokens: no [T, K, O] outputs, no un-sorting.
        """
        if self.exchanges_tokens:   # expert parallelism keeps its own dispatch
            return self.combine(self(x_TD, idx_TK), w_TK)
        return self._dispatch(x_TD, idx_TK, w_TK)

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        """Expert `idx_TK[t, k]` applied to token t: [T, K, O] (unweighted)."""
        return self._dispatch(x_TD, idx_TK)

    def _dispatch(self, x_TD, idx_TK, w_TK=None) -> torch.Tensor:
        dt = compute_dtype(x_TD)
        path = self.path(x_TD.device, dt, idx_TK.numel()) if x_TD.shape[0] else "loop"
        x_TD = x_TD.to(dt)
        if path == "grouped_mm":
            return self._sorted(x_TD, idx_TK, w_TK)
        cast = [None if p is None else p.to(dt) for p in (self.w1, self.b1, self.w2, self.b2)]
        kernel = triton_moe.fused_experts if path == "triton" else looped_experts
        with torch.autocast(x_TD.device.type, enabled=False):     # the kernels take the compute dtype
            return kernel(x_TD, *cast, idx_TK, self.act.key, w_TK)

    def path(self, device: torch.device, dtype: torch.dtype, pairs: int | None = None) -> str:
        """The dispatch `backend` resolves to for `pairs` (token, expert) pairs on `device` in `dtype`:
        "triton", "grouped_mm" or "loop".

        "auto": grouped_mm where it can run (the path measured on GPUs), except on CPU in fp32/fp64 from
        `LOOP_MIN_PAIRS` pairs per expert on average, where the loop is faster and lighter
        (docs/results/moe_layer-cpu.md); the loop wherever grouped_mm cannot run. Never Triton.
        """
        if self.backend == "triton":
            if triton_moe is None or not triton_moe.available(device):
                why = "Triton is not installed" if triton_moe is None else (
                    f"device {device.type} needs CUDA (or TRITON_INTERPRET=1 on CPU)")
                raise RuntimeError(f"backend='triton' is not possible here: {why}; use 'auto'")
            return "triton"
        if self.backend == "loop":
            return "loop"
        gmm_ok = self._grouped_mm_ok(device, dtype)
        if self.backend == "grouped_mm" and not gmm_ok:
            raise RuntimeError(
                f"backend='grouped_mm' is not possible here (device={device.type}, dtype={dtype}, "
                f"d_model={self.d_model}, d_expert={self.d_expert}, d_out={self.d_out}, weights 16-byte aligned: "
                f"{_aligned(self.w1) and _aligned(self.w2)}: sizes must give 16-byte strides); use 'auto'")
        loop_first = (self.backend == "auto" and device.type == "cpu" and dtype != torch.bfloat16
                      and (pairs is None or pairs >= self.LOOP_MIN_PAIRS * self.n_experts))
        return "grouped_mm" if gmm_ok and not loop_first else "loop"

    def _grouped_mm_ok(self, device: torch.device, dtype: torch.dtype) -> bool:
        es = torch.empty(0, dtype=dtype).element_size()
        return (hasattr(F, "grouped_mm") and dtype in (torch.float32, torch.bfloat16)
                # CUDA takes bf16 only, and so does its meta kernel, which torch.compile uses on CPU too
                and (dtype == torch.bfloat16 or (device.type == "cpu" and not torch.compiler.is_compiling()))
                and all((n * es) % 16 == 0 for n in (self.d_expert, self.d_model, self.d_out))
                and _aligned(self.w1) and _aligned(self.w2))

    def _sorted(self, x_TD, idx_TK, w_TK=None) -> torch.Tensor:
        """Pairs sorted by expert, one grouped matmul per weight: Σ_k-weighted [T, O], or [T, K, O]."""
        T, K = idx_TK.shape
        dt = x_TD.dtype
        plan = SortedPairs.of(idx_TK, self.n_experts)
        x_MD = x_TD.index_select(0, plan.token_M)
        scale_M = plan.sorted_weights(w_TK, dt)
        w1, w2 = self.w1.to(dt).transpose(1, 2), self.w2.to(dt).transpose(1, 2)   # [N, in, out] views
        h_MH = F.grouped_mm(x_MD, w1, offs=plan.offsets_N)
        if self.b1 is not None:
            h_MH = h_MH + self.b1.to(dt).index_select(0, plan.expert_M)
        a_MH = self.act(h_MH)
        # The weights scale the narrower side of the second matmul: φ(h) [M, H] or its output [M, O].
        fold = scale_M is not None and a_MH.shape[1] <= self.d_out
        out_MO = F.grouped_mm(a_MH * scale_M[:, None] if fold else a_MH, w2, offs=plan.offsets_N)
        if self.b2 is not None:
            b2_MO = self.b2.to(dt).index_select(0, plan.expert_M)
            out_MO = out_MO + (b2_MO * scale_M[:, None] if fold else b2_MO)
        if scale_M is not None and not fold:
            out_MO = out_MO * scale_M[:, None]
        if w_TK is None:                                      # back to pair order: one scatter
            return torch.empty_like(out_MO).index_copy_(0, plan.pair_M, out_MO).view(T, K, -1)
        return out_MO.new_zeros(T, out_MO.shape[1]).index_add(0, plan.token_M, out_MO)

    @staticmethod
    def combine(out_TKO: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """y_t = Σ_k w[t, k] · out[t, k]  (Eq. (1))."""
        return torch.bmm(w_TK.to(out_TKO.dtype).unsqueeze(1), out_TKO).squeeze(1)


class FFN(nn.Module):
    """A dense FFN with the experts' parametrisation (shared experts, dense baselines)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str | Activation = "gelu", bias: bool = False,
                 d_out: int | None = None) -> None:
        super().__init__()
        self.inner = Experts(1, d_model, d_hidden, activation, bias, backend="loop", d_out=d_out)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_all(x_TD)[0]
