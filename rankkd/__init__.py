"""rankkd: a fused Kendall's tau ranking loss for logit distillation, and the pieces of a lean distillation trainer."""
from rankkd.ops import KendallRankLoss, available_backends, kendall_rank_loss
from rankkd import distill, losses  # noqa: E402  (they build on the op above)

__all__ = ["KendallRankLoss", "available_backends", "kendall_rank_loss"]
__version__ = "0.1.0"
