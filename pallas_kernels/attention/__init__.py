"""Grouped-query softmax attention: the oracle and the XLA path."""

from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.attention.xla import attention_blockwise, attention_xla

__all__ = ["attention_blockwise", "attention_reference", "attention_xla"]
