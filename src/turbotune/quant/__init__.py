"""Quantized weights: how frozen base weights are stored and turned back into dense matrices."""

from turbotune.quant.weights import BaseWeight, Dequantizable, Packed4bitWeight, dense_weight

__all__ = ["BaseWeight", "Dequantizable", "Packed4bitWeight", "dense_weight"]
