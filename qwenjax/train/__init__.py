"""Fine-tuning: the next-token loss over (packed) batches; train step, LoRA, data and checkpoints build on it."""
