/*
 * edgeopt int8 kernels: fixed-point helpers, convolution (dense, depthwise, CSR) and fully
 * connected layers, following TensorFlow Lite's reference_integer_ops bit for bit.
 * No libm, no stdio, no allocation.
 */
#include "eo_internal.h"

int32_t eo_srdhm(int32_t a, int32_t b)
{
    return eo_i_srdhm(a, b);
}

int32_t eo_rdbpot(int32_t x, int exponent)
{
    return eo_i_rdbpot(x, exponent);
}

int32_t eo_mbqm(int32_t x, int32_t multiplier, int shift)
{
    return eo_i_mbqm(x, multiplier, shift);
}

/* bias, requantization, output offset and clamp of one accumulator */
static int8_t eo_requant_out(int32_t acc, const int32_t *bias, int32_t c, const int32_t *mult,
                             const int32_t *shift, int32_t out_offset, int32_t lo, int32_t hi)
{
    if (bias != 0) {
        acc += bias[c];
    }
    acc = eo_i_mbqm(acc, mult[c], (int)shift[c]) + out_offset;
    return (int8_t)eo_i_clamp(acc, lo, hi);
}

/* Dense accumulation of one output channel at one output position (input origin iy0, ix0;
 * t: its taps that read the image, eo_i_conv_taps). */
static int32_t eo_conv_acc_s8(const eo_conv_params *p, const int8_t *in, const int8_t *w_row,
                              int32_t b, int32_t iy0, int32_t ix0, const eo_window *t,
                              int32_t ic0)
{
    const int32_t icg = p->in_c / p->groups;
    int32_t acc = 0, ky, kx, ic;
    for (ky = t->y0; ky < t->y1; ++ky) {
        const int32_t iy = iy0 + ky * p->dil_h;
        for (kx = t->x0; kx < t->x1; ++kx) {
            const int8_t *x = in + eo_i_nhwc(b, iy, ix0 + kx * p->dil_w, p->in_h, p->in_w,
                                             p->in_c) + ic0;
            const int8_t *wk = w_row + (ky * p->k_w + kx) * icg;
            for (ic = 0; ic < icg; ++ic) {
                acc += (int32_t)wk[ic] * ((int32_t)x[ic] + p->in_offset);
            }
        }
    }
    return acc;
}

void eo_conv_s8(const eo_conv_params *p, const int8_t *in, const int8_t *w, const int32_t *bias,
                const int32_t *mult, const int32_t *shift, int8_t *out)
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
                    const int32_t acc = eo_conv_acc_s8(p, in, w + oc * row, b, iy0, ix0, &t,
                                                       (oc / ocg) * icg);
                    *out++ = eo_requant_out(acc, bias, oc, mult, shift, p->out_offset,
                                            p->act_min, p->act_max);
                }
            }
        }
    }
}

/* Depthwise accumulation of output channel oc (input channel oc / multiplier; t as for
 * eo_conv_acc_s8). */
static int32_t eo_dw_acc_s8(const eo_conv_params *p, const int8_t *in, const int8_t *w,
                            int32_t b, int32_t iy0, int32_t ix0, const eo_window *t, int32_t oc,
                            int32_t ic)
{
    int32_t acc = 0, ky, kx;
    for (ky = t->y0; ky < t->y1; ++ky) {
        const int32_t iy = iy0 + ky * p->dil_h;
        for (kx = t->x0; kx < t->x1; ++kx) {
            const int32_t x = in[eo_i_nhwc(b, iy, ix0 + kx * p->dil_w, p->in_h, p->in_w,
                                           p->in_c) + ic];
            acc += (int32_t)w[(ky * p->k_w + kx) * p->out_c + oc] * (x + p->in_offset);
        }
    }
    return acc;
}

void eo_depthwise_conv_s8(const eo_conv_params *p, const int8_t *in, const int8_t *w,
                          const int32_t *bias, const int32_t *mult, const int32_t *shift,
                          int8_t *out)
{
    const int32_t m = p->out_c / p->in_c;
    int32_t b, oy, ox, oc;
    for (b = 0; b < p->batch; ++b) {
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                const int32_t iy0 = oy * p->stride_h - p->pad_top;
                const int32_t ix0 = ox * p->stride_w - p->pad_left;
                const eo_window t = eo_i_conv_taps(p, iy0, ix0);
                for (oc = 0; oc < p->out_c; ++oc) {
                    const int32_t acc = eo_dw_acc_s8(p, in, w, b, iy0, ix0, &t, oc, oc / m);
                    *out++ = eo_requant_out(acc, bias, oc, mult, shift, p->out_offset,
                                            p->act_min, p->act_max);
                }
            }
        }
    }
}

/* CSR accumulation of row r at one output position; columns are (kh, kw, ic) in OHWI order. */
static int32_t eo_conv_csr_acc_s8(const eo_conv_params *p, const int8_t *in, const eo_csr *w,
                                  int32_t r, int32_t b, int32_t iy0, int32_t ix0, int32_t ic0)
{
    const int8_t *values = (const int8_t *)w->values;
    const int32_t icg = p->in_c / p->groups;
    const int32_t end = eo_i_index(w->row_ptr, w->ptr_bytes, r + 1);
    int32_t acc = 0, i;
    for (i = eo_i_index(w->row_ptr, w->ptr_bytes, r); i < end; ++i) {
        int32_t tap, ic, iy, ix, x;
        eo_i_csr_col(eo_i_index(w->col_idx, w->idx_bytes, i), icg, &tap, &ic);
        iy = iy0 + (tap / p->k_w) * p->dil_h;
        ix = ix0 + (tap % p->k_w) * p->dil_w;
        if (iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w) {
            continue;
        }
        x = in[eo_i_nhwc(b, iy, ix, p->in_h, p->in_w, p->in_c) + ic0 + ic];
        acc += (int32_t)values[i] * (x + p->in_offset);
    }
    return acc;
}

void eo_conv_s8_csr(const eo_conv_params *p, const int8_t *in, const eo_csr *w,
                    const int32_t *bias, const int32_t *mult, const int32_t *shift, int8_t *out)
{
    const int32_t icg = p->in_c / p->groups, ocg = p->out_c / p->groups;
    int32_t b, oy, ox, oc;
    for (b = 0; b < p->batch; ++b) {
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                const int32_t iy0 = oy * p->stride_h - p->pad_top;
                const int32_t ix0 = ox * p->stride_w - p->pad_left;
                for (oc = 0; oc < p->out_c; ++oc) {
                    const int32_t acc = eo_conv_csr_acc_s8(p, in, w, oc, b, iy0, ix0,
                                                           (oc / ocg) * icg);
                    *out++ = eo_requant_out(acc, bias, oc, mult, shift, p->out_offset,
                                            p->act_min, p->act_max);
                }
            }
        }
    }
}

void eo_fc_s8(const eo_fc_params *p, const int8_t *in, const int8_t *w, const int32_t *bias,
              const int32_t *mult, const int32_t *shift, int8_t *out)
{
    int32_t b, o, i;
    for (b = 0; b < p->batch; ++b) {
        const int8_t *x = in + b * p->in_features;
        for (o = 0; o < p->out_features; ++o) {
            const int8_t *wr = w + o * p->in_features;
            int32_t acc = 0;
            for (i = 0; i < p->in_features; ++i) {
                acc += (int32_t)wr[i] * ((int32_t)x[i] + p->in_offset);
            }
            *out++ = eo_requant_out(acc, bias, o, mult, shift, p->out_offset, p->act_min,
                                    p->act_max);
        }
    }
}

void eo_fc_s8_f32(const eo_fc_params *p, const int8_t *in, const int8_t *w, const float *bias,
                  const float *scale, float *out)
{
    int32_t b, o, i;
    for (b = 0; b < p->batch; ++b) {
        const int8_t *x = in + b * p->in_features;
        for (o = 0; o < p->out_features; ++o) {
            const int8_t *wr = w + o * p->in_features;
            int32_t acc = 0;
            float y;
            for (i = 0; i < p->in_features; ++i) {
                acc += (int32_t)wr[i] * ((int32_t)x[i] + p->in_offset);
            }
            y = (float)acc * scale[o] + (bias ? bias[o] : 0.0f);
            *out++ = y < p->fact_min ? p->fact_min : y > p->fact_max ? p->fact_max : y;
        }
    }
}

void eo_fc_s8_csr(const eo_fc_params *p, const int8_t *in, const eo_csr *w, const int32_t *bias,
                  const int32_t *mult, const int32_t *shift, int8_t *out)
{
    const int8_t *values = (const int8_t *)w->values;
    int32_t b, o, i;
    for (b = 0; b < p->batch; ++b) {
        const int8_t *x = in + b * p->in_features;
        for (o = 0; o < p->out_features; ++o) {
            const int32_t end = eo_i_index(w->row_ptr, w->ptr_bytes, o + 1);
            int32_t acc = 0;
            for (i = eo_i_index(w->row_ptr, w->ptr_bytes, o); i < end; ++i) {
                const int32_t col = eo_i_index(w->col_idx, w->idx_bytes, i);
                acc += (int32_t)values[i] * ((int32_t)x[col] + p->in_offset);
            }
            *out++ = eo_requant_out(acc, bias, o, mult, shift, p->out_offset, p->act_min,
                                    p->act_max);
        }
    }
}

/* ConvTranspose int32 sum of output (b, oy, ox, oc), as eo_tconv_acc_f32. */
static int32_t eo_tconv_acc_s8(const eo_conv_params *p, const int8_t *in, const int8_t *w,
                               int32_t b, int32_t oy, int32_t ox, int32_t oc)
{
    const int32_t icg = p->in_c / p->groups, c0 = (oc / (p->out_c / p->groups)) * icg;
    int32_t acc = 0, ky, kx, ic;
    for (ky = 0; ky < p->k_h; ++ky) {
        const int32_t iy = eo_i_tconv_src(oy, ky, p->pad_top, p->dil_h, p->stride_h, p->in_h);
        for (kx = 0; iy >= 0 && kx < p->k_w; ++kx) {
            const int32_t ix = eo_i_tconv_src(ox, kx, p->pad_left, p->dil_w, p->stride_w,
                                              p->in_w);
            const int8_t *x, *wk;
            if (ix < 0) {
                continue;
            }
            x = in + eo_i_nhwc(b, iy, ix, p->in_h, p->in_w, p->in_c) + c0;
            wk = w + ((oc * p->k_h + ky) * p->k_w + kx) * icg;
            for (ic = 0; ic < icg; ++ic) {
                acc += (int32_t)wk[ic] * ((int32_t)x[ic] + p->in_offset);
            }
        }
    }
    return acc;
}

void eo_conv_transpose_s8(const eo_conv_params *p, const int8_t *in, const int8_t *w,
                          const int32_t *bias, const int32_t *mult, const int32_t *shift,
                          int8_t *out)
{
    int32_t b, oy, ox, oc;
    for (b = 0; b < p->batch; ++b) {
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                for (oc = 0; oc < p->out_c; ++oc) {
                    *out++ = eo_requant_out(eo_tconv_acc_s8(p, in, w, b, oy, ox, oc), bias, oc,
                                            mult, shift, p->out_offset, p->act_min,
                                            p->act_max);
                }
            }
        }
    }
}
