"""Which compute backends this machine has, and which one a run should use.

Detection never raises: a backend whose library is missing or broken is reported as absent
with the reason, so ``turbotune env`` can always print a full picture.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

from turbotune.errors import ConfigError

KEY_PACKAGES = (
    "torch", "triton", "transformers", "peft", "accelerate", "datasets", "safetensors",
    "bitsandbytes", "trl", "mlx", "mlx-lm", "flash-attn",
)  # fmt: skip

#: Every backend, in the order ``turbotune env`` lists them.
PREFERENCE = ("cuda", "mps", "mlx", "cpu")
#: What ``backend: auto`` tries, first available wins (MLX only by name: see choose_backend).
AUTO_ORDER = ("cuda", "mps", "cpu")


@dataclass
class BackendInfo:
    """What a probe found about one backend."""

    name: str
    """``cuda``, ``mps``, ``mlx`` or ``cpu``."""
    available: bool
    """Whether a run can use it here."""
    detail: str
    """What was found (version, device), or why it is not usable and how to fix that."""
    devices: list[str] = field(default_factory=list)
    """The devices it would run on."""


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

        gpu = bool(getattr(mx, "is_available", lambda d: False)(mx.gpu))
    except Exception as err:  # a broken install must not break `turbotune env`
        return BackendInfo("mlx", False, f"mlx is installed but failed to load: {err}")
    if importlib.util.find_spec("mlx_lm") is None:
        return BackendInfo(
            "mlx", False, "mlx is installed but mlx-lm is not (pip install 'turbotune[mlx]')"
        )
    where = "the Metal GPU" if gpu else "the CPU (no Metal GPU: the mlx[cpu] build)"
    return BackendInfo("mlx", True, f"MLX {mx.__version__} on {where}", ["gpu" if gpu else "cpu"])


def _cpu() -> BackendInfo:
    import os

    return BackendInfo(
        "cpu",
        True,
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        ["cpu"],
    )


#: The availability probes, by backend; tests replace entries to simulate other machines.
PROBES: dict[str, Callable[[], BackendInfo]] = {
    "cuda": _cuda,
    "mps": _mps,
    "mlx": _mlx,
    "cpu": _cpu,
}


def detect_backends() -> dict[str, BackendInfo]:
    """Every backend with whether it is usable here and why (not), in :data:`PREFERENCE` order."""
    return {name: PROBES[name]() for name in PREFERENCE}


def choose_backend(
    requested: str = "auto", found: dict[str, BackendInfo] | None = None
) -> tuple[str, str]:
    """The backend to use and the reason, for ``backend: auto`` or an explicit request.

    ``auto`` takes the first available of CUDA, MPS, CPU: the PyTorch engine, where every
    plugin runs. It never picks MLX, which is a separate engine (its own 4-bit format, no
    plugins) and must be asked for by name; the reason says so when MLX is available.

    Args:
        requested: ``auto`` or a backend name.
        found: the result of :func:`detect_backends` (detected now when ``None``).

    Returns:
        ``(name, reason)``.

    Raises:
        ConfigError: an unknown name, or a requested backend that is not usable here.
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
        return requested, f"requested: {info.detail}"
    name = next((n for n in AUTO_ORDER if found[n].available), "cpu")
    skipped = [
        f"{n}: {found[n].detail}"
        for n in AUTO_ORDER[: AUTO_ORDER.index(name)]
        if not found[n].available
    ]
    why = f"auto: {found[name].detail}"
    if skipped:
        why += f"; not available: {'; '.join(skipped)}"
    if found["mlx"].available:
        why += "; mlx is installed too, chosen only by name (backend=mlx)"
    return name, why
