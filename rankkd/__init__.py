"""rankkd: a fused Kendall's tau ranking loss for logit distillation, and the pieces of a lean distillation trainer."""
from rankkd.ops import KendallRankLoss, available_backends, kendall_rank_loss
from rankkd.fused_linear import FusedLinearDistillLoss, fused_linear_distill_loss, teacher_topk
from rankkd import distill, losses  # noqa: E402  (they build on the op above)

__all__ = ["FusedLinearDistillLoss", "KendallRankLoss", "available_backends", "fused_linear_distill_loss",
           "kendall_rank_loss", "teacher_topk"]
__version__ = "0.1.0"
