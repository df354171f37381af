/*
 * The Llama-architecture forward pass, llama2.c style: a config, weights
 * (copied from the memory-mapped GGUF at creation, repacked for decoding),
 * a KV cache and a run state, all allocated once at creation. ek_forward
 * allocates nothing.
 *
 * One call evaluates a batch of tokens, each with its own position and KV
 * slot: a prompt chunk (one slot, consecutive positions), a decode step for
 * several conversations at once (one token per slot), or a mix.
 */
#ifndef EDGE_MODEL_H
#define EDGE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "edge_kernels.h"
#include "edge_threadpool.h"

typedef struct {
    const void *data; /* row-major: rows x cols elements of type */
    int type;
    int rows, cols;
    int x8; /* data is in the x8 layout (set by ek_model_create) */
} ek_tensor;

/* A layer's tensors. The optional ones (data NULL when absent) are the
 * differences between the families: Qwen2's Q/K/V biases, Qwen3's and
 * Gemma 3's per-head norms of Q and K, Gemma's norms of each sublayer's
 * output. */
typedef struct {
    ek_tensor attn_norm;           /* F32 [dim] */
    ek_tensor wq, wk, wv, wo;      /* [q_dim, dim] [kv_dim, dim] x2 [dim, q_dim] */
    ek_tensor bq, bk, bv;          /* optional, F32 [q_dim] [kv_dim] x2 */
    ek_tensor q_norm, k_norm;      /* optional, F32 [head_dim], shared by every head */
    ek_tensor attn_post_norm;      /* optional, F32 [dim], on the attention's output */
    ek_tensor ffn_norm;            /* F32 [dim] */
    ek_tensor w_gate, w_up, w_down; /* [hidden, dim] x2, [dim, hidden] */
    ek_tensor ffn_post_norm;       /* optional, F32 [dim], on the FFN's output */
} ek_layer;

enum ek_ffn_act { EK_ACT_SILU = 0, EK_ACT_GELU = 1 };

/* The model's shape, and how its family differs from Llama's. Every field
 * past rope_base is 0 for a plain Llama model, so zero means "as Llama". */
typedef struct {
    int n_layer;
    int dim;        /* residual stream width */
    int hidden_dim; /* FFN width */
    int n_head, n_kv_head, head_dim;
    int vocab;
    float norm_eps;
    float rope_base;
    int rope_neox;       /* RoPE pairs element i with i + head_dim / 2, not i + 1 */
    float rope_scale;    /* linear RoPE scaling: positions times this (0: 1) */
    int ffn_act;         /* enum ek_ffn_act */
    float embd_scale;    /* embeddings times this (Gemma: sqrt(dim); 0: 1) */
    float attn_scale;    /* scores times this (0: 1 / sqrt(head_dim)) */
    int swa_window;      /* sliding-window layers attend to this many positions (0: none) */
    int swa_pattern;     /* with a window, every swa_pattern-th layer is global (0: none is) */
    float rope_base_swa; /* the sliding-window layers' RoPE base, unscaled (0: rope_base) */
} ek_config;

/* Whether layer l attends over the sliding window only. */
static inline int ek_layer_slides(const ek_config *c, int l) {
    return c->swa_window > 0 && !(c->swa_pattern > 0 && (l + 1) % c->swa_pattern == 0);
}

typedef struct {
    ek_config cfg;
    ek_tensor tok_embd; /* [vocab, dim] */
    ek_tensor out_norm; /* F32 [dim] */
    ek_tensor output;   /* [vocab, dim]; the embedding itself when tied */
    ek_tensor rope_freqs; /* optional, F32 [head_dim / 2]: Llama 3's RoPE
                             frequency factors, each angle divided by its own */
    ek_layer *layers;   /* [n_layer], owned by the caller */
} ek_weights;

typedef struct ek_model ek_model;

typedef struct {
    int n_threads;
    int n_slots;   /* independent sequences in the KV cache */
    int n_ctx;     /* positions per slot */
    int max_batch; /* tokens per ek_forward call */
    int kv_type;   /* EK_TYPE_F16 or EK_TYPE_Q8_0 */
    const ek_kernels *kernels;
    /* The weights are views of a read-only file mapping: once a tensor is
     * copied, its pages are handed back (ek_release_mapped). */
    int weights_mapped;
} ek_model_params;

/* Checks shapes and types against cfg; on failure returns a status and,
 * if err is given, a message naming the offending tensor. The model copies
 * every tensor it reads (all but an untied token_embd) into memory of its
 * own, ek_model_weight_bytes of it, with the block-type matrices repacked
 * into the x8 layout where the table has an x8 gemm for their type. */
int ek_model_create(const ek_weights *w, const ek_model_params *p, ek_model **out, char *err,
                    size_t err_len);
void ek_model_destroy(ek_model *m);

/* Bytes the model allocates for a given configuration (KV cache + run state).
 * A sliding-window layer's cache is a ring of its window when that is
 * smaller than the context (see ek_kv_usable), so max_batch counts too. */
size_t ek_model_kv_bytes(const ek_config *cfg, int n_slots, int n_ctx, int max_batch, int kv_type);
size_t ek_model_state_bytes(const ek_config *cfg, int max_batch, int n_ctx, int n_threads);
/* Bytes of weights the model holds (copied at creation). */
size_t ek_model_weight_bytes(const ek_model *m);

/*
 * Evaluate n tokens. tokens/pos/slot are [n]. For each i with want[i] != 0,
 * in order, a row of vocab logits is written to logits (rows contiguous).
 * Requires pos[i] < n_ctx, slot[i] < n_slots, n <= max_batch, and that every
 * earlier position of each slot has been evaluated (by this or an earlier
 * call): the cache is the model's memory of the sequence.
 */
int ek_forward(ek_model *m, int n, const int32_t *tokens, const int32_t *pos,
               const int32_t *slot, const uint8_t *want, float *logits);

/*
 * Context shift: in slot, drop positions [keep, keep + n_drop) and move
 * [keep + n_drop, n_used) down by n_drop, re-rotating keys so RoPE sees
 * their new positions. Nothing is recomputed. Positions from n_used on are
 * dropped too. In a sliding-window layer's ring, only what it still holds
 * moves (see ek_kv_usable).
 */
int ek_kv_shift(ek_model *m, int slot, int keep, int n_drop, int n_used);

/* Copy positions [0, n) of slot src into slot dst (a shared prompt prefix). */
int ek_kv_copy(ek_model *m, int src, int dst, int n);

/*
 * How many of slot's first n cached positions a continuation can keep: n
 * (at most what was evaluated), or 0 when the sliding-window layers' ring
 * has overwritten part of the window before position n. Ask before
 * continuing a slot's cache at a position below where it ended (a shared
 * prefix); a forward call that continues where the ring no longer holds the
 * window is refused with EK_EGONE. Without a ring every evaluated position
 * is kept. Returns a negative status for a bad slot or n.
 */
int ek_kv_usable(const ek_model *m, int slot, int n);

/* The length of the sliding-window layers' ring in positions, 0 when every
 * layer keeps the whole context: of a model, or of one yet to be created. */
int ek_model_kv_ring(const ek_model *m);
int ek_swa_ring(const ek_config *cfg, int n_ctx, int max_batch);

const ek_kernels *ek_model_kernels(const ek_model *m);

/* ---- where a forward pass spends its time ----
 * With profiling on, the first pool thread reads the clock as each op of
 * the pass finishes (every thread waits there before the next op), so an
 * op's time is wall time on all threads, waits included. A matmul group's
 * time is shared among its matrices by their bytes. */
enum ek_profile_kind {
    EK_PROF_EMBED,     /* token embedding lookups, RoPE angles */
    EK_PROF_NORM,      /* RMS norms */
    EK_PROF_QUANTIZE,  /* activations into the gemms' formats */
    EK_PROF_ROPE_KV,   /* rotating queries and keys, filing K and V */
    EK_PROF_ATTENTION, /* attention over the cache */
    EK_PROF_FFN_ACT,   /* silu(gate) * up */
    EK_PROF_ADD,       /* residual adds */
    EK_PROF_DISPATCH,  /* starting and joining the pool threads */
    EK_PROF_GEMM,      /* + weight type: that type's matmuls */
    EK_PROF_KINDS = EK_PROF_GEMM + EK_TYPE_COUNT
};

typedef struct {
    double seconds[EK_PROF_KINDS];
    double bytes[EK_PROF_KINDS]; /* weight bytes read, for the gemm kinds */
    int64_t runs, tokens;        /* forward calls and the tokens they evaluated */
} ek_profile;

/* Copies what was gathered since the last call into out (if given), starts
 * afresh, and turns profiling on or off. Not during ek_forward. */
void ek_model_profile(ek_model *m, int on, ek_profile *out);

#endif
