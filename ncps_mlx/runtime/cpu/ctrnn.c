/* The CTRNN's time loop (ncps_mlx.cells.ctrnn) as one CPU kernel: forward and backward over a
 * block of batch rows, batch-major like the cell: h (R, U), each Euler unfold's h @ recurrent one
 * matrix product of the kernels' BLAS (kernels.h). tanh is rational.h's, as in the MLX path; its
 * gradient the exact 1 - f^2 of its output, as fastmath's custom vjp.
 *
 * Per unfold: f = tanh(u + h @ recurrent) (with global feedback; else tanh(u), fixed over the
 * step), h <- clip(h + eps (f - h / tau)), eps = delta_t * timespan.
 */
#include <string.h>

#include "kernels.h"
#include "rational.h"

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

static float step_eps(const ctrnn_args *a, int b, int t) {
    return a->delta_t * (a->timespans ? a->timespans[(int64_t)b * a->steps + t] : 1.0f);
}

static void load_rows(const ctrnn_args *a, int t, int first, int R, float *u) {
    const int U = a->units;
    for (int r = 0; r < R; ++r)
        memcpy(u + (int64_t)r * U, a->inputs + ((int64_t)(first + r) * a->steps + t) * U, U * sizeof(float));
}

/* One unfold of rows h (R, U) in place, given f's argument without the product (u) or f itself
 * (without feedback, in f); f and the pre-clip state into f_out, pre_out if not NULL. */
static void unfold(const ctrnn_args *a, int t, int first, int R, const float *u, float *h, float *f, float *pre_out) {
    const int U = a->units;
    const float tau = a->tau[0], clip = a->clip;
    if (a->recurrent) {
        memcpy(f, u, (int64_t)R * U * sizeof(float));
        a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, R, U, U, 1.0f, h, U, a->recurrent, U, 1.0f, f, U);
        for (int64_t i = 0; i < (int64_t)R * U; ++i) f[i] = rational_tanh(f[i]);
    }
    for (int r = 0; r < R; ++r) {
        const float eps = step_eps(a, first + r, t);
        float *hr = h + (int64_t)r * U;
        const float *fr = f + (int64_t)r * U;
        for (int j = 0; j < U; ++j) {
            float next = hr[j] + eps * (fr[j] - hr[j] / tau);
            if (pre_out) pre_out[(int64_t)r * U + j] = next;
            if (clip > 0.0f) next = next > clip ? clip : (next < -clip ? -clip : next);
            hr[j] = next;
        }
    }
}

/* A step's unfolds from h (R, U) in place; with trail (not NULL) each unfold's input state, f and
 * pre-clip state, 3 U R floats an unfold. work: 2 U R floats. */
static void step(const ctrnn_args *a, int t, int first, int R, float *h, float *trail, float *work) {
    const int U = a->units;
    const int64_t n = (int64_t)R * U;
    float *u = work, *f = work + n;
    load_rows(a, t, first, R, u);
    if (!a->recurrent)
        for (int64_t i = 0; i < n; ++i) f[i] = rational_tanh(u[i]);
    for (int k = 0; k < a->unfolds; ++k) {
        float *at = trail ? trail + 3 * n * k : NULL;
        if (at) memcpy(at, h, n * sizeof(float));
        unfold(a, t, first, R, u, h, f, at ? at + 2 * n : NULL);
        if (at) memcpy(at + n, f, n * sizeof(float));
    }
}

void ctrnn_forward(const ctrnn_args *a, const float *initial, float *states, int first, int last, float *scratch) {
    if (last <= first) return;
    const int U = a->units, R = last - first, T = a->steps;
    float *h = scratch, *work = scratch + (int64_t)R * U;
    memcpy(h, initial + (int64_t)first * U, (int64_t)R * U * sizeof(float));
    for (int t = 0; t < T; ++t) {
        step(a, t, first, R, h, NULL, work);
        for (int r = 0; r < R; ++r) memcpy(states + ((int64_t)(first + r) * T + t) * U, h + (int64_t)r * U, U * sizeof(float));
    }
}

/* Gradients for rows [first, last) given the forward pass's states (B, T, U) and their
 * cotangents d_states: d_inputs (B, T, U), d_initial (B, U), d_timespans (B, T) (if timespans)
 * written for these rows; d_recurrent (U, U) and d_tau (1,) added into (this caller's own
 * buffers). Each step's unfolds are recomputed from its previous state.
 * scratch: (3 unfolds + 5) U R floats. */
void ctrnn_backward(const ctrnn_args *a, const float *initial, const float *states, const float *d_states,
                    float *d_inputs, float *d_initial, float *d_timespans, float *d_recurrent, float *d_tau,
                    int first, int last, float *scratch) {
    if (last <= first) return;
    const int U = a->units, R = last - first, T = a->steps, K = a->unfolds;
    const int64_t n = (int64_t)R * U;
    const float tau = a->tau[0], clip = a->clip;
    float *trail = scratch, *h = trail + 3 * n * K, *work = h + n, *dh = work + 2 * n, *g = dh + n;
    memset(dh, 0, n * sizeof(float));
    double tau_sum = 0.0;
    for (int t = T - 1; t >= 0; --t) {
        for (int r = 0; r < R; ++r) {
            const float *ds = d_states + ((int64_t)(first + r) * T + t) * U;
            for (int j = 0; j < U; ++j) dh[(int64_t)r * U + j] += ds[j];
            const float *previous = t > 0 ? states + ((int64_t)(first + r) * T + t - 1) * U : initial + (int64_t)(first + r) * U;
            memcpy(h + (int64_t)r * U, previous, U * sizeof(float));
        }
        step(a, t, first, R, h, trail, work);
        float *du = work; /* (R, U): the tanh argument's gradient, summed over the unfolds */
        memset(du, 0, n * sizeof(float));
        if (d_timespans)
            for (int r = 0; r < R; ++r) d_timespans[(int64_t)(first + r) * T + t] = 0.0f;
        for (int k = K - 1; k >= 0; --k) {
            const float *hk = trail + 3 * n * k, *fk = hk + n, *pre = hk + 2 * n;
            for (int r = 0; r < R; ++r) {
                const float eps = step_eps(a, first + r, t);
                double d_eps = 0.0;
                for (int j = 0; j < U; ++j) {
                    const int64_t i = (int64_t)r * U + j;
                    float dp = dh[i];
                    if (clip > 0.0f && (pre[i] > clip || pre[i] < -clip)) dp = 0.0f;
                    d_eps += dp * (fk[i] - hk[i] / tau);
                    tau_sum += dp * eps * hk[i] / (tau * tau);
                    g[i] = dp * eps; /* the gradient of f */
                    dh[i] = dp - g[i] / tau;
                }
                if (d_timespans) d_timespans[(int64_t)(first + r) * T + t] += a->delta_t * (float)d_eps;
            }
            if (a->recurrent) {
                for (int64_t i = 0; i < n; ++i) g[i] *= 1.0f - fk[i] * fk[i];
                for (int64_t i = 0; i < n; ++i) du[i] += g[i];
                a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, R, U, U, 1.0f, g, U, a->recurrent, U, 1.0f, dh, U);
                a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, U, U, R, 1.0f, hk, U, g, U, 1.0f, d_recurrent, U);
            } else {
                for (int64_t i = 0; i < n; ++i) du[i] += g[i] * (1.0f - fk[i] * fk[i]);
            }
        }
        for (int r = 0; r < R; ++r) memcpy(d_inputs + ((int64_t)(first + r) * T + t) * U, du + (int64_t)r * U, U * sizeof(float));
    }
    for (int r = 0; r < R; ++r) memcpy(d_initial + (int64_t)(first + r) * U, dh + (int64_t)r * U, U * sizeof(float));
    d_tau[0] += (float)tau_sum;
}
