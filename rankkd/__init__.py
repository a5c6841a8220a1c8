"""rankkd: a fused Kendall's tau ranking loss for logit distillation, and the pieces of a lean distillation trainer."""
from rankkd.ops import KendallRankLoss, available_backends, kendall_rank_loss

__all__ = ["KendallRankLoss", "available_backends", "kendall_rank_loss"]
__version__ = "0.1.0"
