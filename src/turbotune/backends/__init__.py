"""Compute backends: detection and choice (CUDA, MPS, MLX, CPU)."""

from .detect import BackendInfo, choose_backend, detect_backends, package_versions

__all__ = ["BackendInfo", "choose_backend", "detect_backends", "package_versions"]
