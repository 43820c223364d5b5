/* The kernels' products with one column (batch 1: a controller's step) as a vectorised dot per
 * row, the rest in the BLAS: OpenBLAS's sgemm spends microseconds setting up each call, more than
 * a layer's product at batch 1. */
#include "kernels.h"

static sgemm_fn blas; /* one library's: every caller sets the same */

void set_blas(sgemm_fn sgemm) { __atomic_store_n(&blas, sgemm, __ATOMIC_RELAXED); }

enum { ROW_MAJOR = 101, NO_TRANS = 111 };

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline float total(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

static inline void store(float *out, float sum, float alpha, float beta) {
    *out = beta == 0.0f ? alpha * sum : alpha * sum + beta * *out;
}

/* a (m, k) row-major times one column x (k contiguous floats) into y: y = alpha a x + beta y.
 * Four rows at a time, each with eight lanes of partial sums over k. */
static void matvec(int m, int k, float alpha, const float *a, int lda, const float *x, float beta, float *y,
                   int incy) {
    const int k8 = k - k % 8;
    int i = 0;
    for (; i + 4 <= m; i += 4) {
        const float *r0 = a + (int64_t)i * lda, *r1 = r0 + lda, *r2 = r1 + lda, *r3 = r2 + lda;
        v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int j = 0; j < k8; j += 8) {
            const v8 xj = load8(x + j);
            s0 += load8(r0 + j) * xj;
            s1 += load8(r1 + j) * xj;
            s2 += load8(r2 + j) * xj;
            s3 += load8(r3 + j) * xj;
        }
        float t0 = total(s0), t1 = total(s1), t2 = total(s2), t3 = total(s3);
        for (int j = k8; j < k; ++j) {
            t0 += r0[j] * x[j];
            t1 += r1[j] * x[j];
            t2 += r2[j] * x[j];
            t3 += r3[j] * x[j];
        }
        store(y + (int64_t)i * incy, t0, alpha, beta);
        store(y + (int64_t)(i + 1) * incy, t1, alpha, beta);
        store(y + (int64_t)(i + 2) * incy, t2, alpha, beta);
        store(y + (int64_t)(i + 3) * incy, t3, alpha, beta);
    }
    for (; i < m; ++i) {
        const float *r = a + (int64_t)i * lda;
        v8 s0 = {0};
        for (int j = 0; j < k8; j += 8) s0 += load8(r + j) * load8(x + j);
        float t = total(s0);
        for (int j = k8; j < k; ++j) t += r[j] * x[j];
        store(y + (int64_t)i * incy, t, alpha, beta);
    }
}

void small_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    /* One column of op(b), contiguous: b (k, 1) with ldb 1, or b^T of a (1, k) row. */
    if (order == ROW_MAJOR && trans_a == NO_TRANS && n == 1 && (trans_b != NO_TRANS || ldb == 1)) {
        matvec(m, k, alpha, a, lda, b, beta, c, ldc);
        return;
    }
    __atomic_load_n(&blas, __ATOMIC_RELAXED)(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
