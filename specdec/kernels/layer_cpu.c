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
 *   equal to the target alone.
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
        const float e = expf(scores[p - lo] - top);
        scores[p - lo] = e;
        total += e;
        const float *vp = v + p * d;
        for (int64_t i = 0; i < d; i++) out[i] += e * vp[i];
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < d; i++) out[i] *= inv;
}

/* Returns 0, -1 if scratch could not be allocated, -2 if head_dim is past MAX_HEAD_DIM.
 * Token j of row r sits at position start[r] + j; the first n_valid[r] are real and write their
 * k, v there, the rest are padding and write to the scratch position (capacity - 1), as
 * KVCache.write does. Every token attends causally to positions < kv_len of its row's slot (and,
 * with window > 0, to the last `window` of them); the rotary tables are read at the position,
 * clamped to the table. */
int specdec_attention(const float *qkv, int64_t b, int64_t t, int64_t heads, int64_t kv_heads, int64_t d,
                      int64_t rotary_dim, const float *cos, const float *sin, int64_t table_positions,
                      const int64_t *start, const int64_t *n_valid, const int64_t *slots, float *k_cache,
                      float *v_cache, int64_t capacity, int64_t kv_len, int64_t window, float scale,
                      float *out, int threads) {
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

    const int64_t tasks = b * t * heads;
    if (threads < 1) threads = 1;
    if ((double)tasks * (double)kv_len * (double)d < (double)PARALLEL_WORK) threads = 1;
    if (threads > tasks) threads = (int)(tasks > 0 ? tasks : 1);
    float *scratch = malloc(sizeof(float) * (size_t)(threads * (kv_len > 0 ? kv_len : 1)));
    if (!scratch) return -1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t task = 0; task < tasks; task++) {
#ifdef _OPENMP
        float *scores = scratch + (int64_t)omp_get_thread_num() * kv_len;
#else
        float *scores = scratch;
#endif
        const int64_t h = task % heads, token = task / heads, r = token / t, j = token % t;
        const int64_t pos = start[r] + j, row = pos < table_positions ? pos : table_positions - 1;
        float q[MAX_HEAD_DIM];
        rotate(qkv + token * width + h * d, cos + row * rotary_dim, sin + row * rotary_dim, rotary_dim, d, q);
        const int64_t hi = pos < kv_len - 1 ? pos : kv_len - 1;
        const int64_t lo = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
        const int64_t base = (slots[r] * kv_heads + h / group) * capacity * d;
        attend(q, k_cache + base, v_cache + base, lo, hi, d, scale, scores, out + (token * heads + h) * d);
    }
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

/* rows [r, 2n] (gate, then up) -> out [r, n]: gate × (1 / (1 + exp(-gate))) × up. */
void specdec_silu_mul(const float *rows, int64_t r, int64_t n, float *out) {
    for (int64_t i = 0; i < r; i++) {
        const float *gate = rows + i * 2 * n, *up = gate + n;
        float *o = out + i * n;
        for (int64_t j = 0; j < n; j++) o[j] = gate[j] * (1.0f / (1.0f + expf(-gate[j]))) * up[j];
    }
}
