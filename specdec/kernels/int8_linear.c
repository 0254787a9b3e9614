/* CPU int8's whole product in one call: y = x Wᵀ (+ b) with int8 weights (a scale per output
 * channel) and each activation row quantized on its own scale into two int8 digits.
 *
 * Why two digits and why per row: specdec/models/quant_linear.py (Int8LinearCPU). Why our own
 * product instead of fbgemm's: fbgemm wanted the rows as floats it re-quantized on one scale per
 * tensor, so each product was three calls and a dozen buffers; here the quantizing, both digits'
 * integer products and the rescaling are one pass over the weights, which are read once for every
 * row (docs/QUANTIZATION.md has the timings).
 *
 * The numbers are exact by construction, so every path here and the tensor-op reference
 * (`int8_linear_reference` in specdec/kernels/int8_linear.py) agree bit for bit:
 * - the digits: one IEEE float32 operation per step, in the reference's order (built with
 *   -ffp-contract=off and without -ffast-math);
 * - the products: integer dot products in int32, exact in any order, so the AVX-512 VNNI, AVX2
 *   and portable loops below give the same integers (tests/models/test_int8_linear.py runs each
 *   path this machine has against the reference);
 * - the rescaling: float32, elementwise, the reference's order.
 * A row's numbers never depend on the other rows, which is what keeps speculative output equal to
 * the quantized target alone at every verify width.
 *
 * Weight layout (`pack_weights` in int8_linear.py): output channels padded to a multiple of 4 and
 * input columns to a multiple of 64 with zeros, then each block of 4 channels interleaved per 64
 * columns ([N/4][K/64][4][64]), so a block's weights are one sequential stream.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPECDEC_X86 1
#endif

/* Round half to even for |x| < 2^22 in the default rounding mode, as torch.round does: adding and
 * subtracting 1.5 * 2^23 leaves no bits below the units. The sign is put back, so (-0.5, -0]
 * rounds to -0 as torch.round gives it. */
static inline float round_half_even(float x) {
    const float magic = 12582912.0f;
    return copysignf((x + magic) - magic, x);
}

static inline int8_t digit(float x) { /* clamp to [-127, 127]; a NaN row's digits are 0 (its amax is NaN) */
    if (x != x) return 0;
    return (int8_t)(x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x));
}

/* rows [r, k] -> codes [2r, kp] (token i: row 2i its coarse digit, row 2i + 1 its fine one; zero
 * past k) and amax [r]. a = max |x| (at least tiny; NaN for a row that is not finite),
 * s = (1 / a) * 127, steps = x * s, coarse = round(steps), fine = round((steps - coarse) * 254). */
static void quantize_rows(const float *rows, int64_t r, int64_t k, int64_t kp, float tiny, int8_t *codes,
                          float *amax) {
    for (int64_t i = 0; i < r; i++) {
        const float *x = rows + i * k;
        float a = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const float v = fabsf(x[j]);
            if (!(v <= 3.40282347e38f)) { /* NaN or inf: the row's output is NaN, as in the reference */
                a = NAN;
                break;
            }
            a = v > a ? v : a;
        }
        a = a < tiny ? tiny : a; /* keeps a NaN */
        amax[i] = a;
        const float s = (1.0f / a) * 127.0f;
        int8_t *coarse = codes + 2 * i * kp, *fine = coarse + kp;
        for (int64_t j = 0; j < k; j++) {
            const float steps = x[j] * s;
            float c = round_half_even(steps);
            c = c < -127.0f ? -127.0f : (c > 127.0f ? 127.0f : c);
            coarse[j] = digit(c);
            fine[j] = digit(round_half_even((steps - c) * 254.0f));
        }
        for (int64_t j = k; j < kp; j++) coarse[j] = fine[j] = 0;
    }
}

/* y[p] = (coarse[p] + fine[p] * (1 / 254)) * ((amax * (1 / 127)) * wscale[p]) (+ bias[p]), p < nb */
static inline void rescale(const int32_t *coarse, const int32_t *fine, int64_t nb, float amax,
                           const float *wscale, const float *bias, float *y) {
    const float s = amax * (1.0f / 127.0f);
    for (int64_t p = 0; p < nb; p++) {
        float v = (float)coarse[p] + (float)fine[p] * (1.0f / 254.0f);
        v = v * (s * wscale[p]);
        y[p] = bias ? v + bias[p] : v;
    }
}

/* ------------------------------------------------------------------ portable (any CPU) */

static void channels_portable(const int8_t *codes, int64_t r, const int8_t *w, const float *wscale,
                              const float *bias, const float *amax, int64_t j0, int64_t j1, int64_t kp,
                              int64_t n, float *out) {
    for (int64_t j = j0; j < j1; j += 4) {
        const int8_t *wb = w + j * kp;
        for (int64_t i = 0; i < r; i++) {
            int32_t dots[2][4] = {{0}};
            for (int d = 0; d < 2; d++) {
                const int8_t *a = codes + (2 * i + d) * kp;
                for (int64_t t = 0; t < kp; t += 64)
                    for (int p = 0; p < 4; p++) {
                        int32_t sum = 0;
                        for (int e = 0; e < 64; e++) sum += (int32_t)a[t + e] * (int32_t)wb[t * 4 + p * 64 + e];
                        dots[d][p] += sum;
                    }
            }
            rescale(dots[0], dots[1], 4, amax[i], wscale + j, bias ? bias + j : 0, out + i * n + j);
        }
    }
}

#ifdef SPECDEC_X86
/* ------------------------------------------------------------------ AVX2 */

/* |a| (<= 127, unsigned) times sign(a)·w (|.| <= 127): pairs of products stay under int16's limit
 * (2 · 127 · 127 = 32258), so maddubs never saturates and the sums are exact. */
__attribute__((target("avx2"))) static inline __m256i dot32_avx2(__m256i acc, __m256i a, __m256i w) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(w, a));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(products, ones));
}

__attribute__((target("avx2"))) static inline int32_t hsum_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2"))) static void channels_avx2(const int8_t *codes, int64_t r, const int8_t *w,
                                                          const float *wscale, const float *bias,
                                                          const float *amax, int64_t j0, int64_t j1,
                                                          int64_t kp, int64_t n, float *out) {
    for (int64_t j = j0; j < j1; j += 4) {
        const int8_t *wb = w + j * kp;
        for (int64_t i = 0; i < r; i++) { /* one token: its two digit rows against 4 channels */
            const int8_t *a0 = codes + 2 * i * kp, *a1 = a0 + kp;
            __m256i acc[2][4];
            for (int p = 0; p < 4; p++) acc[0][p] = acc[1][p] = _mm256_setzero_si256();
            for (int64_t t = 0; t < kp; t += 64)
                for (int half = 0; half < 64; half += 32) {
                    const __m256i c = _mm256_loadu_si256((const __m256i *)(a0 + t + half));
                    const __m256i f = _mm256_loadu_si256((const __m256i *)(a1 + t + half));
                    for (int p = 0; p < 4; p++) {
                        const __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + t * 4 + p * 64 + half));
                        acc[0][p] = dot32_avx2(acc[0][p], c, wv);
                        acc[1][p] = dot32_avx2(acc[1][p], f, wv);
                    }
                }
            int32_t dots[2][4];
            for (int p = 0; p < 4; p++) {
                dots[0][p] = hsum_avx2(acc[0][p]);
                dots[1][p] = hsum_avx2(acc[1][p]);
            }
            rescale(dots[0], dots[1], 4, amax[i], wscale + j, bias ? bias + j : 0, out + i * n + j);
        }
    }
}

/* ------------------------------------------------------------------ AVX-512 VNNI */

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* The four lanes' sums of four accumulators, as one vector. */
VNNI static inline __m128i sum4_vnni(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* A block of 4 channels against `rows` code rows (2 or 4: one token or two; a constant once
 * inlined, so the 16 accumulators stay in registers). vpdpbusd multiplies unsigned by signed
 * bytes, so the codes go in shifted by 128 (a xor of the sign bit) and 128 · Σw is taken off. */
VNNI __attribute__((always_inline)) static inline void block_vnni(const int8_t *a, const int8_t *wb, int64_t kp,
                                                                 const int rows, __m512i acc[4][4]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int q = 0; q < rows; q++)
        for (int p = 0; p < 4; p++) acc[q][p] = _mm512_setzero_si512();
    for (int64_t t = 0; t < kp; t += 64) {
        __m512i wv[4];
        for (int p = 0; p < 4; p++) wv[p] = _mm512_loadu_si512((const void *)(wb + t * 4 + p * 64));
        for (int q = 0; q < rows; q++) {
            const __m512i av = _mm512_xor_si512(_mm512_loadu_si512((const void *)(a + q * kp + t)), flip);
            for (int p = 0; p < 4; p++) acc[q][p] = _mm512_dpbusd_epi32(acc[q][p], av, wv[p]);
        }
    }
}

VNNI static void channels_vnni(const int8_t *codes, int64_t r, const int8_t *w, const int32_t *wsum,
                               const float *wscale, const float *bias, const float *amax, int64_t j0,
                               int64_t j1, int64_t kp, int64_t n, float *out) {
    for (int64_t j = j0; j < j1; j += 4) {
        const int8_t *wb = w + j * kp;
        const __m128i shift = _mm_slli_epi32(_mm_loadu_si128((const __m128i *)(wsum + j)), 7);
        for (int64_t i = 0; i < r; i += 2) {
            const int rows = r - i < 2 ? 2 : 4;
            __m512i acc[4][4];
            if (rows == 4)
                block_vnni(codes + 2 * i * kp, wb, kp, 4, acc);
            else
                block_vnni(codes + 2 * i * kp, wb, kp, 2, acc);
            for (int q = 0; q < rows; q += 2) {
                int32_t coarse[4], fine[4];
                _mm_storeu_si128((__m128i *)coarse,
                                 _mm_sub_epi32(sum4_vnni(acc[q][0], acc[q][1], acc[q][2], acc[q][3]), shift));
                _mm_storeu_si128((__m128i *)fine, _mm_sub_epi32(sum4_vnni(acc[q + 1][0], acc[q + 1][1],
                                                                          acc[q + 1][2], acc[q + 1][3]),
                                                                shift));
                const int64_t token = i + q / 2;
                rescale(coarse, fine, 4, amax[token], wscale + j, bias ? bias + j : 0, out + token * n + j);
            }
        }
    }
}
#endif

/* ------------------------------------------------------------------ entry points */

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };

/* The fastest path this CPU runs. */
int specdec_int8_best_isa(void) {
#ifdef SPECDEC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return ISA_VNNI;
    if (__builtin_cpu_supports("avx2")) return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

/* rows [r, k] float32; w the packed weights [np, kp] (np = n padded to 4), wsum [np] their channel
 * sums, wscale [np], bias [np] or NULL; out [r, np]. Returns 0, or -1 if the scratch could not be
 * allocated. The channel blocks are split over `threads` OpenMP threads (the same runtime as
 * PyTorch's where both link libgomp.so.1). */
int specdec_int8_linear(const float *rows, int64_t r, int64_t k, int64_t kp, const int8_t *w,
                        const int32_t *wsum, const float *wscale, const float *bias, int64_t np, float *out,
                        float tiny, int threads, int isa) {
    int8_t *codes = malloc((size_t)(2 * r * kp) + 1);
    float *amax = malloc(sizeof(float) * (size_t)r + 1);
    if (!codes || !amax) {
        free(codes);
        free(amax);
        return -1;
    }
    quantize_rows(rows, r, k, kp, tiny, codes, amax);
    const int64_t blocks = np / 4;
    if (threads < 1) threads = 1;
    if (threads > blocks) threads = (int)blocks;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t t = 0, nt = 1;
#endif
        const int64_t per = (blocks + nt - 1) / nt;
        const int64_t j0 = 4 * t * per, j1 = 4 * (t + 1) * per < np ? 4 * (t + 1) * per : np;
        if (j0 < j1) {
#ifdef SPECDEC_X86
            if (isa == ISA_VNNI)
                channels_vnni(codes, r, w, wsum, wscale, bias, amax, j0, j1, kp, np, out);
            else if (isa == ISA_AVX2)
                channels_avx2(codes, r, w, wscale, bias, amax, j0, j1, kp, np, out);
            else
#endif
                channels_portable(codes, r, w, wscale, bias, amax, j0, j1, kp, np, out);
        }
    }
    free(codes);
    free(amax);
    return 0;
}
