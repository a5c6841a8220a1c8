"""The optimizer and the learning-rate schedules, as functions of the (fractional) epoch so that resuming needs only
the step count."""
import math

import torch


def make_optimizer(student, optim, device):
    """SGD or AdamW over the student's parameters with the settings `optim` (RunConfig.optim), at its scaled lr."""
    decay, no_decay = [], []
    # timm ViTs name the embeddings that DeiT keeps out of weight decay (position embedding, class token).
    no_decay_names = set(student.no_weight_decay()) if hasattr(student, "no_weight_decay") else set()
    for name, parameter in student.named_parameters():
        skip = not optim.decay_norm_and_bias and (parameter.ndim <= 1 or name in no_decay_names)
        (no_decay if skip else decay).append(parameter)
    groups = [{"params": params, "weight_decay": wd}
              for params, wd in ((decay, optim.weight_decay), (no_decay, 0.0)) if params]
    fused = device.type == "cuda"  # one kernel for the whole update, and no host sync under a GradScaler
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.scaled_lr, momentum=optim.momentum, nesterov=optim.nesterov,
                               fused=fused)
    return torch.optim.AdamW(groups, lr=optim.scaled_lr, fused=fused)

def learning_rate(epoch, *, schedule, lr, epochs, warmup_epochs=0.0, warmup_lr=0.0, milestones=(), decay=0.1,
                  min_lr=0.0):
    """The learning rate at fractional `epoch` (step / steps per epoch).

    A linear warm-up from `warmup_lr` to `lr` over the first `warmup_epochs`, then
      "step":   lr * decay ** (number of milestones passed)              (the ImageNet recipe: x0.1 at 30, 60, 90)
      "cosine": min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2     (DeiT: to min_lr at the last epoch)"""
    if epoch < warmup_epochs:
        return warmup_lr + (lr - warmup_lr) * epoch / warmup_epochs
    if schedule == "step":
        return lr * decay ** sum(epoch >= milestone for milestone in milestones)
    if schedule == "cosine":
        progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"schedule must be 'step' or 'cosine', got {schedule!r}")
