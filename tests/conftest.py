"""Test-wide setup: run the real Triton kernels on CPU tensors through Triton's interpreter.

The variable must be set before any ``@triton.jit`` function is defined, so before fusetune's ops
are imported; pytest loads this file first. Set ``TRITON_INTERPRET=0`` on a GPU machine to run the
same tests against compiled kernels on CUDA tensors (see ``tests/ops/checks.py: device``).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
