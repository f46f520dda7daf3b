"""The MoE layer and its parts: routers, experts, competition, losses, schedule."""
from .experts import FFN, Experts
from .layer import MoE, MoEOutput, attach_schedule, moe_layers, on_optimizer_step
from .routers import Routing, build_router
from .schedule import CompetitionSchedule

__all__ = ["MoE", "MoEOutput", "Experts", "FFN", "Routing", "build_router", "CompetitionSchedule",
           "attach_schedule", "moe_layers", "on_optimizer_step"]
