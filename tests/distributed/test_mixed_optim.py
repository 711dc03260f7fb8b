"""Optimizer groups and gradient clipping over DTensors mixed with plain tensors (expert shards
under expert parallelism), in a gloo world of one process with foreach forced on (the CUDA
default; on CPU torch would step per tensor and hide the mix). The 2-process proof with real
expert shards, FSDP2 and FsdpTrainer is tests/moe/test_ep_fsdp.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from turbotune.distributed.optim import (
    clip_grad_norm_mixed,
    is_mixed,
    param_groups_by_kind,
    regroup_optimizer,
)


def _mixed_params() -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Two DTensor parameters and two plain ones, with gradients; and plain copies of all four."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(shape, generator=gen) for shape in [(6, 5), (3,), (4, 7), (2, 3)]]
    grads = [torch.randn(v.shape, generator=gen) for v in values]
    mixed, plain = [], []
    for i, (value, grad) in enumerate(zip(values, grads, strict=True)):
        dtensor = i % 2 == 0
        p = nn.Parameter(distribute_tensor(value, mesh, [Shard(0)]) if dtensor else value.clone())
        p.grad = distribute_tensor(grad, mesh, [Shard(0)]) if dtensor else grad.clone()
        q = nn.Parameter(value.clone())
        q.grad = grad.clone()
        mixed.append(p)
        plain.append(q)
    return mixed, plain


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _close_all(name: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        diff = (_full(g).detach() - w.detach()).abs()
        assert diff.max() <= 1e-6, (
            f"{name}[{i}]: max abs diff {diff.max():.3e} mean {diff.mean():.3e}"
        )


def _groups(params: list[nn.Parameter]) -> list[dict]:
    """Two groups of different settings, each mixing both kinds."""
    return [
        {"params": params[:2], "lr": 0.1, "weight_decay": 0.5},
        {"params": params[2:], "lr": 0.01, "weight_decay": 0.0},
    ]


def test_foreach_adamw_over_a_mix_fails_without_the_split(world_of_one):
    """The bug: one foreach call receives DTensors and plain tensors."""
    mixed, _ = _mixed_params()
    assert is_mixed(mixed) and not is_mixed(mixed[::2]) and not is_mixed(mixed[1::2])
    with pytest.raises(RuntimeError, match=r"mixed torch\.Tensor and DTensor"):
        torch.optim.AdamW(_groups(mixed), foreach=True).step()


@pytest.mark.parametrize("after", [False, True], ids=["param_groups_by_kind", "regroup_optimizer"])
def test_split_groups_step_like_plain_tensors(world_of_one, after):
    """Each group splits into one per kind with its settings kept; two foreach steps equal the
    same steps over plain tensors."""
    mixed, plain = _mixed_params()
    if after:
        opt = torch.optim.AdamW(_groups(mixed), foreach=True)
        assert regroup_optimizer(opt) and not regroup_optimizer(opt)
    else:
        opt = torch.optim.AdamW(param_groups_by_kind(_groups(mixed)), foreach=True)
    ref = torch.optim.AdamW(_groups(plain), foreach=True)
    got = [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in opt.param_groups]
    ids = [id(p) for p in mixed]
    want = [
        (0.1, 0.5, [ids[0]]),
        (0.1, 0.5, [ids[1]]),
        (0.01, 0.0, [ids[2]]),
        (0.01, 0.0, [ids[3]]),
    ]
    assert got == want, got
    for _ in range(2):
        opt.step()
        ref.step()
    _close_all("parameter", list(mixed), list(plain))
    if after:  # state is keyed by parameter, a scheduler's initial_lr by group: too late now
        with pytest.raises(RuntimeError, match="already holds state"):
            regroup_optimizer(opt)


def test_param_groups_by_kind_takes_bare_parameters(world_of_one):
    mixed, _ = _mixed_params()
    groups = param_groups_by_kind(mixed)
    assert [[id(p) for p in g["params"]] for g in groups] == [
        [id(mixed[0]), id(mixed[2])],
        [id(mixed[1]), id(mixed[3])],
    ]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_mixed_equals_torch_on_plain_tensors(world_of_one, norm_type):
    """torch's clip_grad_norm_ refuses the mix; the mixed one equals it on plain copies (one
    process: a plain slice's group reduction is the identity, so slices and replicas agree)."""
    mixed, _ = _mixed_params()
    with pytest.raises(RuntimeError, match=r"mixed torch\.Tensor and DTensor"):
        torch.nn.utils.clip_grad_norm_(mixed, 0.5, norm_type, foreach=True)
    _, plain = _mixed_params()
    want = torch.nn.utils.clip_grad_norm_(plain, 0.5, norm_type, foreach=True)
    assert want > 0.5, f"norm {want:.3e}: clipping would prove nothing"
    for as_slice in (False, True):  # params[1]: a replica, or a slice over the world
        params, _ = _mixed_params()
        sharded = {params[1]: None} if as_slice else {}
        got = clip_grad_norm_mixed(params, 0.5, norm_type, sharded=sharded)
        assert not hasattr(got, "device_mesh")
        assert abs(got.item() - want.item()) <= 1e-5, (got.item(), want.item())
        _close_all("clipped grad", [p.grad for p in params], [p.grad for p in plain])
