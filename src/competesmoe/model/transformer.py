"""A decoder-only pre-LN transformer whose MLPs are `competesmoe.MoE` layers (paper Section 5.1, Appendix I.2).

Attention is dense causal self-attention with rotary position embeddings; every block's MLP is an MoE
layer with the configured router. `forward` returns the logits, the LM loss (when targets are given) and
the auxiliary loss: by default the sum over MoE layers of each layer's weighted losses, as Eq. (5) applies
γ·L_D + β·L_div (and the balance loss) to every layer's router (`aux_reduction="mean"` divides by L). A key/value cache makes generation incremental.
Shapes: B batch, S sequence, D d_model, V vocabulary, Hh heads, Dh head dim.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, LossConfig, MoEConfig, apply_overrides, check, check_choice
from ..moe import MoE
from ..moe.experts import Experts
from .loss import lm_cross_entropy

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ModelConfig(Config):
    vocab_size: int = 4096
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_head: int | None = None       # default d_model // n_heads; the paper preset uses 82 with d_model 512
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    aux_reduction: str = "sum"      # how the layers' aux losses combine: "sum" (Eq. (5) per layer) or "mean"
    init: str = "gpt2"              # "gpt2": N(0, 0.02), residual writers 0.02/sqrt(2L); "moeut": the MoEUT
                                    # framework's init, which Appendix I.2 says the LM uses (`reset_parameters`)
    dense: bool = False             # a dense FFN of the MoE's active width (K·d_expert) in every block
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(d_model=128, d_expert=64, n_experts=16, top_k=4))

    @property
    def block_moe(self) -> MoEConfig:
        """The blocks' layer: `moe`, or with `dense` a one-expert MoE of width K·d_expert (its router weight is
        exactly 1, so it is a dense FFN, and every tool that reads MoE outputs works unchanged)."""
        if not self.dense:
            return self.moe
        return dataclasses.replace(self.moe, n_experts=1, top_k=1, d_expert=self.moe.top_k * self.moe.d_expert,
                                   router="smoe")

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    def validate(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.d_head is not None or self.d_model % self.n_heads == 0,
              f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set d_head")
        check(self.head_dim % 2 == 0, f"head dim must be even for rotary embeddings, got {self.head_dim}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check_choice("aux_reduction", self.aux_reduction, ("sum", "mean"))
        check_choice("init", self.init, ("gpt2", "moeut"))
        check(self.moe.d_model == self.d_model,
              f"moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")


def _moe(d, h, n, k, **kw) -> MoEConfig:
    # The presets train the method of the paper unless told otherwise (`--router smoe` for the baseline).
    return MoEConfig(d_model=d, d_expert=h, n_experts=n, top_k=k, router="competesmoe", **kw)


# Presets. Balance loss for LM pre-training as in Section 5.1 / Table 13: MoEUT entropy 0.01, no z-loss.
_LM_LOSSES = LossConfig(balance="entropy", balance_coef=0.01, zloss_coef=0.0)
PRESETS: dict[str, ModelConfig] = {
    # trains in minutes on 2 CPU cores
    "tiny": ModelConfig(vocab_size=4096, n_layers=4, d_model=128, n_heads=4, max_seq_len=128,
                        moe=_moe(128, 64, 16, 4, activation="relu", losses=_LM_LOSSES)),
    "small": ModelConfig(vocab_size=8192, n_layers=8, d_model=256, n_heads=4, max_seq_len=512,
                         moe=_moe(256, 128, 32, 4, activation="relu", losses=_LM_LOSSES)),
    # Section 5.1 / Appendix I.2 (Table 12): 16 layers, d_model 512, 4 heads of 82, 64 experts of 128, K 8.
    # The MoEUT framework the paper trains with uses an 8,000-piece SentencePiece vocabulary: 149.6 M
    # parameters with tied embeddings (the paper: 151 M); docs/presets.md sources every value.
    "paper-151m": ModelConfig(vocab_size=8000, n_layers=16, d_model=512, n_heads=4, d_head=82, max_seq_len=1024,
                              moe=_moe(512, 128, 64, 8, activation="relu", losses=_LM_LOSSES)),
}


def preset(name: str, **overrides) -> ModelConfig:
    check(name in PRESETS, f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return apply_overrides(PRESETS[name], overrides)  # a validated copy


def rotary(x_BHSD: torch.Tensor, pos_S: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding on the last dim (pairs of halves)."""
    half = x_BHSD.shape[-1] // 2
    freq = theta ** (-torch.arange(half, device=x_BHSD.device, dtype=torch.float32) / half)
    ang_SH = pos_S.float()[:, None] * freq[None, :]
    cos, sin = ang_SH.cos().to(x_BHSD.dtype), ang_SH.sin().to(x_BHSD.dtype)
    x1, x2 = x_BHSD[..., :half], x_BHSD[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head, self.theta = cfg.n_heads, cfg.head_dim, cfg.rope_theta
        inner = cfg.n_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x_BSD, pos_S, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, S, _ = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, pos_S, self.theta), rotary(k, pos_S, self.theta)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        # With a cache, new queries see every cached key and the causal part of the new ones.
        causal = cache is None or cache[0].shape[2] == 0
        mask = None
        if not causal:
            past = k.shape[2] - S
            mask = torch.ones(S, k.shape[2], dtype=torch.bool, device=x_BSD.device).tril(diagonal=past)
        o = self._sdpa(q, k, v, mask, causal and S > 1)
        return self.out(o.transpose(1, 2).reshape(B, S, -1)), (k, v)

    # Flash attention needs a head dimension that is a multiple of 8 (paper-151m has 82). On these devices
    # the heads are zero-padded for the kernel: q·k and the first d_head output columns do not change, and
    # the softmax scale stays 1/sqrt(d_head). Elsewhere (CPU) padding would only cost time.
    pad_devices: tuple[str, ...] = ("cuda",)

    def _sdpa(self, q, k, v, mask, causal: bool):
        d = q.shape[-1]
        pad = -d % 8 if q.device.type in self.pad_devices else 0
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1 / math.sqrt(d),
                                           dropout_p=self.dropout if self.training else 0.0)
        return o[..., :d] if pad else o


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.moe = MoE(cfg.block_moe)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD, pos_S, cache=None, compete=None):
        a, new_cache = self.attn(self.ln1(x_BSD), pos_S, cache)
        x_BSD = x_BSD + self.drop(a)
        out = self.moe(self.ln2(x_BSD), compete=compete)
        return x_BSD + self.drop(out.y), out, new_cache


@dataclass
class LMOutput:
    logits: torch.Tensor                      # [B, S, V]
    loss: torch.Tensor | None                 # LM cross-entropy + aux_loss (when targets were given)
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor                    # sum (or mean: aux_reduction) over MoE layers of their aux losses
    moe: list = dataclasses.field(default_factory=list)   # one MoEOutput per layer
    cache: KVCache | None = None


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`init="gpt2"` (default): GPT-2 style for the model's own weights: N(0, 0.02), and the projections
        that write into the residual stream (attention output, every expert's W2) N(0, 0.02/sqrt(2L)).
        Chosen by module type; routers keep the init of their own `reset_parameters` (e.g. XMoE's expert
        embeddings). `init="moeut"`: see `_reset_moeut`."""
        if self.cfg.init == "moeut":
            self._reset_moeut()
            return
        std, res_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, Attention):
                nn.init.normal_(m.qkv.weight, 0.0, std)
                nn.init.normal_(m.out.weight, 0.0, res_std)
            elif isinstance(m, Experts):  # routed and shared experts
                m.reset_parameters()
                nn.init.normal_(m.w1, 0.0, std)
                nn.init.normal_(m.w2, 0.0, res_std)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, 0.0, std)

    @torch.no_grad()
    def _reset_moeut(self) -> None:
        """The MoEUT framework's initialisation (Appendix I.2: "Model weights are initialized according to
        the MoEUT framework"), as in its reference implementation (RobertCsordas/moeut, moeut/moeut.py:
        `MoEUT.reset_parameters`, `SigmaMoE.reset_parameters`, `SwitchHeadCore.reset_parameters`,
        `MoEUTLM.reset_parameters`), mapped onto this model's modules. With s = sqrt(2 / L):

        - embedding: N(0, 1/sqrt(d_model)) (`kaiming_normal_`, fan-in, linear); an untied head keeps
          nn.Linear's default init (MoEUT's `lm_head` is a plain nn.Linear);
        - attention q, k, v: N(0, s/sqrt(d_model)); output: N(0, s/sqrt(heads·d_head));
        - experts' W1: N(0, s/sqrt(d_model)); W2: N(0, s/sqrt(n·d_expert)) with n·d_expert the whole
          layer's hidden width (σ-MoE's `values`: fan-in of all experts together);
        - the router's linear map (`gate`, σ-MoE's `expert_sel`): N(0, s/sqrt(d_model)), then every expert's
          row scaled to the same norm with the overall std kept (`renorm_keep_std`); routers without a
          `gate` (xmoe, pcosine) keep their own init; biases 0; LayerNorms 1 and 0.
        MoEUT's own attention is SwitchHead; here it is dense attention with the same std per projection."""
        s = math.sqrt(2 / self.cfg.n_layers)
        d = self.cfg.d_model
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 1 / math.sqrt(d))
            elif isinstance(m, Attention):
                nn.init.normal_(m.qkv.weight, 0.0, s / math.sqrt(d))
                nn.init.normal_(m.out.weight, 0.0, s / math.sqrt(m.out.weight.shape[1]))
            elif isinstance(m, Experts):  # routed and shared experts
                m.reset_parameters()      # biases
                nn.init.normal_(m.w1, 0.0, s / math.sqrt(d))
                nn.init.normal_(m.w2, 0.0, s / math.sqrt(m.w2.shape[0] * m.w2.shape[2]))
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(getattr(m, "gate", None), nn.Linear) and m.gate.weight.shape[1] == d:
                w = m.gate.weight
                nn.init.normal_(w, 0.0, s / math.sqrt(d))
                std = w.std()
                w.div_(w.norm(dim=1, keepdim=True)).mul_(std / w.std())
                if m.gate.bias is not None:
                    nn.init.zeros_(m.gate.bias)
        if not self.cfg.tie_embeddings:
            self.head.reset_parameters()

    def compile(self, *args, **kwargs) -> None:
        """`torch.compile` every block in place (state_dict keys unchanged). Whether a layer competes is decided
        outside its block, so the blocks compile to one graph for a routed step and one for a competition step,
        whichever layers compete; the kernels are custom operators (no graph break inside the MoE layer)."""
        for block in self.blocks:
            block.compile(*args, **kwargs)

    def num_parameters(self, active: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        m = self.cfg.block_moe
        per_expert = sum(p[0].numel() for p in self.blocks[0].moe.experts.parameters())
        return total - self.cfg.n_layers * per_expert * (m.n_routed - m.k_routed)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                compete: bool | None = None, cache: KVCache | None = None, use_cache: bool = False) -> LMOutput:
        B, S = input_ids.shape
        past = 0 if not cache else cache[0][0].shape[2]
        if past + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past + S} exceeds max_seq_len={self.cfg.max_seq_len}")
        pos_S = torch.arange(past, past + S, device=input_ids.device)
        x = self.drop(self.embed(input_ids))
        outs, new_cache = [], []
        for i, block in enumerate(self.blocks):
            # Decided here, outside the (compiled) block: a bool its graphs specialise on (`compile`).
            c = block.moe.will_compete(compete)
            x, out, kv = block(x, pos_S, cache[i] if cache else None, c)
            outs.append(out)
            new_cache.append(kv)
        logits = self.head(self.ln_f(x))
        aux = torch.stack([o.aux_loss for o in outs])
        aux = aux.sum() if self.cfg.aux_reduction == "sum" else aux.mean()
        lm_loss = loss = None
        if targets is not None:
            lm_loss = lm_cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))   # no fp32 [B·S, V] copies
            loss = lm_loss + aux
        return LMOutput(logits, loss, lm_loss, aux, outs, new_cache if use_cache else None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation."""
        ids, cache = input_ids, None
        for _ in range(max_new_tokens):
            step_in = ids if cache is None else ids[:, -1:]
            out = self(step_in, cache=cache, use_cache=use_cache)
            cache = out.cache
            logits = out.logits[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids
