/*
 * edgeopt conversions (ONNX QuantizeLinear / DequantizeLinear for int8) and CRC-32.
 * Float arithmetic but no libm: rounding is done with integer operations.
 */
#include "eo_internal.h"

/* round half to even of v, saturated to [-256, 256] (beyond that any int8 result saturates) */
static int32_t eo_round_even_sat(float v)
{
    int32_t i;
    float frac;
    if (!(v > -256.0f)) { /* also catches NaN, which quantizes to the zero point */
        return v != v ? 0 : -256;
    }
    if (v > 256.0f) {
        return 256;
    }
    i = (int32_t)v;      /* truncates toward zero */
    frac = v - (float)i; /* exact: |v| < 2^24 */
    if (frac > 0.5f || (frac == 0.5f && (i & 1))) {
        ++i;
    } else if (frac < -0.5f || (frac == -0.5f && (i & 1))) {
        --i;
    }
    return i;
}

void eo_quantize_s8(float scale, int32_t zero_point, const float *in, int8_t *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        /* x / scale as ONNX Runtime's MlasQuantizeLinear does (a division, not a reciprocal) */
        const int32_t q = eo_round_even_sat(in[i] / scale) + zero_point;
        out[i] = (int8_t)eo_i_clamp(q, -128, 127);
    }
}

void eo_dequantize_s8(float scale, int32_t zero_point, const int8_t *in, float *out, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = (float)((int32_t)in[i] - zero_point) * scale;
    }
}

/* CRC-32 of the reflected polynomial 0xEDB88320, four bits at a time (64-byte table). */
uint32_t eo_crc32(uint32_t crc, const void *data, size_t n)
{
    static const uint32_t table[16] = {
        0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u,
        0x4DB26158u, 0x5005713Cu, 0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu,
        0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu};
    const uint8_t *p = (const uint8_t *)data;
    size_t i;
    crc = ~crc;
    for (i = 0; i < n; ++i) {
        crc ^= p[i];
        crc = (crc >> 4) ^ table[crc & 15u];
        crc = (crc >> 4) ^ table[crc & 15u];
    }
    return ~crc;
}
