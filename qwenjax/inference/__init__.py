"""Inference: cache-backed prefill and decode, sampling, the tokenizer and the model's chat template."""
