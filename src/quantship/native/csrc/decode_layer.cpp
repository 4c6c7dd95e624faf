// One decoder layer of a llama-family model for a decode step (one new token per running slot),
// as a single native call.
//
// Why: a batch-1 decode step of a small model issues ~70 tiny torch operators per layer from
// Python; on 2 cores their dispatch and the interpreter cost more than the matmuls themselves
// (docs/bench.md profile: 29% Python, ~9 ms/step of small ops). Here norms, rope, the KV-cache
// write, attention and the activations are plain loops over a few thousand floats; only the
// projections call a kernel (ours for int8, torch's for the others).
//
// Semantics are those of engine/forward.py's LlamaForward.decode (RMSNorm in fp32, rotate-half
// rope with the model's cos/sin, optional per-head q/k RMSNorm (qwen3), GQA, SiLU-gated MLP,
// KV cache layout (slots, kv_heads, max_seq, head_dim) in fp32, bf16 or int8 with an fp16 scale
// per (slot, head, position)); tests compare the two.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace {

// How a projection multiplies; the ints come from quantship/native/decode.py (LinearKind).
enum LinearKind : int64_t { DENSE = 0, INT8 = 1, W8A8 = 2, INT4 = 3 };
constexpr int kTensorsPerLinear = 4;  // (a, b, bias, extra): see run_linear
// Up to this many rows our fp32 GEMV beats torch's F.linear (1.2-3.5x on the default model's
// shapes, docs/results/kernels.md); from 32 rows on torch's blocked GEMM wins.
constexpr int64_t kFp32GemvMaxRows = 16;
// From this many rows on, int4 dequantizes once and runs the dense GEMM (formats/kernels.py: INT4_DENSE_MIN_ROWS).
constexpr int64_t kInt4DenseMinRows = 32;
// w8a8 uses torch._int_mm up to this many rows (formats/kernels.py: W8A8_INT_MM_MAX_ROWS).
constexpr int64_t kW8A8IntMmMaxRows = 2;

at::Tensor run_linear(const at::Tensor& x, int64_t kind, int64_t group, const at::Tensor* t) {
  const at::Tensor &a = t[0], &b = t[1], &bias = t[2], &extra = t[3];
  const bool has_bias = bias.numel() > 0;
  switch (kind) {
    case DENSE: {  // a: fp32 weight (N, K)
      const int64_t M = x.size(0), N = a.size(0), K = a.size(1);
      if (M > kFp32GemvMaxRows || K % 32)
        return at::linear(x, a, has_bias ? std::optional<at::Tensor>(bias) : std::nullopt);
      at::Tensor y = at::empty({M, N}, x.options());
      quantship::fp32_gemv(a.data_ptr<float>(), has_bias ? bias.data_ptr<float>() : nullptr, x.data_ptr<float>(),
                           y.data_ptr<float>(), M, N, K);
      return y;
    }
    case INT8: {  // a: int8 codes (N, K), b: fp32 scale (N,)
      const int64_t M = x.size(0), N = a.size(0), K = a.size(1);
      at::Tensor y = at::empty({M, N}, x.options());
      quantship::int8_gemv(a.data_ptr<int8_t>(), b.data_ptr<float>(), has_bias ? bias.data_ptr<float>() : nullptr,
                           x.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
      return y;
    }
    case INT4: {  // a: int4 32-code blocks (N, K/2), b: fp16 scale (N, K/g), extra: fp16 offset or empty
      const int64_t M = x.size(0), N = a.size(0), K = a.size(1) * 2;
      const auto* s = reinterpret_cast<const uint16_t*>(b.data_ptr<at::Half>());
      const auto* o = extra.numel() ? reinterpret_cast<const uint16_t*>(extra.data_ptr<at::Half>()) : nullptr;
      if (M >= kInt4DenseMinRows) {
        at::Tensor w = at::empty({N, K}, x.options());
        quantship::int4_dequantize(a.data_ptr<uint8_t>(), s, o, w.data_ptr<float>(), N, K, group);
        return at::linear(x, w, has_bias ? std::optional<at::Tensor>(bias) : std::nullopt);
      }
      at::Tensor y = at::empty({M, N}, x.options());
      quantship::int4_gemv(a.data_ptr<uint8_t>(), s, o, has_bias ? bias.data_ptr<float>() : nullptr,
                           x.data_ptr<float>(), y.data_ptr<float>(), M, N, K, group);
      return y;
    }
    case W8A8: {  // a: int8 codes viewed (K, N), b: fp32 scale (1, N), extra: static act scale (1,) or empty
      at::Tensor scale = extra.numel() ? extra : x.abs().amax(-1, true).clamp_min(1e-8).div(127.0);
      at::Tensor codes = x.div(scale).round().clamp(-127, 127);
      at::Tensor y;
      if (x.size(0) <= kW8A8IntMmMaxRows) {  // torch's int8 x int8 matmul (exact integer products)
        y = at::_int_mm(codes.to(at::kChar), a).to(at::kFloat).mul_(scale).mul_(b);
      } else {  // its CPU loop is unvectorised: the reference computation in fp32 is faster here
        y = at::linear(codes.mul_(scale), a.t().to(at::kFloat).mul_(b.t()));
      }
      return has_bias ? y.add_(bias) : y;
    }
    default:
      TORCH_CHECK(false, "unknown linear kind ", kind);
  }
}

// A group of projections reading the same input; their outputs are concatenated (q|k|v, gate|up).
// spec[pos] = count, then (kind, group) per projection; tensors advance kTensorsPerLinear each.
at::Tensor run_group(const at::Tensor& x, const std::vector<int64_t>& spec, size_t& pos,
                     const std::vector<at::Tensor>& tensors, size_t& tpos) {
  const int64_t count = spec[pos++];
  std::vector<at::Tensor> outs;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t kind = spec[pos++], group = spec[pos++];
    outs.push_back(run_linear(x, kind, group, tensors.data() + tpos));
    tpos += kTensorsPerLinear;
  }
  return count == 1 ? outs[0] : at::cat(outs, -1);
}

void rmsnorm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t dim, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < dim; ++j) ss += xr[j] * xr[j];
    const float inv = 1.f / std::sqrt(ss / dim + static_cast<float>(eps));
    for (int64_t j = 0; j < dim; ++j) yr[j] = w[j] * (xr[j] * inv);
  }
}

// x (heads, hd) in place: x * cos + rotate_half(x) * sin.
void rope(float* x, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * hd;
    for (int64_t j = 0; j < half; ++j) {
      const float a = v[j], b = v[j + half];
      v[j] = a * cos[j] - b * sin[j];
      v[j + half] = b * cos[j + half] + a * sin[j + half];
    }
  }
}

// ---- KV cache element types: float, bf16 (plain), int8 (fp16 scale per slot/head/position) ----
template <typename T>
struct Plain {
  static void store(T* dst, at::Half*, const float* src, int64_t hd) {
    for (int64_t j = 0; j < hd; ++j) dst[j] = static_cast<T>(src[j]);
  }
  static float scale(const at::Half*) { return 1.f; }
};

struct Int8 {
  static void store(int8_t* dst, at::Half* scale, const float* src, int64_t hd) {
    float amax = 0.f;
    for (int64_t j = 0; j < hd; ++j) amax = std::max(amax, std::fabs(src[j]));
    const at::Half s = static_cast<at::Half>(std::max(amax, 1e-4f) / 127.f);  // as kv_cache._quantize
    *scale = s;
    const float sf = static_cast<float>(s);
    for (int64_t j = 0; j < hd; ++j)
      dst[j] = static_cast<int8_t>(std::clamp(std::nearbyint(src[j] / sf), -127.f, 127.f));
  }
  static float scale(const at::Half* s) { return static_cast<float>(*s); }
};

// exp of eight floats: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p a degree-7 minimax-style
// polynomial (the classic single-precision scheme; ~1 ulp). libm's scalar expf was ~0.9 ms of a
// 12 ms decode step (SiLU over 1536 features and the softmax, per layer).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two for precision
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

// y[j] = silu(g[j]) * u[j] = g / (1 + exp(-g)) * u
void silu_mul(const float* g, const float* u, float* y, int64_t len) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m256 gv = _mm256_loadu_ps(g + j);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                          _mm256_loadu_ps(u + j)));
  }
  for (; j < len; ++j) y[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
}

// s[t] = exp(s[t] - mx) in place; -> their sum
float exp_shift_sum(float* s, int64_t len, float mx) {
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= len; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = quantship::hsum(acc);
  for (; t < len; ++t) total += (s[t] = std::exp(s[t] - mx));
  return total;
}

// Eight cache elements as fp32.
inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8f(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8f(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <typename T>
float dot(const float* q, const T* k, int64_t hd) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= hd; j += 16) {
    a0 = _mm256_fmadd_ps(load8f(k + j), _mm256_loadu_ps(q + j), a0);
    a1 = _mm256_fmadd_ps(load8f(k + j + 8), _mm256_loadu_ps(q + j + 8), a1);
  }
  for (; j + 8 <= hd; j += 8) a0 = _mm256_fmadd_ps(load8f(k + j), _mm256_loadu_ps(q + j), a0);
  float s = quantship::hsum(_mm256_add_ps(a0, a1));
  for (; j < hd; ++j) s += q[j] * static_cast<float>(k[j]);
  return s;
}

template <typename T>
void axpy(float p, const T* v, float* o, int64_t hd) {  // o += p * v
  const __m256 pv = _mm256_set1_ps(p);
  int64_t j = 0;
  for (; j + 8 <= hd; j += 8) _mm256_storeu_ps(o + j, _mm256_fmadd_ps(pv, load8f(v + j), _mm256_loadu_ps(o + j)));
  for (; j < hd; ++j) o[j] += p * static_cast<float>(v[j]);
}

template <typename T, typename Codec>
void attend(const float* q, const float* k_new, const float* v_new, T* kc, T* vc, at::Half* ks, at::Half* vs,
            const int64_t* positions, float* out, int64_t n, int64_t nh, int64_t nkv, int64_t max_seq, int64_t hd,
            float scaling) {
  // Write this step's K/V first (each slot owns its rows), then attend over positions 0..pos.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < nkv; ++g) {
      const int64_t row = (i * nkv + g) * max_seq + positions[i];
      Codec::store(kc + row * hd, ks ? ks + row : nullptr, k_new + (i * nkv + g) * hd, hd);
      Codec::store(vc + row * hd, vs ? vs + row : nullptr, v_new + (i * nkv + g) * hd, hd);
    }
  const int64_t per_kv = nh / nkv;
  at::parallel_for(0, n * nh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t ih = begin; ih < end; ++ih) {
      const int64_t i = ih / nh, h = ih % nh, g = h / per_kv, length = positions[i] + 1;
      const float* qv = q + ih * hd;
      const int64_t base = (i * nkv + g) * max_seq;
      scores.resize(length);
      float mx = -INFINITY;
      for (int64_t t = 0; t < length; ++t) {
        scores[t] = dot(qv, kc + (base + t) * hd, hd) * Codec::scale(ks ? ks + base + t : nullptr) * scaling;
        mx = std::max(mx, scores[t]);
      }
      const float total = exp_shift_sum(scores.data(), length, mx);
      float* o = out + ih * hd;
      std::fill(o, o + hd, 0.f);
      for (int64_t t = 0; t < length; ++t)
        axpy(scores[t] / total * Codec::scale(vs ? vs + base + t : nullptr), vc + (base + t) * hd, o, hd);
    }
  });
}

void decode_layer(at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                  at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& k_scale, at::Tensor& v_scale,
                  at::TensorList norms, at::TensorList linears, at::IntArrayRef kinds, int64_t n_heads,
                  int64_t n_kv, double eps, double scaling) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous(), "h must be contiguous float32 (n, C)");
  TORCH_CHECK(norms.size() == 4, "norms: (input, post_attention, q_norm or empty, k_norm or empty)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions must be int64");
  const int64_t n = h.size(0), C = h.size(1), hd = k_cache.size(3), max_seq = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) >= n && k_cache.is_contiguous() && v_cache.is_contiguous(), "bad KV cache");
  TORCH_CHECK(cos.size(-1) == hd && cos.is_contiguous() && sin.is_contiguous(), "cos/sin must be (n, head_dim)");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(pos[i] >= 0 && pos[i] < max_seq, "position beyond the KV cache");

  const std::vector<at::Tensor> tensors(linears.begin(), linears.end());
  const std::vector<int64_t> spec(kinds.begin(), kinds.end());
  size_t sp = 0, tp = 0;

  at::Tensor x = at::empty_like(h);
  rmsnorm_rows(h.data_ptr<float>(), norms[0].data_ptr<float>(), x.data_ptr<float>(), n, C, eps);
  at::Tensor qkv = run_group(x, spec, sp, tensors, tp).contiguous();  // (n, (nh + 2 nkv) hd)
  const int64_t qw = n_heads * hd, kw = n_kv * hd;
  TORCH_CHECK(qkv.size(1) == qw + 2 * kw, "q/k/v projections give ", qkv.size(1), " features, expected ", qw + 2 * kw);
  at::Tensor q = at::empty({n, qw}, h.options()), k = at::empty({n, kw}, h.options()), v = at::empty({n, kw}, h.options());
  const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float* row = src + i * (qw + 2 * kw);
    float *qi = q.data_ptr<float>() + i * qw, *ki = k.data_ptr<float>() + i * kw;
    std::copy(row, row + qw, qi);
    std::copy(row + qw, row + qw + kw, ki);
    std::copy(row + qw + kw, row + qw + 2 * kw, v.data_ptr<float>() + i * kw);
    if (norms[2].numel()) {  // qwen3: RMSNorm over head_dim on q and k before rope
      rmsnorm_rows(qi, norms[2].data_ptr<float>(), qi, n_heads, hd, eps);
      rmsnorm_rows(ki, norms[3].data_ptr<float>(), ki, n_kv, hd, eps);
    }
    rope(qi, n_heads, hd, cp + i * hd, snp + i * hd);
    rope(ki, n_kv, hd, cp + i * hd, snp + i * hd);
  }

  at::Tensor attn = at::empty({n, qw}, h.options());
  const float sc = static_cast<float>(scaling);
  at::Half* ksp = k_scale.numel() ? k_scale.data_ptr<at::Half>() : nullptr;
  at::Half* vsp = v_scale.numel() ? v_scale.data_ptr<at::Half>() : nullptr;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* ap = attn.data_ptr<float>();
  switch (k_cache.scalar_type()) {
    case at::kFloat:
      attend<float, Plain<float>>(qp, kp, vp, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), nullptr, nullptr,
                                  pos, ap, n, n_heads, n_kv, max_seq, hd, sc);
      break;
    case at::kBFloat16:
      attend<at::BFloat16, Plain<at::BFloat16>>(qp, kp, vp, k_cache.data_ptr<at::BFloat16>(),
                                                v_cache.data_ptr<at::BFloat16>(), nullptr, nullptr, pos, ap, n,
                                                n_heads, n_kv, max_seq, hd, sc);
      break;
    case at::kChar:
      TORCH_CHECK(ksp && vsp, "an int8 KV cache needs its scales");
      attend<int8_t, Int8>(qp, kp, vp, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), ksp, vsp, pos, ap, n,
                           n_heads, n_kv, max_seq, hd, sc);
      break;
    default:
      TORCH_CHECK(false, "KV cache dtype ", k_cache.scalar_type(), " has no native decode path");
  }

  h.add_(run_group(attn, spec, sp, tensors, tp));  // o_proj
  rmsnorm_rows(h.data_ptr<float>(), norms[1].data_ptr<float>(), x.data_ptr<float>(), n, C, eps);
  at::Tensor gate_up = run_group(x, spec, sp, tensors, tp).contiguous();  // (n, 2 I)
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor act = at::empty({n, inter}, h.options());
  for (int64_t i = 0; i < n; ++i) {
    const float* g = gate_up.data_ptr<float>() + i * 2 * inter;
    silu_mul(g, g + inter, act.data_ptr<float>() + i * inter, inter);
  }
  h.add_(run_group(act, spec, sp, tensors, tp));  // down_proj
  TORCH_CHECK(sp == spec.size() && tp == tensors.size(), "linear spec and tensors disagree");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantship, m) {
  m.def("decode_layer(Tensor(a!) h, Tensor cos, Tensor sin, Tensor positions, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, Tensor(d!) k_scale, Tensor(e!) v_scale, Tensor[] norms, Tensor[] linears, "
        "int[] kinds, int n_heads, int n_kv, float eps, float scaling) -> ()");
}

TORCH_LIBRARY_IMPL(quantship, CPU, m) {
  m.impl("decode_layer", &decode_layer);
}
