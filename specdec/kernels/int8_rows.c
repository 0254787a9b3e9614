/* The per-row work around fbgemm's int8 product on the CPU, fused: one call before it and one
 * after, instead of about ten small tensor ops each (specdec/models/quant_linear.py, Int8LinearCPU,
 * says why the rows are split into two digits; this file only does the arithmetic).
 *
 * Every number here must be bitwise what the tensor-op reference computes (`_row_digits_reference`
 * and `_combine_reference` in specdec/kernels/int8_rows.py; tests/models/test_int8_rows.py holds
 * them equal), so each step is one IEEE operation in float32, in the reference's order, built with
 * -ffp-contract=off (no fused multiply-add) and without -ffast-math.
 *
 * Compiled at first use by specdec/kernels/int8_rows.py with the system's C compiler; where there
 * is none, the reference runs instead (the same numbers, slower).
 */
#include <math.h>
#include <stdint.h>

/* Round half to even for |x| < 2^22 in the default rounding mode, as torch.round does: adding and
 * subtracting 1.5 * 2^23 leaves no bits below the units. Portable (no SSE4.1 round instruction
 * assumed) and vectorisable; IEEE semantics forbid the compiler to fold it away. The sign is put
 * back, so (-0.5, -0] rounds to -0 as torch.round gives it, not +0. NaN stays NaN. */
static inline float round_half_even(float x) {
    const float magic = 12582912.0f;
    return copysignf((x + magic) - magic, x);
}

/* rows [r, k] -> digits [2r, k + 2] and amax [r].
 * Row i: a = max(|x|) (at least tiny), s = (1 / a) * levels, steps = x * s,
 * coarse = round(steps) clamped to [-top, top];
 * digits[i] = coarse * inv_levels, digits[r + i] = steps - coarse; both end in the guard pair +1, -1. */
void specdec_int8_row_digits(const float *rows, int64_t r, int64_t k, float levels, float inv_levels,
                             float top, float tiny, float *digits, float *amax) {
    const int64_t width = k + 2;
    for (int64_t i = 0; i < r; i++) {
        const float *x = rows + i * k;
        float a = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const float v = fabsf(x[j]);
            if (v != v) { /* a NaN row's maximum is NaN, as in torch.linalg.vector_norm(ord=inf) */
                a = v;
                break;
            }
            a = v > a ? v : a;
        }
        a = a < tiny ? tiny : a; /* clamp_(min=tiny) keeps a NaN */
        amax[i] = a;
        const float s = (1.0f / a) * levels;
        float *coarse_out = digits + i * width;
        float *fine_out = digits + (r + i) * width;
        for (int64_t j = 0; j < k; j++) {
            const float steps = x[j] * s;
            float c = round_half_even(steps);
            c = c < -top ? -top : c;
            c = c > top ? top : c;
            coarse_out[j] = c * inv_levels;
            fine_out[j] = steps - c;
        }
        coarse_out[k] = 1.0f;
        coarse_out[k + 1] = -1.0f;
        fine_out[k] = 1.0f;
        fine_out[k + 1] = -1.0f;
    }
}

/* both [2r, n] (fbgemm's products of the two digits) -> out [r, n]:
 * out[i, j] = (both[r + i, j] * inv_levels + both[i, j]) * amax[i] (+ bias[j]). */
void specdec_int8_row_combine(const float *both, int64_t r, int64_t n, const float *amax,
                              const float *bias, float inv_levels, float *out) {
    for (int64_t i = 0; i < r; i++) {
        const float *coarse = both + i * n;
        const float *fine = both + (r + i) * n;
        float *y = out + i * n;
        const float a = amax[i];
        if (bias) {
            for (int64_t j = 0; j < n; j++) {
                float t = fine[j] * inv_levels;
                t = t + coarse[j];
                t = t * a;
                y[j] = t + bias[j];
            }
        } else {
            for (int64_t j = 0; j < n; j++) {
                float t = fine[j] * inv_levels;
                t = t + coarse[j];
                y[j] = t * a;
            }
        }
    }
}
