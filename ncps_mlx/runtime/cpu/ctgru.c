/* The CTGRU's time loop (ncps_mlx.cells.ctgru) as one CPU kernel: forward and backward over a
 * block of batch rows, batch-major like the cell, the traces (R, U, M) unit-major. Per step:
 *
 *   h = sum_m traces;  z = u_rs + h @ w_rs, split into retrieve and store logits (R, U, M) each
 *   retrieve, store = softmax_m(-(z - ln tau)^2);  v = sum_m retrieve traces
 *   q = tanh(u_q + v @ w_q);  traces <- clip(((1 - store) traces + store q) decay)
 *
 * decay: per time scale, fixed ("ltc") or exp(-timespan / tau) ("mozer"). The two state
 * products are one matrix product with w_rs = [w_r | w_s] (U, 2 U M). tanh is rational.h's, as
 * in the MLX path, its gradient the exact 1 - q^2; the softmax is MLX's precise one's
 * arithmetic (max subtracted, float32) with libm's expf.
 */
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "rational.h"

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* Row b's decay of each time scale at step t, into decay (M,): once a row, not once a trace. */
static void decays(const ctgru_args *a, int b, int t, float *decay) {
    const float ts = a->timespans ? a->timespans[(int64_t)b * a->steps + t] : 1.0f;
    for (int m = 0; m < a->scales; ++m) decay[m] = a->mozer ? expf(-ts * a->decay[m]) : a->decay[m];
}

static void softmax_scales(const ctgru_args *a, const float *z, float *p, int64_t groups) {
    const int M = a->scales;
    for (int64_t g = 0; g < groups; ++g) {
        const float *zg = z + g * M;
        float *pg = p + g * M, top = -INFINITY, sum = 0.0f;
        for (int m = 0; m < M; ++m) {
            const float c = zg[m] - a->ln_tau[m];
            pg[m] = -(c * c);
            top = pg[m] > top ? pg[m] : top;
        }
        for (int m = 0; m < M; ++m) sum += (pg[m] = expf(pg[m] - top));
        for (int m = 0; m < M; ++m) pg[m] /= sum;
    }
}

/* One step of rows [first, first + R) from traces (R, U M): z and p (R, 2 U M) the logits and
 * the softmaxes, v and q (R, U), mixed (R, U M) before the decay; the new traces written to
 * next (R, U M), pre-clip into pre if not NULL. */
typedef struct {
    float *h, *z, *p, *v, *q, *mixed;
} step_parts;

static void step(const ctgru_args *a, int t, int first, int R, const float *traces, step_parts s, float *next) {
    const int U = a->units, M = a->scales, UM = U * M, P = 2 * UM + U;
    for (int r = 0; r < R; ++r) {
        const float *u = a->inputs + ((int64_t)(first + r) * a->steps + t) * P;
        memcpy(s.z + (int64_t)r * 2 * UM, u, 2 * UM * sizeof(float));
        memcpy(s.q + (int64_t)r * U, u + 2 * UM, U * sizeof(float));
        for (int j = 0; j < U; ++j) {
            float sum = 0.0f;
            for (int m = 0; m < M; ++m) sum += traces[(int64_t)r * UM + j * M + m];
            s.h[(int64_t)r * U + j] = sum;
        }
    }
    a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, R, 2 * UM, U, 1.0f, s.h, U, a->w_rs, 2 * UM, 1.0f, s.z, 2 * UM);
    softmax_scales(a, s.z, s.p, (int64_t)R * 2 * U);
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < U; ++j) {
            const float *retrieve = s.p + (int64_t)r * 2 * UM + j * M, *tr = traces + (int64_t)r * UM + j * M;
            float sum = 0.0f;
            for (int m = 0; m < M; ++m) sum += retrieve[m] * tr[m];
            s.v[(int64_t)r * U + j] = sum;
        }
    a->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, R, U, U, 1.0f, s.v, U, a->w_q, U, 1.0f, s.q, U);
    for (int64_t i = 0; i < (int64_t)R * U; ++i) s.q[i] = rational_tanh(s.q[i]);
    const float clip = a->clip;
    float decay[M];
    for (int r = 0; r < R; ++r) {
        decays(a, first + r, t, decay);
        for (int j = 0; j < U; ++j) {
            const float q = s.q[(int64_t)r * U + j];
            const float *store = s.p + (int64_t)r * 2 * UM + UM + j * M;
            for (int m = 0; m < M; ++m) {
                const int64_t i = (int64_t)r * UM + j * M + m;
                const float mixed = (1.0f - store[m]) * traces[i] + store[m] * q;
                float value = mixed * decay[m];
                s.mixed[i] = mixed;
                if (clip > 0.0f) value = value > clip ? clip : (value < -clip ? -clip : value);
                next[i] = value;
            }
        }
    }
}

/* scratch for step_parts: (5 U M + 3 U) R floats. */
static step_parts parts_of(const ctgru_args *a, int R, float *scratch) {
    const int64_t U = a->units, UM = U * a->scales;
    step_parts s;
    s.h = scratch;
    s.z = s.h + U * R;
    s.p = s.z + 2 * UM * R;
    s.v = s.p + 2 * UM * R;
    s.q = s.v + U * R;
    s.mixed = s.q + U * R;
    return s;
}

void ctgru_forward(const ctgru_args *a, const float *initial, float *outputs, float *states, int first, int last,
                   float *scratch) {
    if (last <= first) return;
    const int U = a->units, M = a->scales, UM = U * M, R = last - first, T = a->steps;
    float *traces = scratch, *next = traces + (int64_t)UM * R;
    step_parts s = parts_of(a, R, next + (int64_t)UM * R);
    memcpy(traces, initial + (int64_t)first * UM, (int64_t)R * UM * sizeof(float));
    for (int t = 0; t < T; ++t) {
        step(a, t, first, R, traces, s, next);
        for (int r = 0; r < R; ++r) {
            const float *row = next + (int64_t)r * UM;
            memcpy(states + ((int64_t)(first + r) * T + t) * UM, row, UM * sizeof(float));
            float *out = outputs + ((int64_t)(first + r) * T + t) * U;
            for (int j = 0; j < U; ++j) {
                float sum = 0.0f;
                for (int m = 0; m < M; ++m) sum += row[j * M + m];
                out[j] = sum;
            }
        }
        float *swap = traces;
        traces = next;
        next = swap;
    }
}

/* Gradients for rows [first, last) given the forward pass's states (B, T, U M) and the
 * cotangents of its outputs (B, T, U) and states: d_inputs (B, T, 2 U M + U), d_initial
 * (B, U M), d_timespans (B, T) (mozer, if timespans) written for these rows; d_w_rs (U, 2 U M)
 * and d_w_q (U, U) added into (this caller's own buffers). Each step is recomputed from its
 * previous state. scratch: (10 U M + 6 U) R floats. */
void ctgru_backward(const ctgru_args *a, const float *initial, const float *states, const float *d_outputs,
                    const float *d_states, float *d_inputs, float *d_initial, float *d_timespans, float *d_w_rs,
                    float *d_w_q, int first, int last, float *scratch) {
    if (last <= first) return;
    const int U = a->units, M = a->scales, UM = U * M, P = 2 * UM + U, R = last - first, T = a->steps;
    const int64_t n = (int64_t)R * UM;
    const float clip = a->clip;
    step_parts s = parts_of(a, R, scratch);
    float *traces = s.mixed + n, *next = traces + n, *carried = next + n, *dz = carried + n;
    float *dq = dz + 2 * n, *dv = dq + (int64_t)R * U, *dh = dv + (int64_t)R * U;
    memset(carried, 0, n * sizeof(float));
    for (int t = T - 1; t >= 0; --t) {
        for (int r = 0; r < R; ++r) {
            const float *previous = t > 0 ? states + ((int64_t)(first + r) * T + t - 1) * UM : initial + (int64_t)(first + r) * UM;
            memcpy(traces + (int64_t)r * UM, previous, UM * sizeof(float));
        }
        step(a, t, first, R, traces, s, next);
        for (int r = 0; r < R; ++r) {
            const int b = first + r;
            const float *ds = d_states + ((int64_t)b * T + t) * UM, *dout = d_outputs + ((int64_t)b * T + t) * U;
            double d_ts = 0.0;
            float decay[M];
            decays(a, b, t, decay);
            for (int j = 0; j < U; ++j) {
                const float q = s.q[(int64_t)r * U + j];
                const float *store = s.p + (int64_t)r * 2 * UM + UM + j * M;
                float d_q = 0.0f;
                for (int m = 0; m < M; ++m) {
                    const int64_t i = (int64_t)r * UM + j * M + m;
                    float d_new = ds[j * M + m] + carried[i] + dout[j];
                    if (clip > 0.0f) {
                        const float pre = s.mixed[i] * decay[m];
                        if (pre > clip || pre < -clip) d_new = 0.0f;
                    }
                    if (a->mozer) d_ts -= d_new * s.mixed[i] * decay[m] * a->decay[m];
                    const float d_mixed = d_new * decay[m];
                    carried[i] = d_mixed * (1.0f - store[m]);           /* the traces' own path */
                    dz[(int64_t)r * 2 * UM + UM + j * M + m] = d_mixed * (q - traces[i]); /* d store */
                    d_q += d_mixed * store[m];
                }
                dq[(int64_t)r * U + j] = d_q * (1.0f - q * q);
            }
            if (d_timespans) d_timespans[(int64_t)b * T + t] = (float)d_ts;
            memcpy(d_inputs + ((int64_t)b * T + t) * P + 2 * UM, dq + (int64_t)r * U, U * sizeof(float));
        }
        a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, U, U, R, 1.0f, s.v, U, dq, U, 1.0f, d_w_q, U);
        a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, R, U, U, 1.0f, dq, U, a->w_q, U, 0.0f, dv, U);
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < U; ++j) {
                const float d_v = dv[(int64_t)r * U + j];
                const float *retrieve = s.p + (int64_t)r * 2 * UM + j * M;
                for (int m = 0; m < M; ++m) {
                    const int64_t i = (int64_t)r * UM + j * M + m;
                    dz[(int64_t)r * 2 * UM + j * M + m] = d_v * traces[i]; /* d retrieve */
                    carried[i] += d_v * retrieve[m];
                }
            }
        /* Through the softmaxes and the squares: d z = p (d p - <p, d p>) (-2 (z - ln tau)). */
        for (int64_t g = 0; g < (int64_t)R * 2 * U; ++g) {
            const float *p = s.p + g * M, *z = s.z + g * M;
            float *d = dz + g * M, dot = 0.0f;
            for (int m = 0; m < M; ++m) dot += p[m] * d[m];
            for (int m = 0; m < M; ++m) d[m] = p[m] * (d[m] - dot) * (-2.0f * (z[m] - a->ln_tau[m]));
        }
        for (int r = 0; r < R; ++r)
            memcpy(d_inputs + ((int64_t)(first + r) * T + t) * P, dz + (int64_t)r * 2 * UM, 2 * UM * sizeof(float));
        a->sgemm(ROW_MAJOR, TRANS, NO_TRANS, U, 2 * UM, R, 1.0f, s.h, U, dz, 2 * UM, 1.0f, d_w_rs, 2 * UM);
        a->sgemm(ROW_MAJOR, NO_TRANS, TRANS, R, U, 2 * UM, 1.0f, dz, 2 * UM, a->w_rs, 2 * UM, 0.0f, dh, U);
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < U; ++j)
                for (int m = 0; m < M; ++m) carried[(int64_t)r * UM + j * M + m] += dh[(int64_t)r * U + j];
    }
    for (int r = 0; r < R; ++r) memcpy(d_initial + (int64_t)(first + r) * UM, carried + (int64_t)r * UM, UM * sizeof(float));
}
