/* rational.h's tanh and sigmoid over arrays, built with the loops' flags so that tests/test_cpu_kernels.py sweeps the
 * functions the kernels compute, as built (with FMA contraction where -mfma allows it), over the
 * whole float range. The kernels themselves inline them. */
#include <stdint.h>

#include "rational.h"

void tanh_array(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = rational_tanh(x[i]);
}

void sigmoid_array(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = sigmoid(x[i]);
}
