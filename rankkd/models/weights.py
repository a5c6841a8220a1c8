"""Model weights in checkpoint files, for every zoo: the state_dict a checkpoint holds, and a classifier's last layer
(whose shape says how many classes the weights were trained for)."""
import torch
from torch import nn

from rankkd._torchfile import load_torch_file


def classifier_of(model):
    """The model's final linear layer (the last nn.Linear it holds), whose out_features is its class count."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def _strip_wrappers(state_dict):
    """Drop the key prefixes that DDP ('module.') and torch.compile ('_orig_mod.') add."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def read_checkpoint_weights(path):
    """The model state_dict in a checkpoint file: rankkd's own ({'student': ...}), a {'model': ...} or
    {'state_dict': ...} dict (timm, DeiT, most trainers), or a bare state_dict."""
    path = str(path)
    checkpoint = load_torch_file(path, "checkpoint")
    if isinstance(checkpoint, dict):
        for key in ("student", "model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    is_state_dict = isinstance(checkpoint, dict) and checkpoint and all(isinstance(value, torch.Tensor)
                                                                        for value in checkpoint.values())
    if not is_state_dict:
        held = (f"a dict of {', '.join(map(str, list(checkpoint)[:6]))}" if isinstance(checkpoint, dict) and checkpoint
                else repr(checkpoint)[:40])
        raise ValueError(f"checkpoint {path!r} holds no model weights but {held} (expected a state_dict, or a dict "
                         "with one under 'student', 'model' or 'state_dict')")
    return _strip_wrappers(checkpoint)
