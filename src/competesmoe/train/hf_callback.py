"""Training an upcycled model with transformers' `Trainer`: the competition schedule as a callback.

    trainer = transformers.Trainer(model=upcycled, args=args, train_dataset=ds,
                                   callbacks=[CompetitionCallback(ScheduleConfig(omega=0.07, a_max=9, warmup=0.05))])

The model's `loss` already includes the MoE auxiliary losses when labels are given. The callback builds
the schedule (Appendix C) for `state.max_steps` optimizer steps when training begins (unless the model's
MoE layers already have one), sets its step to `state.global_step` (so a resumed run continues the same
table), and advances it once per optimizer step (`on_step_end` runs after each optimizer step, not after
each gradient-accumulation micro-batch).
"""
from __future__ import annotations

from transformers import TrainerCallback

from ..config import ScheduleConfig
from ..moe import CompetitionSchedule, attach_schedule, moe_layers, on_optimizer_step


class CompetitionCallback(TrainerCallback):
    def __init__(self, schedule: ScheduleConfig | None = None) -> None:
        self.cfg = schedule or ScheduleConfig()
        self.schedule: CompetitionSchedule | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = moe_layers(model)
        if not layers:
            raise ValueError("CompetitionCallback: the model has no MoE layer (upcycle it first)")
        self.schedule = layers[0].schedule
        if self.schedule is None:
            self.schedule = CompetitionSchedule.from_config(self.cfg, len(layers), state.max_steps)
            attach_schedule(model, self.schedule)
        self.schedule.step = state.global_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        on_optimizer_step(model)
