// The llama.cpp peer of `cargo xtask gpu`, built on the GPU machine (which has CMake and nvcc but no
// Rust) against the llama.cpp source that peers/llama-cpp vendors, with its CUDA backend: every layer
// on the card. For each stream count: the streams' prompts (the same PROMPT token ids) decoded in one
// batch, then GEN steps each advancing every stream by one greedy token in one llama_decode, as the
// server batches its slots. One JSON line a stream count: the decode's tokens/s over all streams.
//
//   bench MODEL.gguf PROMPT GEN STREAMS...

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "llama.h"

static double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: %s MODEL.gguf PROMPT GEN STREAMS...\n", argv[0]);
        return 2;
    }
    const int prompt = std::atoi(argv[2]);
    const int gen = std::atoi(argv[3]);
    std::vector<int> counts;
    int most = 1;
    for (int i = 4; i < argc; i++) {
        counts.push_back(std::atoi(argv[i]));
        most = counts.back() > most ? counts.back() : most;
    }
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = -1;
    llama_model * model = llama_model_load_from_file(argv[1], model_params);
    if (!model) {
        std::fprintf(stderr, "could not load %s\n", argv[1]);
        return 1;
    }
    const int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_context_params context_params = llama_context_default_params();
    context_params.n_ctx = (uint32_t)(most * (prompt + gen + 1));
    context_params.n_batch = (uint32_t)(most * prompt > most ? most * prompt : most);
    context_params.n_ubatch = context_params.n_batch;
    context_params.n_seq_max = (uint32_t)most;
    llama_context * context = llama_init_from_model(model, context_params);
    if (!context) {
        std::fprintf(stderr, "could not make a context\n");
        return 1;
    }
    llama_batch batch = llama_batch_init((int32_t)context_params.n_batch, 0, most);
    for (int streams : counts) {
        llama_memory_clear(llama_get_memory(context), true);
        // The prompts, all in one batch; each sequence's last token gives its logits.
        batch.n_tokens = 0;
        for (int s = 0; s < streams; s++) {
            for (int p = 0; p < prompt; p++) {
                int i = batch.n_tokens++;
                batch.token[i] = 1 + (p * 7 + 3) % 200;
                batch.pos[i] = p;
                batch.n_seq_id[i] = 1;
                batch.seq_id[i][0] = s;
                batch.logits[i] = p == prompt - 1;
            }
        }
        auto start = std::chrono::steady_clock::now();
        if (llama_decode(context, batch) != 0) {
            std::fprintf(stderr, "the prompts' batch failed\n");
            return 1;
        }
        llama_synchronize(context);
        const double prompts = seconds_since(start);
        std::vector<llama_token> next(streams);
        for (int s = 0; s < streams; s++) {
            const float * logits = llama_get_logits_ith(context, (s + 1) * prompt - 1);
            int best = 0;
            for (int v = 1; v < vocab; v++) best = logits[v] > logits[best] ? v : best;
            next[s] = best;
        }
        start = std::chrono::steady_clock::now();
        for (int step = 0; step < gen; step++) {
            batch.n_tokens = streams;
            for (int s = 0; s < streams; s++) {
                batch.token[s] = next[s];
                batch.pos[s] = prompt + step;
                batch.n_seq_id[s] = 1;
                batch.seq_id[s][0] = s;
                batch.logits[s] = 1;
            }
            if (llama_decode(context, batch) != 0) {
                std::fprintf(stderr, "a step failed\n");
                return 1;
            }
            for (int s = 0; s < streams; s++) {
                const float * logits = llama_get_logits_ith(context, s);
                int best = 0;
                for (int v = 1; v < vocab; v++) best = logits[v] > logits[best] ? v : best;
                next[s] = best;
            }
        }
        const double decode = seconds_since(start);
        std::printf("{\"streams\": %d, \"prompt_seconds\": %.6f, \"decode_seconds\": %.6f, \"decode_tokens_per_second\": %.3f}\n",
                    streams, prompts, decode, streams * gen / decode);
        std::fflush(stdout);
    }
    llama_batch_free(batch);
    llama_free(context);
    llama_model_free(model);
    return 0;
}
