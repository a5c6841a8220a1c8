"""Model weights for every zoo: the state_dict a checkpoint holds, torchvision's published weights resolved before a
run starts (from torch's cache, or downloaded into it), and a classifier's last layer (whose shape says how many
classes the weights were trained for)."""
import http.client
import os
import urllib.error
import urllib.parse
from pathlib import Path

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


def _cache_path(entry):
    """Where torch.hub keeps the file of torchvision weights `entry` (a torchvision WeightsEnum member)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(entry.url).path)


def fetch_torchvision_weights(entry, option):
    """The file of torchvision weights `entry` in torch's cache, downloaded there first where it is missing. Runs
    before training, so that a machine without network access (most clusters' compute nodes) stops in one line
    naming the weights, where they belong and how to pass them (`option`, e.g. "--teacher-weights"), rather than
    in a traceback after the run has started."""
    cached = _cache_path(entry)
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        found = torch.hub.HASH_REGEX.search(cached.name)
        # Downloads into a temporary file and renames it: a failed transfer leaves no partial copy behind.
        torch.hub.download_url_to_file(entry.url, str(cached), hash_prefix=found.group(1) if found else None,
                                       progress=False)
    except (OSError, http.client.HTTPException, RuntimeError) as error:  # RuntimeError: the hash did not match
        cause = error.reason if type(error) is urllib.error.URLError else error
        cause = str(cause).strip().split("\n")[0]
        raise ValueError(f"cannot download torchvision weights {entry} from {entry.url}: {cause}. Download the file "
                         f"where there is network access, then pass it with {option} /path/to/{cached.name} (or put "
                         f"it at {cached})") from None
    return cached


def torchvision_state_dict(entry, option):
    """The state_dict of torchvision weights `entry`, read (CRC-checked) from torch's cache after
    fetch_torchvision_weights."""
    path = fetch_torchvision_weights(entry, option)
    try:
        return load_torch_file(path, f"torchvision weights {entry}")
    except ValueError as error:  # torch.hub reuses a file it downloaded before without checking it
        raise ValueError(f"{error}; delete it to download it again") from None
