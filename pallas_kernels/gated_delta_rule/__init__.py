"""Gated delta rule (Qwen3.5 Gated DeltaNet): reference implementations."""

from pallas_kernels.gated_delta_rule.reference import (
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    gated_delta_rule_step,
)

__all__ = ["gated_delta_rule_chunked", "gated_delta_rule_recurrent", "gated_delta_rule_step"]
