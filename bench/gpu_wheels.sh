#!/usr/bin/env bash
# Run on the CPU machine before bench/gpu.sh: DeepSpeed (built here into a pure-Python wheel, the versions this
# project pins) and the packages it needs that the GPU machine's image lacks, into .whl/ (ignored by git), for
# Python 3.12 on x86-64 Linux. The device call then carries .whl and bench/gpu.sh installs them first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PY" -m pip wheel --quiet --no-deps "deepspeed==$(version deepspeed)" -w .whl
for name in pydantic pydantic-core annotated-types typing-inspection hjson; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$(version "$name")"
done
ls -la .whl
