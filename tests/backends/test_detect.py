"""Backend detection and the ``auto`` choice, with each backend present or absent.

The availability probes (``detect.PROBES``) are replaced, never the packages: the choice and
its reason are what is tested; the real probes are run once on this machine as well.
"""

from __future__ import annotations

import pytest

from turbotune.backends import detect
from turbotune.backends.detect import BackendInfo, choose_backend, detect_backends
from turbotune.errors import ConfigError

ALL = ("cuda", "mps", "mlx", "cpu")


def _machine(monkeypatch, *present: str) -> None:
    """Probes that report exactly ``present`` as available, each with a recognizable detail."""
    for name in ALL:
        up = name in present
        info = BackendInfo(name, up, f"{name}-{'here' if up else 'absent-because-x'}")
        monkeypatch.setitem(detect.PROBES, name, lambda info=info: info)


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (("cuda", "mps", "mlx", "cpu"), "cuda"),
        (("mps", "mlx", "cpu"), "mps"),
        (("mlx", "cpu"), "cpu"),  # MLX is a separate engine: only by name
        (("cpu",), "cpu"),
        (("cuda", "cpu"), "cuda"),
    ],
)
def test_auto_picks_the_first_available_torch_backend(monkeypatch, present, expected):
    _machine(monkeypatch, *present)
    name, why = choose_backend("auto")
    assert name == expected, f"{present}: auto chose {name} ({why})"
    assert why.startswith(f"auto: {expected}-here"), why
    for skipped in ALL[: ALL.index(expected)]:  # every better backend that is absent says why
        if skipped not in present and skipped != "mlx":
            assert f"{skipped}: {skipped}-absent-because-x" in why, why
    assert ("backend=mlx" in why) == ("mlx" in present), why


@pytest.mark.parametrize("name", ALL)
def test_an_explicit_backend_is_used_when_present_and_refused_with_the_reason_when_absent(
    monkeypatch, name
):
    _machine(monkeypatch, "cpu", name)
    chosen, why = choose_backend(name)
    assert chosen == name and f"{name}-here" in why
    _machine(monkeypatch, *(n for n in ALL if n != name))
    if name == "cpu":
        return  # the CPU is always there
    with pytest.raises(ConfigError, match=f"'{name}'.*{name}-absent-because-x"):
        choose_backend(name)


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ConfigError, match="auto, cuda, mps, mlx, cpu"):
        choose_backend("tpu", {n: BackendInfo(n, True, "") for n in ALL})


def test_detect_reports_every_backend_in_order(monkeypatch):
    _machine(monkeypatch, "cpu")
    found = detect_backends()
    assert list(found) == list(ALL)
    assert [b.available for b in found.values()] == [False, False, False, True]


def test_real_probes_on_this_machine():
    """The real probes never raise and always give a reason; the CPU is always usable."""
    import torch

    found = detect_backends()
    assert found["cpu"].available and found["cpu"].devices == ["cpu"]
    for info in found.values():
        assert info.detail, f"{info.name} has no detail"
    assert found["cuda"].available == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "CUDA" in found["cuda"].detail
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401

        has_mlx = True
    except ImportError:
        has_mlx = False
    assert found["mlx"].available == has_mlx, found["mlx"].detail
    if not has_mlx:
        assert "pip install 'turbotune[mlx]'" in found["mlx"].detail


@pytest.mark.gpu
def test_auto_picks_cuda_on_a_gpu_machine():
    """The real CUDA probe: available with its devices, and chosen by auto."""
    import torch

    found = detect_backends()
    assert found["cuda"].available, found["cuda"].detail
    assert len(found["cuda"].devices) == torch.cuda.device_count()
    assert "compute capability" in found["cuda"].devices[0]
    name, why = choose_backend("auto", found)
    assert name == "cuda" and why.startswith("auto: CUDA"), why
