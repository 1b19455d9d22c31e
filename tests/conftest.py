"""pytest setup: without a CUDA device the Triton kernels of kernels.py run on CPU through Triton's interpreter,
which triton reads when it is imported, so the flag is set here, before any test module imports kernels; with
one they run compiled (importing torch does not import triton)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
