// Kernels shared between the native ops of quantship (one extension, several source files).
#pragma once
#include <cstdint>

namespace quantship {

// y (M, N) = x (M, K) @ (w (N, K) int8 * scale (N,))^T + bias (N,) or nothing; K % 32 == 0.
void int8_gemv(const int8_t* w, const float* scale, const float* bias, const float* x, float* y,
               int64_t M, int64_t N, int64_t K);

// y (M, N) = x (M, K) @ w (N, K)^T + bias; K % 32 == 0. For few rows (a GEMV bound by reading w).
void fp32_gemv(const float* w, const float* bias, const float* x, float* y, int64_t M, int64_t N, int64_t K);

}  // namespace quantship
