/* Batch-1 decode kernels for CPU: matrix-vector products over bf16 or int8 weights that stream the weights once,
 * a SwiGLU block over K chosen experts, and the absorbed MLA step over the latent cache.
 *
 * Built by dscoder.engine.native with the machine's C compiler (-O3 -march=native -fopenmp) on first use and
 * cached. Conventions: bf16 values are uint16_t bit patterns; int8 weights are symmetric per output row
 * (w = q * scale[row], scale bf16); bf16 products accumulate in fp32, int8 ones in integers on a fixed-point activation
 * (see act_prep; fp32 without VNNI); outputs are rounded to bf16 (nearest even)
 * where the plain PyTorch path rounds. ``nt`` is the thread count of each parallel region.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define ROWS 4 /* rows per block: x is loaded once for four weight rows */

/* out[r] = dot(w_r, x) for four bf16 rows (pointers may repeat; the caller keeps the ones it needs). */
static void dot4_bf16(const uint16_t *x, const uint16_t *const w[ROWS], int64_t K, float out[ROWS]) {
    int64_t k = 0;
#if defined(__AVX512BF16__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + k));
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(w[0] + k)), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(w[1] + k)), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512((const void *)(w[2] + k)), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512((const void *)(w[3] + k)), xv);
    }
    if (k < K) {
        __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w[0] + k), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, w[1] + k), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(m, w[2] + k), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(m, w[3] + k), xv);
        k = K;
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
#elif defined(__AVX512F__)
    __m512 a[ROWS];
    for (int r = 0; r < ROWS; r++) a[r] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m512 xv = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + k))), 16));
        for (int r = 0; r < ROWS; r++) {
            __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w[r] + k))), 16));
            a[r] = _mm512_fmadd_ps(wv, xv, a[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(a[r]);
#else
    for (int r = 0; r < ROWS; r++) out[r] = 0.0f;
#endif
    for (; k < K; k++) {
        float xv = bf2f(x[k]);
        for (int r = 0; r < ROWS; r++) out[r] += bf2f(w[r][k]) * xv;
    }
}

static float dot1_bf16(const uint16_t *x, const uint16_t *w, int64_t K) {
    int64_t k = 0;
    float out = 0.0f;
#if defined(__AVX512BF16__)
    __m512 a = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512((const void *)(w + k)),
                             (__m512bh)_mm512_loadu_si512((const void *)(x + k)));
    out = _mm512_reduce_add_ps(a);
#endif
    for (; k < K; k++) out += bf2f(w[k]) * bf2f(x[k]);
    return out;
}

/* out[r] = dot(q_r, x) for four int8 rows, x in fp32 (scales applied by the caller). */
__attribute__((unused)) static void dot4_i8(const float *x, const int8_t *const w[ROWS], int64_t K, float out[ROWS]) {
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 a[ROWS], b[ROWS];
    for (int r = 0; r < ROWS; r++) a[r] = b[r] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        for (int r = 0; r < ROWS; r++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(w[r] + k));
            a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), x0, a[r]);
            b[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), x1, b[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
#else
    for (int r = 0; r < ROWS; r++) out[r] = 0.0f;
#endif
    for (; k < K; k++)
        for (int r = 0; r < ROWS; r++) out[r] += (float)w[r][k] * x[k];
}

/* An activation for int8 products: its fp32 values, and (with AVX512-VNNI) the same values as 15-bit fixed point
 * x ~ s * v, v = round(x / s) with |v| < 2^14 and s a power of two (s = 2^(e - 14), max|x| < 2^e), so each value is
 * within s / 2 <= max|x| 2^-14 of itself (the largest values keep 14-15 significant bits where their bf16 already
 * rounded at 2^-9; a value 2^-6 of the largest keeps bf16's 8). v is split into two signed bytes v = d0 + 256 d1
 * (|d1| <= 64). A row's product is then exact integer arithmetic on those v: with u = q + 128 (unsigned),
 * sum q v = sum u d0 + 256 sum u d1 - 128 sum v, two VNNI byte dot products per 64 weights (a third digit, 24-bit
 * fixed point, cost a third more work for error nobody sees after the bf16 rounding of the output).
 * dscoder.engine.native.int8_linear_reference computes the same numbers with PyTorch. */
typedef struct {
    const float *xf;
    int8_t *d[2];
    double s;
    int64_t corr; /* 128 * sum v */
} act_t;

#define FIXED_BITS 14 /* |v| < 2^14 */

static void act_prep(const float *xf, int64_t K, act_t *a) {
    a->xf = xf;
    a->d[0] = a->d[1] = NULL;
    a->s = 1.0;
    a->corr = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    float mx = 0.0f;
    for (int64_t k = 0; k < K; k++) mx = fabsf(xf[k]) > mx ? fabsf(xf[k]) : mx;
    int e = 0;
    if (mx > 0.0f && isfinite(mx)) frexpf(mx, &e); /* mx < 2^e */
    a->s = ldexp(1.0, e - FIXED_BITS);
    const double vmax = (double)((1 << FIXED_BITS) - 1);
    int8_t *buf = (int8_t *)malloc(2 * (size_t)(K > 0 ? K : 1));
    int64_t total = 0;
    for (int64_t k = 0; k < K; k++) {
        double f = nearbyint((double)xf[k] / a->s);
        int32_t v = (int32_t)(f > vmax ? vmax : (f < -vmax ? -vmax : f));
        total += v;
        int32_t d0 = (int32_t)(int8_t)(uint8_t)(v & 0xff); /* balanced digits: d0 in [-128, 127] */
        buf[k] = (int8_t)d0;
        buf[K + k] = (int8_t)((v - d0) / 256); /* |.| <= 64 */
    }
    a->corr = 128 * total;
    a->d[0] = buf, a->d[1] = buf + K;
#else
    (void)K;
#endif
}

static void act_free(act_t *a) { free(a->d[0]); }

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline __m512i widen_epi32(__m512i v) { /* 16 int32 lanes -> 8 int64 lanes, pairwise summed */
    return _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                            _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
}

/* Each row's bytes are prefetched one block ahead (the same columns ROWS rows further: what the next pass over the
 * matrix reads, a few KB away), through integer arithmetic since the address may lie past the matrix (a prefetch
 * never faults). The hardware prefetcher alone left the int8 product well below the read bandwidth; a fixed 1 KB
 * ahead in the same row gained about 15%, one block ahead about 12-19% more on the Lite shapes. */
static inline void prefetch_next_block(const int8_t *p, int64_t K) {
    _mm_prefetch((const char *)(uintptr_t)((uintptr_t)p + (uintptr_t)(ROWS * K)), _MM_HINT_T0);
}

static void dot4_i8_vnni(const act_t *x, const int8_t *const w[ROWS], int64_t K, float out[ROWS]) {
    __m512i a0[ROWS], a1[ROWS];
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int r = 0; r < ROWS; r++) a0[r] = a1[r] = _mm512_setzero_si512();
    int64_t k = 0;
#pragma GCC unroll 2 /* two 64-byte steps per pass: about a tenth faster on the Lite shapes */
    for (; k + 64 <= K; k += 64) {
        __m512i d0 = _mm512_loadu_si512(x->d[0] + k), d1 = _mm512_loadu_si512(x->d[1] + k);
        for (int r = 0; r < ROWS; r++) {
            prefetch_next_block(w[r] + k, K);
            __m512i u = _mm512_xor_si512(_mm512_loadu_si512(w[r] + k), flip);
            a0[r] = _mm512_dpbusd_epi32(a0[r], u, d0);
            a1[r] = _mm512_dpbusd_epi32(a1[r], u, d1);
        }
    }
    if (k < K) { /* masked tail: digits 0 there, so whatever u holds adds nothing */
        __mmask64 m = ((__mmask64)1 << (K - k)) - 1;
        __m512i d0 = _mm512_maskz_loadu_epi8(m, x->d[0] + k), d1 = _mm512_maskz_loadu_epi8(m, x->d[1] + k);
        for (int r = 0; r < ROWS; r++) {
            __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w[r] + k), flip);
            a0[r] = _mm512_dpbusd_epi32(a0[r], u, d0);
            a1[r] = _mm512_dpbusd_epi32(a1[r], u, d1);
        }
    }
    for (int r = 0; r < ROWS; r++) { /* widen to int64 lanes, combine the digits there, one horizontal sum */
        __m512i t = _mm512_add_epi64(widen_epi32(a0[r]), _mm512_slli_epi64(widen_epi32(a1[r]), 8));
        out[r] = (float)((double)(_mm512_reduce_add_epi64(t) - x->corr) * x->s);
    }
}
#endif

/* Which int8 arithmetic this build runs: FIXED_BITS for the fixed-point VNNI products above, 0 for fp32. */
int dsc_int8_fixed_point(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return FIXED_BITS;
#else
    return 0;
#endif
}

/* Rows [r0, r0 + n) (n <= ROWS) of W [*, K] (row stride K) times x: fp32 results, scale applied for int8. */
static void rows_dot(const void *w, int wtype, const uint16_t *scale, int64_t r0, int n, int64_t K,
                     const uint16_t *xb, const act_t *xa, float *out) {
    float tmp[ROWS];
    if (wtype == 0) {
        const uint16_t *p[ROWS];
        for (int r = 0; r < ROWS; r++) p[r] = (const uint16_t *)w + (r0 + (r < n ? r : n - 1)) * K;
        dot4_bf16(xb, p, K, tmp);
        for (int r = 0; r < n; r++) out[r] = tmp[r];
    } else {
        const int8_t *p[ROWS];
        for (int r = 0; r < ROWS; r++) p[r] = (const int8_t *)w + (r0 + (r < n ? r : n - 1)) * K;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        dot4_i8_vnni(xa, p, K, tmp);
#else
        dot4_i8(xa->xf, p, K, tmp);
#endif
        for (int r = 0; r < n; r++) out[r] = tmp[r] * bf2f(scale[r0 + r]);
    }
}

static float *to_f32(const uint16_t *x, int64_t K) {
    float *xf = (float *)malloc(sizeof(float) * (K > 0 ? K : 1));
    for (int64_t k = 0; k < K; k++) xf[k] = bf2f(x[k]);
    return xf;
}

/* y [N] (bf16) = W [N, K] x [K]; wtype 0: bf16 W, 1: int8 W with bf16 row scales. With ``add`` (bf16 [N]),
 * y = add + W x instead, each term rounded to bf16 first (a residual connection after a bf16 linear layer). */
void dsc_linear(const uint16_t *x, const void *w, const uint16_t *scale, int wtype, int64_t N, int64_t K,
                uint16_t *y, const uint16_t *add, int nt) {
    float *xf = wtype == 1 ? to_f32(x, K) : NULL;
    act_t xa = {0};
    if (wtype == 1) act_prep(xf, K, &xa);
    int64_t nblk = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < nblk; b++) {
        float o[ROWS];
        int n = (int)(N - b * ROWS < ROWS ? N - b * ROWS : ROWS);
        rows_dot(w, wtype, scale, b * ROWS, n, K, x, &xa, o);
        for (int r = 0; r < n; r++) {
            int64_t i = b * ROWS + r;
            y[i] = add ? f2bf(bf2f(add[i]) + bf2f(f2bf(o[r]))) : f2bf(o[r]);
        }
    }
    if (wtype == 1) act_free(&xa);
    free(xf);
}

/* y [D] = w * bf16(x * rsqrt(mean(x^2) + eps)) (bf16 in and out; RMSNorm's rounding: normalize in fp32, round,
 * scale in bf16). */
void dsc_rmsnorm(const uint16_t *x, const uint16_t *w, float eps, int64_t D, uint16_t *y) {
    float ss = 0.0f;
    for (int64_t d = 0; d < D; d++) {
        float v = bf2f(x[d]);
        ss += v * v;
    }
    float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t d = 0; d < D; d++) y[d] = f2bf(bf2f(w[d]) * bf2f(f2bf(bf2f(x[d]) * inv)));
}

/* The greedy router for one token: scores = softmax(W x) over E experts (bf16 W [E, D], fp32 math), the K best
 * (ties: the lower index), their weights normalized to sum 1 (``norm`` and K > 1) or multiplied by ``scaling``. */
void dsc_router(const uint16_t *x, const uint16_t *w, int64_t E, int64_t D, int64_t K, int norm, float scaling,
                int64_t *ids, float *weights) {
    float sc[1024];
    float mx = -INFINITY, tot = 0.0f;
    for (int64_t e0 = 0; e0 < E; e0 += ROWS) {
        int n = (int)(E - e0 < ROWS ? E - e0 : ROWS);
        rows_dot(w, 0, NULL, e0, n, D, x, NULL, sc + e0);
    }
    for (int64_t e = 0; e < E; e++)
        if (sc[e] > mx) mx = sc[e];
    for (int64_t e = 0; e < E; e++) {
        sc[e] = expf(sc[e] - mx);
        tot += sc[e];
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < K; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || sc[e] > sc[best])) best = e;
        }
        ids[j] = best;
        weights[j] = sc[best] / tot;
        sum += weights[j];
    }
    for (int64_t j = 0; j < K; j++) weights[j] = (K > 1 && norm) ? weights[j] / (sum + 1e-20f) : weights[j] * scaling;
}

/* acc [D] (fp32) += sum_k coef[k] * down_k (silu(gate_k x) * up_k x) over the experts ids[0..nk): expert e's
 * matrices start at gate + e * gu_stride, up + e * gu_stride (I rows of D each) and down + e * d_stride (D rows
 * of I); int8 scales likewise at gate_s + e * gus_stride, up_s + e * gus_stride, down_s + e * ds_stride.
 * ids NULL means expert 0 with coefficient 1 (a dense SwiGLU block). With ``res`` (bf16 [D]), the block ends the
 * layer: res += bf16(acc) (the residual connection). Gate, up and the activation are rounded to
 * bf16, as the plain path rounds them. */
void dsc_swiglu(const uint16_t *x, const void *gate, const void *up, const void *down, const uint16_t *gate_s,
                const uint16_t *up_s, const uint16_t *down_s, int wtype, const int64_t *ids, const float *coef,
                int64_t nk, int64_t D, int64_t I, int64_t gu_stride, int64_t d_stride, int64_t gus_stride,
                int64_t ds_stride, float *acc, uint16_t *res, int nt) {
    int64_t es = wtype == 1 ? 1 : 2; /* element size */
    float *xf = wtype == 1 ? to_f32(x, D) : NULL;
    act_t xa = {0}, aa[64];
    if (wtype == 1) act_prep(xf, D, &xa);
    float *gu = (float *)malloc(sizeof(float) * 2 * nk * I);
    float *act = (float *)malloc(sizeof(float) * nk * I);
    uint16_t *actb = (uint16_t *)malloc(sizeof(uint16_t) * nk * I);
    float *dsum = (float *)calloc((size_t)(D > 0 ? D : 1), sizeof(float));
    int64_t e_of[64];
    float c_of[64];
    for (int64_t k = 0; k < nk; k++) {
        e_of[k] = ids ? ids[k] : 0;
        c_of[k] = ids ? coef[k] : 1.0f;
    }
    int64_t iblk = (I + ROWS - 1) / ROWS, dblk = (D + ROWS - 1) / ROWS;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nk * 2 * iblk; b++) {
            int64_t k = b / (2 * iblk), rest = b % (2 * iblk), which = rest / iblk, r0 = (rest % iblk) * ROWS;
            int n = (int)(I - r0 < ROWS ? I - r0 : ROWS);
            const char *base = (const char *)(which ? up : gate) + e_of[k] * gu_stride * es;
            const uint16_t *sc = wtype == 1 ? (which ? up_s : gate_s) + e_of[k] * gus_stride : NULL;
            rows_dot(base, wtype, sc, r0, n, D, x, &xa, gu + (2 * k + which) * I + r0);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < nk * I; j++) {
            int64_t k = j / I, i = j % I;
            float g = gu[2 * k * I + i], u = gu[(2 * k + 1) * I + i];
            g = bf2f(f2bf(g)); /* the plain path rounds gate, up and the activation to bf16 */
            u = bf2f(f2bf(u));
            actb[j] = f2bf(g / (1.0f + expf(-g)) * u * c_of[k]);
            act[j] = bf2f(actb[j]);
        }
        if (wtype == 1) {
#pragma omp for schedule(static)
            for (int64_t k = 0; k < nk; k++) act_prep(act + k * I, I, &aa[k]);
        }
        /* The down projections: each thread takes a contiguous range of output rows and streams it expert by
         * expert (one contiguous stretch of each matrix at a time, which the hardware prefetcher follows), the
         * experts' terms summed per row in expert order. */
#ifdef _OPENMP
        int nth = omp_get_num_threads(), tid = omp_get_thread_num();
#else
        int nth = 1, tid = 0;
#endif
        int64_t b0 = dblk * tid / nth, b1 = dblk * (tid + 1) / nth;
        for (int64_t k = 0; k < nk; k++) {
            const char *base = (const char *)down + e_of[k] * d_stride * es;
            const uint16_t *sc = wtype == 1 ? down_s + e_of[k] * ds_stride : NULL;
            for (int64_t b = b0; b < b1; b++) {
                int64_t r0 = b * ROWS;
                int n = (int)(D - r0 < ROWS ? D - r0 : ROWS);
                float o[ROWS];
                rows_dot(base, wtype, sc, r0, n, I, actb + k * I, &aa[k], o);
                for (int r = 0; r < n; r++) dsum[r0 + r] += o[r];
            }
        }
        for (int64_t r = b0 * ROWS; r < (b1 * ROWS < D ? b1 * ROWS : D); r++) {
            acc[r] += dsum[r];
            if (res) res[r] = f2bf(bf2f(res[r]) + bf2f(f2bf(acc[r])));
        }
    }
    if (wtype == 1) {
        act_free(&xa);
        for (int64_t k = 0; k < nk; k++) act_free(&aa[k]);
    }
    free(xf);
    free(gu);
    free(act);
    free(actb);
    free(dsum);
}

/* One absorbed MLA decode step for one sequence (all bf16 but cos/sin/mask):
 * q [H, Nd + R] (q projection), kv [C + R] (kv_a projection), ln [C] (kv_a_layernorm weight), cos/sin [R/2],
 * wkv [H * (Nd + V), C] (kv_b_proj), cache [*, C + R] (this layer's rows), pos (the row this token writes), mask
 * [pos + 1] (1 = attend; NULL = all), out [H, V]. Writes the normalized latent and the rotated rope key at ``pos``,
 * then per head: the query through W_UK, softmax over the cached rows, the latent output through W_UV. */
void dsc_mla_decode(const uint16_t *q, const uint16_t *kv, const uint16_t *ln, float eps, const float *cosv,
                    const float *sinv, const uint16_t *wkv, uint16_t *cache, int64_t pos, const uint8_t *mask,
                    int64_t H, int64_t Nd, int64_t R, int64_t V, int64_t C, float scale, uint16_t *out, int nt) {
    int64_t E = C + R, S = pos + 1, half = R / 2;
    uint16_t *row = cache + pos * E;
    double ss = 0.0;
    for (int64_t c = 0; c < C; c++) {
        float v = bf2f(kv[c]);
        ss += (double)v * v;
    }
    float inv = 1.0f / sqrtf((float)(ss / (double)C) + eps);
    for (int64_t c = 0; c < C; c++) /* normalize in fp32, round, scale in bf16 (RMSNorm's rule) */
        row[c] = f2bf(bf2f(ln[c]) * bf2f(f2bf(bf2f(kv[c]) * inv)));
    for (int64_t i = 0; i < half; i++) {
        float x0 = bf2f(kv[C + 2 * i]), x1 = bf2f(kv[C + 2 * i + 1]);
        row[C + 2 * i] = f2bf(x0 * cosv[i] - x1 * sinv[i]);
        row[C + 2 * i + 1] = f2bf(x0 * sinv[i] + x1 * cosv[i]);
    }
    /* Each thread takes a contiguous group of heads and streams the cache rows once for all of them (a row is read
     * from memory once per thread, not once per head). */
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        int nth = omp_get_num_threads(), tid = omp_get_thread_num();
#else
        int nth = 1, tid = 0;
#endif
        int64_t h0 = H * tid / nth, h1 = H * (tid + 1) / nth, nh = h1 - h0;
        uint16_t *qcb = (uint16_t *)malloc(sizeof(uint16_t) * (nh > 0 ? nh : 1) * E);
        float *qc = (float *)malloc(sizeof(float) * C);
        float *p = (float *)malloc(sizeof(float) * (nh > 0 ? nh : 1) * S);
        float *o = (float *)calloc((size_t)(nh > 0 ? nh : 1) * C, sizeof(float));
        uint16_t *ob = (uint16_t *)malloc(sizeof(uint16_t) * C);
        for (int64_t j = 0; j < nh; j++) { /* absorbed query: [q_nope W_UK | rotated q_rope], rounded to bf16 */
            const uint16_t *qh = q + (h0 + j) * (Nd + R);
            const uint16_t *wh = wkv + (h0 + j) * (Nd + V) * C;
            for (int64_t c = 0; c < C; c++) qc[c] = 0.0f;
            for (int64_t n = 0; n < Nd; n++) { /* rows of W_UK scaled and summed */
                float a = bf2f(qh[n]);
                const uint16_t *wr = wh + n * C;
                for (int64_t c = 0; c < C; c++) qc[c] += a * bf2f(wr[c]);
            }
            uint16_t *qj = qcb + j * E;
            for (int64_t c = 0; c < C; c++) qj[c] = f2bf(qc[c]);
            for (int64_t i = 0; i < half; i++) {
                float x0 = bf2f(qh[Nd + 2 * i]), x1 = bf2f(qh[Nd + 2 * i + 1]);
                qj[C + 2 * i] = f2bf(x0 * cosv[i] - x1 * sinv[i]);
                qj[C + 2 * i + 1] = f2bf(x0 * sinv[i] + x1 * cosv[i]);
            }
        }
        for (int64_t s = 0; s < S; s++) { /* scores, all of this thread's heads per cache row */
            const uint16_t *cr = cache + s * E;
            for (int64_t j = 0; j < nh; j++)
                p[j * S + s] = (mask && !mask[s]) ? -INFINITY : dot1_bf16(qcb + j * E, cr, E) * scale;
        }
        for (int64_t j = 0; j < nh; j++) { /* softmax per head */
            float *pj = p + j * S, mx = -INFINITY, tot = 0.0f;
            for (int64_t s = 0; s < S; s++) mx = pj[s] > mx ? pj[s] : mx;
            for (int64_t s = 0; s < S; s++) {
                pj[s] = pj[s] == -INFINITY ? 0.0f : expf(pj[s] - mx);
                tot += pj[s];
            }
            for (int64_t s = 0; s < S; s++) pj[s] /= tot;
        }
        for (int64_t s = 0; s < S; s++) { /* the softmax-weighted latents, all heads per cache row */
            const uint16_t *cr = cache + s * E;
            for (int64_t j = 0; j < nh; j++) {
                float a = p[j * S + s];
                if (a == 0.0f) continue;
                float *oj = o + j * C;
                for (int64_t c = 0; c < C; c++) oj[c] += a * bf2f(cr[c]);
            }
        }
        for (int64_t j = 0; j < nh; j++) { /* through W_UV: V rows of C per head */
            int64_t h = h0 + j;
            const uint16_t *wv = wkv + (h * (Nd + V) + Nd) * C;
            for (int64_t c = 0; c < C; c++) ob[c] = f2bf(o[j * C + c]);
            for (int64_t v0 = 0; v0 < V; v0 += ROWS) {
                int n = (int)(V - v0 < ROWS ? V - v0 : ROWS);
                float d[ROWS];
                const uint16_t *w4[ROWS];
                for (int r = 0; r < ROWS; r++) w4[r] = wv + (v0 + (r < n ? r : n - 1)) * C;
                dot4_bf16(ob, w4, C, d);
                for (int r = 0; r < n; r++) out[h * V + v0 + r] = f2bf(d[r]);
            }
        }
        free(qcb);
        free(qc);
        free(p);
        free(o);
        free(ob);
    }
}
