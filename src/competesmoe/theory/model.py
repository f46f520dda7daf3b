"""Gaussian mixture of experts of Section 3: experts, gates, density and sampling.

A mixing measure G = Σ_i exp(c_i) δ_(W_i, ν_i) (Appendix L.1) is held in `Atoms`:
  logw [N]     c_i, the log-weights (gate bias)
  expert [N,P] W_i, the expert's parameters
  var [N]      ν_i, the Gaussian variances
  gate [N,d]   β_i, the softmax gate's slopes (softmax gating only; None for competition)

Competition gating, Eq. (6) with the weights exp(c_i) of the mixing measure:
  p(Y|X) = Σ_i softmax_i(c_i + softplus(g(X, W_i))) · N(Y | g(X, W_i), ν_i)
Softmax gating (no competition, Nguyen et al. 2023):
  p(Y|X) = Σ_i softmax_i(c_i + β_i·X) · N(Y | g(X, W_i), ν_i)
Experts (d = input dimension):
  linear: g(X, (a, b)) = a·X + b                       P = d + 1   (Appendix K, Eq. (16))
  ffn:    g(X, (w2, w1, b)) = w2 · softplus(w1·X + b)  P = d + 2   (Section 3, one hidden unit)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

SETTINGS = ("linear", "ffn")
GATINGS = ("competition", "softmax")


@dataclasses.dataclass
class Atoms:
    logw: torch.Tensor                 # [N]
    expert: torch.Tensor               # [N, P]
    var: torch.Tensor                  # [N]
    gate: torch.Tensor | None = None   # [N, d]

    @property
    def n_atoms(self) -> int:
        return self.logw.shape[0]

    def detach(self) -> "Atoms":
        gate = None if self.gate is None else self.gate.detach().clone()
        return Atoms(self.logw.detach().clone(), self.expert.detach().clone(), self.var.detach().clone(), gate)

    def canonical(self) -> "Atoms":
        """The representative used for losses: Σ exp(c) = 1 and, for softmax, Σ exp(c_i) β_i = 0.

        Both gates are unchanged by adding one constant to every c_i (and one vector to every β_i),
        so only this representative is comparable with the truth. Splitting an atom keeps it.
        """
        logw = torch.log_softmax(self.logw, dim=0)
        gate = None
        if self.gate is not None:
            gate = self.gate - (logw.exp()[:, None] * self.gate).sum(0, keepdim=True)
        return Atoms(logw, self.expert, self.var, gate)


def n_expert_params(setting: str, dim: int) -> int:
    return dim + 1 if setting == "linear" else dim + 2


def expert_mean(setting: str, x_nd: torch.Tensor, expert_NP: torch.Tensor) -> torch.Tensor:
    """g(X, W_i) for every expert and sample: [N, n] (experts first: reductions over N run fast)."""
    d = x_nd.shape[1]
    if setting == "linear":
        a, b = expert_NP[:, :d], expert_NP[:, d:d + 1]
        return a @ x_nd.T + b
    if setting == "ffn":
        w2, w1, b = expert_NP[:, :1], expert_NP[:, 1:d + 1], expert_NP[:, d + 1:d + 2]
        return w2 * F.softplus(w1 @ x_nd.T + b)
    raise ValueError(f"unknown setting {setting!r}; choose one of {SETTINGS}")


def gate_logits(gating: str, atoms: Atoms, x_nd: torch.Tensor, mean_Nn: torch.Tensor) -> torch.Tensor:
    """Pre-softmax gate scores [N, n]."""
    if gating == "competition":
        return atoms.logw[:, None] + F.softplus(mean_Nn)   # Eq. (6): exp(softplus(g)) = 1 + exp(g)
    if gating == "softmax":
        if atoms.gate is None:
            raise ValueError("softmax gating needs gate slopes (Atoms.gate)")
        return atoms.logw[:, None] + atoms.gate @ x_nd.T
    raise ValueError(f"unknown gating {gating!r}; choose one of {GATINGS}")


def log_density(setting: str, gating: str, atoms: Atoms, x_nd: torch.Tensor, y_n: torch.Tensor) -> torch.Tensor:
    """log p_G(Y|X) for each sample: [n]."""
    mean = expert_mean(setting, x_nd, atoms.expert)
    log_gate = torch.log_softmax(gate_logits(gating, atoms, x_nd, mean), dim=0)
    var = atoms.var[:, None]
    log_normal = -0.5 * (math.log(2 * math.pi) + var.log() + (y_n - mean) ** 2 / var)
    return torch.logsumexp(log_gate + log_normal, dim=0)


def sample_x(n: int, dim: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """X uniform on the bounded set [-1, 1]^d (Section 3 assumes a bounded input space)."""
    return 2 * torch.rand(n, dim, generator=gen, dtype=dtype) - 1


def sample_y(setting: str, gating: str, atoms: Atoms, x_nd: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Y | X drawn from p_G(Y|X): pick an expert from the gate, then add its Gaussian noise."""
    mean = expert_mean(setting, x_nd, atoms.expert)
    probs_nN = torch.softmax(gate_logits(gating, atoms, x_nd, mean), dim=0).T
    k = torch.multinomial(probs_nN, 1, generator=gen)[:, 0]
    noise = torch.randn(x_nd.shape[0], generator=gen, dtype=x_nd.dtype)
    return mean.T.gather(1, k[:, None])[:, 0] + atoms.var[k].sqrt() * noise
