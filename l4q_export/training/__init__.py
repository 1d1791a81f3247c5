"""Quantization-aware PEFT training: the L4Q layer, model surgery, data and the training loop."""
