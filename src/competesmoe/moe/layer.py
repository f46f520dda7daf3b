"""`MoE`: router + experts (+ shared experts) + the competition on scheduled steps.

A normal step routes each token with the router policy (Section 2.1). A competition step (training only,
`router="competesmoe"`) runs every expert without a graph to find the winners by affinity, then
recomputes only the winners on the sparse path with gradients (Section 2.2), and adds the distillation and
diversity losses (Section 2.3.1, Eqs. (2)-(3)). Shapes: T tokens, D d_model, N routed experts, K routed choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import MoEConfig
from . import competition as comp
from .experts import FFN, Experts
from .kernels.plan import block_elements
from .losses import entropy_loss, switch_loss, z_loss
from .routers import build_router
from .schedule import CompetitionSchedule
from .stats import agreement

# The all-expert buffer [N, chunk, O] of a competition step holds `block_elements(device)` elements (2^20 on
# CPU: a competition step of the paper's shape ran 1.25x faster than with one 2^25 buffer,
# docs/results/competition-chunk-cpu.md), but at least 128 tokens so each GEMM stays efficient.
_AUTO_CHUNK_MIN_TOKENS = 128


@dataclass
class MoEOutput:
    y: torch.Tensor                 # [..., O]: the input's shape with d_out (= d_model unless set) last
    aux_loss: torch.Tensor          # scalar: every auxiliary loss of this layer, already weighted
    indices: torch.Tensor           # [T, K_routed] realised routing (routed experts only)
    weights: torch.Tensor           # [T, K_routed]
    router_logits: torch.Tensor     # [T, N_routed], before selection
    competed: bool = False
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = Experts(cfg.n_routed, cfg.d_model, cfg.d_expert, cfg.activation, cfg.bias, cfg.backend,
                               d_out=cfg.d_out)
        self.shared = (FFN(cfg.d_model, cfg.n_shared * cfg.d_expert, cfg.activation, cfg.bias, d_out=cfg.d_out)
                       if cfg.n_shared else None)
        # Set by `attach_schedule`; kept outside the module tree (not parameters, not buffers).
        self.schedule: CompetitionSchedule | None = None
        self.layer_index: int | None = None

    # --- public helpers ----------------------------------------------------------------------------
    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every routed expert on every token: [N_routed, T, O] (T = all leading dims flattened)."""
        return self.experts.forward_all(x.reshape(-1, self.cfg.d_model))

    @torch.no_grad()
    def competition_winners(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Analysis mode: the competition's winners I_C and weights s_C, [T, K], for any router."""
        x_TD = x.reshape(-1, self.cfg.d_model)
        a_TN, lse_TD = comp.all_affinities(self.experts, x_TD, self.cfg.competition.kappa, self._chunk(x_TD))
        a_TK, win_TK = a_TN.topk(self.cfg.k_routed, dim=-1)
        return win_TK, comp.winner_weights(a_TK, self.cfg.competition.eps)

    def will_compete(self, compete: bool | None = None) -> bool:
        if not self.training:
            return False  # evaluation never competes
        if compete is None:
            return (self.cfg.router == "competesmoe" and self.schedule is not None
                    and self.schedule.competes(self.layer_index))
        if compete and self.cfg.router != "competesmoe":
            raise ValueError(f"compete=True needs router='competesmoe', this layer uses {self.cfg.router!r}")
        return compete

    def after_optimizer_step(self) -> None:
        """Updates outside autograd (the DeepSeek-V3 balancing bias)."""
        update = getattr(self.router, "update_bias", None)
        if update is not None:
            update()

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, compete: bool | None = None) -> MoEOutput:
        cfg = self.cfg
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE expects inputs [..., d_model={cfg.d_model}], got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, cfg.d_model)
        routing = self.router(x_TD)
        stats: dict[str, torch.Tensor] = {}
        aux = x_TD.new_zeros((), dtype=torch.float32)

        competed = self.will_compete(compete)
        if competed:
            y_TD, idx_TK, w_TK, comp_loss = self._compete(x_TD, routing, stats)
            aux = aux + comp_loss
        else:
            idx_TK, w_TK = routing.idx_TK, routing.w_TK
            if cfg.competition.detach_router_off_competition and self.training and self._past_warmup():
                w_TK = w_TK.detach()  # Eq. (5) read literally: the router learns from the competition only
            if self._router_diversity_step():
                # Table 7 "CM ✗, DL ✓": Eq. (3) on the router's own top-K, on the scheduled steps
                out_TKD = self.experts(x_TD, idx_TK)
                y_TD = Experts.combine(out_TKD, w_TK)
                l_div = comp.diversity_loss(out_TKD)
                stats["diversity"] = l_div.detach()
                aux = aux + cfg.competition.beta * l_div
            else:
                y_TD = self.experts.mix(x_TD, idx_TK, w_TK)   # Eq. (1); fused kernels on CUDA

        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            mix = cfg.router_opts.shared_mix
            y_TD = shared_TD + y_TD if mix is None else mix * shared_TD + (1 - mix) * y_TD

        aux = aux + self._balance_losses(routing.logits_TN, idx_TK, x.shape, stats)
        return MoEOutput(y_TD.view(*x.shape[:-1], cfg.out_dim), aux, idx_TK, w_TK, routing.logits_TN, competed, stats)

    def _compete(self, x_TD, routing, stats):
        cc, K = self.cfg.competition, self.cfg.k_routed
        # Steps 1-2: all affinities without a graph (no activations kept for the losers).
        a_TN, lse_TD = comp.all_affinities(self.experts, x_TD, cc.kappa, self._chunk(x_TD))
        win_TK = a_TN.topk(K, dim=-1).indices                                  # step 3: I_C
        y_TD, s_TK, l_div = self._winners(x_TD, win_TK, lse_TD)
        if cc.competition_forward:
            idx_TK, w_TK = win_TK, s_TK                                          # step 4
        else:
            idx_TK, w_TK = routing.idx_TK, routing.w_TK
            y_TD = Experts.combine(self.experts(x_TD, idx_TK), w_TK)
        if cc.distill == "paper":
            target_TN = torch.zeros_like(a_TN).scatter_(-1, win_TK, s_TK.detach().to(a_TN.dtype))
        else:  # "reference": the released code distils toward softmax over all affinities
            target_TN = a_TN.softmax(dim=-1)
        router_TK = (routing.idx_TK, routing.w_TK) if cc.distill_target == "topk" else None
        l_distill = comp.distillation_loss(routing.logits_TN, target_TN, win_TK, cc.alpha, router_TK)  # Eq. (2)
        stats.update(distill=l_distill.detach(), diversity=l_div.detach(), **agreement(routing.idx_TK, win_TK))
        return y_TD, idx_TK, w_TK, cc.gamma * l_distill + cc.beta * l_div

    def _balance_losses(self, logits_TN, idx_TK, shape, stats) -> torch.Tensor:
        lc = self.cfg.losses
        total = logits_TN.new_zeros(())
        if lc.balance == "switch":
            bal = switch_loss(logits_TN, idx_TK)
        elif lc.balance == "entropy":
            seq = shape[-2] if len(shape) >= 3 else logits_TN.shape[0]
            bal = entropy_loss(logits_TN.view(-1, seq, logits_TN.shape[-1]))
        else:
            bal = None
        if bal is not None:
            stats["balance"] = bal.detach()
            total = total + lc.balance_coef * bal
        if lc.zloss_coef > 0:
            z = z_loss(logits_TN)
            stats["zloss"] = z.detach()
            total = total + lc.zloss_coef * z
        return total

    def _winners(self, x_TD, win_TK, lse_TD):
        """The winners with gradients: s_C (step 3), y (step 4) and L_div (Eq. (3)) in one block-wise pass
        through their outputs, without float32 copies of out_TKD.

        With `recompute_winners`, token chunk by token chunk under activation checkpointing: nothing of
        out_TKD is kept for backward, and backward holds one chunk's outputs at a time.
        """
        cc = self.cfg.competition

        def chunk(x_cD, win_cK, *lse_cD):
            y, s, l_div = comp.winners_outputs(self.experts(x_cD, win_cK), cc.kappa, cc.eps, *lse_cD)
            return y, s, l_div * x_cD.shape[0]              # L_div summed over the chunk's tokens

        inputs = (x_TD, win_TK) if lse_TD is None else (x_TD, win_TK, lse_TD)
        if not (cc.recompute_winners and torch.is_grad_enabled()):
            y_TD, s_TK, l_sum = chunk(*inputs)
            return y_TD, s_TK, l_sum / x_TD.shape[0]
        # Expert parallelism exchanges tokens inside: every rank must run as many chunks, so one chunk.
        rows = x_TD.shape[0] if self.experts.exchanges_tokens else self._winners_chunk(x_TD)
        outs = [checkpoint(chunk, *p, use_reentrant=False) for p in zip(*(t.split(rows) for t in inputs))]
        return (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]),
                torch.stack([o[2] for o in outs]).sum() / x_TD.shape[0])

    def _winners_chunk(self, x_TD: torch.Tensor) -> int:
        """Tokens per winners' chunk: [chunk, K, D] within the all-expert pass' element budget, but enough
        pairs per expert to keep the experts' GEMMs efficient."""
        K = self.cfg.k_routed
        return max(1, block_elements(x_TD.device) // (K * self.cfg.out_dim), Experts.LOOP_MIN_PAIRS * self.cfg.n_routed // K)

    def _chunk(self, x_TD: torch.Tensor) -> int:
        if self.cfg.competition.chunk_tokens is not None:
            return self.cfg.competition.chunk_tokens
        per_token = self.cfg.n_routed * max(self.cfg.d_model, self.cfg.out_dim, self.experts.w1.shape[1])
        return max(_AUTO_CHUNK_MIN_TOKENS, block_elements(x_TD.device) // per_token)

    def _router_diversity_step(self) -> bool:
        """Table 7's diversity-without-competition dose: on the steps where the competition schedule Λ
        fires for this layer (ω of the steps after warm-up, as the authors' released ablation does; the
        paper does not say), or every training step with `router_diversity_steps="all"`."""
        cc = self.cfg.competition
        if not (cc.router_diversity and self.training):
            return False
        if cc.router_diversity_steps == "all":
            return True
        return self.schedule is not None and self.schedule.competes(self.layer_index)

    def _past_warmup(self) -> bool:
        return self.schedule is None or self.schedule.past_warmup


# --- model-level helpers ---------------------------------------------------------------------------
def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def attach_schedule(model: nn.Module, schedule: CompetitionSchedule) -> list[MoE]:
    """Give every MoE layer of `model` (in module order) its index and the shared schedule."""
    layers = moe_layers(model)
    if len(layers) != schedule.n_layers:
        raise ValueError(f"schedule is for {schedule.n_layers} MoE layers, the model has {len(layers)}")
    for i, layer in enumerate(layers):
        layer.schedule, layer.layer_index = schedule, i
    return layers


def on_optimizer_step(model: nn.Module) -> None:
    """Call once after each optimizer step: advances the schedule and applies non-gradient updates."""
    schedules = {id(l.schedule): l.schedule for l in moe_layers(model) if l.schedule is not None}
    for layer in moe_layers(model):
        layer.after_optimizer_step()
    for s in schedules.values():
        s.advance()
