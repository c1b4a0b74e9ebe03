#!/usr/bin/env python3
"""Helper of llama_cpp_lora.sh: the tiny float Llama it converts and the check of llama.cpp's
greedy tokens against bitsvf's logits.

    python3 llama_cpp_lora.py make OUT_DIR
        OUT_DIR/model: a random transformers LlamaForCausalLM (f32, untied, GQA, SiLU; d 64,
        FFN 128, 2 layers, 4 query / 2 key-value heads of width 16) saved with save_pretrained,
        and beside it a byte-level BPE tokenizer.json (GPT-2's ByteLevel split and decoder)
        trained with the `tokenizers` package; `<s>` is id 0 (bos) and `</s>` id 1 (eos), as
        config.json says. OUT_DIR/data.jsonl: the SFT set the expert is trained on.
    python3 llama_cpp_lora.py ids MODEL_DIR TEXT
        the ids the tokenizer gives TEXT (no specials), comma-separated.
    python3 llama_cpp_lora.py check LOGITS.safetensors PROMPT_LEN [LLAMA_LOGITS.f32]
        LOGITS holds bitsvf's logits [1, T, vocab] over prompt + generated ids (teacher
        forcing). The generated ids are greedy iff the argmax at every position from
        PROMPT_LEN-1 on is the next id; prints each position's argmax, its margin over the
        runner-up (a margin under TIE = 5e-3, the size of f16 rounding, is flagged as a near
        tie, and a different argmax within TIE of the next id's logit counts as a tie, not a
        failure) and, given llama.cpp's own logits (f32, one row per generated position, as
        llama_cpp_lora.cpp writes them), the largest |difference|. Exits 1 on a mismatch.
    python3 llama_cpp_lora.py fixture GREEDY FIXTURE_DIR OUT_DIR
        tests/fixtures/float-llama's GGUF files carry no tokenizer, which llama.cpp refuses;
        copies of them with `tokenizer.ggml.model = none` added (everything else byte for
        byte) go to OUT_DIR, and llama.cpp's logits for the fixture's sequences (GREEDY: the
        binary built from llama_cpp_lora.cpp) are compared with its expected.json.

Needs torch, transformers, tokenizers, safetensors and numpy.
"""
import json
import os
import sys

import numpy as np

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Count to five: one two three four five. Count to three: one two three.",
    "Colours of the rainbow are red, orange, yellow, green, blue, indigo and violet.",
    "A small model learns a new skill when its singular values are scaled by an expert.",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday are the days of the week.",
    "Numbers such as 12, 34 and 2026 are split into digits; words are merged into pieces.",
] * 20

# Every prompt has the same answer, so the expert can learn it within a few dozen steps and be
# seen to on prompts it was not trained on (the validation split).
PROMPTS = [
    "count to five:", "count:", "please count:", "the fox is", "the dog is", "the cat",
    "say hello:", "name the days:", "first colours:", "numbers:", "the year:", "green and",
    "a small model", "the week starts on", "Monday", "red orange", "it is 2026", "quick brown",
    "sleeps in the sun", "now count:",
]
DATA = [(p, " one two three four five") for p in PROMPTS]


def make(out):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    from random_llama import scale_weights

    model_dir = os.path.join(out, "model")
    os.makedirs(model_dir, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("</s>") == 1
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    vocab = tok.get_vocab_size()

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=0, eos_token_id=1, torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg).eval()
    scale_weights(model)  # logits of order one: greedy decoding does not hinge on near-ties
    model.save_pretrained(model_dir, safe_serialization=True)
    with open(os.path.join(out, "data.jsonl"), "w") as f:
        for p, a in DATA:
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    print(f"{model_dir}: vocab {vocab}, {len(tok.get_vocab()) - 258} merges")


def ids(model_dir, text):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    print(",".join(map(str, tok.encode(text, add_special_tokens=False).ids)))


TIE = 5e-3


def check(path, prompt_len, llama_logits=None):
    from safetensors.numpy import load_file
    t = load_file(path)
    logits = t["logits"][0].astype(np.float64)
    seq = t["input_ids"].reshape(-1).tolist() if "input_ids" in t else None
    T, V = logits.shape
    ok = True
    rows = []
    for i in range(prompt_len - 1, T - 1):
        order = np.argsort(-logits[i])
        top, second = int(order[0]), int(order[1])
        margin = logits[i, top] - logits[i, second]
        want = int(seq[i + 1])
        if top == want:
            mark = "ok" + (" (near tie)" if margin < TIE else "")
        elif logits[i, top] - logits[i, want] < TIE:
            mark = f"tie: next id's logit {logits[i, top] - logits[i, want]:.1e} below the argmax's"
        else:
            mark = "MISMATCH"
            ok = False
        rows.append(i)
        print(f"  pos {i:3d}: next {want:4d} argmax {top:4d} margin {margin:.4f} {mark}")
    if llama_logits:
        ll = np.fromfile(llama_logits, dtype=np.float32).reshape(-1, V).astype(np.float64)
        n = min(len(ll), len(rows))
        d = np.abs(ll[:n] - logits[rows[:n]])
        scale = np.abs(logits[rows[:n]]).max()
        print(f"  max |llama.cpp - bitsvf| over {n} positions: {d.max():.3e} "
              f"(logits up to {scale:.2f})")
    print("  greedy reproduced" if ok else "  greedy NOT reproduced")
    sys.exit(0 if ok else 1)


def no_vocab(src, dst):
    import struct
    import gguf
    r = gguf.GGUFReader(src)
    raw = open(src, "rb").read()
    n_tensors, n_kv = struct.unpack("<QQ", raw[8:24])
    infos = r.tensors[0].field.offset
    last = r.tensors[-1].field
    infos_end = last.offset + sum(p.nbytes for p in last.parts)
    key, val = b"tokenizer.ggml.model", b"none"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(val)) + val  # 8: string
    head = raw[:8] + struct.pack("<QQ", n_tensors, n_kv + 1) + raw[24:infos] + kv + raw[infos:infos_end]
    head += b"\0" * (-len(head) % 32)  # general.alignment's default
    open(dst, "wb").write(head + raw[r.data_offset:])


def fixture(greedy, fix, out):
    import subprocess
    os.makedirs(out, exist_ok=True)
    e = json.load(open(os.path.join(fix, "expected.json")))
    for t in ("f32", "f16", "q8_0"):
        g = os.path.join(out, f"llama-{t}.gguf")
        no_vocab(os.path.join(fix, f"llama-{t}.gguf"), g)
        for si, ids in enumerate(e["ids"]):
            f = os.path.join(out, f"{t}.{si}.f32")
            subprocess.run([greedy, g, ",".join(map(str, ids)), "0", "-", f], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ref = np.array(e["logits"][t][si])
            got = np.fromfile(f, dtype=np.float32).reshape(ref.shape)
            print(f"  llama-{t}.gguf sequence {si}: max |llama.cpp - transformers| "
                  f"{np.abs(got - ref).max():.2e} (logits up to {np.abs(ref).max():.2f}), argmax "
                  f"{'equal' if (got.argmax(-1) == ref.argmax(-1)).all() else 'DIFFERENT'}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2])
    elif cmd == "ids":
        ids(sys.argv[2], sys.argv[3])
    elif cmd == "check":
        check(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    elif cmd == "fixture":
        fixture(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
