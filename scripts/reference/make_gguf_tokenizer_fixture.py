#!/usr/bin/env python3
"""Write the GGUF tokenizer fixtures: two small tokenizers stored in GGUF metadata the way
llama.cpp's converter (convert_hf_to_gguf.py) stores them, and the ids their own libraries give
for a set of texts, which bitsvf's reading of the GGUF must reproduce.

    pip install gguf tokenizers sentencepiece numpy
    python3 scripts/reference/make_gguf_tokenizer_fixture.py tests/fixtures/gguf-tokenizer

- gpt2.gguf: a byte-level BPE (its tokenizer.json: gpt2.tokenizer.json) (`tokenizer.ggml.model = gpt2`, pre-tokenizer `llama-bpe`, the
  Llama-3 split that microsoft/bitnet-b1.58-2B-4T uses) trained here with the `tokenizers`
  package, with three special tokens and a chat template; tokens and types as the converter's
  get_vocab_base writes them, merges, special ids and the template through gguf.SpecialVocab.
- llama.gguf: a SentencePiece BPE with byte fallback (`tokenizer.ggml.model = llama`) trained
  here with the `sentencepiece` package; tokens, scores and types as the converter's
  _set_vocab_sentencepiece writes them.
- expected.json: for each, the texts and the ids of `tokenizers` (encode without specials)
  and of `sentencepiece` (encode, no bos) — the references.
"""
import json
import os
import sys
import tempfile

import gguf
import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

out = sys.argv[1]
os.makedirs(out, exist_ok=True)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2026, and we've sorted 12 numbers.",
    "Count the letters in 'banana': b, a, n, a, n, a. There are 6 letters; 3 of them are a.",
    "Sort these words: pear, apple, fig, cherry. Answer: apple cherry fig pear.",
    "Compare 3141 and 2718: 3141 is larger. Compare 17 and 71: 71 is larger!",
    "Ternary weights take the values -1, 0 and +1; a scale multiplies them.",
    "User: what is 12+34?\nAssistant: 46\nUser: and 99-1?\nAssistant: 98",
    "Ünïcödé text, naïve café, 東京 and emoji 🙂 appear now and then.",
    "    indented code: if x == 1 { return y; }\n\ttabs\tand   spaces  ",
] * 40

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "12+34=46\n",
    "Sort: pear apple fig",
    "  two leading spaces and trailing  ",
    "line one\nline two\n\nline four",
    "It's don't we'll they've I'M",
    "naïve café 東京 🙂 Ünïcödé",
    "numbers 1234567 and 3.14159",
    "tabs\tand\r\nwindows newlines",
]
SPECIAL_TEXTS = [
    "<|begin_of_text|>User: hi<|eot_id|>Assistant: ",
    "a<|end_of_text|>b",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] | trim + '<|eot_id|>' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] | trim + '<|eot_id|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] | trim + '<|eot_id|>' }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
expected = {}

# --- gpt2-style byte-level BPE ---------------------------------------------------------------
specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                              show_progress=False)
tok.train_from_iterator(CORPUS, trainer)
tok.model.ignore_merges = True  # as Llama 3's tokenizer.json, and llama.cpp for llama-bpe
tok.add_special_tokens(specials)
tok.save(os.path.join(out, "gpt2.tokenizer.json"))
with tempfile.TemporaryDirectory() as d:
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "add_bos_token": True, "chat_template": CHAT_TEMPLATE}, f)
    # get_vocab_base: every id's token, CONTROL for special added tokens, else NORMAL.
    vocab = tok.get_vocab(with_added_tokens=True)
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(len(vocab)):
        tokens.append(reverse[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(os.path.join(out, "gpt2.gguf"), "bitnet-b1.58")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(d, load_merges=True)
    special.add_to_gguf(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
expected["gpt2"] = [
    {"text": t, "ids": tok.encode(t, add_special_tokens=False).ids}
    for t in TEXTS + SPECIAL_TEXTS
]
expected["gpt2_chat_template"] = CHAT_TEMPLATE

# --- SentencePiece BPE (llama) ---------------------------------------------------------------
with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "corpus.txt"), "w") as f:
        f.write("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=os.path.join(d, "corpus.txt"), model_prefix=os.path.join(d, "sp"), model_type="bpe",
        vocab_size=360, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "sp.model"))
    n = sp.vocab_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.IsControl(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.IsUnused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.IsByte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(os.path.join(out, "llama.gguf"), "bitnet-b1.58")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected["llama"] = [{"text": t, "ids": sp.encode(t)} for t in TEXTS]

with open(os.path.join(out, "expected.json"), "w") as f:
    f.write("{\n" + ",\n".join(
        f" {json.dumps(k)}: " + (json.dumps(v, ensure_ascii=False) if isinstance(v, str) else
                                 "[\n  " + ",\n  ".join(json.dumps(x, ensure_ascii=False) for x in v) + "\n ]")
        for k, v in expected.items()) + "\n}\n")
print("wrote", sorted(os.listdir(out)))
