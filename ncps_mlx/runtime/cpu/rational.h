/* ncps_mlx.fastmath's rational tanh and sigmoid in C, for the CPU kernels (ncps_mlx/runtime/cpu).
 *
 * tanh(y) = y P(y^2) / Q(y^2) with y clipped to +-CLIP, the same coefficients and the same
 * Estrin order as fastmath.py, so the kernels and the MLX path compute the same function
 * (fastmath's docstring has its error bounds). The clip is written with comparisons, which g++
 * vectorises under -fno-trapping-math (they select, nothing traps); a NaN passes through.
 */
#ifndef NCPS_MLX_RATIONAL_H
#define NCPS_MLX_RATIONAL_H

#define CLIP 8.021990776062012f

static inline float rational_tanh(float x) {
    float y = x > CLIP ? CLIP : x;
    y = y < -CLIP ? -CLIP : y;
    float s = y * y + 1e-9f;
    float s2 = s * s;
    float s4 = s2 * s2;
    float p = (1.0f + 0.13450613617897034f * s) + s2 * (0.003578983014449477f + 2.2023032215656713e-05f * s) +
              1.5427520594357702e-08f * s4;
    float q = (1.0f + 0.46783941984176636f * s) + s2 * (0.026192206889390945f + 0.0003423633170314133f * s) +
              8.598630074629909e-07f * s4;
    return y * p / q;
}

static inline float sigmoid(float x) { return 0.5f + 0.5f * rational_tanh(0.5f * x); }

#endif
