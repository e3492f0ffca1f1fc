#!/usr/bin/env bash
# The GPU-kernel environment, on any machine, GPU or not:
#
#     bash scripts/gpu_env.sh [DIR]          # DIR defaults to .venv-gpu
#     DIR/bin/python -m pytest -q tests/test_gpu_deviceless.py
#
# Python >= 3.12 with jax and jaxlib at the version the lent GPU machines run (JAX_VERSION), absl-py (Mosaic GPU
# imports it), pytest, pytest-xdist and chex (the tests), the CUDA plugin wheels with no nvidia-* packages (--no-deps:
# enough for XLA to lower and compile a program for an H100/H200 target with no GPU present) and the project
# itself (editable). On a CPU machine Mosaic GPU kernels run in its interpreter, with race detection. The main
# environment (jax 0.10 on Python 3.11) needs none of this and is left alone.
#
# Python: $GPU_ENV_PYTHON if set, else pyenv's 3.12 (the GPU machines'), then 3.13, else python3.12/python3.13
# on the PATH, else the distribution's python3 (apt-get) if it is new enough.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-gpu}
JAX_VERSION=0.11.2
export PIP_DISABLE_PIP_VERSION_CHECK=1

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
    local candidate
    local pyenv=${PYENV_ROOT:-$HOME/.pyenv}/versions
    for candidate in "${GPU_ENV_PYTHON:-}" $(ls -d "$pyenv"/3.12*/bin/python "$pyenv"/3.13*/bin/python 2>/dev/null) \
                     python3.12 python3.13 python3; do
        if [ -n "$candidate" ] && command -v "$candidate" >/dev/null && new_enough "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if ! python=$(find_python); then
    if command -v apt-get >/dev/null; then
        echo "gpu_env: no Python >= 3.12 found; installing the distribution's python3" >&2
        apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
    fi
    python=$(find_python) || { echo "gpu_env: needs Python >= 3.12 (jax $JAX_VERSION); set GPU_ENV_PYTHON" >&2; exit 1; }
fi

if ! [ -x "$venv/bin/python" ] || ! new_enough "$venv/bin/python"; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet)
"${pip[@]}" "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" absl-py pytest pytest-xdist chex
"${pip[@]}" --no-deps "jax-cuda13-plugin==$JAX_VERSION" "jax-cuda13-pjrt==$JAX_VERSION"
"${pip[@]}" -e . "jax==$JAX_VERSION"  # the project's other dependencies, jax kept at its version
"$venv/bin/python" -c "import sys, jax; from jax.experimental.pallas import mosaic_gpu; \
print('gpu_env:', sys.executable, 'python', sys.version.split()[0], 'jax', jax.__version__)"
