"""Shared test setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 must be set
before triton is first imported, which is why it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
