/* The per-pair work of the MixLoRA kernel for the SiLU-gated FFN (Llama, Qwen2, Mistral), fused on CPU.
 *
 * moe_zoo/core/lora_pairs_kernel.py compiles this file on first use (gcc/cc, -O3 -march=native, OpenMP) and calls it
 * through ctypes; moe_zoo/core/lora_experts.py documents the algebra. Everything is fp32 and contiguous.
 *
 * Both passes run one token per loop iteration (OpenMP over tokens), and each of the token's k slots is one routed
 * (token, expert) pair p of expert e:
 *   g_p = G[t] + sum_r ag[p, r] * Bg[e, r, :]          (gate pre-activation: frozen product + LoRA delta)
 *   u_p = U[t] + sum_r au[p, r] * Bu[e, r, :]          (up pre-activation)
 *   h_p = silu(g_p) * u_p
 * so that a pair's rows live in registers and cache, and per token the slots are summed without atomics.
 *
 * Forward: mixed[t] = sum_slots w * h_p, and lo[p, r] = sum_i (h_p * mask_o[p])_i * Ao[e, r, i] (output LoRA A).
 * Backward (pre-activations recomputed, never stored): with gh = grad_mixed[t],
 *   dw[p] = <gh, h_p>,  dh = w_p gh + (sum_r go[p, r] Ao[e, r, :]) * mask_o[p],
 *   du_p = dh * silu(g_p),  dg_p = dh * u_p * sigmoid(g_p) * (1 + g_p (1 - sigmoid(g_p))),
 * written per pair (for the LoRA B gradients), summed per token (dG, dU: the frozen products' gradients), and
 * projected on the LoRA B factors (gag[p, r] = <dg_p, Bg[e, r]>, gau likewise). A null LoRA pointer means that
 * projection has no LoRA; a null Ao means no output LoRA; a null mask_o means no output dropout.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float sigmoid_of(float x) {
    x = x < -80.0f ? -80.0f : (x > 80.0f ? 80.0f : x);
    return 1.0f / (1.0f + expf(-x));
}

/* row += a @ factors (rank x width): one pass over the row (which stays in L1) per four ranks. */
static void add_rank_product(float *restrict row, const float *restrict a, const float *restrict factors,
                             int64_t rank, int64_t width) {
    int64_t r = 0;
    for (; r + 4 <= rank; r += 4) {
        const float c0 = a[r], c1 = a[r + 1], c2 = a[r + 2], c3 = a[r + 3];
        const float *restrict f = factors + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; i++)
            row[i] += c0 * f[i] + c1 * f[width + i] + c2 * f[2 * width + i] + c3 * f[3 * width + i];
    }
    for (; r < rank; r++) {
        const float coefficient = a[r];
        const float *restrict factor = factors + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; i++) row[i] += coefficient * factor[i];
    }
}

/* out[r] = <row, factors[r]> for every rank r, four ranks per pass over the row. */
static void project(float *restrict out, const float *restrict row, const float *restrict factors, int64_t rank,
                    int64_t width) {
    int64_t r = 0;
    for (; r + 4 <= rank; r += 4) {
        const float *restrict f = factors + r * width;
        float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
#pragma omp simd reduction(+ : t0, t1, t2, t3)
        for (int64_t i = 0; i < width; i++) {
            t0 += row[i] * f[i];
            t1 += row[i] * f[width + i];
            t2 += row[i] * f[2 * width + i];
            t3 += row[i] * f[3 * width + i];
        }
        out[r] = t0, out[r + 1] = t1, out[r + 2] = t2, out[r + 3] = t3;
    }
    for (; r < rank; r++) {
        const float *restrict factor = factors + r * width;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < width; i++) total += row[i] * factor[i];
        out[r] = total;
    }
}

/* What both passes read to rebuild a pair's pre-activations (filled by lora_pairs_kernel.py's _Pairs). */
struct pairs {
    int64_t top_k, width, rank_g, rank_u;
    const float *G, *U, *ag, *Bg, *au, *Bu, *slot_weights;
    const int64_t *experts, *slot_pair;
    const uint8_t *slot_mask;
};

/* Slot j of token t: 0 if it is empty, else 1 with its pair *p, expert *e, weight *w, and g, u filled. */
static int load_slot(const struct pairs *in, int64_t t, int64_t j, float *restrict g, float *restrict u, int64_t *p,
                     int64_t *e, float *w) {
    const int64_t slot = t * in->top_k + j, width = in->width;
    if (!in->slot_mask[slot]) return 0;
    *p = in->slot_pair[slot];
    *e = in->experts[*p];
    *w = in->slot_weights[slot];
    memcpy(g, in->G + t * width, (size_t)width * sizeof(float));
    memcpy(u, in->U + t * width, (size_t)width * sizeof(float));
    if (in->ag) add_rank_product(g, in->ag + *p * in->rank_g, in->Bg + *e * in->rank_g * width, in->rank_g, width);
    if (in->au) add_rank_product(u, in->au + *p * in->rank_u, in->Bu + *e * in->rank_u * width, in->rank_u, width);
    return 1;
}

void lora_pairs_forward(const struct pairs *pairs, int64_t num_tokens, const float *Ao, int64_t rank_o,
                        const float *mask_o, float *mixed, float *lo) {
    const struct pairs in = *pairs;
    const int64_t top_k = in.top_k, width = in.width;
#pragma omp parallel
    {
        float *g = malloc((size_t)(3 * width) * sizeof(float));
        float *u = g + width, *lora_input = u + width;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; t++) {
            float *restrict out = mixed + t * width;
            memset(out, 0, (size_t)width * sizeof(float));
            for (int64_t j = 0; j < top_k; j++) {
                int64_t p, e;
                float w;
                if (!load_slot(&in, t, j, g, u, &p, &e, &w)) continue;
#pragma omp simd
                for (int64_t i = 0; i < width; i++) {
                    const float h = g[i] * sigmoid_of(g[i]) * u[i];
                    g[i] = h;
                    out[i] += w * h;
                }
                if (!Ao) continue;
                const float *h = g;
                if (mask_o) {
                    const float *mask = mask_o + p * width;
#pragma omp simd
                    for (int64_t i = 0; i < width; i++) lora_input[i] = g[i] * mask[i];
                    h = lora_input;
                }
                project(lo + p * rank_o, h, Ao + e * rank_o * width, rank_o, width);
            }
        }
        free(g);
    }
}

void lora_pairs_backward(const struct pairs *pairs, int64_t num_tokens, const float *grad_mixed, const float *go,
                         const float *Ao, int64_t rank_o, const float *mask_o, float *dg_out, float *du_out,
                         float *lora_hidden, float *dw, float *dG, float *dU, float *gag, float *gau) {
    const struct pairs in = *pairs;
    const int64_t top_k = in.top_k, width = in.width, rank_g = in.rank_g, rank_u = in.rank_u;
    const float *Bg = in.Bg, *Bu = in.Bu;
#pragma omp parallel
    {
        float *g = malloc((size_t)(3 * width) * sizeof(float));
        float *u = g + width, *dh = u + width;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; t++) {
            const float *restrict gh = grad_mixed + t * width;
            float *restrict token_dg = dG + t * width, *restrict token_du = dU + t * width;
            memset(token_dg, 0, (size_t)width * sizeof(float));
            memset(token_du, 0, (size_t)width * sizeof(float));
            for (int64_t j = 0; j < top_k; j++) {
                int64_t p, e;
                float w;
                if (!load_slot(&in, t, j, g, u, &p, &e, &w)) continue;
                memset(dh, 0, (size_t)width * sizeof(float));
                if (Ao) {
                    add_rank_product(dh, go + p * rank_o, Ao + e * rank_o * width, rank_o, width);
                    if (mask_o) {
                        const float *mask = mask_o + p * width;
#pragma omp simd
                        for (int64_t i = 0; i < width; i++) dh[i] *= mask[i];
                    }
                }
                float *restrict dg = dg_out + p * width, *restrict du = du_out + p * width;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < width; i++) {
                    const float s = sigmoid_of(g[i]);
                    const float silu = g[i] * s;
                    const float h = silu * u[i];
                    dot += gh[i] * h;
                    const float grad_h = w * gh[i] + dh[i];
                    const float d_gate = grad_h * u[i] * s * (1.0f + g[i] * (1.0f - s));
                    const float d_up = grad_h * silu;
                    dg[i] = d_gate;
                    du[i] = d_up;
                    token_dg[i] += d_gate;
                    token_du[i] += d_up;
                    u[i] = h; /* u is read above only: it now holds h, for the output LoRA's input below */
                }
                if (Ao) {
                    float *restrict kept = lora_hidden + p * width;
                    if (mask_o) {
                        const float *mask = mask_o + p * width;
#pragma omp simd
                        for (int64_t i = 0; i < width; i++) kept[i] = u[i] * mask[i];
                    } else {
                        memcpy(kept, u, (size_t)width * sizeof(float));
                    }
                }
                dw[p] = dot;
                if (in.ag) project(gag + p * rank_g, dg, Bg + e * rank_g * width, rank_g, width);
                if (in.au) project(gau + p * rank_u, du, Bu + e * rank_u * width, rank_u, width);
            }
        }
        free(g);
    }
}
