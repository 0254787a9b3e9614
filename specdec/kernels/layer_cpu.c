/* A decoder layer's float32 work between its products on the CPU, for the few tokens of a decode
 * or verify pass, each piece one call instead of several tensor ops - which at a decode's width
 * are mostly dispatch (docs/QUANTIZATION.md has the profile):
 * - specdec_attention: the rotary embedding of q and k, the cache write of k and v, and
 *   softmax(q kᵀ × scale) v against each row's own slot;
 * - specdec_rms_norm: x / sqrt(mean(x²) + eps) × w, a row at a time;
 * - specdec_silu_mul: silu(gate) × up from the fused gate/up projection's output.
 *
 * What they compute is the decoder's tensor-op path (specdec/models/decoder.py: Attention.forward
 * with apply_rope, KVCache.write/read and an attention backend; RMSNorm); tests/models/
 * test_layer_cpu.py holds the two together: the cache writes bitwise, the outputs to float32
 * rounding.
 * - Rotary: rotate_half's convention on the leading rotary_dim features, one float32 operation at
 *   a time in apply_rope's order (built with -ffp-contract=off, no fast-math), so the rotated k
 *   written to the cache is bitwise apply_rope's.
 * - Each query token is computed alone, its keys and values summed in position order with a fixed
 *   lane split, whatever the batch, the pass's width or the thread count: a row's output is
 *   bitwise the same in a 1-token decode and in a 5-token verify, which keeps speculative output
 *   equal to the target alone. For head_dim 64 and 128 a vector loop reads each key and value
 *   row once for all the queries of a KV head, with bitwise the scalar loop's numbers.
 * - The softmax's exponential is our own (`exp_scalar`, relative error below 2e-7; `exp16` is it
 *   on 16 lanes): libm's expf per score was half the time at long contexts.
 *
 * Layouts (all contiguous): qkv [B, T, H + 2 KVH, D] (q heads, then k, then v: the fused
 * projection's output); cos, sin [P, rotary_dim]; one layer's cache k, v [slots, KVH, C, D];
 * out [B, T, H, D] (the o projection's input, [B, T, H × D]).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16 /* dot products are summed in 16 independent lanes, then in a fixed tree */
#define MAX_HEAD_DIM 512
/* Below this many multiply-adds a call runs on one thread: waking the others costs more. */
#define PARALLEL_WORK (1 << 17)

/* e^x for x <= 0 (a score minus its row's maximum): x = n ln 2 + r with |r| <= ln 2 / 2, e^r by
 * its degree-6 Taylor polynomial (relative error below 2e-7), times 2^n built in the exponent
 * bits. Below -87 it returns e^-87 (~1.6e-38, nothing next to the maximum's 1); a NaN stays NaN.
 * Four times cheaper than libm's expf per score. `exp16` (the vector loop's) runs the same
 * EXP_REDUCED on 16 lanes - elementwise IEEE float32, no contraction - so both loops give bitwise
 * the same numbers. */
#define EXP_REDUCED(T, x, n, p) /* for x (float or v16, floored): n, and p = e^(x - n ln 2) */      \
    const T n = ((x) * 1.44269504f + 12582912.0f) - 12582912.0f; /* 1.5 * 2^23: rounds */        \
    const T p##_r = ((x) - n * 0.693359375f) - n * -2.12194440e-4f;                              \
    T p = p##_r * (1.0f / 720.0f) + (1.0f / 120.0f);                                             \
    p = p * p##_r + (1.0f / 24.0f);                                                              \
    p = p * p##_r + (1.0f / 6.0f);                                                               \
    p = p * p##_r + 0.5f;                                                                        \
    p = p * p##_r + 1.0f;                                                                        \
    p = p * p##_r + 1.0f

static inline float exp_scalar(float x) {
    if (x < -87.0f) x = -87.0f;
    EXP_REDUCED(float, x, n, p);
    const int32_t bits = (x == x ? (int32_t)n + 127 : 127) * (1 << 23); /* a NaN's p is NaN anyway */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The vector loop needs GCC's vector extensions (__builtin_shuffle) and target_clones; other
 * compilers build the scalar loop alone (the same numbers, slower). */
#if defined(__GNUC__) && !defined(__clang__) && !defined(SPECDEC_NO_VECTOR)
#define VECTOR_LOOP 1
#else
#define VECTOR_LOOP 0
#endif

/* out = x rotated (rotate_half: out[i] = x[i] c[i] - x[i + h] s[i], out[i + h] = x[i + h] c[i + h]
 * + x[i] s[i + h] for i < h = rotary_dim / 2), the features past rotary_dim copied. apply_rope
 * computes x * cos + cat(-x2, x1) * sin: (-a) * s is exactly -(a * s), and p + -(q) is p - q. */
static void rotate(const float *x, const float *c, const float *s, int64_t rotary_dim, int64_t d, float *out) {
    const int64_t h = rotary_dim / 2;
    for (int64_t i = 0; i < h; i++) {
        out[i] = x[i] * c[i] - x[i + h] * s[i];
        out[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
    }
    for (int64_t i = rotary_dim; i < d; i++) out[i] = x[i];
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; i++, j++) acc[j] += a[i] * b[i];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

/* One query token of one head against positions [lo, hi] of its KV head's cache rows. */
static void attend(const float *q, const float *k, const float *v, int64_t lo, int64_t hi, int64_t d,
                   float scale, float *scores, float *out) {
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    if (lo > hi) return; /* nothing to attend to (a padding token past a window): zeros */
    float top = -INFINITY;
    for (int64_t p = lo; p <= hi; p++) {
        const float s = dot(q, k + p * d, d) * scale;
        scores[p - lo] = s;
        if (s > top) top = s;
    }
    float total = 0.0f;
    for (int64_t p = lo; p <= hi; p++) {
        const float e = exp_scalar(scores[p - lo] - top);
        scores[p - lo] = e;
        total += e;
        const float *vp = v + p * d;
        for (int64_t i = 0; i < d; i++) out[i] += e * vp[i];
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < d; i++) out[i] *= inv;
}

#if VECTOR_LOOP
/* `attend` for every query that shares one KV head's rows (a row's tokens × the query heads of
 * its group), with head_dim = 16 × ND: each key and value row is read once for all of them,
 * instead of once a query, and the 16 lanes of `dot` are one vector (GCC's vector extension: one
 * zmm on AVX-512, two ymm on AVX2, four xmm otherwise; `target_clones` builds each and picks at
 * load time). Each query still gets exactly `attend`'s operations in `attend`'s order -
 * elementwise IEEE float32 without contraction, the shuffle tree adding acc[j] + acc[j + w] as
 * `dot` does, its own positions in increasing order - so the numbers are bitwise `attend`'s on
 * every ISA and whatever else is in the group (tests/models/test_layer_cpu.py holds them equal).
 * q [nq, d] rotated; query i attends to [lo[i], hi[i]] (non-empty); scores [nq, span] and acc
 * [nq, d] are scratch; out[i] is where query i's output goes. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
#pragma GCC diagnostic ignored "-Wpsabi" /* only ever inlined: no v16 crosses a call */

__attribute__((always_inline)) static inline v16 load16(const float *p) {
    v16 x;
    memcpy(&x, p, sizeof x);
    return x;
}

__attribute__((always_inline)) static inline void store16(float *p, v16 x) { memcpy(p, &x, sizeof x); }

__attribute__((always_inline)) static inline float hsum16(v16 a) {
    a = a + __builtin_shuffle(a, (i16){8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15});
    a = a + __builtin_shuffle(a, (i16){4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7});
    a = a + __builtin_shuffle(a, (i16){2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3});
    a = a + __builtin_shuffle(a, (i16){1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1});
    return a[0];
}

/* `exp_scalar` on 16 lanes: the same floor, EXP_REDUCED and scaling by 2^n. */
__attribute__((always_inline)) static inline v16 exp16(v16 x) {
    const v16 floor = (v16){0} - 87.0f;
    const i16 low = x < floor; /* NaN compares false */
    x = (v16)(((i16)x & ~low) | ((i16)floor & low));
    EXP_REDUCED(v16, x, n, p);
    const i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
    return p * (v16)bits;
}


#define ATTEND_GROUP(ND)                                                                               \
    __attribute__((target_clones("avx512f", "avx2", "default"))) static void attend_group##ND(         \
        const float *q, int64_t nq, const int64_t *lo, const int64_t *hi, const float *k, const float *v, \
        float scale, float *scores, float *acc, float **out) {                                         \
        const int64_t d = 16 * (ND);                                                                   \
        int64_t first = lo[0], last = hi[0];                                                           \
        for (int64_t i = 1; i < nq; i++) {                                                             \
            if (lo[i] < first) first = lo[i];                                                          \
            if (hi[i] > last) last = hi[i];                                                            \
        }                                                                                              \
        const int64_t span = last - first + 1;                                                         \
        float top[nq], total[nq];                                                                      \
        for (int64_t i = 0; i < nq; i++) top[i] = -INFINITY, total[i] = 0.0f;                          \
        for (int64_t p = first; p <= last; p++) {                                                      \
            v16 kv[ND];                                                                                \
            for (int c = 0; c < (ND); c++) kv[c] = load16(k + p * d + 16 * c);                         \
            for (int64_t i = 0; i < nq; i++) {                                                         \
                if (p < lo[i] || p > hi[i]) continue;                                                  \
                v16 sum = (v16){0};                                                                    \
                for (int c = 0; c < (ND); c++) sum = sum + load16(q + i * d + 16 * c) * kv[c];         \
                const float score = hsum16(sum) * scale;                                               \
                scores[i * span + p - first] = score;                                                  \
                if (score > top[i]) top[i] = score;                                                    \
            }                                                                                          \
        }                                                                                              \
        for (int64_t i = 0; i < nq; i++) {                                                             \
            for (int c = 0; c < (ND); c++) store16(acc + i * d + 16 * c, (v16){0});                    \
            float *row = scores + i * span - first;                                                    \
            int64_t p = lo[i];                                                                         \
            for (; p + 16 <= hi[i] + 1; p += 16) store16(row + p, exp16(load16(row + p) - top[i]));    \
            for (; p <= hi[i]; p++) row[p] = exp_scalar(row[p] - top[i]);                              \
            for (p = lo[i]; p <= hi[i]; p++) total[i] += row[p];                                       \
        }                                                                                              \
        for (int64_t p = first; p <= last; p++) {                                                      \
            v16 vv[ND];                                                                                \
            for (int c = 0; c < (ND); c++) vv[c] = load16(v + p * d + 16 * c);                         \
            for (int64_t i = 0; i < nq; i++) {                                                         \
                if (p < lo[i] || p > hi[i]) continue;                                                  \
                const float e = scores[i * span + p - first];                                          \
                for (int c = 0; c < (ND); c++)                                                         \
                    store16(acc + i * d + 16 * c, load16(acc + i * d + 16 * c) + e * vv[c]);           \
            }                                                                                          \
        }                                                                                              \
        for (int64_t i = 0; i < nq; i++) {                                                             \
            const float inv = 1.0f / total[i];                                                         \
            for (int c = 0; c < (ND); c++) store16(out[i] + 16 * c, load16(acc + i * d + 16 * c) * inv); \
        }                                                                                              \
    }
ATTEND_GROUP(4) /* head_dim 64 (SmolLM2, Llama 3.2 1B) */
ATTEND_GROUP(8) /* head_dim 128 (Llama 3 8B, Qwen, Mistral) */
#endif

/* Returns 0, -1 if scratch could not be allocated, -2 if head_dim is past MAX_HEAD_DIM.
 * `portable`: the scalar `attend` for every head_dim (the tests compare the two).
 * Token j of row r sits at position start[r] + j; the first n_valid[r] are real and write their
 * k, v there, the rest are padding and write to the scratch position (capacity - 1), as
 * KVCache.write does. Every token attends causally to positions < kv_len of its row's slot (and,
 * with window > 0, to the last `window` of them); the rotary tables are read at the position,
 * clamped to the table. */
int specdec_attention(const float *qkv, int64_t b, int64_t t, int64_t heads, int64_t kv_heads, int64_t d,
                      int64_t rotary_dim, const float *cos, const float *sin, int64_t table_positions,
                      const int64_t *start, const int64_t *n_valid, const int64_t *slots, float *k_cache,
                      float *v_cache, int64_t capacity, int64_t kv_len, int64_t window, float scale,
                      float *out, int threads, int portable) {
    if (d > MAX_HEAD_DIM) return -2;
    const int64_t width = (heads + 2 * kv_heads) * d, group = heads / kv_heads;

    /* The writes first, on one thread: padding tokens all write the one scratch row. */
    for (int64_t r = 0; r < b; r++)
        for (int64_t j = 0; j < t; j++) {
            const int64_t pos = start[r] + j, at = j < n_valid[r] ? pos : capacity - 1;
            const int64_t row = pos < table_positions ? pos : table_positions - 1;
            const float *c = cos + row * rotary_dim, *s = sin + row * rotary_dim;
            const float *token = qkv + (r * t + j) * width;
            for (int64_t h = 0; h < kv_heads; h++) {
                const int64_t place = ((slots[r] * kv_heads + h) * capacity + at) * d;
                rotate(token + (heads + h) * d, c, s, rotary_dim, d, k_cache + place);
                memcpy(v_cache + place, token + (heads + kv_heads + h) * d, sizeof(float) * (size_t)d);
            }
        }

    /* One task per (row, KV head, part of the row's tokens): those tokens × the query heads of the
     * KV head's group. A row's tokens are split in parts only to give every thread work (a decode
     * has as many tasks as KV heads); which queries share a task never changes their numbers. */
    const int vector = VECTOR_LOOP && !portable && (d == 64 || d == 128);
    if (threads < 1) threads = 1;
    if ((double)b * (double)t * (double)heads * (double)kv_len * (double)d < (double)PARALLEL_WORK) threads = 1;
    int64_t parts = 1;
    while (parts < t && b * kv_heads * parts < 2 * threads) parts++;
    const int64_t tasks = b * kv_heads * parts, nq_max = ((t + parts - 1) / parts) * group;
    if (threads > tasks) threads = (int)(tasks > 0 ? tasks : 1);
    const int64_t span = kv_len > 0 ? kv_len : 1;
    /* Per thread: rotated q, scores and accumulators of nq_max queries, their bounds and outputs. */
    const int64_t per_thread = nq_max * (2 * d + span);
    float *scratch = malloc(sizeof(float) * (size_t)(threads * per_thread));
    int64_t *bounds = malloc(sizeof(int64_t) * (size_t)(threads * 2 * nq_max));
    float **outs = malloc(sizeof(float *) * (size_t)(threads * nq_max));
    if (!scratch || !bounds || !outs) {
        free(scratch);
        free(bounds);
        free(outs);
        return -1;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t task = 0; task < tasks; task++) {
#ifdef _OPENMP
        const int64_t me = omp_get_thread_num();
#else
        const int64_t me = 0;
#endif
        float *q = scratch + me * per_thread, *acc = q + nq_max * d, *scores = acc + nq_max * d;
        int64_t *lo = bounds + me * 2 * nq_max, *hi = lo + nq_max;
        float **out_of = outs + me * nq_max;
        const int64_t part = task % parts, r = task / parts / kv_heads, kvh = task / parts % kv_heads;
        const int64_t base = (slots[r] * kv_heads + kvh) * capacity * d;
        const int64_t j0 = part * t / parts, j1 = (part + 1) * t / parts;
        int64_t nq = 0;
        for (int64_t j = j0; j < j1; j++) {
            const int64_t pos = start[r] + j, row = pos < table_positions ? pos : table_positions - 1;
            const int64_t last = pos < kv_len - 1 ? pos : kv_len - 1;
            const int64_t first = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
            for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
                const int64_t token = r * t + j;
                float *o = out + (token * heads + h) * d;
                float *qi = vector ? q + nq * d : q;
                rotate(qkv + token * width + h * d, cos + row * rotary_dim, sin + row * rotary_dim, rotary_dim,
                       d, qi);
                if (!vector || first > last) { /* the scalar loop, or nothing to attend to: zeros */
                    attend(qi, k_cache + base, v_cache + base, first, last, d, scale, scores, o);
                    continue;
                }
                lo[nq] = first, hi[nq] = last, out_of[nq] = o;
                nq++;
            }
        }
#if VECTOR_LOOP
        if (nq && d == 64)
            attend_group4(q, nq, lo, hi, k_cache + base, v_cache + base, scale, scores, acc, out_of);
        else if (nq)
            attend_group8(q, nq, lo, hi, k_cache + base, v_cache + base, scale, scores, acc, out_of);
#else
        (void)acc;
#endif
    }
    free(bounds);
    free(outs);
    free(scratch);
    return 0;
}

/* rows [r, n] -> out [r, n]: out = w × (x × (1 / sqrt(mean(x²) + eps))), the sum of squares in
 * double (in order), so a row's numbers depend on that row alone. */
void specdec_rms_norm(const float *rows, const float *w, int64_t r, int64_t n, float eps, float *out) {
    for (int64_t i = 0; i < r; i++) {
        const float *x = rows + i * n;
        float *o = out + i * n;
        double squares = 0.0;
        for (int64_t j = 0; j < n; j++) squares += (double)x[j] * (double)x[j];
        const float inv = 1.0f / sqrtf((float)(squares / (double)n) + eps);
        for (int64_t j = 0; j < n; j++) o[j] = w[j] * (x[j] * inv);
    }
}

/* rows [r, 2n] (gate, then up) -> out [r, n]: gate × (1 / (1 + exp(-gate))) × up. Rows split over
 * `threads` once there are enough of them (a 64-row batch of SmolLM2 is 98 k exponentials: ~3 ms
 * on one core); each element is computed alone, so the split changes no number. */
void specdec_silu_mul(const float *rows, int64_t r, int64_t n, float *out, int threads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (r * n >= 32768)
#else
    (void)threads;
#endif
    for (int64_t i = 0; i < r; i++) {
        const float *gate = rows + i * 2 * n, *up = gate + n;
        float *o = out + i * n;
        for (int64_t j = 0; j < n; j++) o[j] = gate[j] * (1.0f / (1.0f + expf(-gate[j]))) * up[j];
    }
}
