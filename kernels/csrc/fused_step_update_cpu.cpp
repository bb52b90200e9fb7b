// CPU twin of fused_step_update.cu: same C ABI, same float32 arithmetic in the
// same order, so tests on GPU-less machines check the native code path's math
// against torch. Plain portable C++17: the 16-bit float conversions are done on
// bit patterns (round to nearest even), as the GPU's cvt.rn instructions do.

#include <cstdint>
#include <cstring>

#include "adrt_kernels.h"

namespace {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// --- IEEE binary16 ---------------------------------------------------------

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float32.
    const float mag = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));        // rebias 15 -> 127
}

uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN stays a (quiet) NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf (65504 is odd)
  if (a >= 0x38800000u) {
    // Normal half: rebias the exponent, then round the 13 dropped bits to nearest even.
    // A carry out of the mantissa correctly bumps the exponent.
    uint32_t r = a - (112u << 23);
    r += 0xfffu + ((r >> 13) & 1u);
    return sign | static_cast<uint16_t>(r >> 13);
  }
  // Subnormal half (or zero): count units of 2^-24.
  const uint32_t exp = a >> 23;
  if (exp < 102) return sign;  // < 2^-25: rounds to zero (the tie 2^-25 itself needs exp 102)
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;  // value = mant * 2^(exp - 150)
  const uint32_t shift = 126u - exp;                  // units of 2^-24 = mant >> shift, 14..24
  uint32_t m = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (m & 1u))) ++m;  // may reach 0x400: the smallest normal
  return sign | static_cast<uint16_t>(m);
}

// --- bfloat16 (the top half of a float32) ----------------------------------

inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // overflow -> inf, as wanted
}

// --- the update -------------------------------------------------------------

struct F32 {
  using T = float;
  static float load(T v) { return v; }
  static T store(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static float load(T v) { return half_to_float(v); }
  static T store(float v) { return float_to_half(v); }
};
struct BF16 {
  using T = uint16_t;
  static float load(T v) { return bf16_to_float(v); }
  static T store(float v) { return float_to_bf16(v); }
};

template <class D>
void update(int64_t n, const void* x_, const void* eps_, const void* prev_, const void* noise_,
            void* x_prev_, void* x0_, float a, float b, float cx, float ce, float cp, float cn) {
  using T = typename D::T;
  const T* x = static_cast<const T*>(x_);
  const T* eps = static_cast<const T*>(eps_);
  const T* prev = static_cast<const T*>(prev_);    // NULL when its term is left out
  const T* noise = static_cast<const T*>(noise_);  // NULL when its term is left out
  T* x_prev = static_cast<T*>(x_prev_);
  T* x0 = static_cast<T*>(x0_);
  for (int64_t i = 0; i < n; ++i) {
    const float xv = D::load(x[i]);
    const float ev = D::load(eps[i]);
    // Products rounded separately, sums left to right: the order of step_update.
    const float o0 = a * xv + b * ev;
    float op = cx * xv + ce * ev;
    if (prev) op = op + cp * D::load(prev[i]);
    if (noise) op = op + cn * D::load(noise[i]);
    x0[i] = D::store(o0);
    x_prev[i] = D::store(op);
  }
}

}  // namespace

extern "C" ADRT_API int adrt_fused_step_update(
    int dtype, int64_t n,
    const void* x, const void* eps, const void* prev_x0, const void* noise,
    void* x_prev, void* x0,
    float x0_from_x, float x0_from_eps,
    float c_x, float c_eps, float c_prev_x0, float c_noise,
    void* /*stream*/) {
  if (dtype != ADRT_FLOAT32 && dtype != ADRT_FLOAT16 && dtype != ADRT_BFLOAT16) return ADRT_ERR_BAD_DTYPE;
  if (n < 0) return ADRT_ERR_BAD_SIZE;
  if (n == 0) return ADRT_OK;
  if (!x || !eps || !x_prev || !x0) return ADRT_ERR_NULL_POINTER;
  if (c_prev_x0 != 0.0f && !prev_x0) return ADRT_ERR_MISSING_PREV_X0;
  if (c_noise != 0.0f && !noise) return ADRT_ERR_MISSING_NOISE;
  // Coefficient 0: the term is left out, its tensor not read (as in step_update).
  const void* prev = c_prev_x0 != 0.0f ? prev_x0 : nullptr;
  const void* nz = c_noise != 0.0f ? noise : nullptr;
  switch (dtype) {
    case ADRT_FLOAT32:
      update<F32>(n, x, eps, prev, nz, x_prev, x0, x0_from_x, x0_from_eps, c_x, c_eps, c_prev_x0, c_noise);
      break;
    case ADRT_FLOAT16:
      update<F16>(n, x, eps, prev, nz, x_prev, x0, x0_from_x, x0_from_eps, c_x, c_eps, c_prev_x0, c_noise);
      break;
    default:
      update<BF16>(n, x, eps, prev, nz, x_prev, x0, x0_from_x, x0_from_eps, c_x, c_eps, c_prev_x0, c_noise);
      break;
  }
  return ADRT_OK;
}

extern "C" ADRT_API int adrt_library_device(void) { return ADRT_DEVICE_CPU; }
