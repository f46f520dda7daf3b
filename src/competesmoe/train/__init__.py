"""Training: configs, the loop, checkpoints, metrics, trained runs, the validation loss, export."""
from .config import RUN_PRESETS, RunConfig, TrainConfig, run_preset
from .loop import Trainer, TrainingError
from .runs import load_trained
from .validation import LMLoss, lm_loss

__all__ = ["RunConfig", "TrainConfig", "RUN_PRESETS", "run_preset", "Trainer", "TrainingError", "load_trained",
           "LMLoss", "lm_loss"]
