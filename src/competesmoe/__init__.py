"""competesmoe: sparse mixture-of-experts trained via competition (arXiv 2505.13380), with fair baselines."""
from .config import (CompetitionConfig, ConfigError, LossConfig, MoEConfig, RouterConfig, ScheduleConfig,
                     apply_overrides)
from .moe import (MoE, MoEOutput, CompetitionSchedule, attach_schedule, moe_layers, on_optimizer_step)

__version__ = "0.1.0"

# The model types "competesmoe" and "competesmoe_upcycled" join transformers' Auto classes, so that
# `AutoModelForCausalLM.from_pretrained(folder)` works after `import competesmoe`; without importing
# transformers here (it registers when transformers is imported, before or after this).
from ._hf_registration import register_when_transformers_is_imported  # noqa: E402

register_when_transformers_is_imported()
__all__ = ["MoE", "MoEConfig", "MoEOutput", "RouterConfig", "CompetitionConfig", "LossConfig",
           "ScheduleConfig", "CompetitionSchedule", "attach_schedule", "on_optimizer_step", "moe_layers",
           "apply_overrides", "ConfigError"]
