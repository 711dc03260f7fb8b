"""Compute ops: Triton kernels with an eager fallback (``reference``) for every one of them."""
