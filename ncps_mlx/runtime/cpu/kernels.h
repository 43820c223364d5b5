/* The CPU kernels' arguments and entry points (cfc.c, ltc.c), for the MLX primitives in
 * primitives.cpp. Plain C: no MLX or Python headers. */
#ifndef NCPS_MLX_KERNELS_H
#define NCPS_MLX_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                         int lda, const float *b, int ldb, float beta, float *c, int ldc);

typedef struct {
    int32_t batch, steps, units, unfolds;
    float epsilon;
    const float *sigma, *mu, *w, *w_erev; /* (S, S) */
    const float *cm, *gleak, *leak;       /* (S,) */
    const float *inputs;                  /* (B, T, 2S): sensory numerator terms, then denominator */
    const float *timespans;               /* (B, T), or NULL: every step 1.0 */
    /* Mixed memory ("state" circuit), or lstm_inputs NULL: as lstm_args, batch-major. */
    const float *lstm_inputs;             /* (B, T, 4S) */
    const float *lstm_recurrent_t;        /* (S, 4S): the recurrent weight, transposed */
    float forget_bias;
    /* Mixed memory's "input" circuit: the LSTM's output, mapped (x in_w + in_b, (S,)), is the
     * cell's input through these sensory synapses ((S, S) each), computed each step; inputs is
     * unread and the state is left alone. */
    int32_t input_circuit;
    const float *s_sigma, *s_mu, *s_w_erev, *s_w, *in_w, *in_b;
} ltc_args;

/* Mixed memory ("state" circuit), or inputs NULL: before each step an LSTM over the whole state
 * (H rows) whose output replaces it, z = inputs[t] + recurrent h, gates (input, input gate, forget
 * gate, output gate) of H rows each, the forget gate shifted by forget_bias. */
typedef struct {
    const float *inputs;    /* (T, 4H, B): its input projection, bias included */
    const float *recurrent; /* (4H, H) */
    float forget_bias;
} lstm_args;

typedef struct {
    int32_t batch, steps, hidden, units, layers; /* B, T, H, backbone units and layers (>= 1) */
    int32_t mode, activation, ff_tanh, heads;
    int32_t input_size;                 /* I */
    const float *x;                     /* (B, T, I), the sequence itself: the first layer's input half is
                                         * computed here, block by block (a (T, units, B) projection made
                                         * beforehand was 26 MB of fresh pages a call at batch 1024) */
    const float *input_weight;          /* (units, I): the first layer's input half */
    const float *input_bias;            /* (units,): the first layer's bias */
    const float *timespans;             /* (T, B), or NULL: every step 1.0 */
    const float *state_weight;          /* (units, H): the first layer's state half */
    const float *const *hidden_weights; /* layers - 1 of (units, units) */
    const float *const *hidden_biases;  /* layers - 1 of (units,) */
    const float *head_weight;           /* (K, units): ff1, ff2, time_a, time_b (K = 4H), or with a timespan of 1
                                         * ff1, ff2, time_a + time_b (K = 3H); pure mode ff1 (K = H) */
    const float *head_bias;             /* (K,) */
    const float *w_tau, *A;             /* (H,), pure mode */
    lstm_args lstm;
    sgemm_fn sgemm;
    const float *keep; /* (T, layers - 1, units, B), or NULL: dropout after backbone layers 2..n, each
                        * activation times its entry (0, or 1 / (1 - rate)) */
    int32_t input_circuit; /* mixed memory's "input" circuit: the LSTM's output is the first layer's
                            * input (input_weight (units, H)), the state is left alone; x is unread */
} cfc_args;

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
    lstm_args lstm;                       /* over the S rows of all layers' states */
    sgemm_fn sgemm;
    int32_t input_circuit; /* mixed memory's "input" circuit: layer 0's input is the LSTM's output
                            * through input_weights[0] (K_0, S) and biases[0]; inputs is unread */
} wired_args;

typedef struct {
    int32_t batch, steps, units, unfolds;
    float delta_t, clip;          /* clip <= 0: no clip */
    const float *inputs;          /* (B, T, U): the input half of the tanh argument, bias included */
    const float *timespans;       /* (B, T), or NULL: every step 1.0 */
    const float *recurrent;       /* (U, U), f = tanh(u + h @ recurrent); NULL without global feedback */
    const float *tau;             /* (1,) */
    sgemm_fn sgemm;
} ctrnn_args;

typedef struct {
    int32_t batch, steps, units, scales; /* B, T, U, M */
    int32_t mozer;                       /* decay exp(-timespan / tau) (1) or fixed (0) */
    float clip;                          /* <= 0: no clip */
    const float *ln_tau;                 /* (M,) */
    const float *decay;                  /* (M,): the fixed decay, or mozer 1 / tau */
    const float *inputs;                 /* (B, T, 2 U M + U): the input halves of tau_r, tau_s, detect */
    const float *timespans;              /* (B, T), or NULL: every step 1.0 */
    const float *w_rs;                   /* (U, 2 U M): the state halves of tau_r and tau_s, transposed */
    const float *w_q;                    /* (U, U): detect's */
    sgemm_fn sgemm;
} ctgru_args;

/* An LTC's mixed memory, batch-major (B, T, S) and (B, S): as cfc_memory, NULL without. */
typedef struct {
    const float *initial_c;
    float *memory;
    const float *d_memory;
    float *d_inputs, *d_initial_c, *d_recurrent_t;
    float *d_s_sigma, *d_s_mu, *d_s_w_erev, *d_s_w, *d_in_w, *d_in_b; /* the "input" circuit's */
} ltc_memory;

void ltc_forward(const ltc_args *a, const float *initial, float *states, const ltc_memory *m, int first, int last,
                 float *scratch);
void ltc_backward(const ltc_args *a, const float *initial, const float *d_states, float *d_inputs,
                  float *d_initial, float *d_timespans, float *d_sigma, float *d_mu, float *d_w,
                  float *d_w_erev, float *d_cm, float *d_gleak, float *d_leak, const ltc_memory *m, int first,
                  int last, float *scratch);
void ltc_sensory_forward(int I, int S, const float *x, const float *sigma, const float *mu, const float *w_erev,
                         const float *w, float *out, int64_t first, int64_t last);
void ltc_sensory_backward(int I, int S, const float *x, const float *sigma, const float *mu, const float *w_erev,
                          const float *w, const float *d_out, float *d_x, float *d_sigma, float *d_mu,
                          float *d_w_erev, float *d_w, int64_t first, int64_t last, float *along);
/* With mixed memory: the LSTM's initial memory initial_c (H, B), every step's memory (T, H, B)
 * (forward: written; backward: read), its cotangent d_memory, and the gradients of its inputs,
 * initial memory and recurrent weight (the last added into). NULL without. */
typedef struct {
    const float *initial_c;
    float *memory;
    const float *d_memory;
    float *d_inputs, *d_initial_c, *d_recurrent;
} cfc_memory;

void cfc_forward(const cfc_args *a, const float *initial, float *states, const cfc_memory *m, int first, int last,
                 float *scratch);
void cfc_backward(const cfc_args *a, const float *initial, const float *states, const float *d_states, float *d_x,
                  float *d_input_weight, float *d_input_bias, float *d_initial, float *d_timespans, float *d_state_weight, float *const *d_hidden_weights, float *const *d_hidden_biases,
                  float *d_head_weight, float *d_head_bias, float *d_w_tau, float *d_A, float *d_keep,
                  const cfc_memory *m, int first, int last, float *scratch);
void wired_cfc_forward(const wired_args *a, const float *initial, float *states, const cfc_memory *m, int first,
                       int last, float *scratch);
void wired_cfc_backward(const wired_args *a, const float *initial, const float *states, const float *d_states,
                        float *d_inputs, float *d_initial, float *d_timespans, float *const *d_input_weights,
                        float *const *d_biases, float *const *d_state_weights, float *const *d_w_tau,
                        float *const *d_A, const cfc_memory *m, int first, int last, float *scratch);
void ctrnn_forward(const ctrnn_args *a, const float *initial, float *states, int first, int last, float *scratch);
void ctrnn_backward(const ctrnn_args *a, const float *initial, const float *states, const float *d_states,
                    float *d_inputs, float *d_initial, float *d_timespans, float *d_recurrent, float *d_tau,
                    int first, int last, float *scratch);
void ctgru_forward(const ctgru_args *a, const float *initial, float *outputs, float *states, int first, int last,
                   float *scratch);
void ctgru_backward(const ctgru_args *a, const float *initial, const float *states, const float *d_outputs,
                    const float *d_states, float *d_inputs, float *d_initial, float *d_timespans, float *d_w_rs,
                    float *d_w_q, int first, int last, float *scratch);
/* matvec.c: an sgemm that computes products with one column itself and passes the rest to the
 * BLAS given to set_blas. */
void set_blas(sgemm_fn sgemm);
void small_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc);
void tanh_array(const float *x, float *y, int64_t n);
void sigmoid_array(const float *x, float *y, int64_t n);

#ifdef __cplusplus
}
#endif

#endif
