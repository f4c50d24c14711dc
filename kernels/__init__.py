"""Triton kernels (import name ``oodfast.kernels``), each with its launcher and pure-torch reference."""
