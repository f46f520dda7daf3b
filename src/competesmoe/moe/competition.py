"""The competition mechanism (Section 2.2) and its router losses (Section 2.3.1).

Affinities are computed in float32. Shapes: T tokens, D d_model, N experts, K winners per token.

Affinity and diversity reduce each row [.., D] of the winners' outputs to a scalar. Both run through
`rowwise`, which evaluates them a block of rows at a time and keeps only the (bf16) outputs for backward,
recomputing each block there: float32 copies of the whole [T, K, D] never exist at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import fp32
from .rowwise import rowwise

_ELEMENTWISE = {"softplus": F.softplus, "silu": F.silu, "sigmoid": torch.sigmoid, "relu": F.relu}

def winners_outputs(out_TKD: torch.Tensor, kappa: str, eps: float, lse_TD: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The competition's differentiable part on the winners' outputs, in one block-wise pass:
    y_TD = Σ_k s_k g_k(x) (step 4), s_TK = winner_weights(affinity) (step 3), and the diversity loss (Eq. (3)).

    Same values and gradients as `Experts.combine`, `winner_weights(affinity(..))` and `diversity_loss`
    called one by one, but out_TKD gets one gradient buffer instead of three.
    """
    if kappa == "softmax" and lse_TD is None:
        raise ValueError("kappa='softmax' needs the log-normaliser over experts (lse_TD)")

    def fn(o_TKD, *lse):
        a_TK = _softmax_affinity(o_TKD, lse[0][:, None, :]) if lse else _affinity_rows(o_TKD, kappa)
        s_TK = winner_weights(a_TK, eps)
        y_TD = torch.bmm(s_TK.to(o_TKD.dtype).unsqueeze(1), o_TKD).squeeze(1)   # = Experts.combine
        div_T = _diversity_rows(o_TKD) if o_TKD.shape[1] > 1 else o_TKD.new_zeros(o_TKD.shape[0], dtype=torch.float32)
        return y_TD, s_TK, div_T

    y_TD, s_TK, div_T = rowwise(fn, out_TKD, *(() if kappa != "softmax" else (lse_TD,)))
    return y_TD, s_TK, div_T.mean()


def affinity(out_XD: torch.Tensor, kappa: str, lse_XD: torch.Tensor | None = None) -> torch.Tensor:
    """a = mean_d κ(g(x))_d (Eq. (13)); `norm`: a = ‖g(x)‖₂ (Eq. (14)).

    `softmax` is taken across experts for each output coordinate, a_i = mean_d softmax_i(g(x)_d),
    given the per-coordinate log-normaliser `lse_XD` (a softmax over the output dimension alone has
    mean 1/D for every expert and could not rank them). `lse_XD` broadcasts against `out_XD` and is a
    constant (it comes from the graph-free all-expert pass).
    """
    if kappa == "softmax":
        if lse_XD is None:
            raise ValueError("kappa='softmax' needs the log-normaliser over experts (lse_XD)")
        return rowwise(_softmax_affinity, out_XD, lse_XD.expand_as(out_XD))
    return rowwise(lambda o: _affinity_rows(o, kappa), out_XD)


def _affinity_rows(out_XD: torch.Tensor, kappa: str) -> torch.Tensor:
    o = fp32(out_XD)
    if kappa == "norm":
        return o.norm(dim=-1)
    return _ELEMENTWISE[kappa](o).sum(dim=-1) / o.shape[-1]  # = mean; its backward skips a [.., D] division


def _softmax_affinity(out_XD: torch.Tensor, lse_XD: torch.Tensor) -> torch.Tensor:
    return (fp32(out_XD) - lse_XD).exp().mean(dim=-1)


@torch.no_grad()
def all_affinities(experts, x_TD: torch.Tensor, kappa: str, chunk_tokens: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Affinities of every expert for every token, a_TN, without an autograd graph.

    Runs all experts on `chunk_tokens` tokens at a time so the [N, chunk, D] buffer stays bounded.
    For `softmax` it also returns the per-coordinate log-normaliser over experts, lse_TD.
    """
    scored = getattr(experts, "all_affinities", None)   # expert parallelism: each rank scores its own experts
    if scored is not None:
        return scored(x_TD, kappa, chunk_tokens)
    a_chunks, lse_chunks = [], []
    for x_cD in x_TD.split(chunk_tokens):
        out_NcD = fp32(experts.forward_all(x_cD))
        lse_cD = out_NcD.logsumexp(dim=0) if kappa == "softmax" else None
        a_chunks.append(affinity(out_NcD, kappa, lse_cD).T)
        lse_chunks.append(lse_cD)
        del out_NcD
    lse_TD = torch.cat(lse_chunks) if kappa == "softmax" else None
    return torch.cat(a_chunks), lse_TD


def winner_weights(a_TK: torch.Tensor, eps: float) -> torch.Tensor:
    """s_C = TopK₀(a) normalised over the winners (step 3).

    Affinities are clamped to >= eps first, so the weights are defined for every κ: winners whose
    affinity is <= eps (possible with silu or relu) share the weight of eps; if all are, weights are 1/K.
    """
    a_TK = a_TK.clamp_min(eps)
    return a_TK / a_TK.sum(dim=-1, keepdim=True)


def distillation_loss(logits_TN: torch.Tensor, target_TN: torch.Tensor, winners_TK: torch.Tensor,
                      alpha: float, router_TK: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Eq. (2): MSE(s_R, t) + (α/K) Σ_{j∈I_C} (t_j − s_R,j)², t detached.

    The router's side s_R: by default the dense softmax over all N logits (the released code's choice);
    with `router_TK` = (I_R, w_R) the router's own sparse policy of Section 2.1,
    s_R = σ(TopK_{-∞}(h)): w_R at I_R, 0 elsewhere (gradients reach only the router's top-K logits)."""
    K = winners_TK.shape[-1]
    if router_TK is None:
        p_TN = fp32(logits_TN).softmax(dim=-1)
    else:
        idx_TK, w_TK = router_TK
        p_TN = fp32(logits_TN).new_zeros(logits_TN.shape).scatter(-1, idx_TK, fp32(w_TK))
    t_TN = target_TN.detach().to(p_TN.dtype)
    mse = (p_TN - t_TN).square().mean(dim=-1)
    winners_sq = (t_TN.gather(-1, winners_TK) - p_TN.gather(-1, winners_TK)).square().sum(dim=-1)
    return (mse + alpha / K * winners_sq).mean()


def diversity_loss(out_TKD: torch.Tensor) -> torch.Tensor:
    """Eq. (3): mean off-diagonal cosine similarity of the K winners' outputs, averaged over tokens.

    Divides by K(K−1) as the paper does (the released code divides by K²). 0 when K = 1.
    """
    K = out_TKD.shape[1]
    if K < 2:
        return out_TKD.new_zeros((), dtype=torch.float32)
    return rowwise(_diversity_rows, out_TKD).mean()


def _diversity_rows(out_TKD: torch.Tensor) -> torch.Tensor:
    """Per token: mean off-diagonal cosine of its K outputs, [T]."""
    K = out_TKD.shape[1]
    o_TKD = fp32(out_TKD)
    n_TK = o_TKD.norm(dim=-1)
    r_TK = 1 / n_TK.clamp_min(1e-12)                   # ô_i = r_i·o_i (F.normalize's convention: 0 stays 0)
    # Σ_{i≠j} ⟨ô_i, ô_j⟩ = ‖Σ_i ô_i‖² − Σ_i ‖ô_i‖²: O(K·D) per token, no K×K Gram matrix, and only
    # one full-size product to differentiate.
    sum_TD = (o_TKD * r_TK[..., None]).sum(dim=1)
    off_diag = sum_TD.square().sum(dim=-1) - (n_TK * r_TK).square().sum(dim=-1)
    return off_diag / (K * (K - 1))
