"""`turbotune train --backend NAME` / `backend=NAME`: a combination the backend cannot run stops
before anything is loaded, with exit status 2 and a message that says what to do."""

from __future__ import annotations

import pytest

from turbotune.backends import detect, support
from turbotune.backends.detect import BackendInfo
from turbotune.cli import build_parser, main


def _needs_mlx():
    if not detect.detect_backends()["mlx"].available:
        pytest.skip("mlx + mlx-lm are not installed (pip install 'turbotune[mlx]')")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--backend", "mlx", "qlora-nf4-fused", "model.path=x"],
        ["train", "qlora-nf4-fused", "model.path=x", "backend=mlx"],
        ["train", "qlora-nf4-fused", "model.path=x", "backend=cpu", "--backend", "mlx"],
    ],
)
def test_mlx_with_fused_ops_is_refused_by_flag_or_override(argv, capsys):
    _needs_mlx()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "plugins ['fused_ops']" in err and "cannot run with backend=mlx" in err, err
    assert "Traceback" not in err


def test_mlx_requested_where_it_is_absent_says_why(monkeypatch, capsys):
    absent = BackendInfo("mlx", False, "the mlx package is not installed (pip install x)")
    monkeypatch.setitem(detect.PROBES, "mlx", lambda: absent)
    assert main(["train", "--backend", "mlx", "mlx-lora"]) == 2
    err = capsys.readouterr().err
    assert "backend 'mlx' was requested but is not usable here" in err, err
    assert "the mlx package is not installed" in err, err


def test_cpu_four_bit_without_bitsandbytes_stops_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(support, "_bnb_installed", lambda: False)
    code = main(["train", "--backend", "cpu", "stories260k-lora", "quantization.method=nf4"])
    err = capsys.readouterr().err
    assert code == 2 and "needs bitsandbytes" in err and "backend=mlx" in err, err


def test_backend_flag_takes_only_known_names():
    parser = build_parser()
    args = parser.parse_args(["train", "cfg.yaml", "a.b=1", "--backend", "mps"])
    assert args.backend == "mps" and args.words == ["cfg.yaml", "a.b=1"]
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--backend", "tpu"])
