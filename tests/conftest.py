import os

import torch

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter, which must be switched on before
# triton is first imported (rankkd imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
