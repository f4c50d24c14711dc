"""Test-wide setup.

Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before any kernel is
defined (at import of oodfast.kernels.*), hence here, before test modules import them.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
