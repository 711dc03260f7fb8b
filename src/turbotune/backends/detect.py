"""Which compute backends this machine has, and which one a run should use.

Detection never raises: a backend whose library is missing or broken is reported as absent
with the reason, so ``turbotune env`` can always print a full picture.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass, field

from turbotune.errors import ConfigError

KEY_PACKAGES = (
    "torch", "triton", "transformers", "peft", "accelerate", "datasets", "safetensors",
    "bitsandbytes", "trl", "mlx", "mlx-lm", "flash-attn",
)  # fmt: skip

#: Preference order of ``backend: auto``.
PREFERENCE = ("cuda", "mps", "mlx", "cpu")


@dataclass
class BackendInfo:
    name: str
    available: bool
    detail: str
    devices: list[str] = field(default_factory=list)


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package, ``None`` when absent."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cuda() -> BackendInfo:
    try:
        import torch
    except ImportError:
        return BackendInfo("cuda", False, "torch is not installed")
    if not torch.cuda.is_available():
        build = torch.version.cuda
        why = "torch was built without CUDA" if build is None else "no CUDA device is visible"
        return BackendInfo("cuda", False, why)
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(
            f"cuda:{i} {props.name} (compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB)"
        )
    return BackendInfo(
        "cuda", True, f"CUDA {torch.version.cuda}, {len(devices)} device(s)", devices
    )


def _mps() -> BackendInfo:
    try:
        import torch
    except ImportError:
        return BackendInfo("mps", False, "torch is not installed")
    backend = getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_built():
        return BackendInfo("mps", False, "torch was built without MPS (Apple GPUs only)")
    if not backend.is_available():
        return BackendInfo("mps", False, "MPS is built but no Apple GPU is available")
    return BackendInfo("mps", True, "Apple Metal (MPS)", ["mps"])


def _mlx() -> BackendInfo:
    if importlib.util.find_spec("mlx") is None:
        return BackendInfo(
            "mlx", False, "the mlx package is not installed (pip install 'turbotune[mlx]')"
        )
    try:
        import mlx.core as mx

        device = str(mx.default_device())
    except Exception as err:  # a broken install must not break `turbotune env`
        return BackendInfo("mlx", False, f"mlx is installed but failed to load: {err}")
    return BackendInfo("mlx", True, f"MLX on {device}", [device])


def _cpu() -> BackendInfo:
    import os

    return BackendInfo(
        "cpu",
        True,
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        ["cpu"],
    )


def detect_backends() -> dict[str, BackendInfo]:
    """Every backend with whether it is usable here and why (not)."""
    return {b.name: b for b in (_cuda(), _mps(), _mlx(), _cpu())}


def choose_backend(
    requested: str = "auto", found: dict[str, BackendInfo] | None = None
) -> tuple[str, str]:
    """The backend to use and the reason, for ``backend: auto`` or an explicit request.

    ``auto`` never picks MLX: MLX runs a separate engine that must be asked for by name.
    """
    found = detect_backends() if found is None else found
    if requested != "auto":
        info = found.get(requested)
        if info is None:
            raise ConfigError(
                f"unknown backend '{requested}'; choose one of auto, {', '.join(PREFERENCE)}"
            )
        if not info.available:
            raise ConfigError(
                f"backend '{requested}' was requested but is not usable here: {info.detail}"
            )
        return requested, f"requested in the config ({info.detail})"
    for name in ("cuda", "mps", "cpu"):
        if found[name].available:
            skipped = [
                f"{n}: {found[n].detail}"
                for n in ("cuda", "mps")
                if n != name
                and not found[n].available
                and PREFERENCE.index(n) < PREFERENCE.index(name)
            ]
            why = f"auto: {found[name].detail}" + (
                f" (not available: {'; '.join(skipped)})" if skipped else ""
            )
            return name, why
    return "cpu", "auto: fallback"
