/*
 * Internal helpers of the edgeopt kernel library (static inline, C99). Not part of the API:
 * only the runtime's own .c files include this.
 *
 * The fixed-point helpers are gemmlowp's / TensorFlow Lite's, written so that they are defined
 * behaviour in C99: right shifts of negative values are done as ~(~x >> e) (a floor division
 * by 2^e on any compiler), and the left shift inside MultiplyByQuantizedMultiplier is done on
 * uint32_t and converted back, which wraps on overflow exactly as TFLite's int32 multiply does
 * on every two's-complement target (the conversion is implementation-defined, not undefined).
 */
#ifndef EO_INTERNAL_H
#define EO_INTERNAL_H

#include <stdint.h>

#include "eo_kernels.h"

/* floor(x / 2^e), 0 <= e <= 31 */
static inline int32_t eo_i_asr(int32_t x, int e)
{
    return x >= 0 ? (x >> e) : ~(~x >> e);
}

/* x * 2^s modulo 2^32, 0 <= s <= 31 */
static inline int32_t eo_i_shl(int32_t x, int s)
{
    return (int32_t)((uint32_t)x << s);
}

/* gemmlowp SaturatingRoundingDoublingHighMul */
static inline int32_t eo_i_srdhm(int32_t a, int32_t b)
{
    int64_t ab;
    if (a == b && a == INT32_MIN) {
        return INT32_MAX;
    }
    ab = (int64_t)a * (int64_t)b;
    /* C99 division truncates toward zero, as gemmlowp's does */
    return (int32_t)((ab + (ab >= 0 ? (1 << 30) : (1 - (1 << 30)))) / ((int64_t)1 << 31));
}

/* gemmlowp RoundingDivideByPOT: x / 2^e rounded to nearest, ties away from zero */
static inline int32_t eo_i_rdbpot(int32_t x, int e)
{
    const int32_t mask = (int32_t)(((uint32_t)1 << e) - 1u);
    const int32_t remainder = x & mask;
    const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return eo_i_asr(x, e) + (remainder > threshold ? 1 : 0);
}

/* TFLite MultiplyByQuantizedMultiplier (double rounding) */
static inline int32_t eo_i_mbqm(int32_t x, int32_t multiplier, int shift)
{
    const int left = shift > 0 ? shift : 0;
    const int right = shift > 0 ? 0 : -shift;
    return eo_i_rdbpot(eo_i_srdhm(eo_i_shl(x, left), multiplier), right);
}

static inline int32_t eo_i_clamp(int32_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline float eo_i_fclamp(float v, float lo, float hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/* Entry i of a CSR index array of 1, 2 or 4 bytes per entry. */
static inline int32_t eo_i_index(const void *a, int bytes, int32_t i)
{
    if (bytes == 1) {
        return (int32_t)((const uint8_t *)a)[i];
    }
    if (bytes == 2) {
        return (int32_t)((const uint16_t *)a)[i];
    }
    return (int32_t)((const uint32_t *)a)[i];
}

/* Offset of (b, y, x, 0) in an NHWC tensor of h x w x c. */
static inline int32_t eo_i_nhwc(int32_t b, int32_t y, int32_t x, int32_t h, int32_t w, int32_t c)
{
    return ((b * h + y) * w + x) * c;
}

/* The input index whose ConvTranspose scatter lands on output o through tap k
 * (o + pad - k * dil = i * stride, 0 <= i < n), or -1 when no input does. */
static inline int32_t eo_i_tconv_src(int32_t o, int32_t k, int32_t pad, int32_t dil,
                                     int32_t stride, int32_t n)
{
    const int32_t t = o + pad - k * dil;
    return (t < 0 || t % stride != 0 || t / stride >= n) ? -1 : t / stride;
}

/* Decode column `col` of a conv CSR row into its (kh, kw, ic) position: *tap = kh * k_w + kw. */
static inline void eo_i_csr_col(int32_t col, int32_t icg, int32_t *tap, int32_t *ic)
{
    *tap = col / icg;
    *ic = col - *tap * icg;
}

/* A rectangle [y0, y1) x [x0, x1): input rows and columns (pooling) or kernel taps (conv). */
typedef struct {
    int32_t y0, y1, x0, x1;
} eo_window;

/* Taps k in [first, end) of a kernel of k_n taps, dilation dil, whose input i0 + k * dil lies
 * in [0, n): the window of one output with the padding clipped away (empty when first >= end). */
static inline int32_t eo_i_first_tap(int32_t i0, int32_t dil)
{
    return i0 >= 0 ? 0 : (-i0 + dil - 1) / dil;
}

static inline int32_t eo_i_end_tap(int32_t i0, int32_t dil, int32_t k_n, int32_t n)
{
    const int32_t end = i0 > n - 1 ? 0 : (n - 1 - i0) / dil + 1;
    return end < k_n ? end : k_n;
}

/* The kernel taps of the conv output whose input origin is (iy0, ix0) that read the image,
 * not padding. */
static inline eo_window eo_i_conv_taps(const eo_conv_params *p, int32_t iy0, int32_t ix0)
{
    eo_window t;
    t.y0 = eo_i_first_tap(iy0, p->dil_h);
    t.y1 = eo_i_end_tap(iy0, p->dil_h, p->k_h, p->in_h);
    t.x0 = eo_i_first_tap(ix0, p->dil_w);
    t.x1 = eo_i_end_tap(ix0, p->dil_w, p->k_w, p->in_w);
    return t;
}

static inline eo_window eo_i_pool_window(const eo_pool_params *p, int32_t oy, int32_t ox)
{
    eo_window w;
    const int32_t iy = oy * p->stride_h - p->pad_top, ix = ox * p->stride_w - p->pad_left;
    w.y0 = iy < 0 ? 0 : iy;
    w.x0 = ix < 0 ? 0 : ix;
    w.y1 = iy + p->k_h < p->in_h ? iy + p->k_h : p->in_h;
    w.x1 = ix + p->k_w < p->in_w ? ix + p->k_w : p->in_w;
    return w;
}

/* One innermost row of a broadcast binary op (any element type): n elements, element
 * strides sa and sb. */
typedef void (*eo_row_fn)(const eo_binary_params *p, const void *a, int32_t sa, const void *b,
                          int32_t sb, void *out, int32_t n);

/* Walks the three outer dims of a broadcast binary op over elements of `elem` bytes and hands
 * each innermost row to row(). */
static inline void eo_i_broadcast(const eo_binary_params *p, const void *a, const void *b,
                                  void *out, int32_t elem, eo_row_fn row)
{
    const uint8_t *pa = (const uint8_t *)a, *pb = (const uint8_t *)b;
    uint8_t *po = (uint8_t *)out;
    int32_t i0, i1, i2;
    for (i0 = 0; i0 < p->dims[0]; ++i0) {
        for (i1 = 0; i1 < p->dims[1]; ++i1) {
            for (i2 = 0; i2 < p->dims[2]; ++i2) {
                const int32_t oa = i0 * p->a_stride[0] + i1 * p->a_stride[1] + i2 * p->a_stride[2];
                const int32_t ob = i0 * p->b_stride[0] + i1 * p->b_stride[1] + i2 * p->b_stride[2];
                row(p, pa + oa * elem, p->a_stride[3], pb + ob * elem, p->b_stride[3], po,
                    p->dims[3]);
                po += p->dims[3] * elem;
            }
        }
    }
}

#endif /* EO_INTERNAL_H */
