/*
 * edgeopt data movement for any element size: Concat, 4-D Transpose and constant Pad.
 * Pure byte copies: no arithmetic, no libm.
 */
#include <string.h>

#include "eo_internal.h"

void eo_concat(int32_t n_inputs, const void *const *inputs, const int32_t *sizes, int32_t outer,
               void *out)
{
    uint8_t *dst = (uint8_t *)out;
    int32_t o, i;
    for (o = 0; o < outer; ++o) {
        for (i = 0; i < n_inputs; ++i) {
            memcpy(dst, (const uint8_t *)inputs[i] + (size_t)o * (size_t)sizes[i],
                   (size_t)sizes[i]);
            dst += sizes[i];
        }
    }
}

void eo_transpose(const int32_t in_dims[4], const int32_t perm[4], int32_t elem_size,
                  const void *in, void *out)
{
    int32_t in_stride[4], stride[4], dims[4], d, i0, i1, i2, i3;
    const uint8_t *src = (const uint8_t *)in;
    uint8_t *dst = (uint8_t *)out;
    in_stride[3] = elem_size;
    for (d = 2; d >= 0; --d) {
        in_stride[d] = in_stride[d + 1] * in_dims[d + 1];
    }
    for (d = 0; d < 4; ++d) { /* output dim d walks input dim perm[d] */
        dims[d] = in_dims[perm[d]];
        stride[d] = in_stride[perm[d]];
    }
    for (i0 = 0; i0 < dims[0]; ++i0) {
        for (i1 = 0; i1 < dims[1]; ++i1) {
            for (i2 = 0; i2 < dims[2]; ++i2) {
                const uint8_t *s = src + i0 * stride[0] + i1 * stride[1] + i2 * stride[2];
                for (i3 = 0; i3 < dims[3]; ++i3) {
                    memcpy(dst, s + i3 * stride[3], (size_t)elem_size);
                    dst += elem_size;
                }
            }
        }
    }
}

/* Writes `count` copies of the elem_size-byte value at dst; returns the end. */
static uint8_t *eo_fill(uint8_t *dst, const void *value, int32_t elem_size, int32_t count)
{
    int32_t i;
    for (i = 0; i < count; ++i) {
        memcpy(dst, value, (size_t)elem_size);
        dst += elem_size;
    }
    return dst;
}

void eo_pad(const int32_t in_dims[4], const int32_t pads[8], int32_t elem_size, const void *value,
            const void *in, void *out)
{
    int32_t od[4], d, o0, o1, o2;
    const uint8_t *src = (const uint8_t *)in;
    uint8_t *dst = (uint8_t *)out;
    const int32_t row = in_dims[3] * elem_size;
    for (d = 0; d < 4; ++d) {
        od[d] = pads[d] + in_dims[d] + pads[4 + d];
    }
    for (o0 = 0; o0 < od[0]; ++o0) {
        for (o1 = 0; o1 < od[1]; ++o1) {
            for (o2 = 0; o2 < od[2]; ++o2) {
                const int32_t i0 = o0 - pads[0], i1 = o1 - pads[1], i2 = o2 - pads[2];
                if (i0 < 0 || i0 >= in_dims[0] || i1 < 0 || i1 >= in_dims[1] || i2 < 0 ||
                    i2 >= in_dims[2]) {
                    dst = eo_fill(dst, value, elem_size, od[3]);
                    continue;
                }
                dst = eo_fill(dst, value, elem_size, pads[3]);
                memcpy(dst, src + ((i0 * in_dims[1] + i1) * in_dims[2] + i2) * row, (size_t)row);
                dst = eo_fill(dst + row, value, elem_size, pads[7]);
            }
        }
    }
}

void eo_resize_nearest(const int32_t dims[6], const int32_t *y_idx, const int32_t *x_idx,
                       int32_t elem_size, const void *in, void *out)
{
    const int32_t n = dims[0], in_h = dims[1], in_w = dims[2], c = dims[3];
    const int32_t out_h = dims[4], out_w = dims[5];
    const size_t pixel = (size_t)c * (size_t)elem_size;
    const uint8_t *src = (const uint8_t *)in;
    uint8_t *dst = (uint8_t *)out;
    int32_t b, y, x;
    for (b = 0; b < n; ++b) {
        const uint8_t *image = src + (size_t)b * (size_t)in_h * (size_t)in_w * pixel;
        for (y = 0; y < out_h; ++y) {
            const uint8_t *row = image + (size_t)y_idx[y] * (size_t)in_w * pixel;
            for (x = 0; x < out_w; ++x) {
                memcpy(dst, row + (size_t)x_idx[x] * pixel, pixel);
                dst += pixel;
            }
        }
    }
}

void eo_slice(const int32_t in_dims[4], const int32_t starts[4], const int32_t steps[4],
              const int32_t out_dims[4], int32_t elem_size, const void *in, void *out)
{
    const uint8_t *src = (const uint8_t *)in;
    uint8_t *dst = (uint8_t *)out;
    const size_t elem = (size_t)elem_size;
    int32_t o0, o1, o2, o3;
    for (o0 = 0; o0 < out_dims[0]; ++o0) {
        const size_t i0 = (size_t)(starts[0] + o0 * steps[0]);
        for (o1 = 0; o1 < out_dims[1]; ++o1) {
            const size_t i1 = i0 * (size_t)in_dims[1] + (size_t)(starts[1] + o1 * steps[1]);
            for (o2 = 0; o2 < out_dims[2]; ++o2) {
                const size_t i2 = i1 * (size_t)in_dims[2] + (size_t)(starts[2] + o2 * steps[2]);
                const uint8_t *row = src + i2 * (size_t)in_dims[3] * elem;
                if (steps[3] == 1) {  /* contiguous: one copy per row */
                    memcpy(dst, row + (size_t)starts[3] * elem, (size_t)out_dims[3] * elem);
                    dst += (size_t)out_dims[3] * elem;
                    continue;
                }
                for (o3 = 0; o3 < out_dims[3]; ++o3) {
                    memcpy(dst, row + (size_t)(starts[3] + o3 * steps[3]) * elem, elem);
                    dst += elem;
                }
            }
        }
    }
}
