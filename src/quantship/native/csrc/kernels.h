// Kernels shared between the native ops of quantship (one extension, several source files).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace quantship {

// Software prefetch distance: with two threads each streaming its half of a matrix, the hardware
// prefetchers alone left the int8 GEMV at 7-9 GB/s; prefetching 1 KiB ahead gave 12-18 GB/s
// (A/B alternated on the default model's shapes; 512 B and 2 KiB measured the same).
constexpr int64_t kPrefetchBytes = 1024;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y (M, N) = x (M, K) @ (w (N, K) int8 * scale (N,))^T + bias (N,) or nothing; K % 32 == 0.
void int8_gemv(const int8_t* w, const float* scale, const float* bias, const float* x, float* y,
               int64_t M, int64_t N, int64_t K);

// y (M, N) = x (M, K) @ w (N, K)^T + bias; K % 32 == 0. For few rows (a GEMV bound by reading w).
void fp32_gemv(const float* w, const float* bias, const float* x, float* y, int64_t M, int64_t N, int64_t K);

// int4 group-wise weights in 32-code blocks (w (N, K/2) uint8, per block byte j = code[j] | code[j+16] << 4),
// fp16 scale (N, K/group) and fp16 offset (N, K/group) or nullptr:
// W = q * s + offset, or (q - 8) * s without offsets. Activations are quantized to int8 per block of 32
// (absmax / 127) and multiplied in integers, as llama.cpp does for Q4_0 x Q8_0.
void int4_gemv(const uint8_t* w, const uint16_t* scale, const uint16_t* offset, const float* bias, const float* x,
               float* y, int64_t M, int64_t N, int64_t K, int64_t group);

// The same weights as fp32 (N, K), for many-row inputs (prefill) that are better off in a dense GEMM.
void int4_dequantize(const uint8_t* w, const uint16_t* scale, const uint16_t* offset, float* out, int64_t N,
                     int64_t K, int64_t group);

}  // namespace quantship
