/* A CfC's forward time loop as one CPU kernel, over a block of batch columns: a CfCCell with a
 * backbone (cfc_forward), or a wired CfC or a CfCCell without one (wired_cfc_forward).
 *
 * Built by ncps_mlx/native.py and called through ctypes; see that module for why. Everything is
 * feature-major, as in ncps_mlx.cells.cfc (features, batch), so each layer is one matrix
 * product over the block's columns: the same BLAS sgemm that MLX's products use, passed in as a
 * function pointer, on one thread per block. tanh and sigmoid are rational.h's, as in the MLX
 * path; silu's sigmoid too (MLX's is its own exp-based one: within 2e-7); gelu uses libm's erff.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "rational.h"

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                         int lda, const float *b, int ldb, float beta, float *c, int ldc);

enum { ROW_MAJOR = 101, NO_TRANS = 111 };
enum { DEFAULT = 0, PURE = 1, NO_GATE = 2 };
enum { LECUN_TANH = 0, TANH = 1, RELU = 2, SILU = 3, GELU = 4 };

typedef struct {
    int32_t batch, steps, hidden, units, layers; /* B, T, H, backbone units and layers (>= 1) */
    int32_t mode, activation, ff_tanh, heads;
    const float *inputs;                /* (T, units, B): the input half of the first layer, bias included */
    const float *timespans;             /* (T, B), or NULL: every step 1.0 */
    const float *state_weight;          /* (units, H): the first layer's state half */
    const float *const *hidden_weights; /* layers - 1 of (units, units) */
    const float *const *hidden_biases;  /* layers - 1 of (units,) */
    const float *head_weight;           /* (K, units): ff1, ff2, time_a, time_b (K = 4H), or with a timespan of 1
                                         * ff1, ff2, time_a + time_b (K = 3H); pure mode ff1 (K = H) */
    const float *head_bias;             /* (K,) */
    const float *w_tau, *A;             /* (H,), pure mode */
    sgemm_fn sgemm;
} cfc_args;

static void activate(int kind, float *restrict x, int64_t n) {
    switch (kind) {
    case LECUN_TANH:
        for (int64_t i = 0; i < n; ++i) x[i] = 1.7159f * rational_tanh(0.666f * x[i]);
        break;
    case TANH:
        for (int64_t i = 0; i < n; ++i) x[i] = rational_tanh(x[i]);
        break;
    case RELU:
        for (int64_t i = 0; i < n; ++i) x[i] = x[i] < 0.0f ? 0.0f : x[i];
        break;
    case SILU:
        for (int64_t i = 0; i < n; ++i) x[i] = x[i] * sigmoid(x[i]);
        break;
    default:
        for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
    }
}

/* rows of `bias` (n,) repeated over r columns into out (n, r). */
static void fill_rows(float *out, const float *bias, int n, int r) {
    for (int k = 0; k < n; ++k)
        for (int c = 0; c < r; ++c) out[(int64_t)k * r + c] = bias[k];
}

/* One state row of the gated modes: ff1, ff2 the heads after their activation. */
static void gated_row(int no_gate, const float *restrict ff1, const float *restrict ff2, const float *restrict ta,
                      const float *restrict tb, const float *restrict ts, float *restrict out, int R) {
    if (!tb) { /* ta is time_a + time_b */
        for (int c = 0; c < R; ++c) {
            float gate = sigmoid(ta[c]);
            out[c] = no_gate ? ff1[c] + gate * ff2[c] : ff1[c] * (1.0f - gate) + gate * ff2[c];
        }
    } else if (ts) {
        for (int c = 0; c < R; ++c) {
            float gate = sigmoid(ta[c] * ts[c] + tb[c]);
            out[c] = no_gate ? ff1[c] + gate * ff2[c] : ff1[c] * (1.0f - gate) + gate * ff2[c];
        }
    } else {
        for (int c = 0; c < R; ++c) {
            float gate = sigmoid(ta[c] + tb[c]);
            out[c] = no_gate ? ff1[c] + gate * ff2[c] : ff1[c] * (1.0f - gate) + gate * ff2[c];
        }
    }
}

/* The new state (H, R) of head outputs g (K, R), whose ff1 and ff2 rows it overwrites with
 * their tanh (ff_tanh); ts (R,) or NULL; w_tau and A (H,) in pure mode. */
static void tail(int mode, int ff_tanh, int H, int K, const float *w_tau, const float *A, float *restrict g,
                 const float *restrict ts, float *restrict h, int R) {
    if (mode == PURE) {
        for (int j = 0; j < H; ++j) {
            const float *ff1 = g + (int64_t)j * R, tau = fabsf(w_tau[j]), a = A[j];
            float *out = h + (int64_t)j * R;
            for (int c = 0; c < R; ++c) out[c] = -a * expf(-(ts ? ts[c] : 1.0f) * (tau + fabsf(ff1[c]))) * ff1[c] + a;
        }
        return;
    }
    if (ff_tanh)
        for (int64_t i = 0; i < (int64_t)2 * H * R; ++i) g[i] = rational_tanh(g[i]);
    const int fused = K == 3 * H;
    for (int j = 0; j < H; ++j)
        gated_row(mode == NO_GATE, g + (int64_t)j * R, g + (int64_t)(H + j) * R, g + (int64_t)(2 * H + j) * R,
                  fused ? NULL : g + (int64_t)(3 * H + j) * R, ts, h + (int64_t)j * R, R);
}

/* Columns [first, last) of every step's state, states (T, H, B), from initial (H, B).
 * scratch: (H + 2 units + K) (last - first) floats. */
void cfc_forward(const cfc_args *a, const float *initial, float *states, int first, int last, float *scratch) {
    const int B = a->batch, H = a->hidden, U = a->units, R = last - first, K = a->heads;
    float *h = scratch, *z = h + (int64_t)H * R, *spare = z + (int64_t)U * R, *g = spare + (int64_t)U * R;
    for (int j = 0; j < H; ++j) memcpy(h + (int64_t)j * R, initial + (int64_t)j * B + first, R * sizeof(float));
    for (int t = 0; t < a->steps; ++t) {
        const float *u = a->inputs + (int64_t)t * U * B + first;
        for (int k = 0; k < U; ++k) memcpy(z + (int64_t)k * R, u + (int64_t)k * B, R * sizeof(float));
        a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, U, R, H, 1.0f, a->state_weight, H, h, R, 1.0f, z, R);
        activate(a->activation, z, (int64_t)U * R);
        float *x = z, *y = spare;
        for (int l = 0; l < a->layers - 1; ++l) {
            fill_rows(y, a->hidden_biases[l], U, R);
            a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, U, R, U, 1.0f, a->hidden_weights[l], U, x, R, 1.0f, y, R);
            activate(a->activation, y, (int64_t)U * R);
            float *swap = x; x = y; y = swap;
        }
        fill_rows(g, a->head_bias, K, R);
        a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, K, R, U, 1.0f, a->head_weight, U, x, R, 1.0f, g, R);
        tail(a->mode, a->ff_tanh, H, K, a->w_tau, a->A, g, a->timespans ? a->timespans + (int64_t)t * B + first : NULL, h, R);
        float *out = states + (int64_t)t * H * B + first;
        for (int j = 0; j < H; ++j) memcpy(out + (int64_t)j * B, h + (int64_t)j * R, R * sizeof(float));
    }
}

/* A wired CfC (ncps_mlx.cells.cfc.WiredCfCCell), or a CfCCell without a backbone (one layer):
 * layers of masked CfC cells without backbones, each reading the previous layer's new state. */
typedef struct {
    int32_t batch, steps, layers, mode, ff_tanh;
    const int32_t *sizes;              /* H_l */
    const int32_t *heads;              /* K_l: 4 H_l, or 3 H_l with time_a + time_b fused; pure mode H_l */
    const float *inputs;               /* (T, K_0, B): layer 0's input product, bias included */
    const float *timespans;            /* (T, B), or NULL: every step 1.0 */
    const float *const *input_weights; /* per layer (K_l, H_{l-1}); layer 0's unused */
    const float *const *biases;        /* per layer (K_l,); layer 0's unused */
    const float *const *state_weights; /* per layer (K_l, H_l) */
    const float *const *w_tau, *const *A; /* per layer (H_l,), pure mode */
    sgemm_fn sgemm;
} wired_args;

/* Columns [first, last) of every step's state, states (T, S, B) with S the layers' sizes summed,
 * from initial (S, B). scratch: (S + max K_l) (last - first) floats. */
void wired_cfc_forward(const wired_args *a, const float *initial, float *states, int first, int last, float *scratch) {
    const int B = a->batch, R = last - first;
    int S = 0;
    for (int l = 0; l < a->layers; ++l) S += a->sizes[l];
    float *h = scratch, *g = h + (int64_t)S * R;
    for (int j = 0; j < S; ++j) memcpy(h + (int64_t)j * R, initial + (int64_t)j * B + first, R * sizeof(float));
    for (int t = 0; t < a->steps; ++t) {
        const float *ts = a->timespans ? a->timespans + (int64_t)t * B + first : NULL;
        float *state = h, *previous = NULL;
        for (int l = 0; l < a->layers; ++l) {
            const int H = a->sizes[l], K = a->heads[l];
            if (l == 0) {
                const float *u = a->inputs + (int64_t)t * K * B + first;
                for (int k = 0; k < K; ++k) memcpy(g + (int64_t)k * R, u + (int64_t)k * B, R * sizeof(float));
            } else {
                const int P = a->sizes[l - 1];
                fill_rows(g, a->biases[l], K, R);
                a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, K, R, P, 1.0f, a->input_weights[l], P, previous, R, 1.0f, g, R);
            }
            a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, K, R, H, 1.0f, a->state_weights[l], H, state, R, 1.0f, g, R);
            tail(a->mode, a->ff_tanh, H, K, a->mode == PURE ? a->w_tau[l] : NULL, a->mode == PURE ? a->A[l] : NULL, g,
                 ts, state, R);
            previous = state;
            state += (int64_t)H * R;
        }
        float *out = states + (int64_t)t * S * B + first;
        for (int j = 0; j < S; ++j) memcpy(out + (int64_t)j * B, h + (int64_t)j * R, R * sizeof(float));
    }
}
