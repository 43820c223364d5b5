/* The CfC's forward time loop (a CfCCell with a backbone) as one CPU kernel, over a block of
 * batch columns.
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
 * their tanh; ts (R,) or NULL. */
static void tail(const cfc_args *a, float *restrict g, const float *restrict ts, float *restrict h, int R) {
    const int H = a->hidden;
    if (a->mode == PURE) {
        for (int j = 0; j < H; ++j) {
            const float *ff1 = g + (int64_t)j * R, w_tau = fabsf(a->w_tau[j]), A = a->A[j];
            float *out = h + (int64_t)j * R;
            for (int c = 0; c < R; ++c) out[c] = -A * expf(-(ts ? ts[c] : 1.0f) * (w_tau + fabsf(ff1[c]))) * ff1[c] + A;
        }
        return;
    }
    if (a->ff_tanh)
        for (int64_t i = 0; i < (int64_t)2 * H * R; ++i) g[i] = rational_tanh(g[i]);
    const int fused = a->heads == 3 * H;
    for (int j = 0; j < H; ++j)
        gated_row(a->mode == NO_GATE, g + (int64_t)j * R, g + (int64_t)(H + j) * R, g + (int64_t)(2 * H + j) * R,
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
        tail(a, g, a->timespans ? a->timespans + (int64_t)t * B + first : NULL, h, R);
        float *out = states + (int64_t)t * H * B + first;
        for (int j = 0; j < H; ++j) memcpy(out + (int64_t)j * B, h + (int64_t)j * R, R * sizeof(float));
    }
}
