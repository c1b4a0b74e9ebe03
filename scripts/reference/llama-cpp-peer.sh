#!/usr/bin/env bash
# bitsvf's CPU peer, measured on the same machine: llama.cpp running a BitNet checkpoint
# converted to GGUF TQ2_0 and TQ1_0.
# usage: scripts/reference/llama-cpp-peer.sh HF_PACKED_MODEL_DIR [WORK_DIR]
#   HF_PACKED_MODEL_DIR: e.g. a directory written by scripts/make_2b4t_shape.py
#   WORK_DIR: where the llama.cpp sources, the build and the GGUF files go (default
#   $TMPDIR/llama-peer)
# It downloads the llama.cpp sources vendored in llama-cpp-python 0.3.36 from PyPI, builds
# llama-bench with llama-cpp-build.sh (about 6 minutes on 2 cores), converts the model with to_gguf_bitnet.py (beside
# this script; numpy plus the vendored gguf-py) and prints llama-bench's pp64 / tg32 tokens/s
# with 2 and 1 threads. Not used by the build or the tests.
# llama.cpp's `bitnet` graph has a SiLU-gated FFN and NEOX RoPE, so what it *computes* differs
# from a ReLU² BitNet while what each token *costs* is the same. Compare speeds only as ratios
# taken in one sitting.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
M=$(cd "$1" && pwd); W=${2:-${TMPDIR:-/tmp}/llama-peer}; mkdir -p "$W"; cd "$W"
L=$("$HERE/llama-cpp-build.sh" "$W" llama-bench)
for t in tq2_0 tq1_0; do
  [ -s model-$t.gguf ] || GGUF_PY=$L/gguf-py python3 "$HERE/to_gguf_bitnet.py" "$M" model-$t.gguf --wtype $t --etype f16
  for th in 2 1; do build/bin/llama-bench -m model-$t.gguf -t $th -p 64 -n 32 -r 3; done
done
