"""What each backend refuses (with a message that says what to do) and what it notes."""

from __future__ import annotations

import pytest
import torch

from turbotune.backends import support
from turbotune.backends.support import check_backend_support, mlx_quantization
from turbotune.config import load_config
from turbotune.errors import ConfigError

MODEL = {"model": {"path": "some/model"}}


def cfg(**sections):
    return load_config({**MODEL, **sections})


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"plugins": {"fused_ops": {}}}, r"plugins \['fused_ops'\].*cannot run with backend=mlx"),
        ({"quantization": {"method": "gptq"}}, "GPTQ checkpoints have no MLX kernels"),
        ({"adapter": {"method": "dora"}}, "adapter.method=dora is not supported by the MLX"),
        ({"adapter": {"method": "full"}}, "adapter.method=full is not supported by the MLX"),
        ({"train": {"optimizer": "paged_adamw_8bit"}}, "AdamW only"),
        ({"train": {"resume_from_checkpoint": "latest"}}, "resume_from_checkpoint"),
        ({"quantization": {"method": "hqq", "group_size": 16}}, "groups of 32, 64 or 128"),
    ],
)
def test_mlx_refuses_what_it_cannot_run(sections, message):
    with pytest.raises(ConfigError, match=message):
        check_backend_support(cfg(**sections), "mlx")


def test_mlx_refuses_the_builtin_demo():
    with pytest.raises(ConfigError, match="demo runs on the PyTorch engine"):
        check_backend_support(load_config({}), "mlx")


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("none", None),
        ("nf4", ("affine", 4, 64)),
        ("fp4", ("mxfp4", 4, 32)),
        ("hqq", ("affine", 4, 64)),
    ],
)
def test_mlx_quantization_mapping_and_its_note(method, expected):
    c = cfg(quantization={"method": method})
    assert mlx_quantization(c) == expected
    notes = check_backend_support(c, "mlx")
    assert any("quantization.method" in n for n in notes) == (expected is not None), notes


def test_mlx_notes_settings_it_ignores():
    notes = check_backend_support(
        cfg(train={"gradient_checkpointing": True, "report_to": ["tensorboard"]}), "mlx"
    )
    assert any("gradient_checkpointing is ignored" in n for n in notes), notes
    assert any("tensorboard" in n for n in notes), notes


def test_four_bit_without_bitsandbytes_names_the_alternatives(monkeypatch):
    monkeypatch.setattr(support, "_bnb_installed", lambda: False)
    for backend in ("cpu", "mps", "cuda"):
        with pytest.raises(ConfigError, match=r"needs bitsandbytes.*turbotune\[bnb\].*backend=mlx"):
            check_backend_support(cfg(quantization={"method": "nf4"}), backend)


def test_mps_four_bit_needs_a_bitsandbytes_with_mps_support(monkeypatch):
    monkeypatch.setattr(support, "_bnb_installed", lambda: True)
    monkeypatch.setattr(support, "_bnb_devices", lambda: {"cuda", "cpu"})
    with pytest.raises(ConfigError, match="no nf4 4-bit support on mps"):
        check_backend_support(cfg(quantization={"method": "nf4"}), "mps")
    assert check_backend_support(cfg(quantization={"method": "nf4"}), "cpu")  # a note, no error
    monkeypatch.setattr(support, "_bnb_devices", lambda: {"cuda", "cpu", "mps"})
    notes = check_backend_support(cfg(quantization={"method": "nf4"}), "mps")
    assert any("bitsandbytes' PyTorch 4-bit ops" in n for n in notes), notes


def test_real_bitsandbytes_runs_four_bit_on_this_cpu():
    pytest.importorskip("bitsandbytes")
    assert "cpu" in support._bnb_devices()
    check_backend_support(cfg(quantization={"method": "nf4"}), "cpu")


@pytest.mark.parametrize("backend", ["cpu", "mps"])
def test_fused_ops_off_cuda_is_a_note_about_eager_ops(monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    notes = check_backend_support(cfg(plugins={"fused_ops": {}}), backend)
    assert any("eager reference ops run instead" in n for n in notes), notes
    assert check_backend_support(cfg(plugins={"fused_ops": {}}), "cuda") == []


def test_ops_take_the_eager_path_off_cuda(monkeypatch):
    """The one dispatch rule of every op: Triton only for CUDA tensors (or the interpreter)."""
    from turbotune.ops import _triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _triton.use_triton(torch.zeros(2))  # CPU
    assert not _triton.use_triton(torch.zeros(2, device="meta"))  # any non-CUDA device (MPS)
    monkeypatch.setattr(_triton, "HAS_TRITON", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _triton.use_triton(torch.zeros(2))  # no Triton at all: always eager
