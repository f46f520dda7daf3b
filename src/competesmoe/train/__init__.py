"""Training: configs, the loop, checkpoints, metrics."""
from .config import RUN_PRESETS, RunConfig, TrainConfig, run_preset
from .loop import Trainer, TrainingError, load_trained

__all__ = ["RunConfig", "TrainConfig", "RUN_PRESETS", "run_preset", "Trainer", "TrainingError", "load_trained"]
