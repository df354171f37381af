/*
 * The Llama-architecture forward pass, llama2.c style: a config, weights
 * (pointers into the memory-mapped GGUF), a KV cache and a run state, the
 * last two allocated once at creation. ek_forward allocates nothing.
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
} ek_tensor;

typedef struct {
    ek_tensor attn_norm;           /* F32 [dim] */
    ek_tensor wq, wk, wv, wo;      /* [q_dim, dim] [kv_dim, dim] x2 [dim, q_dim] */
    ek_tensor ffn_norm;            /* F32 [dim] */
    ek_tensor w_gate, w_up, w_down; /* [hidden, dim] x2, [dim, hidden] */
} ek_layer;

typedef struct {
    int n_layer;
    int dim;        /* residual stream width */
    int hidden_dim; /* FFN width */
    int n_head, n_kv_head, head_dim;
    int vocab;
    float norm_eps;
    float rope_base;
} ek_config;

typedef struct {
    ek_config cfg;
    ek_tensor tok_embd; /* [vocab, dim] */
    ek_tensor out_norm; /* F32 [dim] */
    ek_tensor output;   /* [vocab, dim]; the embedding itself when tied */
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
} ek_model_params;

/* Checks shapes and types against cfg; on failure returns a status and,
 * if err is given, a message naming the offending tensor. */
int ek_model_create(const ek_weights *w, const ek_model_params *p, ek_model **out, char *err,
                    size_t err_len);
void ek_model_destroy(ek_model *m);

/* Bytes the model allocates for a given configuration (KV cache + run state). */
size_t ek_model_kv_bytes(const ek_config *cfg, int n_slots, int n_ctx, int kv_type);
size_t ek_model_state_bytes(const ek_config *cfg, int max_batch, int n_ctx, int n_threads);

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
 * their new positions. Nothing is recomputed.
 */
int ek_kv_shift(ek_model *m, int slot, int keep, int n_drop, int n_used);

/* Copy positions [0, n) of slot src into slot dst (a shared prompt prefix). */
int ek_kv_copy(ek_model *m, int src, int dst, int n);

const ek_kernels *ek_model_kernels(const ek_model *m);

#endif
