"""Gated delta rule (Qwen3.5 Gated DeltaNet): the oracle, the XLA path, the Pallas TPU and Mosaic GPU kernels."""

from pallas_kernels.gated_delta_rule.gpu import gated_delta_rule_chunked_gpu, gated_delta_rule_step_gpu
from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_recurrent
from pallas_kernels.gated_delta_rule.tpu import gated_delta_rule_chunked_tpu, gated_delta_rule_step_tpu
from pallas_kernels.gated_delta_rule.xla import gated_delta_rule_chunked, gated_delta_rule_step

__all__ = ["gated_delta_rule_recurrent", "gated_delta_rule_chunked", "gated_delta_rule_step",
           "gated_delta_rule_chunked_tpu", "gated_delta_rule_step_tpu", "gated_delta_rule_chunked_gpu",
           "gated_delta_rule_step_gpu"]
