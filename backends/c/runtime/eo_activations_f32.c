/*
 * edgeopt float32 activations and Softmax. Sigmoid, Tanh and Softmax call libm (expf, tanhf).
 */
#include <math.h>

#include "eo_internal.h"

void eo_clamp_f32(float lo, float hi, const float *in, float *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = eo_i_fclamp(in[i], lo, hi);
    }
}

void eo_sigmoid_f32(const float *in, float *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = 1.0f / (1.0f + expf(-in[i]));
    }
}

void eo_tanh_f32(const float *in, float *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = tanhf(in[i]);
    }
}

/* ONNX HardSwish: x * max(0, min(1, x / 6 + 1/2)) */
void eo_hardswish_f32(const float *in, float *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = in[i] * eo_i_fclamp(in[i] * (1.0f / 6.0f) + 0.5f, 0.0f, 1.0f);
    }
}

void eo_leaky_relu_f32(float alpha, const float *in, float *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = in[i] >= 0.0f ? in[i] : alpha * in[i];
    }
}

void eo_prelu_f32(const float *slope, int32_t channels, const float *in, float *out, int32_t n)
{
    int32_t i, c = 0;
    for (i = 0; i < n; ++i) {
        out[i] = in[i] >= 0.0f ? in[i] : slope[c] * in[i];
        if (++c == channels) {
            c = 0;
        }
    }
}

void eo_softmax_f32(int32_t rows, int32_t n, const float *in, float *out)
{
    int32_t r, c;
    for (r = 0; r < rows; ++r, in += n, out += n) {
        float max = in[0], sum = 0.0f, inv;
        for (c = 1; c < n; ++c) {
            max = in[c] > max ? in[c] : max;
        }
        for (c = 0; c < n; ++c) {
            out[c] = expf(in[c] - max);
            sum += out[c];
        }
        inv = 1.0f / sum;
        for (c = 0; c < n; ++c) {
            out[c] *= inv;
        }
    }
}

void eo_lrn_f32(int32_t outer, int32_t channels, int32_t inner, int32_t size, float alpha,
                float beta, float bias, const float *in, float *out)
{
    /* the window of channel c: [c - floor((size - 1) / 2), c + ceil((size - 1) / 2)] */
    const int32_t before = (size - 1) / 2, after = size - 1 - (size - 1) / 2;
    const float scale = alpha / (float)size;
    int32_t o, c, i, k;
    for (o = 0; o < outer; ++o, in += channels * inner, out += channels * inner) {
        for (c = 0; c < channels; ++c) {
            const int32_t first = c - before < 0 ? 0 : c - before;
            const int32_t last = c + after > channels - 1 ? channels - 1 : c + after;
            for (i = 0; i < inner; ++i) {
                float sum = 0.0f;
                for (k = first; k <= last; ++k) {
                    sum += in[k * inner + i] * in[k * inner + i];
                }
                out[c * inner + i] = in[c * inner + i] / powf(bias + scale * sum, beta);
            }
        }
    }
}

void eo_resize_linear_f32(const int32_t dims[6], const int32_t *y0, const int32_t *y1,
                          const float *fy, const int32_t *x0, const int32_t *x1, const float *fx,
                          const float *in, float *out)
{
    const int32_t n = dims[0], in_h = dims[1], in_w = dims[2], c = dims[3];
    const int32_t out_h = dims[4], out_w = dims[5];
    int32_t b, y, x, k;
    for (b = 0; b < n; ++b) {
        const float *image = in + (size_t)b * (size_t)in_h * (size_t)in_w * (size_t)c;
        for (y = 0; y < out_h; ++y) {
            const float *r0 = image + (size_t)y0[y] * (size_t)in_w * (size_t)c;
            const float *r1 = image + (size_t)y1[y] * (size_t)in_w * (size_t)c;
            const float wy1 = fy[y], wy0 = 1.0f - fy[y];
            for (x = 0; x < out_w; ++x) {
                const float *a = r0 + (size_t)x0[x] * (size_t)c, *bb = r0 + (size_t)x1[x] * (size_t)c;
                const float *cc = r1 + (size_t)x0[x] * (size_t)c, *d = r1 + (size_t)x1[x] * (size_t)c;
                const float wx1 = fx[x], wx0 = 1.0f - fx[x];
                const float w00 = wy0 * wx0, w01 = wy0 * wx1, w10 = wy1 * wx0, w11 = wy1 * wx1;
                for (k = 0; k < c; ++k) {
                    *out++ = w00 * a[k] + w01 * bb[k] + w10 * cc[k] + w11 * d[k];
                }
            }
        }
    }
}

void eo_sqrt_f32(const float *in, float *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = sqrtf(in[i]);
    }
}

void eo_pow_f32(float exponent, const float *in, float *out, int32_t n)
{
    int32_t i;
    if (exponent == 2.0f) {
        for (i = 0; i < n; ++i) {
            out[i] = in[i] * in[i];
        }
        return;
    }
    for (i = 0; i < n; ++i) {
        out[i] = powf(in[i], exponent);
    }
}

void eo_reduce_f32(int32_t kind, int32_t outer, int32_t n, int32_t inner, const float *in,
                   float *out)
{
    int32_t o, k, i;
    for (o = 0; o < outer; ++o, in += n * inner, out += inner) {
        for (i = 0; i < inner; ++i) {
            float acc = in[i];
            for (k = 1; k < n; ++k) {
                const float v = in[k * inner + i];
                if (kind == 2) {
                    acc = v > acc ? v : acc;
                } else if (kind == 3) {
                    acc = v < acc ? v : acc;
                } else {
                    acc += v;
                }
            }
            out[i] = kind == 0 ? acc / (float)n : acc;
        }
    }
}
