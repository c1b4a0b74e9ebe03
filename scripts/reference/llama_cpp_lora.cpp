// Helper of llama_cpp_lora.sh: greedy decoding by llama.cpp (libllama) from given token ids,
// with or without a GGUF LoRA adapter, printing the ids it generates and writing the logits it
// chose them from.
//
//   llama-lora-greedy MODEL.gguf IDS N [LORA.gguf|-] [LOGITS.f32] [TEXT]
//     IDS: the prompt's token ids, comma-separated (the caller adds bos if it wants one)
//     N: how many tokens to generate (eos does not stop it: every step is compared); 0: no
//        generation, LOGITS gets the logits of every position of IDS (one forward pass)
//     LORA: applied with scale 1, as `--lora` does; `-` for none
//     LOGITS: f32, N rows of n_vocab, row i the logits that chose generated token i
//     TEXT: if given, also print the ids llama.cpp's own tokenizer gives it (no specials)
//
// Each step takes the first largest logit, which is what llama.cpp's greedy sampler does, so
// the ids are those of `--temp 0`. Build: g++ -O2 -std=c++17 llama_cpp_lora.cpp
// -I LLAMA/include -I LLAMA/ggml/include -L BUILD/bin -lllama -Wl,-rpath,BUILD/bin.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf IDS N [LORA.gguf|-] [LOGITS.f32] [TEXT]\n", argv[0]);
        return 2;
    }
    const char * model_path = argv[1];
    std::vector<llama_token> ids;
    for (char * p = argv[2]; *p;) {
        ids.push_back((llama_token) strtol(p, &p, 10));
        if (*p == ',') p++;
    }
    const int n_gen = atoi(argv[3]);
    const char * lora_path = argc > 4 && strcmp(argv[4], "-") != 0 ? argv[4] : nullptr;
    const char * logits_path = argc > 5 ? argv[5] : nullptr;

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path, mp);
    if (!model) { fprintf(stderr, "llama.cpp could not load %s\n", model_path); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    if (argc > 6) {
        std::vector<llama_token> t(strlen(argv[6]) + 8);
        int n = llama_tokenize(vocab, argv[6], strlen(argv[6]), t.data(), t.size(), false, false);
        printf("tokenize:");
        for (int i = 0; i < n; i++) printf("%s%d", i ? "," : " ", t[i]);
        printf("\n");
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = ids.size() + n_gen + 8;
    cp.n_batch = cp.n_ctx;
    cp.n_threads = cp.n_threads_batch = 2;
    cp.no_perf = true;
    // An f32 KV cache and no flash attention (llama.cpp's defaults are an f16 cache and, on the
    // CPU, flash attention in f16), so that the logits compare with bitsvf's f32 attention.
    cp.type_k = cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "no context\n"); return 1; }
    if (lora_path) {
        llama_adapter_lora * lora = llama_adapter_lora_init(model, lora_path);
        if (!lora) { fprintf(stderr, "llama.cpp could not load the adapter %s\n", lora_path); return 1; }
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &lora, 1, &scale) != 0) { fprintf(stderr, "adapter not set\n"); return 1; }
    }

    FILE * out = logits_path ? fopen(logits_path, "wb") : nullptr;
    if (n_gen == 0) {
        llama_batch all = llama_batch_init(ids.size(), 0, 1);
        for (size_t i = 0; i < ids.size(); i++) {
            all.token[i] = ids[i]; all.pos[i] = i; all.n_seq_id[i] = 1; all.seq_id[i][0] = 0;
            all.logits[i] = 1;
        }
        all.n_tokens = ids.size();
        if (llama_decode(ctx, all) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }
        for (size_t i = 0; out && i < ids.size(); i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, out);
        printf("logits of %zu positions\n", ids.size());
        if (out) fclose(out);
        return 0;
    }
    std::vector<llama_token> gen;
    llama_batch batch = llama_batch_get_one(ids.data(), ids.size());
    llama_token next = 0;
    for (int step = 0; step < n_gen; step++) {
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }
        const float * logits = llama_get_logits_ith(ctx, -1);
        if (out) fwrite(logits, sizeof(float), n_vocab, out);
        next = 0;
        for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[next]) next = v;
        gen.push_back(next);
        batch = llama_batch_get_one(&next, 1);
    }
    if (out) fclose(out);

    printf("generated:");
    for (size_t i = 0; i < gen.size(); i++) printf("%s%d", i ? "," : " ", gen[i]);
    printf("\ntext: ");
    for (llama_token t : gen) {
        char buf[256];
        int n = llama_token_to_piece(vocab, t, buf, sizeof buf, 0, true);
        if (n > 0) fwrite(buf, 1, n, stdout);
    }
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
