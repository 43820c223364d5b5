/* The LTC's time loop as one CPU kernel: forward and backward over a range of batch rows.
 *
 * Run by the LTCSequence and LTCSensory primitives (primitives.cpp); ltc.py beside this file says
 * what the arguments hold. Plain C, no MLX or Python headers.
 *
 * One batch row at a time: per ODE unfold, for each presynaptic neuron i a loop over the
 * postsynaptic j that the compiler vectorises (the parameters are (S, S) row-major, j fastest).
 * The sigmoid is rational.h's, the function the MLX path computes; its gradient is the exact
 * s (1 - s) of its output, as fastmath's custom vjp.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "rational.h"

/* Synaptic sums from P presynaptic potentials v to S neurons: numerator[j], denominator[j] over
 * presynaptic i, the parameters (P, S) row-major. */
static void synapse_sums(int P, int S, const float *v, const float *sigma_, const float *mu_, const float *w_erev_,
                         const float *w_, float *numerator, float *denominator) {
    for (int j = 0; j < S; ++j) numerator[j] = denominator[j] = 0.0f;
    for (int i = 0; i < P; ++i) {
        const float vi = v[i];
        const float *sigma = sigma_ + (int64_t)i * S, *mu = mu_ + (int64_t)i * S;
        const float *w = w_ + (int64_t)i * S, *w_erev = w_erev_ + (int64_t)i * S;
        for (int j = 0; j < S; ++j) {
            float s = sigmoid(sigma[j] * (vi - mu[j]));
            numerator[j] += s * w_erev[j];
            denominator[j] += s * w[j];
        }
    }
}

/* The synaptic sums of one unfold. */
static void synapses(const ltc_args *a, const float *v, float *numerator, float *denominator) {
    synapse_sums(a->units, a->units, v, a->sigma, a->mu, a->w_erev, a->w, numerator, denominator);
}

static float timespan(const ltc_args *a, int b, int t) {
    return a->timespans ? a->timespans[(int64_t)b * a->steps + t] : 1.0f;
}

/* One unfold: v (S,) -> out (S,), the elementwise part after the synaptic sums. */
static void unfold(const ltc_args *a, const float *v, const float *cm_t, const float *u, float *numerator,
                   float *denominator, float *out) {
    const int S = a->units;
    synapses(a, v, numerator, denominator);
    for (int j = 0; j < S; ++j) {
        float n = cm_t[j] * v[j] + a->leak[j] + (numerator[j] + u[j]);
        float d = cm_t[j] + a->gleak[j] + (denominator[j] + u[S + j]);
        out[j] = n / (d + a->epsilon);
    }
}

/* Mixed memory's LSTM gates at step t of row b: z (4S) = lstm_inputs[b, t] + h W^T, the
 * recurrent weight read transposed (S, 4S) so that the loop over the 4S outputs vectorises. */
static void lstm_gates_row(const ltc_args *a, int b, int t, const float *h, float *z) {
    const int S = a->units, G = 4 * a->units;
    memcpy(z, a->lstm_inputs + ((int64_t)b * a->steps + t) * G, G * sizeof(float));
    for (int j = 0; j < S; ++j) {
        const float hj = h[j], *row = a->lstm_recurrent_t + (int64_t)j * G;
        for (int k = 0; k < G; ++k) z[k] += hj * row[k];
    }
}

/* The LSTM's step on row b: c (S) updated in place (from c_in), its output written to h (may be
 * h_in). z: 4S floats. */
static void lstm_row(const ltc_args *a, int b, int t, const float *h_in, const float *c_in, float *c, float *h,
                     float *z) {
    const int S = a->units;
    lstm_gates_row(a, b, t, h_in, z);
    for (int j = 0; j < S; ++j) {
        const float forget = sigmoid(z[2 * S + j] + a->forget_bias);
        c[j] = c_in[j] * forget + rational_tanh(z[j]) * sigmoid(z[S + j]);
        h[j] = rational_tanh(c[j]) * sigmoid(z[3 * S + j]);
    }
}

/* The "input" circuit's sensory sums of step t: the LSTM's output m (S) mapped into mapped (S),
 * then u (2 S): the numerator terms, then the denominator's. */
static void sensory_of_memory(const ltc_args *a, const float *m, float *mapped, float *u) {
    const int S = a->units;
    for (int i = 0; i < S; ++i) mapped[i] = m[i] * a->in_w[i] + a->in_b[i];
    synapse_sums(S, S, mapped, a->s_sigma, a->s_mu, a->s_w_erev, a->s_w, u, u + S);
}

/* Row b's forward pass from initial (B, S): every unfold's input state, then the last state, into
 * trail ((T U + 1) S floats) if not NULL; every step's state into states (B, T, S) if not NULL.
 * With mixed memory the LSTM's output is each step's first unfold input, the state it read goes
 * to h_in (T S floats) if not NULL and every step's memory to m->memory. work: 5 S floats, with
 * mixed memory 5 S more, in the "input" circuit 9 S more (there the LSTM's output is the
 * sensory synapses' input and the state is left alone). */
static void row_forward(const ltc_args *a, const ltc_memory *m, int b, const float *initial, float *trail,
                        float *h_in, float *states, float *work) {
    const int S = a->units, T = a->steps, U = a->unfolds;
    float *cm_t = work, *numerator = work + S, *denominator = work + 2 * S, *ping = work + 3 * S, *pong = work + 4 * S;
    float *c = work + 5 * S, *z = work + 6 * S, *lstm_out = work + 10 * S, *mapped = work + 11 * S, *sensory = work + 12 * S;
    float *v = trail ? trail : ping;
    memcpy(v, initial + (int64_t)b * S, S * sizeof(float));
    if (a->lstm_inputs) memcpy(c, m->initial_c + (int64_t)b * S, S * sizeof(float));
    for (int t = 0; t < T; ++t) {
        if (a->lstm_inputs) {
            if (h_in) memcpy(h_in + (int64_t)t * S, v, S * sizeof(float));
            lstm_row(a, b, t, v, c, c, a->input_circuit ? lstm_out : v, z);
            if (m->memory) memcpy(m->memory + ((int64_t)b * T + t) * S, c, S * sizeof(float));
            if (a->input_circuit) sensory_of_memory(a, lstm_out, mapped, sensory);
        }
        const float *u = a->input_circuit ? sensory : a->inputs + ((int64_t)b * T + t) * 2 * S;
        const float step = timespan(a, b, t) / (float)U;
        for (int j = 0; j < S; ++j) cm_t[j] = a->cm[j] / step;
        for (int k = 0; k < U; ++k) {
            float *next = trail ? v + S : (v == ping ? pong : ping);
            unfold(a, v, cm_t, u, numerator, denominator, next);
            v = next;
        }
        if (states) memcpy(states + ((int64_t)b * T + t) * S, v, S * sizeof(float));
    }
}

/* Rows [first, last): every step's state, states (B, T, S), from initial (B, S); with mixed
 * memory every step's memory into m->memory (B, T, S). scratch: 5 S floats, with mixed memory 10 S. */
void ltc_forward(const ltc_args *a, const float *initial, float *states, const ltc_memory *m, int first, int last,
                 float *scratch) {
    for (int b = first; b < last; ++b) row_forward(a, m, b, initial, NULL, NULL, states, scratch);
}

/* lstm_row's vjp at step t of row b: g (S), the output's cotangent, becomes h_in's; carried_c,
 * c's (from the step after), becomes c_in's, with m->d_memory[b, t] added; the LSTM input's
 * cotangent written to m->d_inputs[b, t], the transposed recurrent weight's added into
 * m->d_recurrent_t. z, dz: 4S floats each. */
static void lstm_row_vjp(const ltc_args *a, const ltc_memory *m, int b, int t, const float *h_in, float *g,
                         float *carried_c, float *z, float *dz) {
    const int S = a->units, T = a->steps, G = 4 * S;
    const float *c_in = t == 0 ? m->initial_c + (int64_t)b * S : m->memory + ((int64_t)b * T + t - 1) * S;
    const float *c_out = m->memory + ((int64_t)b * T + t) * S, *dm = m->d_memory + ((int64_t)b * T + t) * S;
    lstm_gates_row(a, b, t, h_in, z);
    for (int j = 0; j < S; ++j) {
        const float ti = rational_tanh(z[j]), si = sigmoid(z[S + j]);
        const float sf = sigmoid(z[2 * S + j] + a->forget_bias), so = sigmoid(z[3 * S + j]);
        const float tc = rational_tanh(c_out[j]), dh = g[j];
        const float dc = carried_c[j] + dm[j] + dh * so * (1.0f - tc * tc);
        dz[3 * S + j] = dh * tc * so * (1.0f - so);
        dz[2 * S + j] = dc * c_in[j] * sf * (1.0f - sf);
        dz[S + j] = dc * ti * si * (1.0f - si);
        dz[j] = dc * si * (1.0f - ti * ti);
        carried_c[j] = dc * sf;
    }
    memcpy(m->d_inputs + ((int64_t)b * T + t) * G, dz, G * sizeof(float));
    for (int j = 0; j < S; ++j) {
        const float *row = a->lstm_recurrent_t + (int64_t)j * G;
        float *d_row = m->d_recurrent_t + (int64_t)j * G;
        const float hj = h_in[j];
        float total = 0.0f;
        for (int k = 0; k < G; ++k) {
            d_row[k] += hj * dz[k];
            total += row[k] * dz[k];
        }
        g[j] = total;
    }
}

/* One presynaptic neuron's synapses in the backward pass of an unfold: their parameters'
 * gradients added into d_* (rows of (S, S)), the presynaptic potential's returned. along: S
 * floats of scratch, so that the loop over j has no reduction in it and vectorises. */
static float synapse_gradients(int S, float vi, const float *restrict sigma, const float *restrict mu,
                               const float *restrict w, const float *restrict w_erev, const float *restrict gn,
                               const float *restrict gd, float *restrict d_sigma, float *restrict d_mu,
                               float *restrict d_w, float *restrict d_w_erev, float *restrict along) {
    for (int j = 0; j < S; ++j) {
        float centred = vi - mu[j];
        float s = sigmoid(sigma[j] * centred);
        d_w_erev[j] += gn[j] * s;
        d_w[j] += gd[j] * s;
        float dx = (gn[j] * w_erev[j] + gd[j] * w[j]) * (s * (1.0f - s));
        d_sigma[j] += dx * centred;
        d_mu[j] -= dx * sigma[j];
        along[j] = dx * sigma[j];
    }
    float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int j = 0;
    for (; j + 8 <= S; j += 8)
        for (int l = 0; l < 8; ++l) partial[l] += along[j + l];
    float total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5]) + (partial[6] + partial[7]));
    for (; j < S; ++j) total += along[j];
    return total;
}

/* Gradients of rows [first, last) given d_states (B, T, S), the cotangent of every step's state:
 * d_inputs (B, T, 2S), d_initial (B, S) and d_timespans (B, T) (if timespans) written for these
 * rows; the parameters' (S, S) and (S,) gradients added into d_sigma ... d_leak (this caller's
 * own buffers, summed by the caller); with mixed memory m's too (its memory the forward pass's).
 * scratch: (T U + 1) S + 9 S floats, with mixed memory (T + 9) S more, in the "input" circuit
 * 8 S more after those (and d_inputs unused: the circuit's parameters' gradients go to m's). */
void ltc_backward(const ltc_args *a, const float *initial, const float *d_states, float *d_inputs,
                  float *d_initial, float *d_timespans, float *d_sigma, float *d_mu, float *d_w,
                  float *d_w_erev, float *d_cm, float *d_gleak, float *d_leak, const ltc_memory *m, int first,
                  int last, float *scratch) {
    const int S = a->units, T = a->steps, U = a->unfolds;
    float *trail = scratch; /* every unfold's input state, then the last state: (T U + 1, S) */
    /* mixed memory: the state each step's LSTM read (T, S) */
    float *h_in = trail + ((int64_t)T * U + 1) * S;
    float *cm_t = h_in + (a->lstm_inputs ? (int64_t)T * S : 0), *numerator = cm_t + S, *denominator = cm_t + 2 * S;
    float *g = cm_t + 3 * S, *g_prev = cm_t + 4 * S, *gn = cm_t + 5 * S, *gd = cm_t + 6 * S,
          *d_cm_t = cm_t + 7 * S, *along = cm_t + 8 * S;
    /* mixed memory: the memory's cotangent, the gates and theirs (4S each); row_forward's work is
     * cm_t's 9 rows and the first of these (10 S), all free until g is set */
    float *carried_c = cm_t + 9 * S, *z = carried_c + S, *dz = z + 4 * S;
    /* the "input" circuit: the step's LSTM output, its mapping, the sensory sums and their
     * cotangents, the memory after the step, the mapping's cotangent */
    float *lstm_out = dz + 4 * S, *mapped = lstm_out + S, *sensory = mapped + S, *d_sensory = sensory + 2 * S;
    float *c_after = d_sensory + 2 * S, *d_mapped = c_after + S;
    for (int b = first; b < last; ++b) {
        ltc_memory recompute = {0};
        if (a->lstm_inputs) recompute.initial_c = m->initial_c;
        row_forward(a, &recompute, b, initial, trail, a->lstm_inputs ? h_in : NULL, NULL, cm_t);
        for (int j = 0; j < S; ++j) g[j] = 0.0f;
        if (a->lstm_inputs)
            for (int j = 0; j < S; ++j) carried_c[j] = 0.0f;
        for (int t = T - 1; t >= 0; --t) {
            const float *u = a->inputs + ((int64_t)b * T + t) * 2 * S;
            float *du = d_inputs + ((int64_t)b * T + t) * 2 * S;
            if (a->input_circuit) { /* the step's LSTM output and sensory sums again */
                const float *c_in = t == 0 ? m->initial_c + (int64_t)b * S : m->memory + ((int64_t)b * T + t - 1) * S;
                lstm_row(a, b, t, h_in + (int64_t)t * S, c_in, c_after, lstm_out, z);
                sensory_of_memory(a, lstm_out, mapped, sensory);
                u = sensory;
                du = d_sensory;
            }
            const float ts = timespan(a, b, t), step = ts / (float)U;
            const float *ds = d_states + ((int64_t)b * T + t) * S;
            for (int j = 0; j < S; ++j) {
                cm_t[j] = a->cm[j] / step;
                g[j] += ds[j];
                du[j] = du[S + j] = d_cm_t[j] = 0.0f;
            }
            for (int k = U - 1; k >= 0; --k) {
                const float *v = trail + ((int64_t)t * U + k) * S, *out = trail + ((int64_t)t * U + k + 1) * S;
                /* with mixed memory the step's last output was overwritten by the next step's LSTM
                 * output (its first unfold's input); the LSTM's own input kept it */
                if (a->lstm_inputs && k == U - 1 && t + 1 < T) out = h_in + (int64_t)(t + 1) * S;
                synapses(a, v, numerator, denominator);
                for (int j = 0; j < S; ++j) {
                    float d = cm_t[j] + a->gleak[j] + (denominator[j] + u[S + j]) + a->epsilon;
                    gn[j] = g[j] / d;
                    gd[j] = -gn[j] * out[j];
                    g_prev[j] = gn[j] * cm_t[j];
                    d_cm_t[j] += gn[j] * v[j] + gd[j];
                    d_leak[j] += gn[j];
                    d_gleak[j] += gd[j];
                    du[j] += gn[j];
                    du[S + j] += gd[j];
                }
                for (int i = 0; i < S; ++i) {
                    const int64_t row = (int64_t)i * S;
                    g_prev[i] += synapse_gradients(S, v[i], a->sigma + row, a->mu + row, a->w + row, a->w_erev + row,
                                                   gn, gd, d_sigma + row, d_mu + row, d_w + row, d_w_erev + row, along);
                }
                float *swap = g; g = g_prev; g_prev = swap;
            }
            /* cm_t = cm / (ts / U): d cm = d cm_t U / ts, d ts = -sum_j d cm_t cm_t / ts */
            float d_ts = 0.0f;
            for (int j = 0; j < S; ++j) {
                d_cm[j] += d_cm_t[j] / step;
                d_ts -= d_cm_t[j] * cm_t[j];
            }
            if (d_timespans) d_timespans[(int64_t)b * T + t] = d_ts / ts;
            if (a->input_circuit) { /* du: through the sensory synapses and the mapping to the LSTM */
                for (int i = 0; i < S; ++i) {
                    const int64_t row = (int64_t)i * S;
                    d_mapped[i] = synapse_gradients(S, mapped[i], a->s_sigma + row, a->s_mu + row, a->s_w + row,
                                                    a->s_w_erev + row, du, du + S, m->d_s_sigma + row, m->d_s_mu + row,
                                                    m->d_s_w + row, m->d_s_w_erev + row, along);
                    m->d_in_w[i] += d_mapped[i] * lstm_out[i];
                    m->d_in_b[i] += d_mapped[i];
                    d_mapped[i] *= a->in_w[i];
                }
                /* d_mapped becomes the previous state's cotangent through the LSTM; g already holds
                 * the state's own */
                lstm_row_vjp(a, m, b, t, h_in + (int64_t)t * S, d_mapped, carried_c, z, dz);
                for (int j = 0; j < S; ++j) g[j] += d_mapped[j];
            } else if (a->lstm_inputs) /* g is the LSTM output's cotangent: through the LSTM to the state it read */
                lstm_row_vjp(a, m, b, t, h_in + (int64_t)t * S, g, carried_c, z, dz);
        }
        memcpy(d_initial + (int64_t)b * S, g, S * sizeof(float));
        if (a->lstm_inputs) memcpy(m->d_initial_c + (int64_t)b * S, carried_c, S * sizeof(float));
    }
}

/* The sensory synapses (LTCCell.project_input, dense, masked through w): rows [first, last) of
 * x (rows, I) -> out (rows, 2 S), each row's numerator then denominator sums over the inputs. */
void ltc_sensory_forward(int I, int S, const float *x, const float *sigma, const float *mu, const float *w_erev,
                         const float *w, float *out, int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r)
        synapse_sums(I, S, x + r * I, sigma, mu, w_erev, w, out + r * 2 * S, out + r * 2 * S + S);
}

/* Its gradients given d_out (rows, 2 S): d_x written for rows [first, last), the parameters'
 * (I, S) added into d_sigma, d_mu, d_w_erev, d_w (this caller's own). along: S floats. */
void ltc_sensory_backward(int I, int S, const float *x, const float *sigma, const float *mu, const float *w_erev,
                          const float *w, const float *d_out, float *d_x, float *d_sigma, float *d_mu,
                          float *d_w_erev, float *d_w, int64_t first, int64_t last, float *along) {
    for (int64_t r = first; r < last; ++r) {
        const float *gn = d_out + r * 2 * S, *gd = gn + S;
        for (int i = 0; i < I; ++i) {
            const int64_t o = (int64_t)i * S;
            d_x[r * I + i] = synapse_gradients(S, x[r * I + i], sigma + o, mu + o, w + o, w_erev + o, gn, gd,
                                               d_sigma + o, d_mu + o, d_w + o, d_w_erev + o, along);
        }
    }
}
