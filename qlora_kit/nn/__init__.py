"""Modules: quantized layers, LoRA wrappers, fake-quant (QAT) layers."""
