"""pytest setup: the Triton kernels of kernels.py run on CPU through Triton's interpreter, which triton
reads when it is imported, so the flag is set here, before any test module imports kernels."""
import os

os.environ["TRITON_INTERPRET"] = "1"
