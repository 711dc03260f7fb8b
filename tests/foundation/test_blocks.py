"""One rule for a model's decoder layers (``turbotune.blocks``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from turbotune.blocks import checkpointing_layers, decoder_layer_list, decoder_layers


def _tiny_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_transformers_layers_even_beside_a_longer_module_list():
    model = _tiny_llama()
    # An MoE whose experts are a ModuleList longer than the layer stack (transformers 4's
    # Qwen2-MoE: 60 experts, 24 layers) must not be taken for the layers.
    model.model.layers[0].mlp.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))
    layers = list(model.model.layers)
    assert checkpointing_layers(model) == layers
    assert decoder_layers(model) == layers
    name, found = decoder_layer_list(model)
    assert name == "model.layers" and found is model.model.layers


def test_fallbacks_without_transformers_layers():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=2)
            self.heads = nn.ModuleList(nn.Linear(2, 2) for _ in range(5))
            self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))

    plain = Plain()
    assert checkpointing_layers(plain) == []
    assert decoder_layers(plain) == list(plain.blocks)  # as long as num_hidden_layers
    plain.config = None
    assert decoder_layers(plain) == list(plain.heads)  # else the longest list
    assert decoder_layer_list(nn.Sequential(nn.Linear(2, 2))) is None
    assert decoder_layers(nn.Sequential(nn.Linear(2, 2))) == []
