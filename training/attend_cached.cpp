// hstu.attend_cached fused: the (T x L) scores never leave L1.
//
// out[b, t, h, :] = scale * sum_l silu(q[b, t, h, :] . k[b, l, h, :] + bias[b, t, l]) * v[b, l, h, :]
//
// The bias is one row shared by every query (candidate scoring: bias_t = 0) or one row per query stored
// query-fastest (prefill: bias_t = 1, element (t, l) at t + l * bias_l), so that 16 queries' bias for one key
// is one vector load. With causal, query t reads no key past t (they are masked in the bias anyway): a prefill
// computes half the pairs.
//
// Compiled by genrec.training.native for the machine it runs on, with -DDQ=<d_qk> -DDV=<d_v>: constant sizes
// keep q and the sums in registers. Vectors run over 16 queries (candidates) at a time, so the key and value
// rows are read as broadcast scalars in their stored layout (B, L, H, d): nothing is copied head-major.

#include <stdint.h>

#define QB 16  // queries per vector
#ifndef LB
#define LB 16  // keys per block: three passes over the block's scores, each a loop of independent steps
#endif

typedef float vec __attribute__((vector_size(QB * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(QB * sizeof(int32_t))));

#if defined(__AVX512F__)
#include <immintrin.h>
static inline vec recip(vec d) {  // 14-bit estimate and one Newton step: ~1e-8 relative; vdivps is 16 cycles
    vec r = (vec)_mm512_rcp14_ps((__m512)d);
    return r * (2.0f - d * r);
}
static inline ivec round_int(vec z) { return (ivec)_mm512_cvtps_epi32((__m512)z); }
#else
static inline vec recip(vec d) { return 1.0f / d; }
static inline ivec round_int(vec z) { return __builtin_convertvector(z + (z < 0.0f ? -0.5f : 0.5f), ivec); }
#endif

// x * sigmoid(x) in registers (a call to a vector expf would spill every register around it).
// exp(-x) = 2^n e^(f ln 2), n the integer nearest -x log2(e), |f| <= 1/2, by a degree-7 Taylor polynomial
// (truncation < 1e-8 relative). -x log2(e) is clamped to +-115, where silu is x or 0 to fp32 precision; a key
// masked with bias -1e9 gives exactly 0, as the eager form does.
static inline vec silu(vec x) {
    vec z = -x * 1.44269504f;
    z = z < -115.0f ? -115.0f + vec{} : z;
    z = z > 115.0f ? 115.0f + vec{} : z;
    ivec n = round_int(z);
    vec f = (z - __builtin_convertvector(n, vec)) * 0.693147181f;
    vec p = 1.0f / 5040 + vec{};
    p = p * f + 1.0f / 720; p = p * f + 1.0f / 120; p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6; p = p * f + 0.5f; p = p * f + 1.0f; p = p * f + 1.0f;
    vec e = (vec)((ivec)p + (n << 23));  // p * 2^n
    vec s = x * recip(1.0f + e);
    return z >= 115.0f ? vec{} : s;
}

// Strides are in floats; within a row, heads are DQ (DV) floats apart and each head's vector is contiguous.
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
            vec qt[DQ], acc[DV], x[LB];
            for (int e = 0; e < DQ; e++) qt[e] = vec{};
            for (int e = 0; e < DV; e++) acc[e] = vec{};
            for (int64_t t = 0; t < nt; t++)
                for (int e = 0; e < DQ; e++) qt[e][t] = q[b * q_b + (t0 + t) * q_t + h * DQ + e];
            const float *kh = k + b * k_b + h * DQ, *vh = v + b * v_b + h * DV, *bb = bias + b * bias_b;
            const int64_t end = causal && t0 + nt < L ? t0 + nt : L;
            for (int64_t l0 = 0; l0 < end; l0 += LB) {
                const int64_t nl = end - l0 < LB ? end - l0 : LB;
                for (int64_t l = 0; l < nl; l++) {
                    const float *kr = kh + (l0 + l) * k_l, *br = bb + (l0 + l) * bias_l;
                    vec y0, y1 = vec{};  // two partial sums: shorter dependency chains
                    if (!bias_t) {
                        y0 = br[0] + vec{};
                    } else if (nt == QB) {
                        __builtin_memcpy(&y0, br + t0, sizeof(vec));
                    } else {
                        y0 = vec{};
                        for (int64_t t = 0; t < nt; t++) y0[t] = br[t0 + t];
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
            for (int64_t t = 0; t < nt; t++)
                for (int e = 0; e < DV; e++) out[((b * T + t0 + t) * H + h) * DV + e] = acc[e][t] * scale;
        }
    }
}
