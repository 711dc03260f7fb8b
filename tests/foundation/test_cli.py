"""Every CLI verb, run as a subprocess the way a user runs it."""

from __future__ import annotations

import subprocess
import sys


def turbotune(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "turbotune", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_version_and_help():
    out = turbotune("--version")
    assert out.returncode == 0 and "turbotune 0.1.0" in out.stdout
    out = turbotune("--help")
    for verb in ("train", "bench", "merge", "generate", "configs", "plugins", "arguments", "env"):
        assert verb in out.stdout


def test_configs_lists_catalog_with_plugins():
    out = turbotune("configs")
    assert out.returncode == 0, out.stderr
    assert "lora-bf16 (lora-bf16.yaml) - plugins: ['adapter']" in out.stdout


def test_plugins_lists_runnable_and_install():
    out = turbotune("plugins")
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("adapter"))
    assert "yes" in line and "(built in)" in line


def test_arguments_shows_values_and_docs():
    out = turbotune("arguments", "lora-bf16")
    assert out.returncode == 0, out.stderr
    assert (
        "train.precision=bf16" in out.stdout and "adapter.target_modules=all-linear" in out.stdout
    )
    assert "LoRA rank." in out.stdout


def test_arguments_unknown_name_is_clean_error():
    out = turbotune("arguments", "no-such-config")
    assert out.returncode == 2
    assert (
        "neither a file nor a sample configuration" in out.stderr and "Traceback" not in out.stderr
    )


def test_env_reports_backends_packages_plugins():
    out = turbotune("env")
    assert out.returncode == 0, out.stderr
    for text in (
        "Backends:",
        "cuda",
        "mps",
        "mlx",
        "cpu",
        "auto picks",
        "torch",
        "transformers",
        "Plugins that can run here",
    ):
        assert text in out.stdout


def test_train_bad_config_key_exits_2_with_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {max_stpes: 3}\n")
    out = turbotune("train", str(path))
    assert out.returncode == 2
    assert (
        "unknown key 'train.max_stpes'" in out.stderr and "Did you mean 'max_steps'" in out.stderr
    )
    assert "Traceback" not in out.stderr


def test_train_override_without_equals_is_error():
    out = turbotune("train", "lora-bf16", "oops")
    assert out.returncode == 2 and "key=value" in out.stderr
