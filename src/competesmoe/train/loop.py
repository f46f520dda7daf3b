"""The training loop: one page, top to bottom.

    trainer = Trainer(run_config, resume=True)
    summary = trainer.train()

Each optimizer step: ask the competition schedule nothing (the MoE layers ask it themselves), run
`grad_accum` micro-batches under optional bf16 autocast (the LM loss is the mean over the step's target
tokens, on every rank together), check the loss is finite, clip, step AdamW, then `on_optimizer_step`
(advances the schedule, updates non-gradient state). Checkpoints hold
everything needed to continue bit-exactly: weights, optimizer, schedule, RNG states, data position.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import CompeteSMoEError
from ..data import prepare_data
from ..data.batches import model_inputs
from ..model import MoETransformer
from ..moe import CompetitionSchedule, attach_schedule, moe_layers, on_optimizer_step
from . import checkpoint as ckpt
from . import distributed
from .config import RunConfig
from .metrics import MetricsLogger, micro_metrics, step_metrics
from .runs import check_resumable, load_weights, newest_saved, resolve_device
from .validation import lm_loss


class TrainingError(CompeteSMoEError, RuntimeError):
    """Training cannot go on (non-finite losses, a run folder that would be overwritten, ...)."""


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay to lr · min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only (get_rng_state_all would open every GPU on every rank)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]   # older checkpoints hold a list, one state per device
        torch.cuda.set_rng_state(cuda) if isinstance(cuda, torch.Tensor) else torch.cuda.set_rng_state_all(cuda)


def check_run_folder(out: Path, resume: bool) -> None:
    """A run folder with checkpoints is only continued (`resume`), never trained over."""
    if ckpt.checkpoints(out / "checkpoints") and not resume:
        raise TrainingError(f"{out} already holds checkpoints; pass --resume to continue, "
                            f"or choose another --out (nothing was overwritten)")


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, log=print, model: torch.nn.Module | None = None,
                 data=None) -> None:
        """`model`, `data`: a prebuilt model (e.g. upcycled) and its data instead of `MoETransformer(cfg.model)`
        and `prepare_data(cfg.data)` (`competesmoe finetune`); everything else is the same."""
        t = cfg.train
        self.dist = distributed.setup(t, resolve_device(t.device))   # torchrun: process group, rank, device
        log = self.dist.logger(log)                                  # rank 0 logs, the others stay quiet
        self.cfg, self.log = cfg, log
        self.out = Path(t.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        check_run_folder(self.out, resume)
        saved = newest_saved(self.ckpt_root.parent) if resume and ckpt.checkpoints(self.ckpt_root) else None
        if saved is not None:   # refuse another config before preparing data (the tokenizer sets vocab_size)
            check_resumable(cfg, saved[1], saved[0], later=("model.vocab_size",))
        self.device = self.dist.device
        seed_everything(t.seed)

        self.data = data if data is not None else self.dist.main_first(lambda: prepare_data(cfg.data, log=log))   # rank 0 fills the cache
        if model is None:
            if self.data.vocab_size != cfg.model.vocab_size:
                log(f"model.vocab_size set to the tokenizer's {self.data.vocab_size} (was {cfg.model.vocab_size})")
                cfg.model.vocab_size = self.data.vocab_size
            model = MoETransformer(cfg.model)
        self.model = model.to(self.device)
        if t.activation_checkpointing:
            n = distributed.checkpoint_activations(self.model)
            log(f"activation checkpointing: {n} layers recompute their activations in backward")
        if t.compile:
            self.model.compile()      # torch.compile in place: state_dict keys and checkpoints unchanged
        self.train_model = self.dist.parallelize(self.model, log)   # the module forward runs through (DDP, FSDP2)
        self.optimizer = self.dist.adapt_optimizer(self._optimizer())
        layers = moe_layers(self.model)
        self.schedule = CompetitionSchedule.from_config(t.schedule, len(layers), t.steps)
        attach_schedule(self.model, self.schedule)
        self.dist.check_schedule(self.schedule)
        self.batches = self.dist.shard_batches(self.data.train_batches(t.batch_size, seed=cfg.data.seed))
        self.step, self.nan_skipped, self.consecutive_nan = 0, 0, 0
        self.competitions = 0     # layer competitions since the last logged step (metrics.jsonl: competing_layers)
        self.last_val: dict | None = None
        if resume:  # refuses a checkpoint of another config before anything in the run folder changes
            self._restore()

        if self.dist.is_main:  # one writer of the run folder
            self.out.mkdir(parents=True, exist_ok=True)
            self.data.tokenizer.save(str(self.out / "tokenizer.json"))
            cfg.to_yaml(self.out / "config.yaml")
        self.metrics = MetricsLogger(self.out, tensorboard=t.tensorboard) if self.dist.is_main else distributed.NoMetrics()
        total, active = self.model.num_parameters(), self.model.num_parameters(active=True)
        m = layers[0].cfg if layers else None
        log(f"model: {total:,} parameters, {active:,} active per token " + (
            f"({len(layers)} MoE layers, {m.router}, {m.n_experts} experts, K={m.top_k})" if m else "(dense)"))

    # --- setup ------------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable weights only (a frozen one, requires_grad=False, is not in it)."""
        t = self.cfg.train
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=t.lr, betas=(t.beta1, t.beta2), foreach=True)

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.train
        window_tokens = 0     # input tokens (padding included) of every rank since the last logged step
        from tqdm.auto import tqdm
        bar = tqdm(total=t.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=None if self.dist.is_main else True)
        tic = time.perf_counter()
        while self.step < t.steps:
            lr = lr_at(self.step, t)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.model.train()
            logs = self._logs_at(self.step + 1)
            inputs = [model_inputs(next(self.batches), self.device) for _ in range(t.grad_accum)]
            shares = self._token_shares(inputs)
            window_tokens += sum(x["input_ids"].numel() for x in inputs) * self.dist.world
            micro = [self._micro_step(x, w, i == t.grad_accum - 1, logs)         # detached scalars
                     for i, (x, w) in enumerate(zip(inputs, shares))]
            loss = sum(m["loss"] for m in micro) / t.grad_accum
            self.dist.after_backward(self.model)
            grad_norm = self.dist.clip_grad_norm(self.model, t.grad_clip)
            finite = self.dist.all_agree(bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)))
            if finite:
                self.optimizer.step()
                self.consecutive_nan = 0
            else:
                self._non_finite(float(loss))
            self.optimizer.zero_grad(set_to_none=True)
            on_optimizer_step(self.model)
            self.competitions += int(micro[0]["competing_layers"])
            self.step += 1
            bar.update(1)

            if logs:
                elapsed, tic = time.perf_counter() - tic, time.perf_counter()
                m = step_metrics(self.dist.reduce_metrics(micro), grad_norm, lr)
                m["tokens_per_s"] = window_tokens / elapsed if self.step % t.log_every == 0 else None
                window_tokens = 0
                m["nan_skipped"] = self.nan_skipped
                m["competing_layers"], self.competitions = self.competitions, 0
                self.metrics.log(self.step, m)
                bar.set_postfix(loss=f"{m['loss']:.3f}", ppl=f"{math.exp(min(m['lm_loss'], 50)):.1f}",
                                tok_s=f"{m['tokens_per_s'] or 0:.0f}", comp=m["competing_layers"])
            if self.step % t.eval_every == 0 or self.step == t.steps:
                val = self.last_val = self.evaluate()
                self.metrics.log(self.step, val)
                msg = f"step {self.step}: val_loss {val['val_loss']:.4f}  val_ppl {val['val_ppl']:.2f}"
                bar.write(msg) if self.log is print else self.log(msg)
            if self.step % t.ckpt_every == 0 or self.step == t.steps:
                self.save()
        bar.close()
        self.metrics.close()
        final = self.last_val if self.last_val is not None else self.evaluate()
        return {"step": self.step, **final, "nan_skipped": self.nan_skipped, "out_dir": str(self.out)}

    def _logs_at(self, step: int) -> bool:
        """Are the metrics of the optimizer step that ends at `step` logged?"""
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps

    def _token_shares(self, inputs: list[dict[str, torch.Tensor]]) -> list[float | None]:
        """Each micro-batch's LM-loss weight, so that the step's loss is the mean over all of its target tokens
        (every micro-batch, every rank) however they fall: n_i · P · grad_accum / N. Chat and image-text
        samples carry different numbers of reply tokens; a micro-batch holding exactly its share (packed
        pre-training: all of them) keeps its loss as it is (None)."""
        counts = torch.stack([(x["targets"] >= 0).sum() for x in inputs]).tolist()   # one device sync
        total = self.dist.total(sum(counts))
        per = total / (len(counts) * self.dist.world)
        return [None if c == per else (c / per if total else 0.0) for c in counts]

    def _micro_step(self, inputs: dict[str, torch.Tensor], share: float | None = None, last: bool = True,
                    detail: bool = True) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch, its LM loss weighted by its `share` of the step's target
        tokens; returns detached scalars, so no micro-batch's activations or logits outlive its backward
        (memory does not grow with grad_accum); the per-layer metrics only when `detail` (a logged step).
        Several processes reduce gradients on the `last` micro-batch of the step only."""
        with self.dist.sync_context(last):
            with self._autocast():
                out = self.train_model(**inputs)
            if share is not None:
                out.loss, out.lm_loss = out.loss + out.lm_loss * (share - 1), out.lm_loss * share
            (out.loss / self.cfg.train.grad_accum).backward()
        return micro_metrics(out, detail)

    def _non_finite(self, loss: float) -> None:
        t = self.cfg.train
        last = ckpt.latest_good(self.ckpt_root, log=lambda *_: None)
        where = f"last good checkpoint: {last}" if last else "no checkpoint written yet"
        if t.nan_policy == "stop":
            raise TrainingError(f"non-finite loss ({loss}) at step {self.step}; stopping ({where})")
        self.nan_skipped += 1
        self.consecutive_nan += 1
        self.log(f"warning: non-finite loss ({loss}) at step {self.step}: update skipped "
                 f"({self.nan_skipped} skipped so far)")
        if self.consecutive_nan > t.max_nan_skips:
            raise TrainingError(f"{self.consecutive_nan} consecutive non-finite losses up to step {self.step}; "
                                f"stopping ({where})")

    def evaluate(self) -> dict:
        t = self.cfg.train
        val = lm_loss(self.model, self.data.valid_batches(t.batch_size, t.eval_batches), self.device, self._autocast)
        return {"val_loss": val.loss, "val_ppl": val.ppl}

    # --- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "rng": rng_state(), "data": self.batches.state_dict(), "nan_skipped": self.nan_skipped,
                 "consecutive_nan": self.consecutive_nan, "competitions": self.competitions, "version": __version__}
        if self.dist.world > 1:  # every rank writes its shards through torch.distributed.checkpoint
            return self.dist.save(self.ckpt_root, self.step, self.model, self.optimizer, state, self.cfg.to_yaml(),
                                  keep_last=self.cfg.train.keep_last, tokenizer_json=self.data.tokenizer.to_str())
        return ckpt.save(self.ckpt_root, self.step, self.model.state_dict(), state, self.cfg.to_yaml(),
                         keep_last=self.cfg.train.keep_last, tokenizer_json=self.data.tokenizer.to_str())

    def _restore(self) -> None:
        path = ckpt.latest_good(self.ckpt_root, log=self.log)
        if path is None:
            self.log(f"no checkpoint in {self.ckpt_root}: starting from scratch")
            return
        tensors, state, cfg_yaml = ckpt.load(path, map_location=self.device, tensors=not ckpt.is_sharded(path))
        check_resumable(self.cfg, cfg_yaml, path)
        self.dist.load_state(self.model, self.optimizer, path, tensors, state, load_weights)  # any layout, any P
        self.schedule.load_state_dict(state["schedule"])
        attach_schedule(self.model, self.schedule)
        self.batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step, self.nan_skipped = state["step"], state["nan_skipped"]
        self.consecutive_nan, self.competitions = state["consecutive_nan"], state.get("competitions", 0)
        self.log(f"resumed from {path} at step {self.step}")
        saved_steps = self.schedule.total_steps
        if self.cfg.train.steps != saved_steps:
            self._new_total(saved_steps)

    def _new_total(self, saved_steps: int) -> None:
        """A resumed run asked for another train.steps (docs/distributed.md, "Training longer"): the learning
        rate follows the cosine over the new total from here on, and the competition table is rebuilt for
        the new total, the steps already taken keeping their decisions (`CompetitionSchedule.resize`)."""
        t = self.cfg.train
        if t.steps < self.step:
            raise TrainingError(f"train.steps={t.steps} is before the checkpoint's step {self.step}: a run cannot "
                                f"be shortened below what it has trained")
        old = lr_at(self.step, dataclasses.replace(t, steps=saved_steps))
        self.schedule.resize(t.steps)
        attach_schedule(self.model, self.schedule)
        self.log(f"train.steps {saved_steps} -> {t.steps}: the learning rate now follows the cosine over {t.steps} "
                 f"steps ({old:.3g} -> {lr_at(self.step, t):.3g} at step {self.step}); the competition schedule is "
                 f"rebuilt for {t.steps} steps, steps 1..{self.step} keep their decisions")
