// hstu.attend_cached fused: the (T x L) scores never leave L1.
//
// out[b, t, h, :] = scale * sum_l silu(q[b, t, h, :] . k[b, l, h, :] + bias[b, t, l]) * v[b, l, h, :]
//
// The bias is one row shared by every query (candidate scoring: bias_t = 0) or one row per query stored
// query-fastest (prefill: bias_t = 1, element (t, l) at t + l * bias_l), so that 16 queries' bias for one key
// is one vector load. With causal, query t reads no key past t (they are masked in the bias anyway): a prefill
// computes half the pairs.
//
// layer_step runs the rest of a layer on new tokens (candidates, appended events) between its matmuls
// around the same attention.
//
// Compiled by genrec.training.native for the machine it runs on, with -DDQ=<d_qk> -DDV=<d_v>: constant sizes
// keep q and the sums in registers. Vectors run over 16 queries (candidates) at a time, so the key and value
// rows are read as broadcast scalars in their stored layout (B, L, H, d): nothing is copied head-major.

#include <stdint.h>

#define QB 16  // queries per vector
#ifndef LB
#define LB 16  // keys per block: three passes over the block's scores, each a loop of independent steps
#endif
#ifndef PREFETCH
#define PREFETCH 32  // keys ahead
#endif

typedef float vec __attribute__((vector_size(QB * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(QB * sizeof(int32_t))));

#if defined(__AVX512F__)
#include <immintrin.h>
static inline vec recip(vec d) {  // 14-bit estimate and one Newton step: ~1e-8 relative; vdivps is 16 cycles
    vec r = (vec)_mm512_rcp14_ps((__m512)d);
    return r * (2.0f - d * r);
}
static inline vec round_near(vec z) {
    return (vec)_mm512_roundscale_ps((__m512)z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vec scale2(vec p, vec n) { return (vec)_mm512_scalef_ps((__m512)p, (__m512)n); }  // p 2^n, inf past fp32
static inline vec exponent_range(vec z) { return z; }  // scalef takes any n
static inline vec load_first(const float *p, int64_t n) {  // p[0 .. n-1], zeros after: one masked load
    return (vec)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
#else
static inline vec load_first(const float *p, int64_t n) {
    vec x = vec{};
    for (int64_t t = 0; t < n; t++) x[t] = p[t];
    return x;
}
static inline vec recip(vec d) { return 1.0f / d; }
static inline vec exponent_range(vec z) {  // n fits the exponent bits; silu is 0 or x long before +-126
    z = z < -126.0f ? -126.0f + vec{} : z;
    return z > 126.0f ? 126.0f + vec{} : z;
}
static inline vec round_near(vec z) {
    return __builtin_convertvector(__builtin_convertvector(z + (z < 0.0f ? -0.5f : 0.5f), ivec), vec);
}
static inline vec scale2(vec p, vec n) { return (vec)((ivec)p + (__builtin_convertvector(n, ivec) << 23)); }
#endif

// x * sigmoid(x) in registers (a call to a vector expf would spill every register around it): ~16 vector
// instructions for 16 values. exp(-x) = 2^n 2^f, n the integer nearest -x log2(e) and |f| <= 1/2, with 2^f by a
// degree-6 polynomial fitted for relative error (< 1e-7 evaluated in fp32; the coefficients are a weighted
// least-squares fit on Chebyshev nodes). Where -x log2(e) >= 115, silu is 0 to fp32 precision and is returned
// as exactly 0 (a key masked with bias -1e9, as the eager form gives); 1 + exp(-x) may be inf there.
static inline vec silu(vec x) {
    const vec z = exponent_range(-x * 1.44269504f), n = round_near(z), f = z - n;
    vec p = 1.534646705508751e-4f + vec{};
    p = p * f + 1.3399936843755701e-3f; p = p * f + 9.618486524791784e-3f; p = p * f + 5.550328759455762e-2f;
    p = p * f + 2.4022646913061407e-1f; p = p * f + 6.931472057481178e-1f; p = p * f + 1.0000000005511513f;
    const vec s = x * recip(1.0f + scale2(p, n));
    return z < 115.0f ? s : vec{};
}

// One tile: queries t0 .. t0+nt-1 of one (user, head) against keys 0 .. end-1. q, kh, vh and bb point at the
// (user, head)'s first query, key, value and bias; strides are in floats, and within a row the heads are DQ (DV)
// floats apart, each head's vector contiguous. With self_k (strided as q), each query also attends to its own
// key and value (self_k, self_v) with bias self_bias: a candidate token seeing itself. out: the tile's first
// query's row, out_t floats between queries.
static inline void attend_tile(const float *q, int64_t q_t, const float *kh, int64_t k_l, const float *vh,
                               int64_t v_l, const float *bb, int64_t bias_t, int64_t bias_l, int64_t t0,
                               int64_t nt, int64_t end, const float *self_k, const float *self_v, float self_bias,
                               float scale, float *out, int64_t out_t) {
    vec qt[DQ], acc[DV], x[LB];
    for (int e = 0; e < DQ; e++) qt[e] = vec{};
    for (int e = 0; e < DV; e++) acc[e] = vec{};
    for (int64_t t = 0; t < nt; t++)
        for (int e = 0; e < DQ; e++) qt[e][t] = q[(t0 + t) * q_t + e];
    for (int64_t l0 = 0; l0 < end; l0 += LB) {
        const int64_t nl = end - l0 < LB ? end - l0 : LB;
        // The head's first tile reads its keys and values from memory, 64 B of each longer row: a stride the
        // hardware prefetches too late (a user's cache read cold cost scoring ~25% more before this).
        if (t0 == 0)
            for (int64_t l = l0 + PREFETCH; l < l0 + PREFETCH + nl && l < end; l++) {
                __builtin_prefetch(kh + l * k_l);
                __builtin_prefetch(vh + l * v_l);
            }
        for (int64_t l = 0; l < nl; l++) {
            const float *kr = kh + (l0 + l) * k_l, *br = bb + (l0 + l) * bias_l;
            vec y0, y1 = vec{};  // two partial sums: shorter dependency chains
            if (!bias_t) {
                y0 = br[0] + vec{};
            } else if (nt == QB) {
                __builtin_memcpy(&y0, br + t0, sizeof(vec));
            } else {  // a partial tile (an append of a few events): lanes written one by one would stall the load
                y0 = load_first(br + t0, nt);
            }
            #pragma GCC unroll 64
            for (int e = 0; e + 1 < DQ; e += 2) { y0 += qt[e] * kr[e]; y1 += qt[e + 1] * kr[e + 1]; }
            if (DQ % 2) y0 += qt[DQ - 1] * kr[DQ - 1];
            x[l] = y0 + y1;
        }
        for (int64_t l = 0; l < nl; l++) x[l] = silu(x[l]);
        for (int64_t l = 0; l < nl; l++) {
            const float *vr = vh + (l0 + l) * v_l;
            #pragma GCC unroll 64
            for (int e = 0; e < DV; e++) acc[e] += x[l] * vr[e];
        }
    }
    if (self_k) {
        vec y = self_bias + vec{}, column;
        for (int e = 0; e < DQ; e++) {
            column = vec{};
            for (int64_t t = 0; t < nt; t++) column[t] = self_k[(t0 + t) * q_t + e];
            y += qt[e] * column;
        }
        const vec w = silu(y);
        for (int e = 0; e < DV; e++) {
            column = vec{};
            for (int64_t t = 0; t < nt; t++) column[t] = self_v[(t0 + t) * q_t + e];
            acc[e] += w * column;
        }
    }
    for (int64_t t = 0; t < nt; t++)
        for (int e = 0; e < DV; e++) out[(t0 + t) * out_t + e] = acc[e][t] * scale;
}

// hstu.attend_cached: q (B, T, H, DQ), k (B, L, H, DQ), v (B, L, H, DV) -> out (B, T, H, DV), contiguous.
extern "C" void attend_cached(const float *q, const float *k, const float *v, const float *bias, float *out,
                              int64_t B, int64_t T, int64_t H, int64_t L, int64_t q_b, int64_t q_t,
                              int64_t k_b, int64_t k_l, int64_t v_b, int64_t v_l, int64_t bias_b,
                              int64_t bias_t, int64_t bias_l, int64_t causal, float scale, int threads) {
    const int64_t tblocks = (T + QB - 1) / QB;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        for (int64_t tb = 0; tb < tblocks; tb++) {
            const int64_t b = bh / H, h = bh % H, t0 = tb * QB;
            const int64_t nt = T - t0 < QB ? T - t0 : QB;
            const int64_t end = causal && t0 + nt < L ? t0 + nt : L;
            attend_tile(q + b * q_b + h * DQ, q_t, k + b * k_b + h * DQ, k_l, v + b * v_b + h * DV, v_l,
                        bias + b * bias_b, bias_t, bias_l, t0, nt, end, nullptr, nullptr, 0.0f, scale,
                        out + b * T * H * DV + h * DV, H * DV);
        }
    }
}

static inline void silu_row(float *p, const float *bias, int64_t n) {  // p = silu(p + bias), in place
    int64_t i = 0;
    for (; i + QB <= n; i += QB) {  // whole vectors: a fixed-size copy is one load, a variable one a call
        vec x, b;
        __builtin_memcpy(&x, p + i, sizeof(vec));
        __builtin_memcpy(&b, bias + i, sizeof(vec));
        x = silu(x + b);
        __builtin_memcpy(p + i, &x, sizeof(vec));
    }
    if (i < n) {
        const vec x = silu(load_first(p + i, n - i) + load_first(bias + i, n - i));
        __builtin_memcpy(p + i, &x, (n - i) * sizeof(float));
    }
}

static inline float row_sum(const float *p, int64_t n, float shift, bool square) {  // sum of (p - shift)^(1 or 2)
    vec acc = vec{};
    int64_t i = 0;
    for (; i + QB <= n; i += QB) {
        vec x;
        __builtin_memcpy(&x, p + i, sizeof(vec));
        x -= shift;
        acc += square ? x * x : x;
    }
    float total = 0;
    for (int t = 0; t < QB; t++) total += acc[t];
    for (; i < n; i++) total += square ? (p[i] - shift) * (p[i] - shift) : p[i] - shift;
    return total;
}

// One HSTU layer's work on new tokens between its two matmuls (hstu.HSTULayer.step_fused), for candidates
// scored against a user's cache and for events appended to it. pre (B*T, H*(2 DV + 2 DQ)), the tokens' input
// projection before its bias (pre_bias) and SiLU, laid out u | v | q | k, becomes silu(pre + pre_bias) in place.
// With write_pos (B, T), token t's key and value are then written into the cache (k, v: (B, rows, H, d)) at row
// write_pos[b, t] (an append: the token attends to itself there). Each token attends to the cache's keys
// 0 .. L-1 with the bias table[buckets[b, t', l]] where l < limits[b, t'], the bias `masked` after; per_query: t' = t (B, T,
// L buckets, (B, T) limits), else t' = 0 for every token. With self_attend (candidates), a token also attends to
// its own key and value with the bias table[self_index]. The result, layer-normed (norm_w, norm_b, eps) and gated
// by u, goes to y (B*T, H*DV); xb = x + out_bias (B*T, D) is the residual that the output matmul adds to.
// bias_rows: scratch of B * (T or 1) * L floats.
extern "C" void layer_step(float *pre, const float *pre_bias, float *k, float *v, const int64_t *write_pos,
                           int64_t self_attend, const int64_t *buckets, const int64_t *limits, int64_t per_query,
                           float masked, const float *table, int64_t self_index, const float *norm_w, const float *norm_b,
                           float eps, const float *x, const float *out_bias, float *y, float *xb, float *bias_rows,
                           int64_t B, int64_t T, int64_t H, int64_t L, int64_t D, int64_t k_b, int64_t k_l,
                           int64_t v_b, int64_t v_l, float scale, int threads) {
    const int64_t width = H * (2 * DV + 2 * DQ), n = H * DV, tblocks = (T + QB - 1) / QB;
    const int64_t tq = per_query ? T : 1;  // bias rows per user
    const float self_bias = self_attend ? table[self_index] : 0.0f;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < B * T; r++) {
            float *row = pre + r * width;
            silu_row(row, pre_bias, width);
            for (int64_t e = 0; e < D; e++) xb[r * D + e] = x[r * D + e] + out_bias[e];
            if (write_pos) {
                const int64_t b = r / T, at = write_pos[r];
                __builtin_memcpy(k + b * k_b + at * k_l, row + 2 * n + H * DQ, H * DQ * sizeof(float));
                __builtin_memcpy(v + b * v_b + at * v_l, row + n, n * sizeof(float));
            }
        }
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B * L * tq; i++) {  // stored (b, l, t'): one vector holds 16 queries' bias
            const int64_t b = i / (L * tq), l = i / tq % L, t = i % tq, q = b * tq + t;
            bias_rows[i] = l < limits[q] ? table[buckets[q * L + l]] : masked;
        }
        #pragma omp for collapse(2) schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            for (int64_t tb = 0; tb < tblocks; tb++) {
                const int64_t b = bh / H, h = bh % H, t0 = tb * QB;
                const int64_t nt = T - t0 < QB ? T - t0 : QB;
                const float *rows = pre + b * T * width;
                attend_tile(rows + 2 * n + h * DQ, width, k + b * k_b + h * DQ, k_l, v + b * v_b + h * DV, v_l,
                            bias_rows + b * L * tq, per_query, tq, t0, nt, L,
                            self_attend ? rows + 2 * n + H * DQ + h * DQ : nullptr, rows + n + h * DV, self_bias,
                            scale, y + b * T * n + h * DV, n);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < B * T; r++) {
            float *row = y + r * n;
            const float *u = pre + r * width;
            const float mean = row_sum(row, n, 0.0f, false) / n;
            const float rstd = 1.0f / __builtin_sqrtf(row_sum(row, n, mean, true) / n + eps);
            for (int64_t e = 0; e < n; e++) row[e] = ((row[e] - mean) * rstd * norm_w[e] + norm_b[e]) * u[e];
        }
    }
}
