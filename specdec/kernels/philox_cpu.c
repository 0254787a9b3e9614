/* specdec's Philox uniforms on the CPU (specdec/kernels/philox.py).
 *
 * specdec_uniform fills out[row, lane] with the number `philox_uniform(seed, stream, position,
 * lane)` gives inside a Triton kernel and `uniform_reference` as tensor ops: Philox4x32-10 keyed on
 * the row's seed, counter (lane / 4, position, stream, 0), word lane % 4, turned into
 * ((word >> 9) * 2 + 1) * 2^-24. Integer arithmetic and three exact float32 operations, so it is
 * bitwise the reference on every compiler (tests/kernels/test_philox.py compares them).
 *
 * Why C: a sampled token draws one number per vocabulary entry. The tensor-op reference emulates
 * 32-bit multiply-high in int64 and runs ~50 ops over [rows, vocab / 4]: 15 ms a row for a
 * 49152-entry vocabulary on one thread of this project's 2-core machine, about half a float32
 * decode pass of SmolLM2; this loop takes 0.35 ms (docs/BENCHMARKS.md, sampled decode).
 */
#include <stdint.h>

#define ROUND_A 0xD2511F53u
#define ROUND_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u

static inline float to_uniform(uint32_t word) {
    return ((float)(word >> 9) * 2.0f + 1.0f) * 5.9604644775390625e-08f; /* 2^-24 */
}

/* seeds, positions [rows]; out [rows, lanes] float32. */
void specdec_uniform(const int64_t *seeds, const int64_t *positions, int64_t rows, uint32_t stream,
                     int64_t lanes, float *out, int threads) {
    int64_t groups = (lanes + 3) / 4;
#ifdef _OPENMP
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (rows * groups >= 4096)
#else
    (void)threads;
#endif
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            uint64_t seed = (uint64_t)seeds[r];
            uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
            uint32_t c0 = (uint32_t)g, c1 = (uint32_t)positions[r], c2 = stream, c3 = 0;
            for (int i = 0; i < 10; i++) {
                uint64_t product_b = (uint64_t)ROUND_B * c2, product_a = (uint64_t)ROUND_A * c0;
                c0 = (uint32_t)(product_b >> 32) ^ c1 ^ k0;
                c2 = (uint32_t)(product_a >> 32) ^ c3 ^ k1;
                c1 = (uint32_t)product_b;
                c3 = (uint32_t)product_a;
                k0 += KEY_A;
                k1 += KEY_B;
            }
            uint32_t words[4] = {c0, c1, c2, c3};
            float *o = out + r * lanes + g * 4;
            int64_t n = lanes - g * 4 < 4 ? lanes - g * 4 : 4;
            for (int64_t w = 0; w < n; w++) o[w] = to_uniform(words[w]);
        }
    }
}
