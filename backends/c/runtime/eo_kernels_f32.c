/*
 * edgeopt float32 kernels: the same layouts and parameter blocks as the int8 kernels (the
 * int8 fields are ignored). No libm here (see eo_activations_f32.c).
 */
#include <float.h>

#include "eo_internal.h"

/* Dense or CSR weights of a float convolution: exactly one of dense / csr is set. */
typedef struct {
    const float *dense;
    const eo_csr *csr;
} eo_wf32;

/* t: the taps of this output position that read the image (eo_i_conv_taps). */
static float eo_conv_acc_dense_f32(const eo_conv_params *p, const float *in, const float *w_row,
                                   int32_t b, int32_t iy0, int32_t ix0, const eo_window *t,
                                   int32_t ic0)
{
    const int32_t icg = p->in_c / p->groups;
    float acc = 0.0f;
    int32_t ky, kx, ic;
    for (ky = t->y0; ky < t->y1; ++ky) {
        const int32_t iy = iy0 + ky * p->dil_h;
        for (kx = t->x0; kx < t->x1; ++kx) {
            const float *x = in + eo_i_nhwc(b, iy, ix0 + kx * p->dil_w, p->in_h, p->in_w,
                                            p->in_c) + ic0;
            const float *wk = w_row + (ky * p->k_w + kx) * icg;
            for (ic = 0; ic < icg; ++ic) {
                acc += wk[ic] * x[ic];
            }
        }
    }
    return acc;
}

static float eo_conv_acc_csr_f32(const eo_conv_params *p, const float *in, const eo_csr *w,
                                 int32_t r, int32_t b, int32_t iy0, int32_t ix0, int32_t ic0)
{
    const float *values = (const float *)w->values;
    const int32_t icg = p->in_c / p->groups;
    const int32_t end = eo_i_index(w->row_ptr, w->ptr_bytes, r + 1);
    float acc = 0.0f;
    int32_t i;
    for (i = eo_i_index(w->row_ptr, w->ptr_bytes, r); i < end; ++i) {
        int32_t tap, ic, iy, ix;
        eo_i_csr_col(eo_i_index(w->col_idx, w->idx_bytes, i), icg, &tap, &ic);
        iy = iy0 + (tap / p->k_w) * p->dil_h;
        ix = ix0 + (tap % p->k_w) * p->dil_w;
        if (iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w) {
            continue;
        }
        acc += values[i] * in[eo_i_nhwc(b, iy, ix, p->in_h, p->in_w, p->in_c) + ic0 + ic];
    }
    return acc;
}

static void eo_conv_any_f32(const eo_conv_params *p, const float *in, eo_wf32 w,
                            const float *bias, float *out)
{
    const int32_t icg = p->in_c / p->groups, ocg = p->out_c / p->groups;
    const int32_t row = p->k_h * p->k_w * icg;
    int32_t b, oy, ox, oc;
    for (b = 0; b < p->batch; ++b) {
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                const int32_t iy0 = oy * p->stride_h - p->pad_top;
                const int32_t ix0 = ox * p->stride_w - p->pad_left;
                const eo_window t = eo_i_conv_taps(p, iy0, ix0);
                for (oc = 0; oc < p->out_c; ++oc) {
                    const int32_t ic0 = (oc / ocg) * icg;
                    float acc = w.csr != 0
                                    ? eo_conv_acc_csr_f32(p, in, w.csr, oc, b, iy0, ix0, ic0)
                                    : eo_conv_acc_dense_f32(p, in, w.dense + oc * row, b, iy0,
                                                            ix0, &t, ic0);
                    acc += bias != 0 ? bias[oc] : 0.0f;
                    *out++ = eo_i_fclamp(acc, p->fact_min, p->fact_max);
                }
            }
        }
    }
}

void eo_conv_f32(const eo_conv_params *p, const float *in, const float *w, const float *bias,
                 float *out)
{
    eo_wf32 wf;
    wf.dense = w;
    wf.csr = 0;
    eo_conv_any_f32(p, in, wf, bias, out);
}

void eo_conv_f32_csr(const eo_conv_params *p, const float *in, const eo_csr *w,
                     const float *bias, float *out)
{
    eo_wf32 wf;
    wf.dense = 0;
    wf.csr = w;
    eo_conv_any_f32(p, in, wf, bias, out);
}

void eo_depthwise_conv_f32(const eo_conv_params *p, const float *in, const float *w,
                           const float *bias, float *out)
{
    const int32_t m = p->out_c / p->in_c;
    int32_t b, oy, ox, oc, ky, kx;
    for (b = 0; b < p->batch; ++b) {
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                const int32_t iy0 = oy * p->stride_h - p->pad_top;
                const int32_t ix0 = ox * p->stride_w - p->pad_left;
                const eo_window t = eo_i_conv_taps(p, iy0, ix0);
                for (oc = 0; oc < p->out_c; ++oc) {
                    float acc = bias != 0 ? bias[oc] : 0.0f;
                    for (ky = t.y0; ky < t.y1; ++ky) {
                        const int32_t iy = iy0 + ky * p->dil_h;
                        for (kx = t.x0; kx < t.x1; ++kx) {
                            acc += w[(ky * p->k_w + kx) * p->out_c + oc] *
                                   in[eo_i_nhwc(b, iy, ix0 + kx * p->dil_w, p->in_h, p->in_w,
                                                p->in_c) + oc / m];
                        }
                    }
                    *out++ = eo_i_fclamp(acc, p->fact_min, p->fact_max);
                }
            }
        }
    }
}

/* ConvTranspose sum of output (b, oy, ox, oc): the taps whose input scatters onto it. */
static float eo_tconv_acc_f32(const eo_conv_params *p, const float *in, const float *w,
                              int32_t b, int32_t oy, int32_t ox, int32_t oc)
{
    const int32_t icg = p->in_c / p->groups, c0 = (oc / (p->out_c / p->groups)) * icg;
    float acc = 0.0f;
    int32_t ky, kx, ic;
    for (ky = 0; ky < p->k_h; ++ky) {
        const int32_t iy = eo_i_tconv_src(oy, ky, p->pad_top, p->dil_h, p->stride_h, p->in_h);
        for (kx = 0; iy >= 0 && kx < p->k_w; ++kx) {
            const int32_t ix = eo_i_tconv_src(ox, kx, p->pad_left, p->dil_w, p->stride_w,
                                              p->in_w);
            const float *x, *wk;
            if (ix < 0) {
                continue;
            }
            x = in + eo_i_nhwc(b, iy, ix, p->in_h, p->in_w, p->in_c) + c0;
            wk = w + ((oc * p->k_h + ky) * p->k_w + kx) * icg;
            for (ic = 0; ic < icg; ++ic) {
                acc += wk[ic] * x[ic];
            }
        }
    }
    return acc;
}

void eo_conv_transpose_f32(const eo_conv_params *p, const float *in, const float *w,
                           const float *bias, float *out)
{
    int32_t b, oy, ox, oc;
    for (b = 0; b < p->batch; ++b) {
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                for (oc = 0; oc < p->out_c; ++oc) {
                    const float acc = (bias != 0 ? bias[oc] : 0.0f) +
                                      eo_tconv_acc_f32(p, in, w, b, oy, ox, oc);
                    *out++ = eo_i_fclamp(acc, p->fact_min, p->fact_max);
                }
            }
        }
    }
}

void eo_fc_f32(const eo_fc_params *p, const float *in, const float *w, const float *bias,
               float *out)
{
    int32_t b, o, i;
    for (b = 0; b < p->batch; ++b) {
        const float *x = in + b * p->in_features;
        for (o = 0; o < p->out_features; ++o) {
            const float *wr = w + o * p->in_features;
            float acc = bias != 0 ? bias[o] : 0.0f;
            for (i = 0; i < p->in_features; ++i) {
                acc += wr[i] * x[i];
            }
            *out++ = eo_i_fclamp(acc, p->fact_min, p->fact_max);
        }
    }
}

void eo_fc_f32_csr(const eo_fc_params *p, const float *in, const eo_csr *w, const float *bias,
                   float *out)
{
    const float *values = (const float *)w->values;
    int32_t b, o, i;
    for (b = 0; b < p->batch; ++b) {
        const float *x = in + b * p->in_features;
        for (o = 0; o < p->out_features; ++o) {
            const int32_t end = eo_i_index(w->row_ptr, w->ptr_bytes, o + 1);
            float acc = bias != 0 ? bias[o] : 0.0f;
            for (i = eo_i_index(w->row_ptr, w->ptr_bytes, o); i < end; ++i) {
                acc += values[i] * x[eo_i_index(w->col_idx, w->idx_bytes, i)];
            }
            *out++ = eo_i_fclamp(acc, p->fact_min, p->fact_max);
        }
    }
}

/* Elementwise binary float ops with broadcasting (see eo_binary_params): one row each. */
#define EO_ROW_F32(name, expr)                                                               \
    static void name(const eo_binary_params *p, const void *va, int32_t sa, const void *vb,   \
                     int32_t sb, void *vout, int32_t n)                                     \
    {                                                                                          \
        const float *a = (const float *)va, *b = (const float *)vb;                           \
        float *out = (float *)vout;                                                            \
        int32_t i;                                                                             \
        for (i = 0; i < n; ++i) {                                                              \
            const float x = a[i * sa], y = b[i * sb];                                          \
            out[i] = eo_i_fclamp(expr, p->fact_min, p->fact_max);                              \
        }                                                                                      \
    }

EO_ROW_F32(eo_add_row_f32, x + y)
EO_ROW_F32(eo_sub_row_f32, x - y)
EO_ROW_F32(eo_mul_row_f32, x * y)
EO_ROW_F32(eo_div_row_f32, x / y)

void eo_add_f32(const eo_binary_params *p, const float *a, const float *b, float *out)
{
    eo_i_broadcast(p, a, b, out, 4, eo_add_row_f32);
}

void eo_sub_f32(const eo_binary_params *p, const float *a, const float *b, float *out)
{
    eo_i_broadcast(p, a, b, out, 4, eo_sub_row_f32);
}

void eo_mul_f32(const eo_binary_params *p, const float *a, const float *b, float *out)
{
    eo_i_broadcast(p, a, b, out, 4, eo_mul_row_f32);
}

void eo_div_f32(const eo_binary_params *p, const float *a, const float *b, float *out)
{
    eo_i_broadcast(p, a, b, out, 4, eo_div_row_f32);
}

static void eo_pool_f32(const eo_pool_params *p, const float *in, float *out, int is_max)
{
    int32_t b, oy, ox, c, y, x;
    for (b = 0; b < p->batch; ++b) {
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                const eo_window w = eo_i_pool_window(p, oy, ox);
                const int32_t count = (w.y1 - w.y0) * (w.x1 - w.x0);
                for (c = 0; c < p->c; ++c) {
                    float acc = is_max ? -FLT_MAX : 0.0f;
                    for (y = w.y0; y < w.y1; ++y) {
                        for (x = w.x0; x < w.x1; ++x) {
                            const float v = in[eo_i_nhwc(b, y, x, p->in_h, p->in_w, p->c) + c];
                            acc = is_max ? (v > acc ? v : acc) : acc + v;
                        }
                    }
                    if (!is_max && count > 0) {
                        acc /= (float)count;
                    }
                    *out++ = eo_i_fclamp(acc, p->fact_min, p->fact_max);
                }
            }
        }
    }
}

void eo_maxpool_f32(const eo_pool_params *p, const float *in, float *out)
{
    eo_pool_f32(p, in, out, 1);
}

void eo_avgpool_f32(const eo_pool_params *p, const float *in, float *out)
{
    eo_pool_f32(p, in, out, 0);
}

void eo_mean_hw_f32(int32_t batch, int32_t hw, int32_t c, const float *in, float *out)
{
    int32_t b, ch, i;
    for (b = 0; b < batch; ++b) {
        const float *x = in + b * hw * c;
        for (ch = 0; ch < c; ++ch) {
            float acc = 0.0f;
            for (i = 0; i < hw; ++i) {
                acc += x[i * c + ch];
            }
            *out++ = acc / (float)hw;
        }
    }
}

void eo_matmul_f32(int32_t batch, int32_t m, int32_t k, int32_t n, int32_t a_stride,
                   int32_t b_stride, float lo, float hi, const float *a, const float *b,
                   float *out)
{
    int32_t t, i, j, l;
    for (t = 0; t < batch; ++t, a += a_stride, b += b_stride) {
        for (i = 0; i < m; ++i) {
            for (j = 0; j < n; ++j) {
                float acc = 0.0f;
                for (l = 0; l < k; ++l) {
                    acc += a[i * k + l] * b[l * n + j];
                }
                acc = acc < lo ? lo : acc;
                *out++ = acc > hi ? hi : acc;
            }
        }
    }
}
