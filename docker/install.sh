#!/bin/sh
# Installs paddock and its pinned dependencies into one Python: torch first, then paddock with what is asked for.
# `make` builds .venv with it; docker/Dockerfile builds the images with it, so a laptop, CI and a cluster install
# the same pins the same way.
#
#   sh docker/install.sh PYTHON PIP-ARGS...      e.g. sh docker/install.sh .venv/bin/python -e '.[dev]'
#
# TORCH (default torch==2.13.0) is installed first and on its own: asked for by a looser pin, pip takes a
# multi-GB CUDA build. TORCH_INDEX names a wheel index for it (https://download.pytorch.org/whl/cu128 for the
# CUDA image); unset, pip's own (where this machine's CPU wheel lies).
set -eu
python=$1
shift
"$python" -m pip install -q --upgrade pip
# --no-compile: paddock's dependencies byte-compile in 147 s on 2 cores against 51 s without; Python writes the
# bytecode of what it imports as it imports it.
if [ -n "${TORCH_INDEX:-}" ]; then
  "$python" -m pip install -q --no-compile --index-url "$TORCH_INDEX" "${TORCH:-torch==2.13.0}"
else
  "$python" -m pip install -q --no-compile "${TORCH:-torch==2.13.0}"
fi
"$python" -m pip install -q --no-compile "$@"
