#!/usr/bin/env bash
# Make a disposable virtual environment with PyTorch and transformers for the reference
# scripts in scripts/reference/. Not used by the build or the tests; the wheels are large, so
# it takes a few minutes.
# usage: scripts/reference/torch-venv.sh [DIR]   (default $TMPDIR/torch-ref)
set -euo pipefail
V=${1:-${TMPDIR:-/tmp}/torch-ref}
[ -x "$V/bin/python" ] || python3 -m venv "$V"
"$V/bin/pip" install -q torch numpy transformers safetensors accelerate
echo "ready: $V/bin/python scripts/reference/torch_svf_step.py   (or scripts/reference/make_hf_bitnet_fixture.py ...)"
