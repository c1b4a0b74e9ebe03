#!/usr/bin/env bash
# Build llama.cpp targets (CPU only) from the sources vendored in PyPI's llama-cpp-python
# 0.3.36, for the reference scripts beside this one.
# usage: scripts/reference/llama-cpp-build.sh WORK_DIR TARGET...
#   The sources go to WORK_DIR/llama_cpp_python-0.3.36, the build to WORK_DIR/build (targets
#   already built are kept). Prints the path of the llama.cpp sources.
set -euo pipefail
W=$1; shift; mkdir -p "$W"; cd "$W"
# pip's metadata step for the sdist already needs CMake ≥ 3.21: install it first.
command -v cmake >/dev/null || pip install -q cmake >/dev/null
if [ ! -d llama_cpp_python-0.3.36 ]; then
  pip install -q scikit-build-core >/dev/null
  pip download -q --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36 -d . >&2
  tar xzf llama_cpp_python-0.3.36.tar.gz
fi
L=$PWD/llama_cpp_python-0.3.36/vendor/llama.cpp
command -v cmake >/dev/null || { apt-get update -q && apt-get install -y -q cmake; } >&2
missing=()
for t in "$@"; do [ -e "build/bin/$t" ] || [ -e "build/bin/lib$t.so" ] || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  cmake -S "$L" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF \
    -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build build -j"$(nproc)" --target "${missing[@]}" >/dev/null
fi
echo "$L"
