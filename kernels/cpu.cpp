// CPU kernels for decoding: a few tokens times weight matrices, where every weight is read from memory
// once and the arithmetic must keep up with memory. PyTorch's own kernels do not on AVX2 CPUs: bf16
// F.linear converts more slowly than memory delivers, and its int8 kernels are slower still.
//
// One primitive does all the work: a tile of 4 weight rows times up to 2 activation vectors, the weights
// widened to float32 eight at a time in registers (bf16: a shift; fp16: F16C; int8: sign-extend and
// convert) and multiplied into float32 accumulators. The 4 rows share each load of the activations, and
// 4 to 8 independent accumulators hide the latency of the fused multiply-adds.
//
// Ops (torch.ops.mixtral_cpu.*), built and registered by kernels/cpu.py:
//   linear(x [M, K], weight [N, K], scales [N]?) -> [M, N]          y = x @ (weight * scales).T
//   moe(x [T, D], experts [T, Kx], weights [T, Kx], w1 [E, I, D], w3 [E, I, D], w2 [E, D, I],
//       w1_scales [E, I]?, w3_scales [E, I]?, w2_scales [E, D]?) -> [T, D]
// moe reads each chosen expert in place, once per call however many tokens chose it, with w1 and w3 in
// one pass and silu(w1 x) * (w3 x) computed as the rows come in. Weights are float32, bf16, fp16 or
// int8 (with float scales per output row); activations any of the three float types.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------- eight weights as floats

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {
  // bf16 is the top half of a float32: widen to 32 bits and shift into place.
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256 load8(const int8_t* p) {
  __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[r * MC + m] = dot(rows[r], x + m * K) over K values, for R rows and MC vectors (float32).
template <typename W, int R, int MC>
inline void dot_tile(const W* const* rows, const float* x, int64_t K, float* out) {
  __m256 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MC];
    for (int m = 0; m < MC; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      __m256 w = load8(rows[r] + k);
      for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_fmadd_ps(w, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) {
      float s = horizontal_sum(acc[r][m]);
      for (int64_t j = k; j < K; ++j) s += to_float(rows[r][j]) * x[m * K + j];
      out[r * MC + m] = s;
    }
}

// dots[r * M + m] = dot(rows[r], x[m]) for R rows and any M vectors, two vectors at a time: the rows'
// tile stays in L1 while the vectors pass, so the weights come from memory once.
template <typename W, int R>
inline void dot_rows(const W* const* rows, const float* x, int64_t M, int64_t K, float* dots) {
  float out[R * 2];
  for (int64_t m = 0; m < M; m += 2) {
    if (M - m >= 2) {
      dot_tile<W, R, 2>(rows, x + m * K, K, out);
      for (int r = 0; r < R; ++r) dots[r * M + m] = out[r * 2], dots[r * M + m + 1] = out[r * 2 + 1];
    } else {
      dot_tile<W, R, 1>(rows, x + m * K, K, out);
      for (int r = 0; r < R; ++r) dots[r * M + m] = out[r];
    }
  }
}

constexpr int64_t kRowsPerTile = 4;
// Rows a thread takes at a time: large enough that scheduling costs nothing, small enough that two
// threads split a 1024-row matrix evenly.
constexpr int64_t kRowsPerTask = 64;

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

float* float_data(const Tensor& t) { return t.data_ptr<float>(); }

Tensor as_float(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// ---------------------------------------------------------------------------- linear

// y[m, n] = scale[n] * dot(w[n], x[m]) for rows n in [n0, n1).
template <typename W>
void linear_rows(const W* w, const float* scales, const float* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                 float* y, int64_t N) {
  float dots[kRowsPerTile * 64];
  int64_t n = n0;
  for (; n < n1; n += kRowsPerTile) {
    int64_t R = std::min(kRowsPerTile, n1 - n);
    for (int64_t m0 = 0; m0 < M; m0 += 64) {  // 64 vectors at most per pass: dots stays on the stack
      int64_t Mc = std::min<int64_t>(64, M - m0);
      const float* xc = x + m0 * K;
      if (R == kRowsPerTile) {
        const W* rows[4] = {w + n * K, w + (n + 1) * K, w + (n + 2) * K, w + (n + 3) * K};
        dot_rows<W, 4>(rows, xc, Mc, K, dots);
      } else {
        for (int64_t r = 0; r < R; ++r) {
          const W* row[1] = {w + (n + r) * K};
          dot_rows<W, 1>(row, xc, Mc, K, dots + r * Mc);
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        float s = scales ? scales[n + r] : 1.0f;
        for (int64_t m = 0; m < Mc; ++m) y[(m0 + m) * N + n + r] = dots[r * Mc + m] * s;
      }
    }
  }
}

template <typename F>
void dispatch_weight_type(const Tensor& w, F&& f) {
  switch (w.scalar_type()) {
    case at::kFloat: return f(static_cast<const float*>(nullptr));
    case at::kBFloat16: return f(static_cast<const c10::BFloat16*>(nullptr));
    case at::kHalf: return f(static_cast<const c10::Half*>(nullptr));
    case at::kChar: return f(static_cast<const int8_t*>(nullptr));
    default: TORCH_CHECK(false, "mixtral_cpu: weights of dtype ", w.scalar_type(), " are not supported");
  }
}

void check_scales(const c10::optional<Tensor>& scales, const Tensor& w, at::IntArrayRef shape) {
  TORCH_CHECK(scales.has_value() == (w.scalar_type() == at::kChar),
              "mixtral_cpu: int8 weights need scales, and only int8 weights take them");
  if (scales) TORCH_CHECK(scales->sizes() == shape, "mixtral_cpu: scales of shape ", scales->sizes(),
                          " do not fit weights of shape ", w.sizes());
}

Tensor linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& scales) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "mixtral_cpu.linear: x [M, K] and weight [N, K] expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "mixtral_cpu.linear: weight must be contiguous");
  check_scales(scales, weight, {weight.size(0)});
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  Tensor xf = as_float(x);
  Tensor sf = scales ? as_float(*scales) : Tensor();
  Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* s = scales ? float_data(sf) : nullptr;
  dispatch_weight_type(weight, [&](auto tag) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const W* w = static_cast<const W*>(weight.data_ptr());
    const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      linear_rows<W>(w, s, float_data(xf), M, K, t0 * kRowsPerTask, std::min(N, t1 * kRowsPerTask), float_data(y), N);
    });
  });
  return y.to(x.scalar_type());
}

// ---------------------------------------------------------------------------- mixture of experts

// The (token, expert) pairs grouped by expert: group g is expert expert_of[g], pairs [start[g], start[g+1]).
struct Groups {
  std::vector<int64_t> expert_of, start, token, slot;  // slot: the pair's index in experts.flatten()
};

Groups group_by_expert(const Tensor& experts, int64_t E) {
  Tensor ex = experts.to(at::kLong).contiguous();
  const int64_t* e = ex.data_ptr<int64_t>();
  const int64_t P = ex.numel(), Kx = ex.size(1);
  std::vector<int64_t> count(E, 0);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(e[p] >= 0 && e[p] < E, "mixtral_cpu.moe: expert id ", e[p], " out of range for ", E, " experts");
    ++count[e[p]];
  }
  Groups g;
  std::vector<int64_t> offset(E, 0);
  g.start.push_back(0);
  for (int64_t i = 0; i < E; ++i) {
    if (!count[i]) continue;
    offset[i] = g.start.back();
    g.expert_of.push_back(i);
    g.start.push_back(g.start.back() + count[i]);
  }
  g.token.resize(P), g.slot.resize(P);
  for (int64_t p = 0; p < P; ++p) {  // stable: tokens keep their order within a group
    int64_t q = offset[e[p]]++;
    g.token[q] = p / Kx, g.slot[q] = p;
  }
  return g;
}

template <typename W>
void moe_experts(const Groups& g, const float* x, const float* pair_weight, const W* w1, const W* w3, const W* w2,
                 const float* s1, const float* s3, const float* s2, int64_t D, int64_t I, float* y) {
  const int64_t G = g.expert_of.size(), P = g.token.size();
  // Each group's tokens side by side, so that an expert's rows meet all of its tokens in one pass.
  std::vector<float> xg(P * D), h(P * I);
  for (int64_t q = 0; q < P; ++q) std::copy(x + g.token[q] * D, x + (g.token[q] + 1) * D, xg.begin() + q * D);

  // w1 and w3 together: for a tile of 2 rows of each, h = silu(w1 x) * (w3 x) over the group's tokens.
  const int64_t tiles_per_expert = (I + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, G * tiles_per_expert, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> dots;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t grp = t / tiles_per_expert, e = g.expert_of[grp];
      const int64_t q0 = g.start[grp], M = g.start[grp + 1] - q0;
      const W* e1 = w1 + e * I * D;
      const W* e3 = w3 + e * I * D;
      const float* xm = xg.data() + q0 * D;
      dots.resize(4 * M);
      const int64_t i1 = std::min(I, (t % tiles_per_expert + 1) * kRowsPerTask);
      for (int64_t i = (t % tiles_per_expert) * kRowsPerTask; i < i1; i += 2) {
        const int64_t R = std::min<int64_t>(2, i1 - i);
        if (R == 2) {
          const W* rows[4] = {e1 + i * D, e1 + (i + 1) * D, e3 + i * D, e3 + (i + 1) * D};
          dot_rows<W, 4>(rows, xm, M, D, dots.data());
        } else {
          const W* rows[2] = {e1 + i * D, e3 + i * D};
          dot_rows<W, 2>(rows, xm, M, D, dots.data());
        }
        for (int64_t r = 0; r < R; ++r) {
          const float a1 = s1 ? s1[e * I + i + r] : 1.0f, a3 = s3 ? s3[e * I + i + r] : 1.0f;
          for (int64_t m = 0; m < M; ++m)
            h[(q0 + m) * I + i + r] = silu(dots[r * M + m] * a1) * (dots[(R + r) * M + m] * a3);
        }
      }
    }
  });

  // w2: each thread owns a range of output rows d and adds every pair's contribution to them.
  const int64_t tasks = (D + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> dots;
    for (int64_t grp = 0; grp < G; ++grp) {
      const int64_t e = g.expert_of[grp], q0 = g.start[grp], M = g.start[grp + 1] - q0;
      const W* e2 = w2 + e * D * I;
      dots.resize(kRowsPerTile * M);
      for (int64_t d = t0 * kRowsPerTask; d < std::min(D, t1 * kRowsPerTask); d += kRowsPerTile) {
        const int64_t R = std::min(kRowsPerTile, D - d);
        if (R == kRowsPerTile) {
          const W* rows[4] = {e2 + d * I, e2 + (d + 1) * I, e2 + (d + 2) * I, e2 + (d + 3) * I};
          dot_rows<W, 4>(rows, h.data() + q0 * I, M, I, dots.data());
        } else {
          for (int64_t r = 0; r < R; ++r) {
            const W* row[1] = {e2 + (d + r) * I};
            dot_rows<W, 1>(row, h.data() + q0 * I, M, I, dots.data() + r * M);
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          const float a2 = s2 ? s2[e * D + d + r] : 1.0f;
          for (int64_t m = 0; m < M; ++m)
            y[g.token[q0 + m] * D + d + r] += pair_weight[g.slot[q0 + m]] * a2 * dots[r * M + m];
        }
      }
    }
  });
}

Tensor moe(const Tensor& x, const Tensor& experts, const Tensor& weights, const Tensor& w1, const Tensor& w3,
           const Tensor& w2, const c10::optional<Tensor>& w1_scales, const c10::optional<Tensor>& w3_scales,
           const c10::optional<Tensor>& w2_scales) {
  TORCH_CHECK(x.dim() == 2 && experts.dim() == 2 && weights.sizes() == experts.sizes() && experts.size(0) == x.size(0),
              "mixtral_cpu.moe: x [T, D], experts and weights [T, K] expected");
  TORCH_CHECK(w1.dim() == 3 && w1.sizes() == w3.sizes() && w2.dim() == 3 && w2.size(0) == w1.size(0) &&
              w2.size(1) == w1.size(2) && w2.size(2) == w1.size(1) && w1.size(2) == x.size(1),
              "mixtral_cpu.moe: w1, w3 [E, I, D] and w2 [E, D, I] expected, got ", w1.sizes(), ", ", w3.sizes(),
              ", ", w2.sizes(), " for x ", x.sizes());
  TORCH_CHECK(w1.scalar_type() == w3.scalar_type() && w1.scalar_type() == w2.scalar_type(),
              "mixtral_cpu.moe: w1, w3 and w2 must share a dtype");
  TORCH_CHECK(w1.is_contiguous() && w3.is_contiguous() && w2.is_contiguous(), "mixtral_cpu.moe: weights must be contiguous");
  const int64_t E = w1.size(0), I = w1.size(1), D = w1.size(2);
  check_scales(w1_scales, w1, {E, I});
  check_scales(w3_scales, w3, {E, I});
  check_scales(w2_scales, w2, {E, D});
  Tensor xf = as_float(x), pw = as_float(weights);
  Tensor s1 = w1_scales ? as_float(*w1_scales) : Tensor(), s3 = w3_scales ? as_float(*w3_scales) : Tensor(),
         s2 = w2_scales ? as_float(*w2_scales) : Tensor();
  Tensor y = at::zeros({x.size(0), D}, x.options().dtype(at::kFloat));
  const Groups g = group_by_expert(experts, E);
  dispatch_weight_type(w1, [&](auto tag) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    moe_experts<W>(g, float_data(xf), float_data(pw), static_cast<const W*>(w1.data_ptr()),
                   static_cast<const W*>(w3.data_ptr()), static_cast<const W*>(w2.data_ptr()),
                   w1_scales ? float_data(s1) : nullptr, w3_scales ? float_data(s3) : nullptr,
                   w2_scales ? float_data(s2) : nullptr, D, I, float_data(y));
  });
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(mixtral_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? scales) -> Tensor");
  m.def("moe(Tensor x, Tensor experts, Tensor weights, Tensor w1, Tensor w3, Tensor w2, Tensor? w1_scales, "
        "Tensor? w3_scales, Tensor? w2_scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("moe", &moe);
}
