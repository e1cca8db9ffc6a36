/*
 * edgeopt portable kernel library (C99). Generated models call these; firmware compiles
 * them as they are. No malloc, no VLAs, no recursion, nothing large on the stack; the int8
 * kernels need neither libm nor stdio.
 *
 * Layouts: activations are NHWC (a rank-2 tensor is [batch][features]). Weights:
 *   conv (groups >= 1, not depthwise)  OHWI  [out_c][k_h][k_w][in_c / groups]
 *   depthwise (groups == in_c)         [k_h][k_w][out_c]   (CMSIS-NN [1,KH,KW,C*M])
 *   fully connected                    [out][in]
 * A CSR weight (eo_csr) has one row per output channel; a conv row's columns are
 * (kh, kw, ic) in OHWI order, relative to the row's group (column order within a row does
 * not matter). A depthwise layer in CSR runs as eo_conv_s8_csr with groups = in_c and the
 * OHWI weight [C*M][KH][KW][1]. Integer accumulation makes CSR and dense results identical.
 *
 * int8 arithmetic follows TensorFlow Lite's integer reference kernels bit for bit (checked
 * against the tflite-micro interpreter in tests/backends/test_reference_tflm.py):
 * per-channel symmetric int8 weights, asymmetric int8 activations, int32 bias at
 * s_in * s_w[c], requantization by eo_mbqm() (SaturatingRoundingDoublingHighMul followed by
 * RoundingDivideByPOT, TFLite's MultiplyByQuantizedMultiplier), output offset, clamp to
 * [act_min, act_max] (a fused ReLU/ReLU6 is just tighter bounds).
 *
 * Offsets use TFLite's sign convention: in_offset = -input_zero_point,
 * out_offset = +output_zero_point. A bias pointer may be NULL (no bias).
 * backends/c/reference.py is the bit-exact Python model of every int8 kernel here and derives
 * their parameters (multipliers, shifts, Add/Mul/Softmax blocks, LUTs) from float scales.
 *
 * Sources: eo_kernels_s8.c (fixed point, conv, depthwise, FC, CSR), eo_eltwise_s8.c,
 * eo_softmax_s8.c, eo_convert.c (quantize/dequantize, CRC-32) and eo_data.c need no libm;
 * eo_kernels_f32.c needs no libm either; eo_activations_f32.c calls expf/tanhf. All include
 * the private eo_internal.h. Only memcpy (eo_data.c) comes from the C library.
 */
#ifndef EO_KERNELS_H
#define EO_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- fixed-point helpers (TFLite / gemmlowp semantics) -------------------------------- */
int32_t eo_srdhm(int32_t a, int32_t b);            /* SaturatingRoundingDoublingHighMul */
int32_t eo_rdbpot(int32_t x, int exponent);        /* RoundingDivideByPOT, exponent 0..31 */
/* MultiplyByQuantizedMultiplier, shift -31..31: a positive shift multiplies x by 2^shift
 * first, wrapping modulo 2^32 like TFLite's int32 product on two's-complement targets. */
int32_t eo_mbqm(int32_t x, int32_t multiplier, int shift);

/* ---- parameter blocks ------------------------------------------------------------------ */
typedef struct {
    int32_t batch;
    int32_t in_h, in_w, in_c;
    int32_t out_h, out_w, out_c;
    int32_t k_h, k_w;
    int32_t stride_h, stride_w;
    int32_t dil_h, dil_w;
    int32_t pad_top, pad_left;       /* bottom/right padding follows from the sizes */
    int32_t groups;
    int32_t in_offset, out_offset;   /* int8 only */
    int32_t act_min, act_max;        /* int8 clamp */
    float fact_min, fact_max;        /* float32 clamp (-INF/+INF as -FLT_MAX/FLT_MAX) */
} eo_conv_params;

typedef struct {
    int32_t batch, in_features, out_features;
    int32_t in_offset, out_offset;
    int32_t act_min, act_max;
    float fact_min, fact_max;
} eo_fc_params;

typedef struct {
    const void *values;     /* int8_t or float, nnz entries */
    const void *col_idx;    /* uint8/16/32, nnz entries */
    const void *row_ptr;    /* uint8/16/32, rows + 1 entries */
    int32_t rows, cols;
    uint8_t idx_bytes;      /* 1, 2 or 4 (arrays aligned to their width) */
    uint8_t ptr_bytes;      /* 1, 2 or 4 */
} eo_csr;

typedef struct {
    int32_t batch, in_h, in_w, c, out_h, out_w;
    int32_t k_h, k_w, stride_h, stride_w, pad_top, pad_left;
    int32_t act_min, act_max;
    float fact_min, fact_max;
} eo_pool_params;

/* Elementwise binary ops with NumPy broadcasting over up to 4 dims (rank-padded on the left):
 * out[i] = op(a[sum i_d * a_stride[d]], b[sum i_d * b_stride[d]]); a stride of 0 broadcasts.
 * Strides count elements. int8 Add/Sub per element (TFLite add.h/sub.h; mbqm equals TFLite's
 * MultiplyByQuantizedMultiplierSmallerThanOneExp for the shifts <= 0 that Add/Sub produce):
 *   sa = mbqm((a + a_offset) << left_shift, a_mult, a_shift), sb likewise,
 *   out = clamp(mbqm(sa +/- sb, out_mult, out_shift) + out_offset, act_min, act_max). */
typedef struct {
    int32_t dims[4];
    int32_t a_stride[4], b_stride[4];
    /* int8 Add/Sub (TFLite): left_shift 20, per-input multipliers, output multiplier */
    int32_t a_offset, b_offset, out_offset;
    int32_t left_shift;
    int32_t a_mult, b_mult, out_mult;
    int32_t a_shift, b_shift, out_shift;
    int32_t act_min, act_max;
    float fact_min, fact_max;
} eo_binary_params;

/* ---- int8 kernels ---------------------------------------------------------------------- */
void eo_conv_s8(const eo_conv_params *p, const int8_t *in, const int8_t *w, const int32_t *bias,
                const int32_t *mult, const int32_t *shift, int8_t *out);
void eo_depthwise_conv_s8(const eo_conv_params *p, const int8_t *in, const int8_t *w,
                          const int32_t *bias, const int32_t *mult, const int32_t *shift,
                          int8_t *out);
void eo_conv_s8_csr(const eo_conv_params *p, const int8_t *in, const eo_csr *w,
                    const int32_t *bias, const int32_t *mult, const int32_t *shift, int8_t *out);
/* ConvTranspose (gather form): output (oy, ox, oc) sums input (iy, ix) where
 * oy + pad_top - ky * dil_h = iy * stride_h (likewise x), weights [out_c][k_h][k_w][in_c/groups];
 * in/out dims and pads as in eo_conv_params (pads = ConvTranspose's begin pads). */
void eo_conv_transpose_s8(const eo_conv_params *p, const int8_t *in, const int8_t *w,
                          const int32_t *bias, const int32_t *mult, const int32_t *shift,
                          int8_t *out);
void eo_fc_s8(const eo_fc_params *p, const int8_t *in, const int8_t *w, const int32_t *bias,
              const int32_t *mult, const int32_t *shift, int8_t *out);
/* int8 input and weights, float32 output (a layer whose output is not quantized):
 * out = clamp(float(sum((in + in_offset) * w)) * scale[o] + bias[o], fact_min, fact_max),
 * scale[o] = s_in * s_w[o]; bias may be NULL. Float multiplies only, no libm. */
void eo_fc_s8_f32(const eo_fc_params *p, const int8_t *in, const int8_t *w, const float *bias,
                  const float *scale, float *out);
void eo_fc_s8_csr(const eo_fc_params *p, const int8_t *in, const eo_csr *w, const int32_t *bias,
                  const int32_t *mult, const int32_t *shift, int8_t *out);
void eo_add_s8(const eo_binary_params *p, const int8_t *a, const int8_t *b, int8_t *out);
void eo_sub_s8(const eo_binary_params *p, const int8_t *a, const int8_t *b, int8_t *out);
/* Mul: clamp(mbqm((a + a_offset) * (b + b_offset), out_mult, out_shift) + out_offset) */
void eo_mul_s8(const eo_binary_params *p, const int8_t *a, const int8_t *b, int8_t *out);
/* Pooling on raw int8 values (input and output share scale and zero point, as in TFLite);
 * windows are clipped to the image (count_include_pad = 0); the average rounds half away from
 * zero; both clamp to [act_min, act_max]. */
void eo_maxpool_s8(const eo_pool_params *p, const int8_t *in, int8_t *out);
void eo_avgpool_s8(const eo_pool_params *p, const int8_t *in, int8_t *out);
/* Mean over H and W of NHWC, TFLite reference_integer_ops::Mean: mult/shift quantize
 * s_in / s_out (not divided by hw), then the average is taken with rounding half away from 0:
 * out = clamp(round(mbqm(sum(in + in_offset), mult, shift) / hw) + out_offset, -128, 127) */
void eo_mean_hw_s8(int32_t batch, int32_t hw, int32_t c, int32_t in_offset, int32_t out_offset,
                   int32_t mult, int32_t shift, const int8_t *in, int8_t *out);
/* Any unary int8 -> int8 function (Sigmoid, Tanh, HardSwish, LeakyRelu, ...): out = lut[in+128] */
void eo_lut_s8(const int8_t *lut, const int8_t *in, int8_t *out, int32_t n);
void eo_clamp_s8(int32_t act_min, int32_t act_max, const int8_t *in, int8_t *out, int32_t n);
/* Requantize int8 -> int8 (scale change): out = clamp(mbqm(in + in_offset, mult, shift) + out_offset) */
void eo_requantize_s8(int32_t in_offset, int32_t out_offset, int32_t mult, int32_t shift,
                      const int8_t *in, int8_t *out, int32_t n);
/* Softmax over the last axis (rows x n), TFLite reference_ops::Softmax for int8: output scale
 * 1/256 and zero point -128 (requantize afterwards for another output scale). input_multiplier,
 * input_left_shift and diff_min come from PreprocessSoftmaxScaling / CalculateInputRadius
 * (reference.softmax_params). Rows hold at most 4095 values (the Q12.19 sum, as in TFLite). */
void eo_softmax_s8(int32_t rows, int32_t n, int32_t input_multiplier, int32_t input_left_shift,
                   int32_t diff_min, const int8_t *in, int8_t *out);

/* LeakyRelu / PRelu with a per-channel slope (TFLite LeakyRelu's two-multiplier scheme):
 * x = in + in_offset; out = clamp((x >= 0 ? mbqm(x, pos_mult, pos_shift)
 *                                         : mbqm(x, neg_mult[c], neg_shift[c])) + out_offset)
 * where c = i % channels (the last axis; channels == 1 broadcasts one slope). */
typedef struct {
    int32_t channels;
    int32_t in_offset, out_offset;
    int32_t pos_mult, pos_shift;           /* s_in / s_out */
    const int32_t *neg_mult, *neg_shift;   /* s_in * slope[c] / s_out, `channels` entries */
} eo_prelu_params;
void eo_prelu_s8(const eo_prelu_params *p, const int8_t *in, int8_t *out, int32_t n);

/* ---- float32 kernels (same parameter blocks; int8 fields ignored) ---------------------- */
void eo_conv_transpose_f32(const eo_conv_params *p, const float *in, const float *w,
                           const float *bias, float *out);
void eo_conv_f32(const eo_conv_params *p, const float *in, const float *w, const float *bias,
                 float *out);
void eo_depthwise_conv_f32(const eo_conv_params *p, const float *in, const float *w,
                           const float *bias, float *out);
void eo_conv_f32_csr(const eo_conv_params *p, const float *in, const eo_csr *w,
                     const float *bias, float *out);
void eo_fc_f32(const eo_fc_params *p, const float *in, const float *w, const float *bias,
               float *out);
void eo_fc_f32_csr(const eo_fc_params *p, const float *in, const eo_csr *w, const float *bias,
                   float *out);
void eo_add_f32(const eo_binary_params *p, const float *a, const float *b, float *out);
void eo_sub_f32(const eo_binary_params *p, const float *a, const float *b, float *out);
void eo_mul_f32(const eo_binary_params *p, const float *a, const float *b, float *out);
void eo_div_f32(const eo_binary_params *p, const float *a, const float *b, float *out);
void eo_maxpool_f32(const eo_pool_params *p, const float *in, float *out);
void eo_avgpool_f32(const eo_pool_params *p, const float *in, float *out); /* count_include_pad=0 */
void eo_mean_hw_f32(int32_t batch, int32_t hw, int32_t c, const float *in, float *out);
void eo_clamp_f32(float lo, float hi, const float *in, float *out, int32_t n);
void eo_sigmoid_f32(const float *in, float *out, int32_t n);
void eo_tanh_f32(const float *in, float *out, int32_t n);
void eo_hardswish_f32(const float *in, float *out, int32_t n);
void eo_leaky_relu_f32(float alpha, const float *in, float *out, int32_t n);
void eo_sqrt_f32(const float *in, float *out, int32_t n);
/* Pow with a constant exponent (2: x * x, exactly what powf gives) */
void eo_pow_f32(float exponent, const float *in, float *out, int32_t n);
/* batch x ([m][k] x [k][n]) of two computed tensors (a batch stride of 0 broadcasts one
 * matrix), clamped to [lo, hi] (a fused Relu/Clip) */
void eo_matmul_f32(int32_t batch, int32_t m, int32_t k, int32_t n, int32_t a_stride,
                   int32_t b_stride, float lo, float hi, const float *a, const float *b,
                   float *out);
/* Reductions over the middle axis of [outer][n][inner]: 0 mean, 1 sum, 2 max, 3 min */
void eo_reduce_f32(int32_t kind, int32_t outer, int32_t n, int32_t inner, const float *in,
                   float *out);
/* PRelu with a per-channel slope over the last (channel) axis; channels == 1 broadcasts */
void eo_prelu_f32(const float *slope, int32_t channels, const float *in, float *out, int32_t n);
/* Softmax over the last axis: rows x n */
void eo_softmax_f32(int32_t rows, int32_t n, const float *in, float *out);
/* ONNX LRN across channels: outer x channels x inner, channel stride inner (1 for NHWC):
 * out = in / (bias + alpha / size * sum of in^2 over the size channels around)^beta */
void eo_lrn_f32(int32_t outer, int32_t channels, int32_t inner, int32_t size, float alpha,
                float beta, float bias, const float *in, float *out);

/* ---- conversions (no libm) -------------------------------------------------------------- */
/* ONNX QuantizeLinear: saturate(round_half_to_even(x / scale) + zero_point), int8, bit-exact
 * with ONNX Runtime (float division, as MLAS does); NaN gives the zero point. */
void eo_quantize_s8(float scale, int32_t zero_point, const float *in, int8_t *out, int32_t n);
void eo_dequantize_s8(float scale, int32_t zero_point, const int8_t *in, float *out, int32_t n);

/* ---- data movement (any element size) -------------------------------------------------- */
/* Concat along one axis: `outer` blocks; input i contributes sizes[i] bytes per block. */
void eo_concat(int32_t n_inputs, const void *const *inputs, const int32_t *sizes, int32_t outer,
               void *out);
/* 4-D transpose: out dims are in dims permuted by perm; elem_size bytes per element. */
void eo_transpose(const int32_t in_dims[4], const int32_t perm[4], int32_t elem_size,
                  const void *in, void *out);
/* 4-D constant pad: pads[0..3] before, pads[4..7] after (all >= 0); value is elem_size bytes. */
void eo_pad(const int32_t in_dims[4], const int32_t pads[8], int32_t elem_size, const void *value,
            const void *in, void *out);
/* Nearest-neighbour resize of [n][in_h][in_w][c] to [n][out_h][out_w][c] (NHWC, or NCHW as
 * [n*c][h][w][1]): output row y reads input row y_idx[y], column x reads x_idx[x] (the ONNX
 * coordinate and rounding modes are resolved into the tables at compile time).
 * dims = {n, in_h, in_w, c, out_h, out_w}. */
void eo_resize_nearest(const int32_t dims[6], const int32_t *y_idx, const int32_t *x_idx,
                       int32_t elem_size, const void *in, void *out);
/* Strided slice of a 4-D storage array: out[o] = in[starts + o * steps] on every axis
 * (steps may be negative), out_dims elements per axis; any element type (elem_size bytes). */
void eo_slice(const int32_t in_dims[4], const int32_t starts[4], const int32_t steps[4],
              const int32_t out_dims[4], int32_t elem_size, const void *in, void *out);
/* Bilinear resize (ONNX mode "linear"), float, same dims and layouts as eo_resize_nearest:
 * output row y blends input rows y0[y] and y1[y] with weight fy[y] on y1 (columns likewise),
 * as w00*A + w01*B + w10*C + w11*D the way ONNX Runtime sums them. */
void eo_resize_linear_f32(const int32_t dims[6], const int32_t *y0, const int32_t *y1,
                          const float *fy, const int32_t *x0, const int32_t *x1, const float *fx,
                          const float *in, float *out);

/* ---- integrity ------------------------------------------------------------------------- */
/* CRC-32 (IEEE 802.3, reflected, poly 0xEDB88320, init/xorout 0xFFFFFFFF), incremental:
 * crc = eo_crc32(0, a, na); crc = eo_crc32(crc, b, nb); ... */
uint32_t eo_crc32(uint32_t crc, const void *data, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* EO_KERNELS_H */
