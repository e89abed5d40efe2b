#include "bdb_hash.h"

#include <dlfcn.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* The hash is the polynomial sum of byte[i] * 33^(n-1-i) modulo 2^32, so a block of bytes can
 * be folded in at once: h' = h * 33^block + sum of byte[j] * 33^(block-1-j). */

/* 33^k mod 2^32, k = 0 ... 32 (a constant table: nothing to initialise before the first call). */
static const uint32_t powers[33] = {
    0x00000001, 0x00000021, 0x00000441, 0x00008c61, 0x00121881, 0x025528a1, 0x4cfa3cc1, 0xec41d4e1,
    0x747c7101, 0x040a9121, 0x855cb541, 0x30f35d61, 0x4f5f0981, 0x3b4039a1, 0xa3476dc1, 0x0c3525e1,
    0x92d9e201, 0xee162221, 0xb0da6641, 0xcc272e61, 0x510cfa81, 0x72ac4aa1, 0xc8359ec1, 0xcee976e1,
    0xac185301, 0x2f22b321, 0x13791741, 0x829bff61, 0xd61beb81, 0x99995ba1, 0xccc4cfc1, 0x655ec7e1,
    0x1137c401,
};

/* One byte at a time, continuing from h. */
static uint32_t fold_bytes(uint32_t h, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) h = h * 33u + p[i];
    return h;
}

/* Eight bytes a step: eight independent products and one multiplication on the chain. */
static uint32_t fold_portable(const uint8_t *p, size_t n) {
    uint32_t h = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        h = h * powers[8] + p[i] * powers[7] + p[i + 1] * powers[6] + p[i + 2] * powers[5]
            + p[i + 3] * powers[4] + p[i + 4] * powers[3] + p[i + 5] * powers[2]
            + p[i + 6] * powers[1] + p[i + 7];
    return fold_bytes(h, p + i, n - i);
}

#if defined(__x86_64__)
/* 32 bytes a step in eight 32-bit lanes: lane j of group g holds byte 8g + j of the block,
 * weighted by 33^(31 - 8g - j); the lanes carry their sums from block to block (times 33^32)
 * and add up to h at the end. */
__attribute__((target("avx2")))
static uint32_t fold_avx2(const uint8_t *p, size_t n) {
    size_t blocks = n / 32;
    uint32_t h = 0;
    if (blocks > 0) {
        __m256i weight[4];
        for (int g = 0; g < 4; g++) {
            uint32_t w[8];
            for (int j = 0; j < 8; j++) w[j] = powers[31 - 8 * g - j];
            weight[g] = _mm256_loadu_si256((const __m256i *)w);
        }
        const __m256i step = _mm256_set1_epi32((int)powers[32]);
        __m256i sum = _mm256_setzero_si256();
        for (size_t b = 0; b < blocks; b++) {
            const uint8_t *q = p + 32 * b;
            __m256i s0 = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q)), weight[0]);
            __m256i s1 = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8))), weight[1]);
            __m256i s2 = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16))), weight[2]);
            __m256i s3 = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 24))), weight[3]);
            sum = _mm256_add_epi32(_mm256_mullo_epi32(sum, step),
                                   _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3)));
        }
        uint32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, sum);
        for (int j = 0; j < 8; j++) h += lanes[j];
    }
    return fold_bytes(h, p + 32 * blocks, n - 32 * blocks);
}
#endif

typedef uint32_t (*fold_fn)(const uint8_t *, size_t);
/* Chosen once by the constructor; a call before it (or racing it) chooses the same. */
static _Atomic(fold_fn) fold;

__attribute__((constructor))
static fold_fn choose_fold(void) {
    fold_fn chosen = fold_portable;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) chosen = fold_avx2;
#endif
    atomic_store_explicit(&fold, chosen, memory_order_release);
    return chosen;
}

uint32_t plover_bdb_hash4(const void *bytes, uint32_t length) {
    fold_fn f = atomic_load_explicit(&fold, memory_order_acquire);
    if (f == NULL) f = choose_fold();
    return f((const uint8_t *)bytes, length);
}

uint32_t plover_bdb_hash4_portable(const void *bytes, uint32_t length) {
    return fold_portable((const uint8_t *)bytes, length);
}

/* Berkeley DB's signature: u_int32_t __ham_func4(DB *, const void *, u_int32_t). */
uint32_t __ham_func4(void *db, const void *key, uint32_t length);
__attribute__((visibility("default")))
uint32_t __ham_func4(void *db, const void *key, uint32_t length) {
    (void)db;
    return plover_bdb_hash4(key, length);
}

int plover_bdb_hash4_in_effect(void) {
    void *bound = dlsym(RTLD_DEFAULT, "__ham_func4");
    return bound != NULL && bound == (void *)&__ham_func4;
}
