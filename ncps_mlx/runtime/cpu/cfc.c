/* A CfC's time loop as one CPU kernel, over a block of batch columns: a CfCCell with a backbone
 * (cfc_forward, cfc_backward), or a wired CfC or a CfCCell without one (wired_cfc_forward,
 * wired_cfc_backward), in every mode.
 *
 * Run by the CfCSequence and WiredCfCSequence primitives (primitives.cpp). Everything but the
 * CfCCell's x is feature-major, as in ncps_mlx.cells.cfc (features, batch), so
 * each layer is one matrix product over the block's columns: the same BLAS sgemm that MLX's
 * products use, passed in as a function pointer, on one thread per block. tanh and sigmoid are
 * rational.h's, as in the MLX path; silu's sigmoid too (MLX's is its own exp-based one: within
 * 2e-7); gelu uses libm's erff.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "rational.h"

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { DEFAULT = 0, PURE = 1, NO_GATE = 2 };
enum { LECUN_TANH = 0, TANH = 1, RELU = 2, SILU = 3, GELU = 4 };

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

/* Dropout after backbone layer l + 2 at step t, on columns [first, first + R): keep's (U, B) slice. */
static const float *kept_rows(const cfc_args *a, int t, int l) {
    return a->keep + ((int64_t)t * (a->layers - 1) + l) * a->units * a->batch;
}

/* x (U, R) times the columns [first, first + R) of keep (U, B). */
static void drop(const float *keep, int U, int B, int first, int R, float *x) {
    for (int u = 0; u < U; ++u)
        for (int c = 0; c < R; ++c) x[(int64_t)u * R + c] *= keep[(int64_t)u * B + first + c];
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

/* rows (n, R) out to the columns [first, first + R) of dest (n, B), or back (to_block). */
static void copy_columns(float *block, float *wide, int n, int R, int B, int first, int to_block) {
    if (R == B) { /* the whole batch: one block (a row at a time was a call per float at batch 1) */
        memcpy(to_block ? block : wide, to_block ? wide : block, (int64_t)n * R * sizeof(float));
        return;
    }
    for (int k = 0; k < n; ++k) {
        float *a = block + (int64_t)k * R, *b = wide + (int64_t)k * B + first;
        memcpy(to_block ? a : b, to_block ? b : a, R * sizeof(float));
    }
}

/* The mixed-memory LSTM of step t on a block: from h (H, R) and c (H, R), c updated in place
 * and the output written over h; gates (4H, R) gets the pre-activations. */
static void lstm_gates(int64_t n, float forget_bias, const float *restrict input, const float *restrict input_gate,
                       const float *restrict forget_gate, const float *restrict output_gate, float *restrict c,
                       float *restrict h) {
    for (int64_t i = 0; i < n; ++i) {
        const float forget = sigmoid(forget_gate[i] + forget_bias);
        c[i] = c[i] * forget + rational_tanh(input[i]) * sigmoid(input_gate[i]);
        h[i] = rational_tanh(c[i]) * sigmoid(output_gate[i]);
    }
}

/* z (units, R) = the first layer's input half at step t, bias included, for the block's columns:
 * W_x x_t^T, the rows of x (B, T, I) read in place (row stride T I). */
static void first_layer_input(const cfc_args *a, int t, int first, int R, float *z) {
    const int I = a->input_size, T = a->steps;
    fill_rows(z, a->input_bias, a->units, R);
    if (I > 0)
        a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, a->units, R, I, 1.0f, a->input_weight, I,
                 a->x + ((int64_t)first * T + t) * I, T * I, 1.0f, z, R);
}

static void lstm_step(const lstm_args *l, sgemm_fn sgemm, int H, int B, int t, int first, int R, float *h, float *c,
                      float *gates) {
    copy_columns(gates, (float *)l->inputs + (int64_t)t * 4 * H * B, 4 * H, R, B, first, 1);
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, 4 * H, R, H, 1.0f, l->recurrent, H, h, R, 1.0f, gates, R);
    const int64_t n = (int64_t)H * R;
    lstm_gates(n, l->forget_bias, gates, gates + n, gates + 2 * n, gates + 3 * n, c, h);
}

/* The backward passes' LSTM at step t again, from the previous state (H, R), which it turns into
 * the LSTM's output: h_in, c_in, c_out and gates are kept for lstm_step_vjp. */
static void lstm_step_again(const lstm_args *l, sgemm_fn sgemm, const cfc_memory *m, int H, int B, int t, int first,
                            int R, float *previous, float *h_in, float *c_in, float *c_out, float *gates) {
    memcpy(h_in, previous, (int64_t)H * R * sizeof(float));
    copy_columns(c_in, (float *)(t == 0 ? m->initial_c : m->memory + (int64_t)(t - 1) * H * B), H, R, B, first, 1);
    memcpy(c_out, c_in, (int64_t)H * R * sizeof(float));
    lstm_step(l, sgemm, H, B, t, first, R, previous, c_out, gates);
}

/* lstm_step's vjp at step t: carried (H, R), the output's cotangent, becomes h_in's; carried_c,
 * c_out's (from the step after), becomes c_in's, with the memory's own cotangent m->d_memory[t]
 * added; the LSTM input's cotangent goes to m->d_inputs[t], the recurrent weight's is added into
 * m->d_recurrent. gates is overwritten. */
static void lstm_step_vjp(const lstm_args *l, sgemm_fn sgemm, const cfc_memory *m, int H, int B, int t, int first,
                          int R, float *gates, const float *c_in, const float *c_out, const float *h_in, float *carried,
                          float *carried_c) {
    const int64_t n = (int64_t)H * R;
    const float *dm = m->d_memory + (int64_t)t * H * B + first;
    for (int j = 0; j < H; ++j)
        for (int col = 0; col < R; ++col) {
            const int64_t i = (int64_t)j * R + col;
            const float ti = rational_tanh(gates[i]), si = sigmoid(gates[n + i]);
            const float sf = sigmoid(gates[2 * n + i] + l->forget_bias), so = sigmoid(gates[3 * n + i]);
            const float tc = rational_tanh(c_out[i]), dh = carried[i];
            const float dc = carried_c[i] + dm[(int64_t)j * B + col] + dh * so * (1.0f - tc * tc);
            gates[3 * n + i] = dh * tc * so * (1.0f - so);
            gates[2 * n + i] = dc * c_in[i] * sf * (1.0f - sf);
            gates[n + i] = dc * ti * si * (1.0f - si);
            gates[i] = dc * si * (1.0f - ti * ti);
            carried_c[i] = dc * sf;
        }
    copy_columns(gates, m->d_inputs + (int64_t)t * 4 * H * B, 4 * H, R, B, first, 0);
    sgemm(ROW_MAJOR, NO_TRANS, TRANS, 4 * H, H, R, 1.0f, gates, R, h_in, R, 1.0f, m->d_recurrent, H);
    sgemm(ROW_MAJOR, TRANS, NO_TRANS, H, R, 4 * H, 1.0f, l->recurrent, H, gates, R, 0.0f, carried, R);
}

/* Columns [first, last) of every step's state, states (T, H, B), from initial (H, B).
 * scratch: (H + 2 units + K) (last - first) floats, with mixed memory 5 H (last - first) more, in
 * the "input" circuit 6 H. */
void cfc_forward(const cfc_args *a, const float *initial, float *states, const cfc_memory *m, int first, int last,
                 float *scratch) {
    if (last <= first) return; /* an empty batch: nothing to do (a BLAS rejects empty products) */
    const int B = a->batch, H = a->hidden, U = a->units, R = last - first, K = a->heads, L = a->layers;
    float *h = scratch, *z = h + (int64_t)H * R, *spare = z + (int64_t)U * R, *g = spare + (int64_t)U * R;
    float *c = g + (int64_t)K * R, *gates = c + (int64_t)H * R, *lstm_out = gates + 4 * (int64_t)H * R;
    copy_columns(h, (float *)initial, H, R, B, first, 1);
    if (a->lstm.inputs) copy_columns(c, (float *)m->initial_c, H, R, B, first, 1);
    for (int t = 0; t < a->steps; ++t) {
        if (a->lstm.inputs) { /* the "state" circuit: the LSTM's output replaces h */
            if (a->input_circuit) memcpy(lstm_out, h, (int64_t)H * R * sizeof(float));
            lstm_step(&a->lstm, a->sgemm, H, B, t, first, R, a->input_circuit ? lstm_out : h, c, gates);
            copy_columns(c, m->memory + (int64_t)t * H * B, H, R, B, first, 0);
        }
        if (a->input_circuit) {
            fill_rows(z, a->input_bias, U, R);
            a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, U, R, H, 1.0f, a->input_weight, H, lstm_out, R, 1.0f, z, R);
        } else {
            first_layer_input(a, t, first, R, z);
        }
        a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, U, R, H, 1.0f, a->state_weight, H, h, R, 1.0f, z, R);
        activate(a->activation, z, (int64_t)U * R);
        float *x = z, *y = spare;
        for (int l = 0; l < L - 1; ++l) {
            fill_rows(y, a->hidden_biases[l], U, R);
            a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, U, R, U, 1.0f, a->hidden_weights[l], U, x, R, 1.0f, y, R);
            activate(a->activation, y, (int64_t)U * R);
            if (a->keep) drop(kept_rows(a, t, l), U, B, first, R, y);
            float *swap = x; x = y; y = swap;
        }
        fill_rows(g, a->head_bias, K, R);
        a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, K, R, U, 1.0f, a->head_weight, U, x, R, 1.0f, g, R);
        tail(a->mode, a->ff_tanh, H, K, a->w_tau, a->A, g, a->timespans ? a->timespans + (int64_t)t * B + first : NULL, h, R);
        copy_columns(h, states + (int64_t)t * H * B, H, R, B, first, 0);
    }
}

/* A wired CfC (ncps_mlx.cells.cfc.WiredCfCCell), or a CfCCell without a backbone (one layer):
 * layers of masked CfC cells without backbones, each reading the previous layer's new state. */

/* Columns [first, last) of every step's state, states (T, S, B) with S the layers' sizes summed,
 * from initial (S, B); with mixed memory m's every step's memory too. scratch: (S + max K_l)
 * (last - first) floats, with mixed memory 5 S (last - first) more, in the "input" circuit 6 S. */
void wired_cfc_forward(const wired_args *a, const float *initial, float *states, const cfc_memory *m, int first,
                       int last, float *scratch) {
    if (last <= first) return; /* an empty batch: nothing to do (a BLAS rejects empty products) */
    const int B = a->batch, R = last - first;
    int S = 0, widest = 0;
    for (int l = 0; l < a->layers; ++l) {
        S += a->sizes[l];
        widest = a->heads[l] > widest ? a->heads[l] : widest;
    }
    float *h = scratch, *g = h + (int64_t)S * R, *c = g + (int64_t)widest * R, *gates = c + (int64_t)S * R;
    float *lstm_out = gates + 4 * (int64_t)S * R;
    copy_columns(h, (float *)initial, S, R, B, first, 1);
    if (a->lstm.inputs) copy_columns(c, (float *)m->initial_c, S, R, B, first, 1);
    for (int t = 0; t < a->steps; ++t) {
        if (a->lstm.inputs) { /* the "state" circuit: the LSTM's output replaces h */
            if (a->input_circuit) memcpy(lstm_out, h, (int64_t)S * R * sizeof(float));
            lstm_step(&a->lstm, a->sgemm, S, B, t, first, R, a->input_circuit ? lstm_out : h, c, gates);
            copy_columns(c, m->memory + (int64_t)t * S * B, S, R, B, first, 0);
        }
        const float *ts = a->timespans ? a->timespans + (int64_t)t * B + first : NULL;
        float *state = h, *previous = NULL;
        for (int l = 0; l < a->layers; ++l) {
            const int H = a->sizes[l], K = a->heads[l];
            if (l == 0 && a->input_circuit) {
                fill_rows(g, a->biases[0], K, R);
                a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, K, R, S, 1.0f, a->input_weights[0], S, lstm_out, R, 1.0f, g, R);
            } else if (l == 0) {
                const float *u = a->inputs + (int64_t)t * K * B + first;
                copy_columns(g, (float *)u, K, R, B, 0, 1);
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
        copy_columns(h, out, S, R, B, 0, 0);
    }
}



/* d activation / d pre-activation, given both; d may be z. */
static void activation_derivative(int kind, const float *z, const float *a, float *d, int64_t n) {
    switch (kind) {
    case LECUN_TANH:
        for (int64_t i = 0; i < n; ++i) {
            float t = a[i] * (1.0f / 1.7159f);
            d[i] = (1.7159f * 0.666f) * (1.0f - t * t);
        }
        break;
    case TANH:
        for (int64_t i = 0; i < n; ++i) d[i] = 1.0f - a[i] * a[i];
        break;
    case RELU:
        for (int64_t i = 0; i < n; ++i) d[i] = z[i] > 0.0f ? 1.0f : 0.0f;
        break;
    case SILU:
        for (int64_t i = 0; i < n; ++i) {
            float s = sigmoid(z[i]);
            d[i] = s + z[i] * s * (1.0f - s);
        }
        break;
    default:
        for (int64_t i = 0; i < n; ++i)
            d[i] = 0.5f * (1.0f + erff(z[i] * 0.70710678118654752f)) + z[i] * expf(-0.5f * z[i] * z[i]) * 0.3989422804014327f;
    }
}

/* gated_row's vjp for one state row: the head cotangents d1, d2, dga, dgb (dgb NULL when tb is,
 * the gate's heads fused) from the new state's cotangent here + back (back may be NULL); d_ts
 * accumulates the timespans' (unfused heads only). Loops by case, so that each vectorises. */
static void gated_row_vjp(int no_gate, int ff_tanh, const float *restrict g1, const float *restrict g2,
                          const float *restrict ga, const float *restrict gb, const float *restrict ts,
                          const float *restrict here, const float *restrict back, float *restrict d1,
                          float *restrict d2, float *restrict dga, float *restrict dgb, float *restrict d_ts, int R) {
    for (int c = 0; c < R; ++c) {
        float f1 = ff_tanh ? rational_tanh(g1[c]) : g1[c], f2 = ff_tanh ? rational_tanh(g2[c]) : g2[c];
        float argument = gb ? ga[c] * (ts ? ts[c] : 1.0f) + gb[c] : ga[c];
        float gate = sigmoid(argument), dh = back ? here[c] + back[c] : here[c];
        float d_f1 = no_gate ? dh : dh * (1.0f - gate), d_f2 = dh * gate;
        d1[c] = ff_tanh ? d_f1 * (1.0f - f1 * f1) : d_f1;
        d2[c] = ff_tanh ? d_f2 * (1.0f - f2 * f2) : d_f2;
        dga[c] = dh * (no_gate ? f2 : f2 - f1) * (gate * (1.0f - gate)); /* d argument, for now */
    }
    if (!gb) return;
    for (int c = 0; c < R; ++c) dgb[c] = dga[c];
    if (ts)
        for (int c = 0; c < R; ++c) {
            d_ts[c] += dga[c] * ga[c];
            dga[c] *= ts[c];
        }
}

/* Pure mode's vjp for one state row, new = A - A e ff1, e = exp(-ts (|w_tau| + |ff1|)): the
 * head's cotangent d1 from the new state's cotangent here + back (back may be NULL); the row's
 * w_tau and A gradients added into *d_tau and *d_A, the timespans' into d_ts (NULL: none).
 * abs' derivative is sign(), 0 at 0, as in MLX. */
static void pure_row_vjp(const float *restrict ff1, float w_tau, float A, const float *restrict ts,
                         const float *restrict here, const float *restrict back, float *restrict d1,
                         float *d_tau, float *d_A, float *restrict d_ts, int R) {
    const float tau = fabsf(w_tau), tau_sign = (float)((w_tau > 0.0f) - (w_tau < 0.0f));
    float sum_tau = 0.0f, sum_A = 0.0f;
    for (int c = 0; c < R; ++c) {
        const float s = ts ? ts[c] : 1.0f, f = ff1[c], af = fabsf(f);
        const float e = expf(-s * (tau + af)), dh = back ? here[c] + back[c] : here[c];
        const float dhfe = dh * A * f * e; /* minus d new / d (the exponent) */
        d1[c] = -dh * A * e + dhfe * s * (float)((f > 0.0f) - (f < 0.0f));
        sum_A += dh * (1.0f - e * f);
        sum_tau += dhfe * s;
        if (d_ts) d_ts[c] += dhfe * (tau + af);
    }
    *d_tau += sum_tau * tau_sign;
    *d_A += sum_A;
}

/* Row sums of m (n, r) added into out (n,). */
static void add_row_sums(const float *m, float *out, int n, int r) {
    for (int k = 0; k < n; ++k) {
        const float *row = m + (int64_t)k * r;
        float total = 0.0f;
        for (int c = 0; c < r; ++c) total += row[c];
        out[k] += total;
    }
}

/* Gradients of cfc_forward for columns [first, last), given the forward
 * pass's states (T, H, B) and their cotangents d_states (T, H, B): d_x (B, T, I) (these rows),
 * d_initial (H, B) and d_timespans (T, B) (if timespans) written for these columns; the weights'
 * gradients added into d_input_weight (units, I), d_input_bias (units,), d_state_weight
 * (units, H), d_hidden_weights / d_hidden_biases (per hidden
 * layer), d_head_weight (K, units), d_head_bias (K,): this caller's own buffers; with mixed
 * memory m's gradients too. Each step is recomputed from its previous state.
 * scratch: (2 H + (2 L + 1) units + 2 K + 1) (last - first) floats, L = backbone layers, with
 * mixed memory 8 H (last - first) more, with dropout (L - 1) units (last - first) more after that,
 * in the "input" circuit H (last - first) more after those; d_keep (as keep) written for these
 * columns. */
void cfc_backward(const cfc_args *a, const float *initial, const float *states, const float *d_states, float *d_x,
                  float *d_input_weight, float *d_input_bias, float *d_initial, float *d_timespans, float *d_state_weight,
                  float *const *d_hidden_weights, float *const *d_hidden_biases, float *d_head_weight,
                  float *d_head_bias, float *d_w_tau, float *d_A, float *d_keep, const cfc_memory *m, int first,
                  int last, float *scratch) {
    if (last <= first) return; /* an empty batch: nothing to do (a BLAS rejects empty products) */
    const int B = a->batch, H = a->hidden, U = a->units, L = a->layers, R = last - first, K = a->heads;
    const int fused = K == 3 * H, no_gate = a->mode == NO_GATE;
    const int64_t n = (int64_t)H * R;
    float *previous = scratch, *carried = previous + (int64_t)H * R;
    float *z = carried + (int64_t)H * R;         /* L layers' pre-activations (U, R) */
    float *act = z + (int64_t)L * U * R;         /* L layers' activations */
    float *da = act + (int64_t)L * U * R;        /* (U, R) */
    float *g = da + (int64_t)U * R, *dy = g + (int64_t)K * R, *d_ts = dy + (int64_t)K * R;
    /* mixed memory: the LSTM's input state, memory in and out, gates, the memory's cotangent */
    float *h_in = d_ts + R, *c_in = h_in + n, *c_out = c_in + n, *gates = c_out + n, *carried_c = gates + 4 * n;
    /* with dropout: layers 2..n's activations after it (the next layer's input); the others' is act's */
    float *dropped = a->lstm.inputs ? carried_c + n : h_in;
    /* the "input" circuit: the LSTM output's cotangent */
    float *d_lstm_out = dropped + (a->keep ? (int64_t)(L - 1) * U * R : 0);
    /* what the first layer's state half reads: the previous state, or the LSTM's output over it */
    const float *state_in = a->input_circuit ? h_in : previous;
#define LAYER_OUTPUT(l) ((a->keep && (l) > 0) ? dropped + (int64_t)((l) - 1) * U * R : act + (int64_t)(l) * U * R)
    for (int i = 0; i < H * R; ++i) carried[i] = 0.0f;
    if (a->lstm.inputs)
        for (int64_t i = 0; i < n; ++i) carried_c[i] = 0.0f;
    for (int t = a->steps - 1; t >= 0; --t) {
        /* the step's forward pass again, from its previous state (keeping each step's products
         * from the forward pass instead was slower at batch 1024, 190 against 170 ms, and no
         * faster at 32) */
        const float *source = t == 0 ? initial : states + (int64_t)(t - 1) * H * B;
        copy_columns(previous, (float *)source, H, R, B, first, 1);
        if (a->lstm.inputs) /* the LSTM again: its output is the CfC step's previous state */
            lstm_step_again(&a->lstm, a->sgemm, m, H, B, t, first, R, previous, h_in, c_in, c_out, gates);
        if (a->input_circuit) { /* previous is the LSTM's output, h_in the previous state */
            fill_rows(z, a->input_bias, U, R);
            a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, U, R, H, 1.0f, a->input_weight, H, previous, R, 1.0f, z, R);
        } else {
            first_layer_input(a, t, first, R, z);
        }
        a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, U, R, H, 1.0f, a->state_weight, H, state_in, R, 1.0f, z, R);
        for (int l = 0; l < L; ++l) {
            float *zl = z + (int64_t)l * U * R, *al = act + (int64_t)l * U * R;
            if (l > 0) {
                fill_rows(zl, a->hidden_biases[l - 1], U, R);
                a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, U, R, U, 1.0f, a->hidden_weights[l - 1], U, LAYER_OUTPUT(l - 1), R,
                         1.0f, zl, R);
            }
            memcpy(al, zl, (int64_t)U * R * sizeof(float));
            activate(a->activation, al, (int64_t)U * R);
            if (a->keep && l > 0) {
                memcpy(LAYER_OUTPUT(l), al, (int64_t)U * R * sizeof(float));
                drop(kept_rows(a, t, l - 1), U, B, first, R, LAYER_OUTPUT(l));
            }
        }
        const float *last_act = LAYER_OUTPUT(L - 1);
        fill_rows(g, a->head_bias, K, R);
        a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, K, R, U, 1.0f, a->head_weight, U, last_act, R, 1.0f, g, R);

        /* the tail's vjp: dy (K, R) from d new state = d_states[t] + what the next step sent */
        const float *ts = a->timespans ? a->timespans + (int64_t)t * B + first : NULL;
        const float *ds = d_states + (int64_t)t * H * B + first;
        for (int c = 0; c < R; ++c) d_ts[c] = 0.0f;
        for (int j = 0; j < H; ++j)
            if (a->mode == PURE)
                pure_row_vjp(g + (int64_t)j * R, a->w_tau[j], a->A[j], ts, ds + (int64_t)j * B, carried + (int64_t)j * R,
                             dy + (int64_t)j * R, d_w_tau + j, d_A + j, d_ts, R);
            else
                gated_row_vjp(no_gate, a->ff_tanh, g + (int64_t)j * R, g + (int64_t)(H + j) * R,
                              g + (int64_t)(2 * H + j) * R, fused ? NULL : g + (int64_t)(3 * H + j) * R, ts,
                              ds + (int64_t)j * B, carried + (int64_t)j * R, dy + (int64_t)j * R,
                              dy + (int64_t)(H + j) * R, dy + (int64_t)(2 * H + j) * R,
                              fused ? NULL : dy + (int64_t)(3 * H + j) * R, d_ts, R);
        if (d_timespans) memcpy(d_timespans + (int64_t)t * B + first, d_ts, R * sizeof(float));

        /* heads, backbone layers, first layer */
        a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, K, U, R, 1.0f, dy, R, last_act, R, 1.0f, d_head_weight, U);
        add_row_sums(dy, d_head_bias, K, R);
        a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, U, R, K, 1.0f, a->head_weight, U, dy, R, 0.0f, da, R);
        for (int l = L - 1; l >= 0; --l) {
            float *zl = z + (int64_t)l * U * R, *al = act + (int64_t)l * U * R;
            if (a->keep && l > 0) { /* da is the dropped activation's cotangent: keep's, then the activation's */
                const float *keep = kept_rows(a, t, l - 1);
                float *d_kept = d_keep + ((int64_t)t * (L - 1) + l - 1) * U * B;
                for (int u = 0; u < U; ++u)
                    for (int c = 0; c < R; ++c) {
                        d_kept[(int64_t)u * B + first + c] = da[(int64_t)u * R + c] * al[(int64_t)u * R + c];
                        da[(int64_t)u * R + c] *= keep[(int64_t)u * B + first + c];
                    }
            }
            activation_derivative(a->activation, zl, al, zl, (int64_t)U * R); /* zl now d act / d z */
            for (int64_t i = 0; i < (int64_t)U * R; ++i) zl[i] *= da[i];       /* zl now d z */
            if (l > 0) {
                const float *below = LAYER_OUTPUT(l - 1);
                a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, U, U, R, 1.0f, zl, R, below, R, 1.0f, d_hidden_weights[l - 1], U);
                add_row_sums(zl, d_hidden_biases[l - 1], U, R);
                a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, U, R, U, 1.0f, a->hidden_weights[l - 1], U, zl, R, 0.0f, da, R);
            }
        }
        /* z is the first layer's d pre-activation: into x's rows of this step, and W_x, b */
        const int I = a->input_size;
        add_row_sums(z, d_input_bias, U, R);
        if (a->input_circuit) { /* through the first layer's input half to the LSTM, and to h_in */
            a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, U, H, R, 1.0f, z, R, previous, R, 1.0f, d_input_weight, H);
            a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, U, H, R, 1.0f, z, R, h_in, R, 1.0f, d_state_weight, H);
            a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, H, R, U, 1.0f, a->input_weight, H, z, R, 0.0f, d_lstm_out, R);
            a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, H, R, U, 1.0f, a->state_weight, H, z, R, 0.0f, carried, R);
            lstm_step_vjp(&a->lstm, a->sgemm, m, H, B, t, first, R, gates, c_in, c_out, h_in, d_lstm_out, carried_c);
            for (int64_t i = 0; i < n; ++i) carried[i] += d_lstm_out[i];
            continue;
        }
        if (I > 0) {
            const int64_t row = ((int64_t)first * a->steps + t) * I;
            a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, U, I, R, 1.0f, z, R, a->x + row, a->steps * I, 1.0f, d_input_weight, I);
            a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, R, I, U, 1.0f, z, R, a->input_weight, I, 0.0f, d_x + row, a->steps * I);
        }
        a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, U, H, R, 1.0f, z, R, previous, R, 1.0f, d_state_weight, H);
        a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, H, R, U, 1.0f, a->state_weight, H, z, R, 0.0f, carried, R);
        if (a->lstm.inputs) /* carried is the LSTM output's cotangent: through the LSTM to h_in */
            lstm_step_vjp(&a->lstm, a->sgemm, m, H, B, t, first, R, gates, c_in, c_out, h_in, carried, carried_c);
    }
    for (int j = 0; j < H; ++j) memcpy(d_initial + (int64_t)j * B + first, carried + (int64_t)j * R, R * sizeof(float));
    if (a->lstm.inputs)
        for (int j = 0; j < H; ++j)
            memcpy(m->d_initial_c + (int64_t)j * B + first, carried_c + (int64_t)j * R, R * sizeof(float));
#undef LAYER_OUTPUT
}

/* Gradients of wired_cfc_forward for columns [first, last), given its
 * states (T, S, B) and their cotangents d_states (T, S, B): d_inputs (T, K_0, B), d_initial
 * (S, B) and d_timespans (T, B) (if timespans) written for these columns; the weights'
 * gradients added into d_input_weights, d_biases (layers 1.., as input_weights and biases) and
 * d_state_weights: this caller's own buffers. Each step's head outputs are recomputed from the
 * states; with mixed memory m's gradients too. scratch: (4 S + sum K_l + max K_l + 1) (last - first)
 * floats, with mixed memory 8 S (last - first) more, in the "input" circuit 9 S. */
void wired_cfc_backward(const wired_args *a, const float *initial, const float *states, const float *d_states,
                        float *d_inputs, float *d_initial, float *d_timespans, float *const *d_input_weights,
                        float *const *d_biases, float *const *d_state_weights, float *const *d_w_tau,
                        float *const *d_A, const cfc_memory *m, int first, int last, float *scratch) {
    if (last <= first) return; /* an empty batch: nothing to do (a BLAS rejects empty products) */
    const int B = a->batch, R = last - first, L = a->layers, no_gate = a->mode == NO_GATE;
    int S = 0, all_heads = 0, widest = 0;
    for (int l = 0; l < L; ++l) {
        S += a->sizes[l];
        all_heads += a->heads[l];
        widest = a->heads[l] > widest ? a->heads[l] : widest;
    }
    float *previous = scratch, *current = previous + (int64_t)S * R, *carried = current + (int64_t)S * R;
    float *d_new = carried + (int64_t)S * R, *g = d_new + (int64_t)S * R, *dy = g + (int64_t)all_heads * R;
    float *d_ts = dy + (int64_t)widest * R;
    /* mixed memory: the LSTM's input state, memory in and out, gates, the memory's cotangent */
    const int64_t n = (int64_t)S * R;
    float *h_in = d_ts + R, *c_in = h_in + n, *c_out = c_in + n, *gates = c_out + n, *carried_c = gates + 4 * n;
    /* the "input" circuit: the LSTM output's cotangent; the layers' previous state is h_in, and
     * previous the LSTM's output */
    float *d_lstm_out = carried_c + n;
    const float *layers_in = a->input_circuit ? h_in : previous;
    for (int64_t i = 0; i < n; ++i) carried[i] = 0.0f;
    if (a->lstm.inputs)
        for (int64_t i = 0; i < n; ++i) carried_c[i] = 0.0f;
    for (int t = a->steps - 1; t >= 0; --t) {
        copy_columns(previous, (float *)(t == 0 ? initial : states + (int64_t)(t - 1) * S * B), S, R, B, first, 1);
        if (a->lstm.inputs) /* the LSTM again: its output is the layers' previous state */
            lstm_step_again(&a->lstm, a->sgemm, m, S, B, t, first, R, previous, h_in, c_in, c_out, gates);
        copy_columns(current, (float *)states + (int64_t)t * S * B, S, R, B, first, 1);
        copy_columns(d_new, (float *)d_states + (int64_t)t * S * B, S, R, B, first, 1);
        for (int64_t i = 0; i < (int64_t)S * R; ++i) d_new[i] += carried[i];
        const float *ts = a->timespans ? a->timespans + (int64_t)t * B + first : NULL;
        for (int c = 0; c < R; ++c) d_ts[c] = 0.0f;
        /* each layer's head outputs again: its input (layer 0's projection, else the previous
         * layer's new state) and its previous state */
        int64_t offset = 0, head_offset = 0;
        for (int l = 0; l < L; ++l) {
            const int H = a->sizes[l], K = a->heads[l];
            float *gl = g + head_offset * R;
            if (l == 0 && a->input_circuit) {
                fill_rows(gl, a->biases[0], K, R);
                a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, K, R, S, 1.0f, a->input_weights[0], S, previous, R, 1.0f, gl, R);
            } else if (l == 0) {
                copy_columns(gl, (float *)a->inputs + (int64_t)t * K * B, K, R, B, first, 1);
            } else {
                const int P = a->sizes[l - 1];
                fill_rows(gl, a->biases[l], K, R);
                a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, K, R, P, 1.0f, a->input_weights[l], P, current + (offset - P) * R, R,
                         1.0f, gl, R);
            }
            a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, K, R, H, 1.0f, a->state_weights[l], H, layers_in + offset * R, R, 1.0f, gl, R);
            offset += H;
            head_offset += K;
        }
        /* the layers in reverse: a layer's new state also feeds the next layer's input */
        for (int l = L - 1; l >= 0; --l) {
            const int H = a->sizes[l], K = a->heads[l], fused = K == 3 * H;
            offset -= H;
            head_offset -= K;
            const float *gl = g + head_offset * R;
            float *dh = d_new + offset * R;
            for (int j = 0; j < H; ++j)
                if (a->mode == PURE)
                    pure_row_vjp(gl + (int64_t)j * R, a->w_tau[l][j], a->A[l][j], ts, dh + (int64_t)j * R, NULL,
                                 dy + (int64_t)j * R, d_w_tau[l] + j, d_A[l] + j, d_ts, R);
                else
                    gated_row_vjp(no_gate, a->ff_tanh, gl + (int64_t)j * R, gl + (int64_t)(H + j) * R,
                                  gl + (int64_t)(2 * H + j) * R, fused ? NULL : gl + (int64_t)(3 * H + j) * R, ts,
                                  dh + (int64_t)j * R, NULL, dy + (int64_t)j * R, dy + (int64_t)(H + j) * R,
                                  dy + (int64_t)(2 * H + j) * R, fused ? NULL : dy + (int64_t)(3 * H + j) * R, d_ts, R);
            a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, K, H, R, 1.0f, dy, R, layers_in + offset * R, R, 1.0f, d_state_weights[l], H);
            a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, H, R, K, 1.0f, a->state_weights[l], H, dy, R, 0.0f, carried + offset * R, R);
            if (l == 0 && a->input_circuit) { /* layer 0's input is the LSTM's output, previous */
                a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, K, S, R, 1.0f, dy, R, previous, R, 1.0f, d_input_weights[0], S);
                add_row_sums(dy, d_biases[0], K, R);
                a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, S, R, K, 1.0f, a->input_weights[0], S, dy, R, 0.0f, d_lstm_out, R);
            } else if (l == 0) {
                copy_columns(dy, d_inputs + (int64_t)t * K * B, K, R, B, first, 0);
            } else {
                const int P = a->sizes[l - 1];
                const float *x = current + (offset - P) * R;
                a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, K, P, R, 1.0f, dy, R, x, R, 1.0f, d_input_weights[l], P);
                add_row_sums(dy, d_biases[l], K, R);
                a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, P, R, K, 1.0f, a->input_weights[l], P, dy, R, 1.0f, d_new + (offset - P) * R, R);
            }
        }
        if (d_timespans) memcpy(d_timespans + (int64_t)t * B + first, d_ts, R * sizeof(float));
        if (a->input_circuit) { /* carried is h_in's own cotangent; the LSTM's path to it is added */
            lstm_step_vjp(&a->lstm, a->sgemm, m, S, B, t, first, R, gates, c_in, c_out, h_in, d_lstm_out, carried_c);
            for (int64_t i = 0; i < n; ++i) carried[i] += d_lstm_out[i];
        } else if (a->lstm.inputs) /* carried is the LSTM output's cotangent: through the LSTM to h_in */
            lstm_step_vjp(&a->lstm, a->sgemm, m, S, B, t, first, R, gates, c_in, c_out, h_in, carried, carried_c);
    }
    copy_columns(carried, d_initial, S, R, B, first, 0);
    if (a->lstm.inputs) copy_columns(carried_c, m->d_initial_c, S, R, B, first, 0);
}
