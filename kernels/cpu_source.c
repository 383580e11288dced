/* CPU kernels for the quantized matmuls of qlora_kit (loaded by kernels/cpu.py through ctypes).
 *
 * The kernels decode W a 32-value chunk at a time into registers (or, for many rows of x, one row into a K-float
 * buffer that stays in L1/L2; the float weight is never materialized) and form y[m, n] = dot(x[m, :], W[n, :]).
 * At one row of x, several output rows run together with their code streams prefetched (run_m1_512: eight,
 * rows256: six).
 * Decoding is bit-identical to the PyTorch references (kernels/reference), so only the summation order differs:
 *   4-bit blockwise (NF4 / FP4): w[k] = table[nibble(e)] * absmax[e / bs], e = n * K + k, element e in the
 *       high nibble of byte e / 2 when e is even (the low nibble when odd); blocks run over the flat index.
 *   int4 per group:  w[k] = (q[n, k] - zero[n, k / gs]) * scale[n, k / gs], column 2j in the high nibble.
 *   per channel:     w[k] = lut[q[n, k]] * scale[n] (lut: int8 -> float, or fp8 e4m3 -> float).
 *   MXFP4:           w[k] = table[nibble] * scale[n, k / 32] (scale = 2**(E - 127), exact), rows of
 *       ceil(K / 32) * 16 bytes, column 2j in the LOW nibble.
 * The *_dequant variants write the whole [N, K] fp32 weight (used when M is large and a GEMM wins).
 * Compiled with -ffp-contract=off so a * b + c never becomes an FMA in the decoders (same rounding as
 * PyTorch's separate operations). Threads: OpenMP over output rows (the caller passes torch's count).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ACC 32 /* independent partial sums: hides the FMA latency, vectorizes to 2 AVX-512 registers */

static float dot(const float *restrict a, const float *restrict b, int64_t k) {
    float acc[ACC] = {0};
    int64_t i = 0;
    for (; i + ACC <= k; i += ACC)
        for (int j = 0; j < ACC; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (int j = 0; j < ACC; j++) s += acc[j];
    for (; i < k; i++) s += a[i] * b[i];
    return s;
}

static void pair_table(const float *table16, float pairs[512]) {
    for (int b = 0; b < 256; b++) {
        pairs[2 * b] = table16[b >> 4];
        pairs[2 * b + 1] = table16[b & 15];
    }
}

/* decode 2 * nbytes codes: buf[2i], buf[2i + 1] = pairs of byte i (one 8-byte copy per byte) */
static void decode_pairs(const uint8_t *restrict bytes, int64_t nbytes, const float *restrict pairs,
                         float *restrict buf) {
    for (int64_t i = 0; i < nbytes; i++) memcpy(buf + 2 * i, pairs + 2 * bytes[i], 8);
}

static float *row_4bit(const uint8_t *packed, const float *absmax, const float *pairs, int64_t n, int64_t k,
                       int64_t bs, float *buf) {
    int64_t e0 = n * k, off = e0 & 1;
    decode_pairs(packed + e0 / 2, (off + k + 1) / 2, pairs, buf);
    float *w = buf + off;
    for (int64_t c = 0; c < k;) {
        int64_t blk = (e0 + c) / bs, end = (blk + 1) * bs - e0;
        if (end > k) end = k;
        float a = absmax[blk];
        for (int64_t j = c; j < end; j++) w[j] = w[j] * a;
        c = end;
    }
    return w;
}

static float *row_int4(const uint8_t *packed, const float *scale, const float *zero, const float *pairs,
                       int64_t n, int64_t k, int64_t gs, float *buf) {
    int64_t groups = (k + gs - 1) / gs;
    decode_pairs(packed + n * ((k + 1) / 2), (k + 1) / 2, pairs, buf);
    for (int64_t g = 0; g < groups; g++) {
        float s = scale[n * groups + g], z = zero[n * groups + g];
        int64_t end = (g + 1) * gs < k ? (g + 1) * gs : k;
        for (int64_t j = g * gs; j < end; j++) buf[j] = (buf[j] - z) * s;
    }
    return buf;
}

static float *row_chan(const uint8_t *q, const float *lut, const float *scale, int is_int8, int64_t n, int64_t k,
                       float *buf) {
    const uint8_t *row = q + n * k;
    float s = scale[n];
    if (is_int8) {
        const int8_t *r = (const int8_t *)row;
        for (int64_t j = 0; j < k; j++) buf[j] = (float)r[j] * s;
    } else {
        for (int64_t j = 0; j < k; j++) buf[j] = lut[row[j]] * s;
    }
    return buf;
}

static float *row_mxfp4(const uint8_t *packed, const float *scale, const float *table16, int64_t n, int64_t k,
                        float *buf) {
    int64_t blocks = (k + 31) / 32;
    const uint8_t *row = packed + n * blocks * 16;
    for (int64_t j = 0; j < k; j++) {
        uint8_t b = row[j / 2];
        buf[j] = table16[j & 1 ? b >> 4 : b & 15] * scale[n * blocks + j / 32];
    }
    return buf;
}

/* KIND: 0 = 4-bit blockwise, 1 = int4 per group, 2 = per channel, 3 = MXFP4; p0, p1: the format's stats */
typedef struct {
    int kind;
    const uint8_t *q;
    const float *p0, *p1, *lut;
    int64_t n, k, size; /* size: blocksize, group size, or is_int8 */
    int64_t groups, cpb; /* vector paths: groups per row (int4), 32-wide chunks per block or group */
    int shift;           /* log2(cpb) when cpb is a power of two, else -1 (an integer division per chunk) */
    int far;             /* GEMV: x's fp32 row is over X_L1_BYTES, so W is prefetched into L2, not L1 */
} Weight;

static float *decode_row(const Weight *w, const float *pairs, int64_t n, float *buf) {
    if (w->kind == 0) return row_4bit(w->q, w->p0, pairs, n, w->k, w->size, buf);
    if (w->kind == 1) return row_int4(w->q, w->p0, w->p1, pairs, n, w->k, w->size, buf);
    if (w->kind == 2) return row_chan(w->q, w->lut, w->p0, (int)w->size, n, w->k, buf);
    return row_mxfp4(w->q, w->p0, w->lut, n, w->k, buf);
}


#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define INLINE static inline __attribute__((always_inline))

/* AVX2 (8 floats a register): 32 weights w[n, c .. c + 32) decoded into v[0..3], bit-identical to the
 * portable decoders; needs K % 32 == 0 and 32 | block / group size, so a chunk never straddles one */
static int vectorizable(const Weight *w) {
    return w->k % 32 == 0 && (w->kind > 1 || w->size % 32 == 0);
}

/* index of chunk c of row n into the block / group statistics (no division on the usual power-of-two sizes) */
INLINE int64_t stat_index(const Weight *w, int64_t n, int64_t c) {
    if (w->kind == 3) return n * (w->k >> 5) + (c >> 5);
    int64_t chunk = w->kind == 0 ? (n * w->k + c) >> 5 : c >> 5;
    int64_t blk = w->shift >= 0 ? chunk >> w->shift : chunk / w->cpb;
    return w->kind == 0 ? blk : n * w->groups + blk;
}

INLINE __m256 lookup16(__m256i idx, __m256 t_lo, __m256 t_hi) {
    /* table[idx] for idx in 0..15: two 8-entry permutes, bit 3 (moved to the sign bit) picks one */
    __m256 a = _mm256_permutevar8x32_ps(t_lo, idx), b = _mm256_permutevar8x32_ps(t_hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* 8 fp8 e4m3 codes * s: the code's bits moved into an fp16 (e5m10) read as 2**-8 times the e4m3 value (the
 * subnormals too, exactly: F16C converts them in hardware), then * (256 s), which rounds like lut[q] * s. The one
 * difference from the table: the NaN pattern 0x7F reads 480 (quantize_fp8 saturates, it never writes it) */
INLINE __m256 fp8x8(__m128i b, __m256 s, const float *lut) {
#ifdef __F16C__
    (void)lut;
    __m128i q = _mm_cvtepu8_epi16(b);
    __m128i mag = _mm_slli_epi16(_mm_and_si128(q, _mm_set1_epi16(0x7F)), 7);
    __m128i sign = _mm_and_si128(_mm_slli_epi16(q, 8), _mm_set1_epi16((short)0x8000));
    return _mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(mag, sign)), _mm256_mul_ps(s, _mm256_set1_ps(256.0f)));
#else
    return _mm256_mul_ps(_mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(b), 4), s);
#endif
}

/* The GEMV order of a 4-bit chunk. vpshufb looks up one byte of the 16-entry fp32 table per code (4 byte planes),
 * two rounds of unpacks rebuild the floats: 3 shuffles per 8 weights instead of 2 permutes, a shift and a blend.
 * The unpacks work within 128-bit lanes, so the 32 weights come out in a fixed permuted order: register r, lane L,
 * slot i holds element 2 (4 r + i) + L of the chunk; the GEMV permutes x the same way once per call (xperm). */
static void planes16(const float *table, __m256i plane[4]) {
    uint8_t b[4][16];
    for (int v = 0; v < 16; v++) {
        uint32_t u;
        memcpy(&u, table + v, 4);
        for (int p = 0; p < 4; p++) b[p][v] = (uint8_t)(u >> (8 * p));
    }
    for (int p = 0; p < 4; p++) plane[p] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b[p]));
}

INLINE void chunk_perm(const Weight *w, const __m256i plane[4], int64_t n, int64_t c, __m256 v[4]) {
    int64_t k = w->k;
    const uint8_t *bytes = w->kind == 3 ? w->q + n * (k / 2) + c / 2 : w->q + (n * k + c) / 2;
    __m128i b = _mm_loadu_si128((const __m128i *)bytes), m15 = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, m15), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m15);
    __m256i codes = w->kind == 3 ? _mm256_set_m128i(hi, lo) : _mm256_set_m128i(lo, hi); /* lane 0: even elements */
    __m256i p0 = _mm256_shuffle_epi8(plane[0], codes), p1 = _mm256_shuffle_epi8(plane[1], codes);
    __m256i p2 = _mm256_shuffle_epi8(plane[2], codes), p3 = _mm256_shuffle_epi8(plane[3], codes);
    __m256i w01l = _mm256_unpacklo_epi8(p0, p1), w01h = _mm256_unpackhi_epi8(p0, p1);
    __m256i w23l = _mm256_unpacklo_epi8(p2, p3), w23h = _mm256_unpackhi_epi8(p2, p3);
    v[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01l, w23l));
    v[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01l, w23l));
    v[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01h, w23h));
    v[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01h, w23h));
    int64_t g = stat_index(w, n, c);
    __m256 s = _mm256_set1_ps(w->p0[g]);
    if (w->kind == 1) {
        __m256 z = _mm256_set1_ps(w->p1[g]);
        for (int j = 0; j < 4; j++) v[j] = _mm256_mul_ps(_mm256_sub_ps(v[j], z), s);
        return;
    }
    for (int j = 0; j < 4; j++) v[j] = _mm256_mul_ps(v[j], s);
}

static float *xperm(const float *x, int64_t m, int64_t k) {
    float *xp = (float *)malloc((size_t)(m * k) * sizeof(float));
    for (int64_t c = 0; c < m * k; c += 32)
        for (int r = 0; r < 4; r++)
            for (int l = 0; l < 2; l++)
                for (int i = 0; i < 4; i++) xp[c + 8 * r + 4 * l + i] = x[c + 2 * (4 * r + i) + l];
    return xp;
}

INLINE void chunk_avx2(const Weight *w, __m256 t_lo, __m256 t_hi, int64_t n, int64_t c, __m256 v[4]) {
    int64_t k = w->k;
    if (w->kind == 2) {
        const uint8_t *q = w->q + n * k + c;
        __m256 s = _mm256_set1_ps(w->p0[n]);
        for (int j = 0; j < 4; j++) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(q + 8 * j));
            v[j] = w->size ? _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s) : fp8x8(b, s, w->lut);
        }
        return;
    }
    const uint8_t *bytes = w->kind == 3 ? w->q + n * (k / 2) + c / 2 : w->q + (n * k + c) / 2;
    __m128i b = _mm_loadu_si128((const __m128i *)bytes), m15 = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, m15), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m15);
    __m128i first = w->kind == 3 ? _mm_unpacklo_epi8(lo, hi) : _mm_unpacklo_epi8(hi, lo);
    __m128i second = w->kind == 3 ? _mm_unpackhi_epi8(lo, hi) : _mm_unpackhi_epi8(hi, lo);
    __m256i idx[4] = {_mm256_cvtepu8_epi32(first), _mm256_cvtepu8_epi32(_mm_srli_si128(first, 8)),
                      _mm256_cvtepu8_epi32(second), _mm256_cvtepu8_epi32(_mm_srli_si128(second, 8))};
    int64_t g = stat_index(w, n, c);
    __m256 s = _mm256_set1_ps(w->p0[g]);
    if (w->kind == 1) {
        __m256 z = _mm256_set1_ps(w->p1[g]);
        for (int j = 0; j < 4; j++) v[j] = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(idx[j]), z), s);
        return;
    }
    for (int j = 0; j < 4; j++) v[j] = _mm256_mul_ps(lookup16(idx[j], t_lo, t_hi), s);
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float dot256(const float *a, const float *b, int64_t k) { /* k % 32 == 0 */
    __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < k; i += 32)
        for (int j = 0; j < 4; j++) s[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * j), _mm256_loadu_ps(b + i + 8 * j), s[j]);
    return hsum256(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])));
}

/* y[i * ldy] = dot(x row i, b) for 4 rows of x: each load of b feeds 4 FMAs */
static inline void dot256x4(const float *x, const float *b, int64_t k, float *y, int64_t ldy) {
    __m256 s[4][2];
    for (int i = 0; i < 4; i++) s[i][0] = s[i][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k; c += 16) {
        __m256 b0 = _mm256_loadu_ps(b + c), b1 = _mm256_loadu_ps(b + c + 8);
        for (int i = 0; i < 4; i++) {
            s[i][0] = _mm256_fmadd_ps(b0, _mm256_loadu_ps(x + i * k + c), s[i][0]);
            s[i][1] = _mm256_fmadd_ps(b1, _mm256_loadu_ps(x + i * k + c + 8), s[i][1]);
        }
    }
    for (int i = 0; i < 4; i++) y[i * ldy] = hsum256(_mm256_add_ps(s[i][0], s[i][1]));
}

/* one output row n: up to 4 rows of x take each decoded chunk from registers (two partial sums per row
 * hide the FMA latency); more rows, or wout: decode the row into buf (L1) once, then one dot per x row */
/* 32 int8 / fp8 codes of row n without the row's scale (the GEMV multiplies the dot products instead) */
INLINE void chunk_chan_raw(const Weight *w, int64_t n, int64_t c, __m256 v[4]) {
    const uint8_t *q = w->q + n * w->k + c;
    __m256 one = _mm256_set1_ps(1.0f);
    for (int j = 0; j < 4; j++) {
        __m128i b = _mm_loadl_epi64((const __m128i *)(q + 8 * j));
        v[j] = w->size ? _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)) : fp8x8(b, one, w->lut);
    }
}

/* GEMV decode: the permuted 4-bit order (plane), unscaled per-channel codes, or the decoders' own */
INLINE void chunk_any(const Weight *w, const __m256i *plane, __m256 t_lo, __m256 t_hi, int64_t n, int64_t c,
                             __m256 v[4]) {
    if (plane)
        chunk_perm(w, plane, n, c, v);
    else if (w->kind == 2)
        chunk_chan_raw(w, n, c, v);
    else
        chunk_avx2(w, t_lo, t_hi, n, c, v);
}

/* the first byte of chunk c of row n; the GEMV loops prefetch ahead of it. Rows are short streams (2-11 KiB at
 * K = 4096 .. 11008, where the hardware prefetcher starts over on each), so software prefetch keeps several in
 * flight. Where it goes depends on whether x stays in L1 (measured on the 2-core EPYC, Zen 4, 32 KiB L1D, weights
 * from DRAM, 2 threads, one row of x):
 * - x's fp32 row up to X_L1_BYTES (K <= 4096): into L1, PREFETCH = 4 KiB ahead. int8 4096x4096: 0.91 ms without
 *   prefetch, 0.69 ms at 1 KiB; 2 and 4 KiB within noise; into L2 instead: the same for int8, NF4 5-7% slower.
 * - longer rows of x: into L2, PREFETCH_L2 = 2 KiB ahead. Prefetching into L1 there evicts x, which every group of
 *   rows reads again: int8 4096x11008 1.68 -> 1.51 ms (30 GB/s, what a plain read of the same bytes reaches),
 *   4096x5632 1.24 -> 0.91 ms; NF4 4096x11008 2.22 -> 1.87 ms. 1, 2 and 3 KiB ahead were within noise.
 * All three are -D overridable for such experiments. */
#ifndef PREFETCH
#define PREFETCH 4096
#endif
#ifndef PREFETCH_L2
#define PREFETCH_L2 2048
#endif
#ifndef X_L1_BYTES
#define X_L1_BYTES 16384
#endif
INLINE void prefetch_chunk(const Weight *w, int64_t n, int64_t c) {
    int64_t k = w->k;
    const uint8_t *p = w->kind == 2 ? w->q + n * k + c : w->kind == 3 ? w->q + n * (k / 2) + c / 2 : w->q + (n * k + c) / 2;
    if (w->far)
        _mm_prefetch((const char *)p + PREFETCH_L2, _MM_HINT_T1);
    else
        _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);
}

static void row_avx2(const Weight *w, const __m256i *plane, __m256 t_lo, __m256 t_hi, const float *x, int64_t m,
                     int64_t n, float *y, float *wout, float *buf) {
    int64_t k = w->k;
    __m256 v[4];
    if (wout) {
        for (int64_t c = 0; c < k; c += 32) {
            chunk_avx2(w, t_lo, t_hi, n, c, v);
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(wout + n * k + c + 8 * j, v[j]);
        }
        return;
    }
    float rs = w->kind == 2 ? w->p0[n] : 1.0f; /* the row scale chunk_chan_raw leaves out */
    if (m > 4) {
        for (int64_t c = 0; c < k; c += 32) {
            prefetch_chunk(w, n, c);
            chunk_any(w, plane, t_lo, t_hi, n, c, v);
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(buf + c + 8 * j, v[j]);
        }
        int64_t i = 0;
        for (; i + 4 <= m; i += 4) dot256x4(x + i * k, buf, k, y + i * w->n + n, w->n);
        for (; i < m; i++) y[i * w->n + n] = dot256(x + i * k, buf, k);
        for (i = 0; i < m; i++) y[i * w->n + n] *= rs;
        return;
    }
    if (m == 1) {
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t c = 0; c < k; c += 32) {
            prefetch_chunk(w, n, c);
            chunk_any(w, plane, t_lo, t_hi, n, c, v);
            for (int j = 0; j < 4; j++) a[j] = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(x + c + 8 * j), a[j]);
        }
        y[n] = rs * hsum256(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
        return;
    }
    __m256 acc[4][2];
    for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k; c += 32) {
        prefetch_chunk(w, n, c);
        chunk_any(w, plane, t_lo, t_hi, n, c, v);
        for (int i = 0; i < 4; i++) {
            if (i < m) {
                const float *xr = x + i * k + c;
                acc[i][0] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xr), acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xr + 8), acc[i][1]);
                acc[i][0] = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xr + 16), acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xr + 24), acc[i][1]);
            }
        }
    }
    for (int64_t i = 0; i < m; i++) y[i * w->n + n] = rs * hsum256(_mm256_add_ps(acc[i][0], acc[i][1]));
}

/* M = 1: ROWS256 output rows at a time, so that many streams of W are in flight (each prefetched ahead) and every
 * chunk of x read from L1 feeds them all. KIND and INT8 are constants at each call in rows256_any, so the format's
 * branches fold away. Measured on the 2-core EPYC (Zen 4) with this path built -mno-avx512f, weights from DRAM,
 * 2 threads (a Zen 4 core stands in for an AVX2-only one here; only 16 vector registers either way): int8 4096x4096
 * one row at a time 0.95 ms, four 0.72 ms; then, with prefetch, four / six / eight rows: int8 0.87 / 0.77 / 0.77 ms,
 * int8 4096x11008 1.74 / 1.57 / 1.60 ms, NF4 4096x4096 1.19 / 1.11 / 1.16 ms, NF4 4096x11008 3.11 / 2.95 / 2.99 ms. */
#ifndef ROWS256
#define ROWS256 6
#endif
INLINE void rows256(const Weight *w0, int kind, int int8, const __m256i *plane, __m256 t_lo, __m256 t_hi,
                      const float *x, int64_t n, float *y) {
    Weight wk = *w0;
    wk.kind = kind;
    if (kind == 2) wk.size = int8;
    const Weight *w = &wk;
    __m256 a[ROWS256], b[ROWS256]; /* two partial sums a row: chains of two FMAs a chunk */
    for (int r = 0; r < ROWS256; r++) a[r] = b[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < w->k; c += 32) {
        for (int r = 0; r < ROWS256; r++) {
            __m256 v[4];
            prefetch_chunk(w, n + r, c);
            chunk_any(w, plane, t_lo, t_hi, n + r, c, v);
            a[r] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(x + c), a[r]);
            b[r] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x + c + 8), b[r]);
            a[r] = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(x + c + 16), a[r]);
            b[r] = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(x + c + 24), b[r]);
        }
    }
    for (int r = 0; r < ROWS256; r++) y[n + r] = (kind == 2 ? w->p0[n + r] : 1.0f) * hsum256(_mm256_add_ps(a[r], b[r]));
}

static void rows256_any(const Weight *w, const __m256i *plane, __m256 t_lo, __m256 t_hi, const float *x, int64_t n,
                    float *y) {
    if (w->kind == 0)
        rows256(w, 0, 0, plane, t_lo, t_hi, x, n, y);
    else if (w->kind == 1)
        rows256(w, 1, 0, plane, t_lo, t_hi, x, n, y);
    else if (w->kind == 2 && w->size)
        rows256(w, 2, 1, plane, t_lo, t_hi, x, n, y);
    else if (w->kind == 2)
        rows256(w, 2, 0, plane, t_lo, t_hi, x, n, y);
    else
        rows256(w, 3, 0, plane, t_lo, t_hi, x, n, y);
}

#ifdef __AVX512F__
/* AVX-512, M = 1. Chunk c of row n as two registers in the order even columns, odd columns (x is permuted to match
 * once per call, xperm_eo; the per-channel codes keep their order): a nibble's value is one vpermps from the
 * 16-entry table. Decoding is the same as the AVX2 path's (bit-identical to the references). Measured on the
 * 2-core EPYC (Zen 4), NF4 4096x4096 from DRAM, 2 threads: AVX2 rows of four 1.24 ms, these 0.82 ms. */
INLINE __m512 fp8x16(__m128i b) { /* as fp8x8: e4m3 bits moved into an fp16, read as 2**-8 times the value */
    __m256i q = _mm256_cvtepu8_epi16(b);
    __m256i mag = _mm256_slli_epi16(_mm256_and_si256(q, _mm256_set1_epi16(0x7F)), 7);
    __m256i sign = _mm256_and_si256(_mm256_slli_epi16(q, 8), _mm256_set1_epi16((short)0x8000));
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_or_si256(mag, sign)), _mm512_set1_ps(256.0f));
}

INLINE void chunk512(const Weight *w, int int8, __m512 table, int64_t n, int64_t c, __m512 *v0, __m512 *v1) {
    int64_t k = w->k;
    if (w->kind == 2) { /* unscaled codes: the row scale multiplies the dot product */
        const uint8_t *q = w->q + n * k + c;
        __m128i b0 = _mm_loadu_si128((const __m128i *)q), b1 = _mm_loadu_si128((const __m128i *)(q + 16));
        *v0 = int8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0)) : fp8x16(b0);
        *v1 = int8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1)) : fp8x16(b1);
        return;
    }
    const uint8_t *bytes = w->kind == 3 ? w->q + n * (k / 2) + c / 2 : w->q + (n * k + c) / 2;
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    __m512i hi = _mm512_srli_epi32(b, 4), lo = _mm512_and_si512(b, _mm512_set1_epi32(15));
    __m512i even = w->kind == 3 ? lo : hi, odd = w->kind == 3 ? hi : lo; /* MXFP4: column 2j in the low nibble */
    int64_t g = stat_index(w, n, c);
    __m512 s = _mm512_set1_ps(w->p0[g]);
    if (w->kind == 1) {
        __m512 z = _mm512_set1_ps(w->p1[g]);
        *v0 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(even), z), s);
        *v1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(odd), z), s);
        return;
    }
    *v0 = _mm512_mul_ps(_mm512_permutexvar_ps(even, table), s);
    *v1 = _mm512_mul_ps(_mm512_permutexvar_ps(odd, table), s);
}

#ifndef ROWS512
#define ROWS512 8
#endif
/* ROWS (ROWS512, or 1 for the last rows) output rows from n; KIND and INT8 are constants at each call */
INLINE void rows512(const Weight *w0, int kind, int int8, int rows, __m512 table, const float *x, int64_t n,
                    float *y) {
    Weight wk = *w0;
    wk.kind = kind;
    const Weight *w = &wk;
    __m512 a[ROWS512];
    for (int r = 0; r < rows; r++) a[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < w->k; c += 32) {
        __m512 x0 = _mm512_loadu_ps(x + c), x1 = _mm512_loadu_ps(x + c + 16);
        int line = (c & (kind == 2 ? 63 : 127)) == 0; /* this chunk starts 64 bytes of codes: prefetch once */
        for (int r = 0; r < rows; r++) {
            __m512 v0, v1;
            if (line) prefetch_chunk(w, n + r, c);
            chunk512(w, int8, table, n + r, c, &v0, &v1);
            a[r] = _mm512_fmadd_ps(v1, x1, _mm512_fmadd_ps(v0, x0, a[r]));
        }
    }
    for (int r = 0; r < rows; r++) y[n + r] = (kind == 2 ? w->p0[n + r] : 1.0f) * _mm512_reduce_add_ps(a[r]);
}

static void rows512_any(const Weight *w, int rows, __m512 table, const float *x, int64_t n, float *y) {
    int int8 = w->kind == 2 && w->size;
    if (rows == ROWS512) {
        if (w->kind == 0) rows512(w, 0, 0, ROWS512, table, x, n, y);
        else if (w->kind == 1) rows512(w, 1, 0, ROWS512, table, x, n, y);
        else if (int8) rows512(w, 2, 1, ROWS512, table, x, n, y);
        else if (w->kind == 2) rows512(w, 2, 0, ROWS512, table, x, n, y);
        else rows512(w, 3, 0, ROWS512, table, x, n, y);
    } else {
        rows512(w, w->kind, int8, 1, table, x, n, y);
    }
}

static void run_m1_512(const Weight *w, const float *x, float *y, int64_t n0, int64_t n1, int nt) {
    int64_t k = w->k, blocks = (n1 - n0) / ROWS512;
    __m512 table = w->kind == 0 || w->kind == 3 ? _mm512_loadu_ps(w->lut) : _mm512_setzero_ps();
    float *xp = NULL;
    if (w->kind != 2) { /* per 32-chunk: the 16 even columns, then the 16 odd ones */
        xp = (float *)malloc((size_t)k * sizeof(float));
        for (int64_t c = 0; c < k; c += 32)
            for (int i = 0; i < 16; i++) {
                xp[c + i] = x[c + 2 * i];
                xp[c + 16 + i] = x[c + 2 * i + 1];
            }
        x = xp;
    }
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < blocks; i++) rows512_any(w, ROWS512, table, x, n0 + ROWS512 * i, y);
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = n0 + ROWS512 * blocks; n < n1; n++) rows512_any(w, 1, table, x, n, y);
    }
    free(xp);
}
#endif

static void run_avx2(const Weight *w0, const float *x, int64_t m, float *y, float *wout, int64_t n0, int64_t n1,
                     int nt) {
    Weight wv = *w0;
    const Weight *w = &wv;
    wv.far = wv.k * (int64_t)sizeof(float) > X_L1_BYTES;
    if (wv.kind < 2) {
        wv.cpb = wv.size / 32;
        wv.shift = (wv.cpb & (wv.cpb - 1)) ? -1 : __builtin_ctzll((unsigned long long)wv.cpb);
        wv.groups = (wv.k + wv.size - 1) / wv.size;
    }
#ifdef __AVX512F__
    if (m == 1 && !wout) {
        run_m1_512(w, x, y, n0, n1, nt);
        return;
    }
#endif
    static const float ints[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    __m256 t_lo = _mm256_setzero_ps(), t_hi = _mm256_setzero_ps();
    if (w->kind == 0 || w->kind == 3) {
        t_lo = _mm256_loadu_ps(w->lut);
        t_hi = _mm256_loadu_ps(w->lut + 8);
    }
    /* GEMV of a 4-bit format: the permuted decode order (chunk_perm), x permuted to match */
    __m256i planes[4];
    const __m256i *plane = NULL;
    float *xp = NULL;
    if (!wout && w->kind != 2) {
        planes16(w->kind == 1 ? ints : w->lut, planes);
        plane = planes;
        x = xp = xperm(x, m, w->k);
    }
    int64_t blocks = m == 1 && !wout ? (n1 - n0) / ROWS256 : 0; /* M = 1: rows n0 .. in groups of ROWS256 */
#pragma omp parallel num_threads(nt)
    {
        float *buf = (m > 4 && !wout) ? (float *)malloc((size_t)w->k * sizeof(float)) : NULL;
#pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < blocks; i++) rows256_any(w, plane, t_lo, t_hi, x, n0 + ROWS256 * i, y);
#pragma omp for schedule(dynamic, 16)
        for (int64_t n = n0 + ROWS256 * blocks; n < n1; n++)
            row_avx2(w, plane, t_lo, t_hi, x, m, n, y, wout ? wout - n0 * w->k : NULL, buf);
        free(buf);
    }
    free(xp);
}
#endif

static void run_f32(const Weight *w, const float *x, int64_t m, float *y, float *wout, int64_t n0, int64_t n1, int nt) {
    float pairs[512];
    if (w->kind == 1) {
        float ints[16];
        for (int i = 0; i < 16; i++) ints[i] = (float)i;
        pair_table(ints, pairs);
    } else if (w->kind == 0) {
        pair_table(w->lut, pairs);
    }
#if defined(__AVX2__) && defined(__FMA__)
    if (vectorizable(w)) {
        run_avx2(w, x, m, y, wout, n0, n1, nt);
        return;
    }
#endif
#pragma omp parallel num_threads(nt)
    {
        float *buf = (float *)malloc((size_t)(w->k + 16) * sizeof(float));
#pragma omp for schedule(dynamic, 16)
        for (int64_t n = n0; n < n1; n++) {
            float *row = decode_row(w, pairs, n, buf);
            if (wout) {
                memcpy(wout + (n - n0) * w->k, row, (size_t)w->k * sizeof(float));
            } else {
                for (int64_t i = 0; i < m; i++) y[i * w->n + n] = dot(x + i * w->k, row, w->k);
            }
        }
        free(buf);
    }
}

/* bf16 <-> fp32 as PyTorch converts them (round to nearest even; NaN -> 0x7FC0) */
static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* XBF16: x is bf16 [M, K] and y is bf16 [M, N] (GEMV only): the product runs in fp32 as for fp32 x, y is rounded once.
 * Converting here rather than with two PyTorch ops saves ~0.1 ms a call on the 2-core EPYC (after the weight stream
 * has evicted the caches, each small op costs tens of microseconds). */
static void run(const Weight *w, const void *x, int xbf16, int64_t m, void *y, float *wout, int64_t n0, int64_t n1,
                int nt) {
    if (!xbf16 || wout) {
        run_f32(w, (const float *)x, m, (float *)y, wout, n0, n1, nt);
        return;
    }
    int64_t k = w->k, n = w->n;
    float *xf = (float *)malloc((size_t)(m * k) * sizeof(float)), *yf = (float *)malloc((size_t)(m * n) * sizeof(float));
    for (int64_t i = 0; i < m * k; i++) xf[i] = from_bf16(((const uint16_t *)x)[i]);
    run_f32(w, xf, m, yf, NULL, n0, n1, nt);
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = n0; j < n1; j++) ((uint16_t *)y)[i * n + j] = to_bf16(yf[i * n + j]);
    free(xf);
    free(yf);
}

/* y[m, n] ([M, N]) = x ([M, K], fp32, or bf16 with xbf16) @ W^T, or rows n0 .. n1 of W into wout (fp32 [n1 - n0, K]) */
void qk_4bit(const void *x, int xbf16, int64_t m, const uint8_t *packed, const float *absmax, const float *table16,
             int64_t n, int64_t k, int64_t bs, void *y, float *wout, int64_t n0, int64_t n1, int nt) {
    Weight w = {0, packed, absmax, NULL, table16, n, k, bs};
    run(&w, x, xbf16, m, y, wout, n0, n1, nt);
}

void qk_int4(const void *x, int xbf16, int64_t m, const uint8_t *packed, const float *scale, const float *zero, int64_t n,
             int64_t k, int64_t gs, void *y, float *wout, int64_t n0, int64_t n1, int nt) {
    Weight w = {1, packed, scale, zero, NULL, n, k, gs};
    run(&w, x, xbf16, m, y, wout, n0, n1, nt);
}

void qk_chan(const void *x, int xbf16, int64_t m, const uint8_t *q, const float *lut256, const float *scale, int is_int8,
             int64_t n, int64_t k, void *y, float *wout, int64_t n0, int64_t n1, int nt) {
    Weight w = {2, q, scale, NULL, lut256, n, k, is_int8};
    run(&w, x, xbf16, m, y, wout, n0, n1, nt);
}

void qk_mxfp4(const void *x, int xbf16, int64_t m, const uint8_t *packed, const float *scale, const float *table16, int64_t n,
              int64_t k, void *y, float *wout, int64_t n0, int64_t n1, int nt) {
    Weight w = {3, packed, scale, NULL, table16, n, k, 0};
    run(&w, x, xbf16, m, y, wout, n0, n1, nt);
}
