"""Shared test setup and helpers (import them with `from conftest import logits, rel_err`)."""
import os

import torch

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter, which must be switched on before
# triton is first imported (rankkd imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def logits(*shape, scale=3.0, dtype=torch.float64, device="cpu", requires_grad=False):
    """Fresh random logits at a realistic scale (ImageNet-trained logits have a spread of a few units), drawn in
    float64 and then rounded to dtype."""
    x = (scale * torch.randn(*shape, dtype=torch.float64)).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()
