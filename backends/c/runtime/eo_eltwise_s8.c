/*
 * edgeopt int8 kernels: broadcast Add/Sub/Mul, pooling, mean, lookup tables, clamp and
 * requantization, following TensorFlow Lite's reference_integer_ops bit for bit.
 * No libm, no stdio, no allocation.
 */
#include "eo_internal.h"

/* TFLite int8 Add/Sub: both inputs scaled to a common 2^-left_shift grid, summed, requantized */
static int8_t eo_addsub_one(const eo_binary_params *p, int32_t a, int32_t b, int32_t sign)
{
    const int32_t sa = eo_i_shl(a + p->a_offset, (int)p->left_shift);
    const int32_t sb = eo_i_shl(b + p->b_offset, (int)p->left_shift);
    const int32_t ra = eo_i_mbqm(sa, p->a_mult, (int)p->a_shift);
    const int32_t rb = eo_i_mbqm(sb, p->b_mult, (int)p->b_shift);
    const int32_t raw = eo_i_mbqm(ra + sign * rb, p->out_mult, (int)p->out_shift) + p->out_offset;
    return (int8_t)eo_i_clamp(raw, p->act_min, p->act_max);
}

static void eo_add_row(const eo_binary_params *p, const void *va, int32_t sa, const void *vb,
                       int32_t sb, void *vout, int32_t n)
{
    const int8_t *a = (const int8_t *)va, *b = (const int8_t *)vb;
    int8_t *out = (int8_t *)vout;
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = eo_addsub_one(p, a[i * sa], b[i * sb], 1);
    }
}

static void eo_sub_row(const eo_binary_params *p, const void *va, int32_t sa, const void *vb,
                       int32_t sb, void *vout, int32_t n)
{
    const int8_t *a = (const int8_t *)va, *b = (const int8_t *)vb;
    int8_t *out = (int8_t *)vout;
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = eo_addsub_one(p, a[i * sa], b[i * sb], -1);
    }
}

static void eo_mul_row(const eo_binary_params *p, const void *va, int32_t sa, const void *vb,
                       int32_t sb, void *vout, int32_t n)
{
    const int8_t *a = (const int8_t *)va, *b = (const int8_t *)vb;
    int8_t *out = (int8_t *)vout;
    int32_t i;
    for (i = 0; i < n; ++i) {
        const int32_t prod = ((int32_t)a[i * sa] + p->a_offset) * ((int32_t)b[i * sb] + p->b_offset);
        const int32_t raw = eo_i_mbqm(prod, p->out_mult, (int)p->out_shift) + p->out_offset;
        out[i] = (int8_t)eo_i_clamp(raw, p->act_min, p->act_max);
    }
}

void eo_add_s8(const eo_binary_params *p, const int8_t *a, const int8_t *b, int8_t *out)
{
    eo_i_broadcast(p, a, b, out, 1, eo_add_row);
}

void eo_sub_s8(const eo_binary_params *p, const int8_t *a, const int8_t *b, int8_t *out)
{
    eo_i_broadcast(p, a, b, out, 1, eo_sub_row);
}

void eo_mul_s8(const eo_binary_params *p, const int8_t *a, const int8_t *b, int8_t *out)
{
    eo_i_broadcast(p, a, b, out, 1, eo_mul_row);
}

/* C99 division rounded to nearest, ties away from zero (TFLite's average rounding) */
static int32_t eo_div_round(int32_t acc, int32_t n)
{
    return acc > 0 ? (acc + n / 2) / n : (acc - n / 2) / n;
}

/* Max (is_max != 0) or average of one channel over a window. */
static int32_t eo_pool_one(const eo_pool_params *p, const int8_t *in, int32_t b, eo_window w,
                           int32_t c, int is_max)
{
    int32_t y, x, acc = is_max ? -128 : 0, count = 0;
    for (y = w.y0; y < w.y1; ++y) {
        for (x = w.x0; x < w.x1; ++x) {
            const int32_t v = in[eo_i_nhwc(b, y, x, p->in_h, p->in_w, p->c) + c];
            acc = is_max ? (v > acc ? v : acc) : acc + v;
            ++count;
        }
    }
    if (is_max) {
        return acc;
    }
    return count > 0 ? eo_div_round(acc, count) : 0;
}

static void eo_pool_s8(const eo_pool_params *p, const int8_t *in, int8_t *out, int is_max)
{
    int32_t b, oy, ox, c;
    for (b = 0; b < p->batch; ++b) {
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                const eo_window w = eo_i_pool_window(p, oy, ox);
                for (c = 0; c < p->c; ++c) {
                    const int32_t v = eo_pool_one(p, in, b, w, c, is_max);
                    *out++ = (int8_t)eo_i_clamp(v, p->act_min, p->act_max);
                }
            }
        }
    }
}

void eo_maxpool_s8(const eo_pool_params *p, const int8_t *in, int8_t *out)
{
    eo_pool_s8(p, in, out, 1);
}

void eo_avgpool_s8(const eo_pool_params *p, const int8_t *in, int8_t *out)
{
    eo_pool_s8(p, in, out, 0);
}

void eo_mean_hw_s8(int32_t batch, int32_t hw, int32_t c, int32_t in_offset, int32_t out_offset,
                   int32_t mult, int32_t shift, const int8_t *in, int8_t *out)
{
    int32_t b, ch, i;
    for (b = 0; b < batch; ++b) {
        const int8_t *x = in + b * hw * c;
        for (ch = 0; ch < c; ++ch) {
            int32_t acc = 0;
            for (i = 0; i < hw; ++i) {
                acc += (int32_t)x[i * c + ch] + in_offset;
            }
            acc = eo_div_round(eo_i_mbqm(acc, mult, (int)shift), hw) + out_offset;
            *out++ = (int8_t)eo_i_clamp(acc, -128, 127);
        }
    }
}

void eo_lut_s8(const int8_t *lut, const int8_t *in, int8_t *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = lut[(int32_t)in[i] + 128];
    }
}

void eo_clamp_s8(int32_t act_min, int32_t act_max, const int8_t *in, int8_t *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = (int8_t)eo_i_clamp(in[i], act_min, act_max);
    }
}

void eo_requantize_s8(int32_t in_offset, int32_t out_offset, int32_t mult, int32_t shift,
                      const int8_t *in, int8_t *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        const int32_t v = eo_i_mbqm((int32_t)in[i] + in_offset, mult, (int)shift) + out_offset;
        out[i] = (int8_t)eo_i_clamp(v, -128, 127);
    }
}

void eo_prelu_s8(const eo_prelu_params *p, const int8_t *in, int8_t *out, int32_t n)
{
    int32_t i, c = 0;
    for (i = 0; i < n; ++i) {
        const int32_t x = (int32_t)in[i] + p->in_offset;
        const int32_t v = x >= 0 ? eo_i_mbqm(x, p->pos_mult, (int)p->pos_shift)
                                 : eo_i_mbqm(x, p->neg_mult[c], (int)p->neg_shift[c]);
        out[i] = (int8_t)eo_i_clamp(v + p->out_offset, -128, 127);
        if (++c == p->channels) {
            c = 0;
        }
    }
}
