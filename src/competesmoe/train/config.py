"""`RunConfig` = model + data + training; run presets (`tiny`, `small`, `paper-151m`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import Config, ScheduleConfig, apply_overrides, check, check_choice
from ..data import DataConfig
from ..model.transformer import PRESETS as MODEL_PRESETS, ModelConfig


@dataclass
class TrainConfig(Config):
    out_dir: str = "runs/default"
    steps: int = 300                  # optimizer steps
    batch_size: int = 16              # sequences per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1         # cosine decays to lr · min_lr_ratio (MoEUT framework)
    warmup_steps: int = 30
    weight_decay: float = 0.01        # AdamW settings of the MoEUT framework the paper trains with
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 0.25           # 0 disables clipping
    precision: str = "fp32"           # "bf16": autocast to bfloat16 (CPU and CUDA)
    device: str = "auto"              # "auto": cuda if available, else cpu
    seed: int = 42
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 100
    keep_last: int = 3
    nan_policy: str = "skip"          # non-finite loss: "skip" the step (counted) or "stop" with an error
    max_nan_skips: int = 10           # consecutive skipped steps before stopping anyway
    tensorboard: bool = True
    compile: bool = False             # torch.compile the model's forward (in place: same module, same checkpoints)
    parallel: str = "ddp"             # under torchrun: "ddp" (replicated weights), "fsdp" (FSDP2 shards), "none"
    expert_parallel: int = 1          # E: each MoE layer's experts split over E ranks (docs/distributed.md)
    activation_checkpointing: bool = False   # recompute each layer's activations in backward (less memory, ~1/3 more compute)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)   # competition (competesmoe only)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches",
                     "ckpt_every", "keep_last", "max_nan_skips"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"train.{name} must be an integer >= 1, got {v!r}")
        check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)")
        check_choice("train.precision", self.precision, ("fp32", "bf16"))
        check_choice("train.nan_policy", self.nan_policy, ("skip", "stop"))
        check_choice("train.parallel", self.parallel, ("none", "ddp", "fsdp"))
        check(isinstance(self.expert_parallel, int) and self.expert_parallel >= 1,
              f"train.expert_parallel must be an integer >= 1, got {self.expert_parallel!r}")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
              f"train.device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")


@dataclass
class RunConfig(Config):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step: batch × accumulation × sequence length."""
        return self.train.batch_size * self.train.grad_accum * self.data.seq_len

    def validate(self) -> None:
        check(self.data.seq_len <= self.model.max_seq_len,
              f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        E, n = self.train.expert_parallel, self.model.block_moe.n_routed
        check(n % E == 0, f"train.expert_parallel={E} must divide the {n} routed experts of each layer")


def _run(model: str, seq_len: int, vocab: int, **train) -> RunConfig:
    m = dataclasses.replace(MODEL_PRESETS[model], vocab_size=vocab)
    return RunConfig(model=m, data=DataConfig(seq_len=seq_len, vocab_size=vocab), train=TrainConfig(**train))


# Section 5.1: "We train this model ... on 7 x 10^9 tokens"; steps = ceil(7e9 / (256 x 1024)).
PAPER_151M_TOKENS = 7_000_000_000
PAPER_151M_STEPS = -(-PAPER_151M_TOKENS // (256 * 1024))   # 26,703

# Every value's source is in docs/presets.md. tiny/small are ours (sized for CPUs); paper-151m follows the
# paper (Tables 12-14) and, where it is silent, the MoEUT framework it trains with (Appendix I.2).
RUN_PRESETS: dict[str, RunConfig] = {
    "tiny": _run("tiny", 128, 4096, steps=300, batch_size=16, lr=3e-3, warmup_steps=30, eval_every=100,
                 ckpt_every=100),
    "small": _run("small", 256, 8192, steps=5000, batch_size=32, lr=1e-3, warmup_steps=200, eval_every=500,
                  ckpt_every=500),
    # 64 sequences per GPU on 4 GPUs (Table 13) = 256 per optimizer step: 64 x 4 accumulated. 1,024 tokens
    # each (MoEUT's SlimPajama sweep, lm.unroll; the paper gives no length). 7 x 10^9 training tokens
    # (Section 5.1): 26,703 steps x 262,144 tokens = 7.00 B.
    "paper-151m": _run("paper-151m", 1024, 8000, steps=PAPER_151M_STEPS, batch_size=64, grad_accum=4, lr=2.5e-4,
                       warmup_steps=4000, eval_every=2000, ckpt_every=2000, precision="bf16",
                       schedule=ScheduleConfig(omega=0.07, a_max=3, warmup=0.0, seed=42)),
}


def run_preset(name: str, overrides: list[str] | dict | None = None) -> RunConfig:
    check(name in RUN_PRESETS, f"unknown preset {name!r}; choose from {sorted(RUN_PRESETS)}")
    return apply_overrides(RUN_PRESETS[name], overrides or {})
