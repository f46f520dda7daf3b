"""Language models built from MoE layers."""
from .transformer import PRESETS, LMOutput, ModelConfig, MoETransformer, preset

__all__ = ["MoETransformer", "ModelConfig", "LMOutput", "PRESETS", "preset"]
