#!/usr/bin/env bash
# llama.cpp as the outside reader of the GGUF files bitsvf writes: a float Llama converted by
# `bitsvf convert --type f16`, and an SVF expert exported by `bitsvf export-adapter --format
# gguf-lora`, applied with llama.cpp's LoRA loader. llama.cpp's greedy tokens must be bitsvf's.
# usage: scripts/reference/llama_cpp_lora.sh [WORK_DIR]
#   WORK_DIR: where the llama.cpp sources, the build, the model and the GGUF files go
#   (default $TMPDIR/llama-lora)
#   PYTHON: a Python with torch, transformers, tokenizers, safetensors and numpy (default
#   python3; scripts/reference/torch-venv.sh makes one); BITSVF: the bitsvf binary (default
#   target/debug/bitsvf, built with cargo if missing)
# It downloads the llama.cpp sources vendored in llama-cpp-python 0.3.36 from PyPI, builds
# libllama and llama-completion (about 6 minutes on 2 cores) and, against libllama,
# llama_cpp_lora.cpp (beside this script: greedy decoding from token ids, writing the logits
# each token was chosen from). Then:
#  1. llama_cpp_lora.py makes a random transformers LlamaForCausalLM (f32, d 64, 2 layers,
#     GQA 4/2, untied) with a byte-level BPE tokenizer.json, and a 20-line SFT set;
#  2. `bitsvf convert --type f16` writes it as a `llama` GGUF (q/k rows permuted for ggml's
#     RoPE, the tokenizer embedded);
#  3. `bitsvf train --targets all` (and `mlp`) trains SVF experts on the HF directory, and one
#     on the f16 GGUF itself (an expert is bound to the exact weights it was trained on);
#  4. `bitsvf export-adapter --format gguf-lora` writes each as a llama.cpp LoRA;
#  5. llama.cpp decodes 16 tokens greedily with and without each adapter; `bitsvf logits`
#     over prompt + generated ids (teacher forcing) must have its argmax on the next id at
#     every generated position, and its logits are compared with llama.cpp's;
#  6. llama.cpp is also asked to load `bitsvf convert --type f16` of the embedded model
#     (architecture bitnet-b1.58) and tests/fixtures/float-llama/*.gguf (no tokenizer); their
#     errors are reported, not fatal. Copies of the fixture files with `tokenizer.ggml.model =
#     none` added are then run, and llama.cpp's logits compared with the fixture's
#     expected.json (transformers on the weights each file holds).
# Exits non-zero when a greedy sequence is not reproduced. Not used by the build or the tests.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd)
W=${1:-${TMPDIR:-/tmp}/llama-lora}; mkdir -p "$W"; W=$(cd "$W" && pwd); cd "$W"
PY=${PYTHON:-python3}
B=${BITSVF:-$REPO/target/debug/bitsvf}
[ -x "$B" ] || (cd "$REPO" && cargo build)

# --- llama.cpp ------------------------------------------------------------------------------
L=$("$HERE/llama-cpp-build.sh" "$W" llama llama-completion)
G=$W/build/bin/llama-lora-greedy
if [ ! -x "$G" ] || [ "$HERE/llama_cpp_lora.cpp" -nt "$G" ]; then
  g++ -O2 -std=c++17 "$HERE/llama_cpp_lora.cpp" -I"$L/include" -I"$L/ggml/include" \
    -L"$W/build/bin" -lllama -Wl,-rpath,"$W/build/bin" -o "$G"
fi

# --- 1-4: the model, its GGUF, the experts and their adapters --------------------------------
M=$W/fx/model; C=$W/fx/cache
rm -rf fx; "$PY" "$HERE/llama_cpp_lora.py" make fx
"$B" convert "$M" --type f16 --out fx/model-f16.gguf
"$B" inspect fx/model-f16.gguf | sed -n 1,7p
train() { # SOURCE TARGETS NAME
  "$B" train "$1" --data fx/data.jsonl --objective sft --steps 60 --lr 0.2 --batch-prompts 4 \
    --val-n 4 --eval-every 10 --targets "$2" --out "fx/expert-$3.json" --cache-dir "$C" | tail -1
  "$B" export-adapter "fx/expert-$3.json" --model "$1" --format gguf-lora --out "fx/lora-$3.gguf" \
    --cache-dir "$C"
}
train "$M" all all; train "$M" mlp mlp; train fx/model-f16.gguf all f16

# --- 5: greedy decoding, llama.cpp against bitsvf -------------------------------------------
PROMPT="count to five:"
IDS=0,$("$PY" "$HERE/llama_cpp_lora.py" ids "$M" "$PROMPT")   # bos, then the prompt
NP=$(echo "$IDS" | tr , '\n' | wc -l); N=16; FAIL=0
echo "prompt \"$PROMPT\": ids $IDS (tokenizers)"
compare() { # LABEL LORA BITSVF_MODEL [EXPERT]
  local out gen
  out=$("$G" fx/model-f16.gguf "$IDS" $N "$2" "fx/$1.llama.f32" "$PROMPT")
  gen=$(echo "$out" | sed -n 's/^generated: //p')
  echo "== $1: llama.cpp $([ "$2" = - ] && echo without || echo "with $2")"
  echo "$out" | sed 's/^/  /'
  "$B" logits "$3" --mode dense --tokens "$IDS,$gen" --out "fx/$1.bitsvf.safetensors" \
    ${4:+--expert "$4"} --cache-dir "$C" >/dev/null
  echo "  bitsvf logits $3${4:+ --expert $4}:"
  "$PY" "$HERE/llama_cpp_lora.py" check "fx/$1.bitsvf.safetensors" "$NP" "fx/$1.llama.f32" || FAIL=1
}
compare base-vs-hf - "$M"
compare base-vs-f16 - fx/model-f16.gguf
compare all-vs-hf fx/lora-all.gguf "$M" fx/expert-all.json
compare mlp-vs-hf fx/lora-mlp.gguf "$M" fx/expert-mlp.json
compare f16-vs-f16 fx/lora-f16.gguf fx/model-f16.gguf fx/expert-f16.json
# The same through llama.cpp's own command line (text in, text out; `--temp 0` is greedy; it
# stops at eos, since `--ignore-eos` would bias eos away rather than only not stop at it).
# A gpt-2 tokenizer gets no bos from llama.cpp, so the prompt names it; specials are parsed.
for lora in "" fx/lora-all.gguf; do
  echo "== llama-completion --temp 0 ${lora:+--lora $lora}"
  text=$(build/bin/llama-completion -m fx/model-f16.gguf ${lora:+--lora "$lora"} -p "<s>$PROMPT" \
    -n $N --temp 0 -no-cnv --no-warmup -t 2 --simple-io --verbose-prompt 2>fx/completion.log)
  echo "  text: $text"
  grep -E " I +[0-9]+ -> '" fx/completion.log | awk '{print $3}' | paste -sd, | sed 's/^/  prompt ids: /'
done

# --- 6: other GGUF files of bitsvf's --------------------------------------------------------
"$B" convert --type f16 --out fx/default-f16.gguf >/dev/null
for f in fx/default-f16.gguf "$REPO"/tests/fixtures/float-llama/*.gguf; do
  echo "== llama.cpp loading $f"
  "$G" "$f" 1,2,3 4 2>&1 | sed 's/^/  /' || true
done
echo "== llama.cpp on tests/fixtures/float-llama with tokenizer.ggml.model = none"
"$PY" "$HERE/llama_cpp_lora.py" fixture "$G" "$REPO/tests/fixtures/float-llama" fx/float-llama
[ $FAIL = 0 ] && echo "every greedy sequence reproduced" || { echo "a greedy sequence was NOT reproduced"; exit 1; }
