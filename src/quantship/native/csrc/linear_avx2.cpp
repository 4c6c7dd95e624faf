// int8 and fp32 weight GEMV/GEMM for few rows (decode), AVX2 + FMA.
//
// Why our own: on AVX2-only CPUs torch's _weight_int8pack_mm converts through software bf16 and
// reads ~6-7 GB/s (docs/bench.md). This kernel keeps activations in fp32, widens the int8 codes
// to fp32 in registers and accumulates with FMA, so it reads the codes once at close to memory
// bandwidth and matches the dequantize-then-matmul reference up to fp32 summation order.
// (int4 is in int4_avx2.cpp: widening nibbles to fp32 costs more than the bytes it saves.)
//
// Layout: w (N, K) int8 two's-complement codes (QuantLinear's buffer, zero-copy), scale (N,) fp32:
// W[n, k] = w[n, k] * scale[n].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "kernels.h"

namespace {

using quantship::hsum;

// Eight weights as fp32: int8 codes are widened in registers, fp32 weights load as they are.
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// Rows of x processed together so each loaded weight vector is reused MT times; U independent
// accumulator chains per x row hide the FMA latency when MT is small.
template <int MT, int U, typename W>
void gemv_row(const W* w, const float* x, int64_t K, float scale, float bias, float* y, int64_t ldy) {
  __m256 acc[MT][U];
  for (int m = 0; m < MT; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8 * U) {
    for (int64_t off = 0; off < 8 * U * static_cast<int64_t>(sizeof(W)); off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + off + quantship::kPrefetchBytes, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      __m256 wv = load8(w + k + 8 * u);
      for (int m = 0; m < MT; ++m)
        acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m256 s = acc[m][0];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[m][u]);
    y[m * ldy] = hsum(s) * scale + bias;
  }
}

template <typename W>
void gemv_rows(const W* w, const float* x, int64_t M, int64_t K, float scale, float bias, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) gemv_row<4, 2>(w, x + m * K, K, scale, bias, y + m * ldy, ldy);
  switch (M - m) {
    case 3: gemv_row<3, 2>(w, x + m * K, K, scale, bias, y + m * ldy, ldy); break;
    case 2: gemv_row<2, 2>(w, x + m * K, K, scale, bias, y + m * ldy, ldy); break;
    case 1: gemv_row<1, 4>(w, x + m * K, K, scale, bias, y + m * ldy, ldy); break;
    default: break;
  }
}

}  // namespace

namespace quantship {

void int8_gemv(const int8_t* w, const float* scale, const float* bias, const float* x, float* y,
               int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) gemv_rows(w + n * K, x, M, K, scale[n], bias ? bias[n] : 0.f, y + n, N);
  });
}

void fp32_gemv(const float* w, const float* bias, const float* x, float* y, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) gemv_rows(w + n * K, x, M, K, 1.f, bias ? bias[n] : 0.f, y + n, N);
  });
}

}  // namespace quantship

namespace {

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 (M, K) tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weight ", K);
  TORCH_CHECK(K % 32 == 0, "in_features must be a multiple of 32, got ", K);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "w must be contiguous int8 (N, K)");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(), "scale must be float32 (N,)");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(), "bias must be float32 (N,)");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  quantship::int8_gemv(w.data_ptr<int8_t>(), scale.data_ptr<float>(), b, x.data_ptr<float>(), y.data_ptr<float>(),
                       M, N, K);
  return y;
}

at::Tensor fp32_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(), "w must be contiguous float32 (N, K)");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(), "bias must be float32 (N,)");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  quantship::fp32_gemv(w.data_ptr<float>(), b, x.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantship, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor");
  m.def("fp32_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantship, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("fp32_linear", &fp32_linear);
}
