/*
 * edgeopt int8 Softmax: TensorFlow Lite's reference_ops::Softmax (int8 in, int8 out at scale
 * 1/256, zero point -128) with gemmlowp's fixed-point exp and reciprocal, bit for bit.
 * No libm, no stdio, no allocation.
 */
#include "eo_internal.h"

/* gemmlowp SaturatingRoundingMultiplyByPOT<e> for 0 < e < 31 */
static int32_t eo_sat_shl(int32_t x, int e)
{
    const int32_t threshold = (int32_t)(((uint32_t)1 << (31 - e)) - 1u);
    if (x > threshold) {
        return INT32_MAX;
    }
    if (x < -threshold) {
        return INT32_MIN;
    }
    return eo_i_shl(x, e);
}

/* gemmlowp exp_on_interval_between_negative_one_quarter_and_0_excl: Q0.31 in and out */
static int32_t eo_exp_quarter(int32_t a)
{
    const int32_t constant_term = 1895147668;    /* exp(-1/8) */
    const int32_t constant_1_over_3 = 715827883; /* 1/3 */
    const int32_t x = a + (1 << 28);
    const int32_t x2 = eo_i_srdhm(x, x);
    const int32_t x3 = eo_i_srdhm(x2, x);
    const int32_t x4 = eo_i_srdhm(x2, x2);
    const int32_t x4_over_4 = eo_i_rdbpot(x4, 2);
    const int32_t poly = eo_i_rdbpot(eo_i_srdhm(x4_over_4 + x3, constant_1_over_3) + x2, 1);
    return constant_term + eo_i_srdhm(constant_term, x + poly);
}

/* gemmlowp exp_on_negative_values for a Q5.26 input a <= 0; the result is Q0.31. */
static int32_t eo_exp_negative(int32_t a)
{
    /* exp(-2^k) in Q0.31 for k = -2 .. 4 */
    static const int32_t mults[7] = {1672461947, 1302514674, 790015084, 290630308,
                                     39332535,   720401,     242};
    const int32_t quarter = 1 << 24;
    const int32_t a_mod = (a & (quarter - 1)) - quarter;
    const int32_t remainder = a_mod - a;
    int32_t result = eo_exp_quarter(eo_sat_shl(a_mod, 5)); /* Rescale<0> from Q5.26 */
    int k;
    for (k = 0; k < 7; ++k) {
        if (remainder & (1 << (24 + k))) {
            result = eo_i_srdhm(result, mults[k]);
        }
    }
    return a == 0 ? INT32_MAX : result;
}

/* gemmlowp one_over_one_plus_x_for_x_in_0_1: Newton-Raphson in Q2.29, Q0.31 in and out */
static int32_t eo_one_over_one_plus_x(int32_t a)
{
    const int64_t sum = (int64_t)a + INT32_MAX;
    const int32_t half_den = (int32_t)((sum + (sum >= 0 ? 1 : -1)) / 2);
    const int32_t one_q2 = 1 << 29;
    int32_t x = 1515870810 + eo_i_srdhm(half_den, -1010580540); /* 48/17 - 32/17 * d */
    int i;
    for (i = 0; i < 3; ++i) {
        const int32_t e = one_q2 - eo_i_srdhm(half_den, x);
        x = x + eo_sat_shl(eo_i_srdhm(x, e), 2);
    }
    return eo_sat_shl(x, 1); /* Rescale<0>(ExactMulByPot<-1>(x)): Q1.30 -> Q0.31 */
}

static int eo_clz32(uint32_t x)
{
    int n = 0;
    if (x == 0) {
        return 32;
    }
    while ((x & 0x80000000u) == 0) {
        x <<= 1;
        ++n;
    }
    return n;
}

/* exp(x - max) in Q0.31 of one input difference, or -1 when below diff_min */
static int32_t eo_softmax_exp(int32_t diff, int32_t mult, int32_t left_shift, int32_t diff_min)
{
    if (diff < diff_min) {
        return -1;
    }
    return eo_exp_negative(eo_i_srdhm(eo_i_shl(diff, (int)left_shift), mult));
}

void eo_softmax_s8(int32_t rows, int32_t n, int32_t input_multiplier, int32_t input_left_shift,
                   int32_t diff_min, const int8_t *in, int8_t *out)
{
    int32_t r, c;
    for (r = 0; r < rows; ++r, in += n, out += n) {
        int32_t max_in = -128, sum = 0, scale, bits_over_unit, headroom;
        for (c = 0; c < n; ++c) {
            max_in = in[c] > max_in ? in[c] : max_in;
        }
        for (c = 0; c < n; ++c) {
            const int32_t e = eo_softmax_exp(in[c] - max_in, input_multiplier,
                                             input_left_shift, diff_min);
            sum += e < 0 ? 0 : eo_i_rdbpot(e, 12); /* Q12.19 accumulator */
        }
        headroom = eo_clz32((uint32_t)sum);
        bits_over_unit = 12 - headroom;
        scale = eo_one_over_one_plus_x(
            (int32_t)(((uint32_t)sum << headroom) - ((uint32_t)1 << 31)));
        for (c = 0; c < n; ++c) {
            const int32_t e = eo_softmax_exp(in[c] - max_in, input_multiplier,
                                             input_left_shift, diff_min);
            const int exponent = (int)bits_over_unit + 23;
            int32_t v = -128;
            if (e >= 0) {
                /* TFLite shifts by more than 31 (undefined) only for rows of more than 256
                 * near-equal values; the correctly rounded quotient is then 0. */
                v = (exponent > 31 ? 0 : eo_i_rdbpot(eo_i_srdhm(scale, e), exponent)) - 128;
            }
            out[c] = (int8_t)eo_i_clamp(v, -128, 127);
        }
    }
}
