// int4 group-wise weight GEMV for few rows (decode), AVX2: integer dot products with int8 activations.
//
// Why integers: widening 4-bit codes to fp32 costs ~22 instructions per 32 weights, which made an
// fp32-activation kernel compute-bound at ~5 GB/s here, no faster than torch's int4pack. Quantizing
// the activation row to int8 per block of 32 (absmax / 127, as llama.cpp's Q8_0 does for its Q4_0
// dot product) lets _mm256_maddubs_epi16 multiply 32 codes in one instruction. The price is the
// activation rounding (relative error <= 1/254 of each block's absmax), the same order as the bf16
// activations torch's integer kernels use.
//
// y[n] = sum_g ( s_g * sum_{b in g} d_b * <q_b, xq_b> ) + sum_g c_g * (sum_{b in g} d_b * sum(xq_b)),
// c_g = offset_g (asymmetric: W = q s + offset) or -8 s_g (symmetric: W = (q - 8) s).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <vector>

#include "kernels.h"

namespace {

constexpr int64_t kBlock = 32;

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// One activation row -> int8 codes per block of 32, each block's step d_b, and per group
// sum_{b in g} d_b * sum(xq_b) (the offset term).
void quantize_row(const float* x, int64_t K, int64_t group, int8_t* xq, float* d, float* gsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const int64_t per_group = group / kBlock;
  for (int64_t g = 0; g < K / group; ++g) gsum[g] = 0.f;
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(xb + 8 * i);
    __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    const float m = hmax(amax);
    const __m256 inv = _mm256_set1_ps(m > 0.f ? 127.f / m : 0.f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // round to nearest even
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + b * kBlock), _mm256_permutevar8x32_epi32(packed, order));
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    d[b] = m / 127.f;
    gsum[b / per_group] += d[b] * quantship::hsum(_mm256_cvtepi32_ps(s));
  }
}

// 32 codes of one block as 32 unsigned bytes in order (low nibbles are codes 0-15, high 16-31).
inline __m256i unpack_block(const uint8_t* p) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

struct QuantizedRows {  // MT activation rows, quantized
  const int8_t* xq;
  const float* d;
  const float* gsum;
  int64_t K, G;
};

float dot_floats(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = quantship::hsum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// A weight row's group scales s_g and offset terms c_g as fp32 (converting fp16 once per row, not per
// block: the per-group scalar conversions were a third of the inner loop's instructions).
void row_scales(const uint16_t* s, const uint16_t* off, int64_t G, float* sf, float* cf) {
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g)));
    _mm256_storeu_ps(sf + g, sv);
    _mm256_storeu_ps(cf + g, off ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(off + g)))
                                 : _mm256_mul_ps(sv, _mm256_set1_ps(-8.f)));
  }
  for (; g < G; ++g) {
    sf[g] = half_to_float(s[g]);
    cf[g] = off ? half_to_float(off[g]) : -8.f * sf[g];
  }
}

// R weight rows x MT activation rows: R * MT independent accumulators hide the FMA latency.
// sf, cf: the R rows' scales and offset terms (R x G, fp32).
template <int R, int MT>
void int4_tile(const uint8_t* w, int64_t row_bytes, const float* sf, const float* cf, int64_t group,
               const QuantizedRows& x, const float* bias, float* y, int64_t ldy) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t per_group = group / kBlock, blocks = x.K / kBlock;
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < x.G; ++g) {
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      if ((b & 3) == 0)  // one prefetch per 64-byte line (4 blocks); see kernels.h
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes + b * (kBlock / 2)) + quantship::kPrefetchBytes,
                       _MM_HINT_T0);
      __m256i codes[R];
      for (int r = 0; r < R; ++r) codes[r] = unpack_block(w + r * row_bytes + b * (kBlock / 2));
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.xq + m * x.K + b * kBlock));
        const float db = x.d[m * blocks + b];
        for (int r = 0; r < R; ++r) {
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(codes[r], xv), ones));
          acc[r][m] = _mm256_fmadd_ps(dot, _mm256_set1_ps(sf[r * x.G + g] * db), acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m)
      y[m * ldy + r] = quantship::hsum(acc[r][m]) + dot_floats(cf + r * x.G, x.gsum + m * x.G, x.G) +
                       (bias ? bias[r] : 0.f);
}

template <int R>
void int4_rows(const uint8_t* w, int64_t row_bytes, const uint16_t* s, const uint16_t* off, int64_t group,
               const QuantizedRows& x, int64_t M, const float* bias, float* y, int64_t ldy, float* sf, float* cf) {
  const int64_t blocks = x.K / kBlock;
  for (int r = 0; r < R; ++r)
    row_scales(s + r * x.G, off ? off + r * x.G : nullptr, x.G, sf + r * x.G, cf + r * x.G);
  auto rows = [&](int64_t m) { return QuantizedRows{x.xq + m * x.K, x.d + m * blocks, x.gsum + m * x.G, x.K, x.G}; };
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) int4_tile<R, 4>(w, row_bytes, sf, cf, group, rows(m), bias, y + m * ldy, ldy);
  switch (M - m) {
    case 3: int4_tile<R, 3>(w, row_bytes, sf, cf, group, rows(m), bias, y + m * ldy, ldy); break;
    case 2: int4_tile<R, 2>(w, row_bytes, sf, cf, group, rows(m), bias, y + m * ldy, ldy); break;
    case 1: int4_tile<R, 1>(w, row_bytes, sf, cf, group, rows(m), bias, y + m * ldy, ldy); break;
    default: break;
  }
}

}  // namespace

namespace quantship {

void int4_gemv(const uint8_t* w, const uint16_t* scale, const uint16_t* offset, const float* bias, const float* x,
               float* y, int64_t M, int64_t N, int64_t K, int64_t group) {
  const int64_t G = K / group, blocks = K / kBlock, row_bytes = K / 2;
  std::vector<int8_t> xq(M * K);
  std::vector<float> d(M * blocks), gsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x + m * K, K, group, xq.data() + m * K, d.data() + m * blocks, gsum.data() + m * G);
  const QuantizedRows xr{xq.data(), d.data(), gsum.data(), K, G};
  // rows per tile: 4 weight rows share each quantized x block (4 chains at M = 1); measured 0.87-0.97x
  // the time of 2-row tiles on the default model's shapes except 576x1536 at M = 1 (1.14x), same-process A/B
  constexpr int64_t R = 4;
  at::parallel_for(0, (N + R - 1) / R, 8, [&](int64_t t0, int64_t t1) {
    std::vector<float> sf(R * G), cf(R * G);  // the current row tile's scales and offset terms
    const int64_t end = std::min(N, t1 * R);
    for (int64_t n = t0 * R; n < end;) {
      const int64_t rows = n + R <= end ? R : 1;  // the last tile of a matrix whose N % R != 0: row by row
      const uint16_t* off = offset ? offset + n * G : nullptr;
      const float* b = bias ? bias + n : nullptr;
      if (rows == R)
        int4_rows<R>(w + n * row_bytes, row_bytes, scale + n * G, off, group, xr, M, b, y + n, N, sf.data(), cf.data());
      else
        int4_rows<1>(w + n * row_bytes, row_bytes, scale + n * G, off, group, xr, M, b, y + n, N, sf.data(), cf.data());
      n += rows;
    }
  });
}

void int4_dequantize(const uint8_t* w, const uint16_t* scale, const uint16_t* offset, float* out, int64_t N,
                     int64_t K, int64_t group) {
  const int64_t G = K / group, row_bytes = K / 2;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; k += kBlock) {
        const uint8_t* blk = w + n * row_bytes + k / 2;
        const float sg = half_to_float(scale[n * G + k / group]);
        const float cg = offset ? half_to_float(offset[n * G + k / group]) : -8.f * sg;
        for (int j = 0; j < 16; ++j) {
          out[n * K + k + j] = static_cast<float>(blk[j] & 0x0F) * sg + cg;
          out[n * K + k + j + 16] = static_cast<float>(blk[j] >> 4) * sg + cg;
        }
      }
  });
}

}  // namespace quantship

namespace {

void check_int4(const at::Tensor& w, const at::Tensor& scale, const std::optional<at::Tensor>& offset, int64_t group) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8 (N, K/2)");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(group > 0 && group % kBlock == 0 && K % group == 0, "group must be a multiple of 32 dividing K=", K,
              ", got ", group);
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.numel() == N * (K / group),
              "scale must be contiguous float16 (N, K/group)");
  TORCH_CHECK(!offset.has_value() || (offset->scalar_type() == at::kHalf && offset->is_contiguous() &&
                                      offset->numel() == N * (K / group)),
              "offset must be contiguous float16 (N, K/group)");
}

const uint16_t* half_ptr(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias, int64_t group) {
  check_int4(w, scale, offset, group);
  const int64_t N = w.size(0), K = w.size(1) * 2, M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == K,
              "x must be contiguous float32 (M, ", K, ")");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous()),
              "bias must be float32 (N,)");
  at::Tensor y = at::empty({M, N}, x.options());
  quantship::int4_gemv(w.data_ptr<uint8_t>(), half_ptr(scale), offset ? half_ptr(*offset) : nullptr,
                       bias ? bias->data_ptr<float>() : nullptr, x.data_ptr<float>(), y.data_ptr<float>(), M, N, K,
                       group);
  return y;
}

at::Tensor int4_dequantize(const at::Tensor& w, const at::Tensor& scale, const std::optional<at::Tensor>& offset,
                           int64_t group) {
  check_int4(w, scale, offset, group);
  const int64_t N = w.size(0), K = w.size(1) * 2;
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  quantship::int4_dequantize(w.data_ptr<uint8_t>(), half_ptr(scale), offset ? half_ptr(*offset) : nullptr,
                             out.data_ptr<float>(), N, K, group);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantship, m) {
  m.def("int4_linear(Tensor x, Tensor w, Tensor scale, Tensor? offset, Tensor? bias, int group) -> Tensor");
  m.def("int4_dequantize(Tensor w, Tensor scale, Tensor? offset, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantship, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_dequantize", &int4_dequantize);
}
