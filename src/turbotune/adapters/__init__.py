"""Adapters: LoRA (peft's layers or turbotune's own), DoRA, Llama-Pro block expansion."""
