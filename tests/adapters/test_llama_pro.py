"""Llama-Pro: ``turbotune expand`` on the real stories260K checkpoint, and training only the new
blocks (dense and with 4-bit old blocks, through ``run_training``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from turbotune.errors import ConfigError
from turbotune.expand import expand_checkpoint, new_layers_of, plan_expansion


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # eager NF4 dequantization: faster here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_plan_spreads_new_blocks_evenly():
    # LLaMA Pro 8B: 32 blocks in 8 groups of 4, a copy after each group.
    plan = plan_expansion(32, new_blocks=8)
    assert plan.num_layers == 40 and plan.new == tuple(range(4, 40, 5))
    assert all(
        plan.sources[j] == plan.sources[j - 1] for j in plan.new
    )  # copies of the block before
    assert plan_expansion(32, expansion_rate=0.25) == plan
    uneven = plan_expansion(5, new_blocks=2)
    assert uneven.sources == (0, 1, 2, 2, 3, 4, 4) and uneven.new == (3, 6)
    assert plan_expansion(4, new_blocks=4).sources == (0, 0, 1, 1, 2, 2, 3, 3)
    for bad in ({"new_blocks": 0}, {"new_blocks": 6}, {"expansion_rate": -1.0}, {}):
        with pytest.raises(ConfigError):
            plan_expansion(5, **bad)


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)


@pytest.fixture(scope="module")
def sharded_source(stories260k, tmp_path_factory):
    """stories260K re-saved in several shards (with an index), as big checkpoints come."""
    out = tmp_path_factory.mktemp("sharded")
    _load(stories260k).save_pretrained(str(out), max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((stories260k / name).read_bytes())
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_expanded_model_computes_what_the_original_did(
    stories260k, sharded_source, layout, tmp_path
):
    src = stories260k if layout == "single" else sharded_source
    plan = expand_checkpoint(src, tmp_path / "pro", new_blocks=2, progress=False)
    config = json.loads((tmp_path / "pro" / "config.json").read_text())
    assert config["num_hidden_layers"] == 7 and new_layers_of(config) == [3, 6] == list(plan.new)
    assert (tmp_path / "pro" / "tokenizer.json").is_file()
    original, expanded = _load(src), _load(tmp_path / "pro")
    assert len(expanded.model.layers) == 7
    for j, i in enumerate(plan.sources):  # copies of the block before, outputs zeroed
        for name, p in expanded.model.layers[j].named_parameters():
            ref = original.model.layers[i].get_parameter(name)
            zeroed = j in plan.new and name.startswith(("self_attn.o_proj", "mlp.down_proj"))
            assert torch.equal(p, torch.zeros_like(ref) if zeroed else ref), f"layer {j} {name}"
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(input_ids=ids).logits, expanded(input_ids=ids).logits
    d = (a - b).abs()
    # Exact: a zero block adds exact zeros to the residual stream.
    assert torch.equal(a, b), f"logits: max abs diff {d.max():.3e}, mean {d.mean():.3e}"


def test_config_lists_follow_the_blocks():
    from turbotune.expand import _expanded_config

    config = {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"], "architectures": ["X"]}
    out = _expanded_config(config, plan_expansion(3, new_blocks=1), "src")
    assert out["layer_types"] == ["a", "b", "c", "c"] and out["architectures"] == ["X"]
    with pytest.raises(ConfigError, match="already expanded"):
        _expanded_config(out, plan_expansion(4, new_blocks=1), "again")


def _train_steps(model, n: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        ids = torch.randint(0, 512, (2, 24), generator=g).to(model.device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _changed(before: dict[str, torch.Tensor], model) -> set[str]:
    after = model.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


@pytest.mark.parametrize("quant", ["none", "nf4", "hqq"])
def test_only_new_blocks_train(stories260k, tmp_path, quant):
    from turbotune.framework import AccelerationFramework

    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    expand_checkpoint(stories260k, tmp_path / "pro", new_blocks=2, progress=False)
    train_type = {"none": None, "nf4": "bnb_llama_pro", "hqq": "hqq_llama_pro"}[quant]
    cfg = {"adapter": {"method": "llama_pro"}, "train_type": train_type}
    fw = AccelerationFramework(cfg, banner=False)
    model, peft_config = fw.load_model(str(tmp_path / "pro"), dtype=torch.float32)
    assert peft_config is None
    model, _ = fw.augment(model, None, None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("model.layers.3.", "model.layers.6.")) for n in trainable
    )
    if quant != "none":  # old blocks quantized, new ones dense
        quantized = {"nf4": "Linear4bit", "hqq": "HQQLinear"}[quant]
        kinds = [type(model.model.layers[j].mlp.down_proj).__name__ for j in range(7)]
        expected = ["Linear" if j in (3, 6) else quantized for j in range(7)]
        assert kinds == expected, kinds
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model)
    changed = _changed(before, model)
    new = {k for k in before if k.startswith(("model.layers.3.", "model.layers.6."))}
    # Nothing outside the new blocks moves; inside, the zeroed output projections train first
    # (the other projections see no gradient while o_proj/down_proj are still zero).
    assert changed and changed <= new, (
        f"changed outside the new blocks: {sorted(changed - new)[:4]}"
    )
    assert {k for k in changed if "o_proj" in k or "down_proj" in k}, (
        "output projections did not train"
    )


def test_bnb_llama_pro_through_run_training(stories260k, shared_data, tmp_path):
    """``train_type: bnb_llama_pro`` end to end: 4-bit old blocks, the saved model is the
    expanded checkpoint with only the new blocks changed, and it loads with from_pretrained."""
    pytest.importorskip("bitsandbytes")
    from turbotune.train.run import run_training

    data = shared_data / "alpaca" / "alpaca_tiny.json"
    if not data.is_file():
        pytest.skip(f"{data} is missing")
    pro = tmp_path / "pro"
    expand_checkpoint(stories260k, pro, new_blocks=1, progress=False)
    cfg = {
        "train_type": "bnb_llama_pro",
        "model": {"path": str(pro)},
        "data": {"path": str(data), "max_length": 64, "max_samples": 16},
        "train": {"precision": "bf16_autocast", "max_steps": 3, "per_device_train_batch_size": 4,
                  "learning_rate": 1e-2, "logging_steps": 1, "output_dir": str(tmp_path / "run"),
                  "report_to": []},
    }  # fmt: skip
    result = run_training(cfg)
    saved = load_file(str(result.output_dir / "model.safetensors"))
    source = load_file(str(pro / "model.safetensors"))
    assert saved.keys() == source.keys()
    changed = {k for k in source if not torch.equal(saved[k], source[k])}
    new = new_layers_of(json.loads((pro / "config.json").read_text()))
    assert changed and all(k.startswith(tuple(f"model.layers.{i}." for i in new)) for k in changed)
    assert _load(result.output_dir).config.num_hidden_layers == 6
    # Resuming: the saved new blocks go back into a fresh 4-bit model (old blocks untouched).
    from turbotune.adapters.llama_pro import llama_pro_params, load_llama_pro
    from turbotune.framework import AccelerationFramework

    fw = AccelerationFramework({"train_type": "bnb_llama_pro"}, banner=False)
    fresh, _ = fw.load_model(str(pro), dtype=torch.bfloat16)
    fresh, _ = fw.augment(fresh, None, None)
    load_llama_pro(fresh, result.output_dir)
    for key, param in llama_pro_params(fresh).items():
        assert torch.equal(param, saved[key].to(param.dtype)), f"resumed {key} differs"


def test_expand_cli(stories260k, tmp_path, capsys):
    from turbotune.cli import main

    out = tmp_path / "pro"
    assert main(["expand", str(stories260k), "--expansion-rate", "0.4", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "5 -> 7 blocks" in said and "[3, 6]" in said, said
    assert new_layers_of(json.loads((out / "config.json").read_text())) == [3, 6]
    # User errors are one line, not a traceback: expanding twice, an occupied --out.
    assert main(["expand", str(out), "--new-blocks", "1", "--out", str(tmp_path / "again")]) == 2
    assert "already expanded" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()  # refused before anything was written
    assert main(["expand", str(stories260k), "--new-blocks", "1", "--out", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_llama_pro_with_fused_ops_matches_unpatched(stories260k, tmp_path):
    """The fused kernels run the frozen old blocks (plain frozen projections fuse) and leave
    the trainable new blocks on the eager path: loss and new-block gradients match."""
    from turbotune.framework import AccelerationFramework

    expand_checkpoint(stories260k, tmp_path / "pro", new_blocks=2, progress=False)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for plugins in ({}, {"fused_ops": {}}):
        cfg = {"adapter": {"method": "llama_pro"}, "plugins": plugins}
        fw = AccelerationFramework(cfg, banner=False)
        model, _ = fw.load_model(str(tmp_path / "pro"), dtype=torch.float32)
        model, _ = fw.augment(model, None, None)
        torch.manual_seed(7)
        with torch.no_grad():  # non-zero output projections: the new blocks must matter
            for i in (3, 6):
                model.model.layers[i].mlp.down_proj.weight.normal_(0, 0.02)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    (loss0, g0), (loss1, g1) = results
    assert abs(loss0 - loss1) < 1e-4, f"loss {loss0:.6f} vs {loss1:.6f}"
    for name, g in g0.items():
        d = (g1[name] - g).abs().max()
        assert d <= 1e-3 * g.abs().max() + 1e-6, f"grad {name}: max abs diff {d:.3e}"


@pytest.mark.gpu
def test_bnb_llama_pro_keeps_new_blocks_dense_on_gpu(stories260k, tmp_path):
    """The GPU machine's transformers applies bitsandbytes' skip list with its own matcher:
    the new blocks must still load dense (else apply_llama_pro refuses them)."""
    pytest.importorskip("bitsandbytes")
    from turbotune.framework import AccelerationFramework

    expand_checkpoint(stories260k, tmp_path / "pro", new_blocks=2, progress=False)
    fw = AccelerationFramework({"train_type": "bnb_llama_pro"}, banner=False)
    model, _ = fw.load_model(str(tmp_path / "pro"), dtype=torch.bfloat16)
    model, _ = fw.augment(model, None, None)
    kinds = [type(model.model.layers[j].mlp.down_proj).__name__ for j in range(7)]
    assert kinds == ["Linear" if j in (3, 6) else "Linear4bit" for j in range(7)], kinds
    assert model.device.type == "cuda"
    _train_steps(model, 1)
