"""The launcher: ``turbotune train --nproc N`` builds and runs the right ``torchrun`` command, and
``python -m turbotune`` (what torchrun runs in each process) is the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from turbotune.distributed.launch import torchrun_command


def test_single_node_command_is_standalone_torchrun():
    cmd = torchrun_command(["cfg.yaml", "train.max_steps=3"], 2, python="py")
    assert cmd == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "0", "-m", "turbotune", "train", "cfg.yaml", "train.max_steps=3",
    ]  # fmt: skip


def test_multi_node_command_joins_a_c10d_rendezvous():
    cmd = torchrun_command(["cfg.yaml"], 8, nnodes=4, rdzv_endpoint="head:29400", rdzv_id="77")
    assert "--standalone" not in cmd
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--nnodes"] == "4" and flags["--rdzv-backend"] == "c10d"
    assert flags["--rdzv-endpoint"] == "head:29400" and flags["--rdzv-id"] == "77"
    assert flags["--nproc-per-node"] == "8"
    assert cmd[-4:] == ["-m", "turbotune", "train", "cfg.yaml"]


def test_nproc_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        torchrun_command(["cfg.yaml"], 0)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--nproc", "2", "cfg.yaml", "a.b=1"],
        ["train", "cfg.yaml", "a.b=1", "--nproc", "2"],
    ],
)
def test_cli_nproc_execs_torchrun_with_the_same_words(monkeypatch, argv):
    import turbotune.distributed.launch as launch
    from turbotune import cli

    seen = []
    monkeypatch.setattr(launch, "launch", lambda cmd: seen.append(cmd) or 0)
    monkeypatch.setattr(cli, "resolve_config_path", lambda name: name)
    assert cli.main(argv) == 0
    (cmd,) = seen
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-5:] == ["-m", "turbotune", "train", "cfg.yaml", "a.b=1"]


def test_cli_exit_status_is_the_launchers(monkeypatch):
    import turbotune.distributed.launch as launch
    from turbotune import cli

    monkeypatch.setattr(launch, "launch", lambda cmd: 3)
    assert cli.main(["train", "--nproc", "2", "cfg.yaml"]) == 3


def test_python_dash_m_turbotune_is_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "turbotune", "train", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "--nproc" in done.stdout, done.stderr[-2000:]
