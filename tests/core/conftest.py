"""Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The switch is read
when `@triton.jit` decorates, so it must be set before `otr_megatron.core.triton_backend` is first
imported; an explicit TRITON_INTERPRET in the environment (e.g. 0 on a GPU machine) wins."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
