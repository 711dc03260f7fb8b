"""The Llama-3.1-8B LoRA MLP case and command line shared by the MLP micro-benchmarks.

from mlp_case import llama_mlp, run_sections   # the scripts put this folder on sys.path

``glu_lora_forward.py``, ``glu_lora_backward.py`` and ``mlp_backward_h.py`` time the same MLP
(gate, up, down with rank-r adapters, NF4 and bf16 bases, bf16 activations) and take the same
shape flags; building both here keeps their numbers comparable: the same seed draws the same
weights in the same order in every script.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

import torch

from turbotune.ops.lora import LoRAWeights

__all__ = ["MLPCase", "llama_mlp", "run_sections"]


class MLPCase(NamedTuple):
    """One LoRA MLP on the GPU.

    Attributes:
        dense: bf16 base weights of gate ``[inter, hidden]``, up ``[inter, hidden]``, down
            ``[hidden, inter]``.
        nf4: the same weights quantized to NF4 (``bnb.nn.Params4bit``, double quantization).
        adapters: a ``LoRAWeights`` (fp32 ``A``, ``B``, scale 2) per projection, same order.
        x: bf16 input ``[tokens, hidden]`` that requires grad.
        dy: bf16 output gradient ``[tokens, hidden]``.
    """

    dense: list[torch.Tensor]
    nf4: list[torch.nn.Parameter]
    adapters: list[LoRAWeights]
    x: torch.Tensor
    dy: torch.Tensor


def llama_mlp(tokens: int, hidden: int, inter: int, rank: int = 16) -> MLPCase:
    """Draws the MLP from CPU seed 0 (weights, then ``A``, ``B`` per projection), ``x`` and
    ``dy`` from the default CUDA generator."""
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(0)
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    dense = [(torch.randn(o, i, generator=gen) / i**0.5).to("cuda", torch.bfloat16)
             for o, i in shapes]  # fmt: skip
    nf4 = [bnb.nn.Params4bit(w, quant_type="nf4", compress_statistics=True,
                             quant_storage=torch.bfloat16).to("cuda") for w in dense]  # fmt: skip
    adapters = []
    for o, i in shapes:
        a = (torch.randn(rank, i, generator=gen) / i**0.5).cuda().requires_grad_()
        b = (torch.randn(o, rank, generator=gen) * 0.01).cuda().requires_grad_()
        adapters.append(LoRAWeights(a, b, 2.0))
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    return MLPCase(dense, nf4, adapters, x, dy)


def run_sections(
    doc: str, sections: dict[str, Callable[[argparse.Namespace], None]], rank: bool = False
) -> None:
    """Parses ``--tokens --hidden --inter [--rank] --only``, prints the device line, then runs
    the chosen sections in the order of ``sections``.

    Args:
        doc: the script's module docstring (its first line is the description).
        sections: name -> section taking the parsed arguments; ``--only`` defaults to all.
        rank: whether the script takes ``--rank`` (default 16).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=14336)
    if rank:
        parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--only", default=",".join(sections))
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, section in sections.items():
        if name in only:
            section(args)
