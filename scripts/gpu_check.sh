#!/usr/bin/env bash
# On a lent GPU machine (H100 / H200: Python 3.12, jax 0.11.2, torch, triton, transformers in its image), within
# 7 minutes: the Mosaic GPU kernels checked at real shapes and timed (scripts/gpu_check.py), the 0.8B decode at
# batch 1 and 32 against the HBM roofline (scripts/bench_decode.py; batch 1 also with XLA's Triton GEMM fusions
# off, the suspect for bf16 at batch 1 being slower than fp32), the kernels launched per decode step. Results in
# $OUT (default ./gpu_check_out): gpu_check.json / .md, decode_*.txt, and this run's log.
#
# flash-linear-attention is not in the machine's image: carry its wheel (pure Python) in .whl/:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps -d .whl flash-linear-attention==0.6.0
# then, from the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=480).
# Here on the CPU, `.venv-gpu/bin/python scripts/gpu_check.py --smoke` runs the same code at tiny shapes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
status=0
timeout 240 python3 scripts/gpu_check.py --out "$OUT" || status=1
for batch in 1 32; do
    timeout 55 python3 scripts/bench_decode.py --dtypes float32,bfloat16 --batch $batch --new-tokens 64 --repeats 3 \
        | tee "$OUT/decode_batch$batch.txt" || status=1
done
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" timeout 40 python3 scripts/bench_decode.py \
    --dtypes bfloat16 --batch 1 --new-tokens 64 --repeats 3 | tee "$OUT/decode_batch1_no_triton_gemm.txt" || status=1
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 timeout 30 python3 scripts/gpu_decode_kernels.py | tee "$OUT/decode_kernels.txt" \
    || status=1
echo "gpu_check: exit $status; results in $OUT"
exit $status
