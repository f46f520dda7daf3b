"""Router policies (Section 2.1 and the baselines of Section 5.1): token -> (logits, chosen experts, their weights).

One small class per scoring rule; `build_router(cfg)` maps the seven router names onto them.
Routers run in float32 even under autocast (their softmax/top-K decide the routing). Each router owns its
init (`reset_parameters`): linear maps N(0, 0.02) (GPT-2's init, which the paper uses for new routers,
Appendix I.1), XMoE/perturbed-cosine expert embeddings orthogonal; a model embedding a router leaves it alone.
Shapes: T tokens, D d_model, N routed experts, K routed choices per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .precision import fp32


@dataclass
class Routing:
    logits_TN: torch.Tensor   # scores before selection (what the balance and z losses see)
    idx_TK: torch.Tensor      # chosen experts
    w_TK: torch.Tensor        # their weights in the output


INIT_STD = 0.02  # linear maps of the routers


class _Router(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, top_k

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, logits_TN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor) -> Routing:
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TN = self.logits(fp32(x_TD))
            idx_TK, w_TK = self.select(logits_TN)
        return Routing(logits_TN, idx_TK, w_TK)


class SoftmaxRouter(_Router):
    """`smoe` / `competesmoe` / `sharede_v2`: I = TopK(h), w = softmax(h[I])."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, bias: bool = False) -> None:
        super().__init__(d_model, n_experts, top_k)
        self.gate = nn.Linear(d_model, n_experts, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate.weight, 0.0, INIT_STD)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)

    def logits(self, x_TD):
        return F.linear(x_TD, fp32(self.gate.weight),
                        None if self.gate.bias is None else fp32(self.gate.bias))

    def select(self, logits_TN):
        top = logits_TN.topk(self.top_k, dim=-1)
        return top.indices, top.values.softmax(dim=-1)


class CosineRouter(SoftmaxRouter):
    """`xmoe` (eps=0) and `pcosine` (eps>0): logits = <Px, e_i> / ((‖Px‖+ε)(‖e_i‖+ε)) / τ.

    Weights are the softmax of the top-K logits. (The XMoE reference code applies a second softmax to
    probabilities, which makes the weights nearly uniform; we do not.)
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, proj_dim: int,
                 temperature: float, eps: float) -> None:
        _Router.__init__(self, d_model, n_experts, top_k)
        self.proj = nn.Linear(d_model, proj_dim, bias=False)
        self.expert_emb = nn.Parameter(torch.empty(n_experts, proj_dim))
        self.temperature, self.eps = temperature, eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, 0.0, INIT_STD)
        nn.init.orthogonal_(self.expert_emb)  # row norms sqrt(d_r/N) when N > d_r (0.71 at d_r = N/2)

    def logits(self, x_TD):
        z_TR = F.linear(x_TD, fp32(self.proj.weight))
        e_NR = fp32(self.expert_emb)
        tiny = torch.finfo(z_TR.dtype).tiny
        zn_T1 = z_TR.norm(dim=-1, keepdim=True).clamp_min(tiny) + self.eps
        en_N = e_NR.norm(dim=-1).clamp_min(tiny) + self.eps
        return (z_TR @ e_NR.T) / (zn_T1 * en_N) / self.temperature


class SigmoidRouter(SoftmaxRouter):
    """`moeut`: s = σ(h), I = TopK(s), w = s[I] (optionally renormalised to sum 1)."""

    def __init__(self, d_model, n_experts, top_k, bias=False, normalize=False) -> None:
        super().__init__(d_model, n_experts, top_k, bias)
        self.normalize = normalize

    def select(self, logits_TN):
        top = logits_TN.topk(self.top_k, dim=-1)          # σ is monotone: TopK(σ(h)) = TopK(h)
        w_TK = torch.sigmoid(top.values)
        return top.indices, w_TK / w_TK.sum(-1, keepdim=True) if self.normalize else w_TK


class DeepSeekV3Router(SoftmaxRouter):
    """`sharede_v3`: s = σ(h); I = TopK(s + b); w = routed_scale · s[I] / Σ s[I].

    With `bias_balance`, b is the auxiliary-loss-free balancing bias: it only affects selection and is
    updated outside autograd after each optimizer step by b_i += u·sign(mean_load − load_i).
    """

    def __init__(self, d_model, n_experts, top_k, bias=False, routed_scale=1.0,
                 bias_balance=False, bias_rate=1e-3) -> None:
        super().__init__(d_model, n_experts, top_k, bias)
        self.routed_scale, self.bias_balance, self.bias_rate = routed_scale, bias_balance, bias_rate
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.register_buffer("load", torch.zeros(n_experts), persistent=False)

    def select(self, logits_TN):
        s_TN = torch.sigmoid(logits_TN)
        idx_TK = (s_TN + self.expert_bias if self.bias_balance else s_TN).topk(self.top_k, dim=-1).indices
        s_TK = s_TN.gather(-1, idx_TK)
        if self.bias_balance and self.training:
            self.load += torch.bincount(idx_TK.reshape(-1), minlength=self.n_experts).to(self.load)
        return idx_TK, self.routed_scale * s_TK / s_TK.sum(-1, keepdim=True)

    @torch.no_grad()
    def update_bias(self) -> None:
        if self.bias_balance and self.load.sum() > 0:
            self.expert_bias += self.bias_rate * torch.sign(self.load.mean() - self.load)
            self.load.zero_()


def build_router(cfg: MoEConfig) -> _Router:
    o, D, N, K = cfg.router_opts, cfg.d_model, cfg.n_routed, cfg.k_routed
    if cfg.router in ("smoe", "competesmoe", "sharede_v2"):
        return SoftmaxRouter(D, N, K, cfg.router_bias)
    if cfg.router in ("xmoe", "pcosine"):
        proj = o.proj_dim or max(1, N // 2)
        return CosineRouter(D, N, K, proj, o.temperature, o.cosine_eps if cfg.router == "pcosine" else 0.0)
    if cfg.router == "moeut":
        return SigmoidRouter(D, N, K, cfg.router_bias, o.normalize)
    if cfg.router == "sharede_v3":
        return DeepSeekV3Router(D, N, K, cfg.router_bias, o.routed_scale, o.bias_balance, o.bias_rate)
    raise ValueError(f"unknown router {cfg.router!r}")  # unreachable: MoEConfig validates the name


__all__ = ["Routing", "SoftmaxRouter", "CosineRouter", "SigmoidRouter", "DeepSeekV3Router", "build_router"]
