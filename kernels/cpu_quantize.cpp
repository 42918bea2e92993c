// GGUF's block quantizers in C++: quants.py's quantize (q8_0, q4_0, q4_k, q5_k, q6_k), the same searches
// over the same candidates, op for op in the same float32 arithmetic. quants.py is the reference: its
// header has the blocks' layout and its comments say why each rule is what it is; this file only makes it
// fast enough for Mixtral's 47 billion weights, where PyTorch's many small passes over memory are not.
//
//   quantize_blocks(w [rows, n] float32, importance [rows, n] float32 or None, type) -> uint8 [rows, n / QK * bytes]
//
// importance may repeat one row for all (stride 0 along the rows, as torch's expand gives); None counts
// every input the same. The caller (quants.quantize) has checked the values (finite, importance >= 0) and
// checks that no fp16 scale overflowed.
//
// The bytes are the reference's but where a value lies within float32 rounding of a decision's boundary
// (d halfway between two fp16 values, two candidates that err the same): each group's sums here add up in
// value order, PyTorch's in an order of its own that depends on the CPU, and such a value can go either
// way (tests/test_quantize_kernel.py says how rarely).
//
// Speed: each search runs on 8 groups at once, one in each lane of a vector (a q4_k block's 8 sub-blocks,
// half of a q6_k block's 16, eight q8_0 or q4_0 blocks): every operation of the search is one vector
// instruction for the 8, and no sum crosses lanes. Rows are shared among threads.
// The file is compiled with the library's flags (kernels/cpu.py), but never fuses a * b + c into one
// rounding: PyTorch and the gguf package round the product and the sum apart, and so must this.
#pragma GCC optimize("fp-contract=off")

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef MIXTRAL_OPS
#error "MIXTRAL_OPS (the ops' namespace) is set by kernels/cpu.py"
#endif

namespace {

using at::Tensor;

// quants.py's candidate grids, as steps added to the number of steps of the grid that spans the values;
// computed as Python computes them (in double), then rounded to float where they meet a tensor.
double min_scale_step(int i) { return -1 + 0.2 * i; }  // MIN_SCALE_STEPS, i in 0..10
constexpr int kMinScaleSteps = 11;
// SYMMETRIC_STEPS: 0, then 0.1 * i for i in -9..9 but 0.
double symmetric_step(int i) { return i == 0 ? 0.0 : 0.1 * (i <= 9 ? i - 10 : i - 9); }
constexpr int kSymmetricSteps = 19;
double scale_step(int i) { return 0.1 * (i < 4 ? i - 4 : i - 3); }  // SCALE_STEPS: 0.1 * i, i in -4..4 but 0
constexpr int kScaleSteps = 8;

float clampf(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }

float fp16_round(float x) { return static_cast<float>(c10::Half(x)); }

void put_half(uint8_t* out, float x) {
  const uint16_t bits = c10::Half(x).x;  // little-endian, as GGUF stores it
  std::memcpy(out, &bits, 2);
}

// Eight groups side by side, one in each lane: GCC's vector type, whose operators (+, -, *, /, <, ?:) are
// one instruction on all 8 lanes, IEEE float32 each, as PyTorch's. The sets all have AVX.
typedef float F8 __attribute__((vector_size(32)));

F8 splat(float s) { return F8{} + s; }
F8 round_even(F8 x) { return (F8)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }  // torch.round
F8 clamp(F8 x, float lo, float hi) {
  x = x > splat(lo) ? x : splat(lo);
  return x < splat(hi) ? x : splat(hi);
}

// quants.symmetric_scales for 8 groups of g values x with weights w, value j of group l in x[j][l]: the
// scale of a symmetric grid (w ~= scale * q, q in qmin..qmax) each, the best by sum w (x - scale q)^2
// among the grids that put the group's extreme at qmin - step, each refit by least squares.
template <int g>
F8 symmetric_scales(const F8 (&x)[g], const F8 (&w)[g], int qmin, int qmax) {
  F8 largest = splat(-1), extreme = {}, best = {};
  for (int j = 0; j < g; j++) {  // the value of largest magnitude, signed; the first of equals (torch.argmax's)
    const F8 magnitude = x[j] < 0 ? -x[j] : x[j];
    const auto more = magnitude > largest;
    largest = more ? magnitude : largest;
    extreme = more ? x[j] : extreme;
    best += w[j] * (x[j] * x[j]);  // the error of scale 0: a candidate must do better
  }
  F8 scale = extreme / static_cast<float>(qmin);
  const F8 inverse = splat(1.0f) / (extreme == 0 ? splat(1.0f) : extreme);  // (qmin - step) / extreme is reciprocal * scalar in torch
  for (int s = 0; s < kSymmetricSteps; s++) {
    const F8 iscale = inverse * static_cast<float>(qmin - symmetric_step(s));
    F8 q[g], sxq = {}, sqq = {}, err = {};
    for (int j = 0; j < g; j++) {
      q[j] = clamp(round_even(x[j] * iscale), qmin, qmax);
      const F8 qw = q[j] * w[j];
      sxq += qw * x[j];
      sqq += qw * q[j];
    }
    const F8 candidate = sxq / sqq;  // nan where every code is 0 or weighs 0: never better
    for (int j = 0; j < g; j++) {
      const F8 r = x[j] - candidate * q[j];
      err += w[j] * (r * r);  // from the residuals, as quants.weighted_squares says why
    }
    const auto better = err < best;
    best = better ? err : best;
    scale = better ? candidate : scale;
  }
  return scale;
}

// quants.fit_scale_min for q4_k's and q5_k's 8 sub-blocks of 32 values x, weights w (value j of sub-block l
// in x[j][l]): scale >= 0 and min >= 0 of x ~= scale * q - min, q in 0..top, the candidates refit by least
// squares from the best bottom so far.
void fit_scale_min(const F8 (&x)[32], const F8 (&w)[32], int top, F8& scale, F8& mn) {
  F8 lo = x[0], hi = x[0], sw = {}, swx = {}, q[32];
  // sum w (x - scale q - bottom)^2 of the codes q, from the residuals (quants.weighted_squares says why)
  auto error = [&](F8 scale, F8 bottom) {
    F8 err = {};
    for (int j = 0; j < 32; j++) {
      const F8 r = x[j] - scale * q[j] - bottom;
      err += w[j] * (r * r);
    }
    return err;
  };
  for (int j = 1; j < 32; j++) lo = x[j] < lo ? x[j] : lo, hi = x[j] > hi ? x[j] : hi;
  lo = lo < 0 ? lo : splat(0);  // the grid's bottom, -min: 0 or below
  scale = (hi - lo) / static_cast<float>(top);
  for (int j = 0; j < 32; j++) {
    sw += w[j], swx += w[j] * x[j];
    q[j] = scale > 0 ? clamp(round_even((x[j] - lo) / scale), 0, top) : splat(0);
  }
  F8 best = error(scale, lo);
  for (int s = 0; s < kMinScaleSteps; s++) {
    const F8 span = hi - lo;
    const F8 iscale = splat(1.0f) / (span > 1e-30f ? span : splat(1e-30f)) * static_cast<float>(top + min_scale_step(s));
    const F8 shift = -lo * iscale;
    F8 sq = {}, sqq = {}, sxq = {};
    for (int j = 0; j < 32; j++) {
      q[j] = clamp(round_even(shift + x[j] * iscale), 0, top);
      const F8 qw = q[j] * w[j];
      sq += qw, sqq += qw * q[j], sxq += w[j] * x[j] * q[j];
    }
    const F8 det = sw * sqq - sq * sq;
    F8 a = (sw * sxq - swx * sq) / det, m = (sqq * swx - sq * sxq) / det;
    const auto alone = (det <= 0) | (m > 0);  // no joint fit, or one with the bottom above 0: the scale alone
    a = alone ? sxq / sqq : a;  // nan if sqq = 0: never better
    m = alone ? splat(0) : m;
    const F8 err = error(a, m);
    const auto better = err < best;
    best = better ? err : best;
    scale = better ? a : scale;
    lo = better ? m : lo;
  }
  scale = scale > 0 ? scale : splat(0);
  mn = -lo;
}

// quants.fit_scale_of_scales: v [8] >= 0 as d * q, q in 0..63, weights w: returns d, writes the codes q.
float fit_scale_of_scales(F8 v, F8 w, uint8_t (&q)[8]) {
  constexpr int top = 63;
  float largest = v[0];
  for (int k = 1; k < 8; k++) largest = std::max(largest, v[k]);
  const float inverse = 1.0f / (largest > 0 ? largest : 1.0f);  // all zero: every code 0
  auto error = [&](float iscale) {
    float err = 0;
    for (int k = 0; k < 8; k++) {
      const float e = v[k] - clampf(std::rint(v[k] * iscale), 0, top) / iscale;
      err += w[k] * (e * e);
    }
    return err;
  };
  float iscale = inverse * top, best = error(iscale);
  for (int s = 0; s < kScaleSteps; s++) {
    const float candidate = inverse * static_cast<float>(top + scale_step(s)), err = error(candidate);
    if (err < best) best = err, iscale = candidate;
  }
  float sxq = 0, sqq = 0;
  for (int k = 0; k < 8; k++) {
    const float code = clampf(std::rint(v[k] * iscale), 0, top);
    q[k] = static_cast<uint8_t>(code);
    sxq += w[k] * v[k] * code, sqq += w[k] * code * code;
  }
  const float d = sqq > 0 ? sxq / sqq : 1.0f / iscale;  // least squares, unless no code weighs anything
  return largest > 0 ? d : 0.0f;
}

// Up to 8 consecutive groups of g values at x (weights w, or null: all 1) into lanes: value j of group l in
// xt[j][l]. Missing groups are zeros; their results are not used.
template <int g>
void to_lanes(const float* x, const float* w, int groups, F8 (&xt)[g], F8 (&wt)[g]) {
  for (int j = 0; j < g; j++)
    for (int l = 0; l < 8; l++) {
      xt[j][l] = l < groups ? x[l * g + j] : 0.0f;
      wt[j][l] = w && l < groups ? w[l * g + j] : 1.0f;  // without an importance all weigh 1, which multiplies exactly
    }
}

// ----------------------------------------------------------------------------- the block types

// Up to 8 blocks of 32 of q8_0 or q4_0 at x (w), `blocks` of them, into out.
void q8_0_or_q4_0(bool q4, const float* x, const float* w, int blocks, uint8_t* out) {
  const int size = q4 ? 18 : 34;
  float d[8];
  if (w) {  // the searched scale, stored in fp16; the codes round to nearest with what is stored
    F8 xt[32], wt[32];
    to_lanes(x, w, blocks, xt, wt);
    const F8 scale = symmetric_scales(xt, wt, q4 ? -8 : -127, q4 ? 7 : 127);
    for (int b = 0; b < blocks; b++) d[b] = fp16_round(scale[b]);
  }
  for (int b = 0; b < blocks; b++) {
    const float* xb = x + 32 * b;
    uint8_t* ob = out + size * b;
    uint8_t q[32];
    if (w) {
      for (int j = 0; j < 32; j++) {
        const float code = d[b] != 0 ? clampf(std::rint(xb[j] / d[b]), q4 ? -8 : -127, q4 ? 7 : 127) : 0.0f;
        q[j] = static_cast<uint8_t>(static_cast<int8_t>(code) + (q4 ? 8 : 0));
      }
    } else if (q4) {  // llama.cpp's quantize_row_q4_0_ref: the extreme becomes -8, halves round up
      float extreme = 0, largest = -1;
      for (int j = 0; j < 32; j++)
        if (std::fabs(xb[j]) > largest) largest = std::fabs(xb[j]), extreme = xb[j];
      d[b] = extreme / -8.0f;
      const float id = d[b] == 0 ? 0.0f : 1.0f / d[b];
      for (int j = 0; j < 32; j++) q[j] = static_cast<uint8_t>(clampf(std::trunc(xb[j] * id + 8.5f), 0, 15));
    } else {  // llama.cpp's quantize_row_q8_0_ref
      float largest = 0;
      for (int j = 0; j < 32; j++) largest = std::max(largest, std::fabs(xb[j]));
      d[b] = largest / 127.0f;
      const float id = d[b] == 0 ? 0.0f : 1.0f / d[b];
      for (int j = 0; j < 32; j++) q[j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(xb[j] * id)));
    }
    put_half(ob, d[b]);
    if (q4)
      for (int j = 0; j < 16; j++) ob[2 + j] = q[j] | (q[j + 16] << 4);
    else
      std::memcpy(ob + 2, q, 32);
  }
}

// One block of 256 of q4_k (levels 16) or q5_k (32): quants.quantize_k, then packed as quants.py's table says.
void q4_k_or_q5_k(int levels, const float* x, const float* w, uint8_t* out) {
  F8 xt[32], wt[32], scale, mn, weight = splat(1);  // how much an error in a sub-block's scale or min counts
  to_lanes(x, w, 8, xt, wt);
  fit_scale_min(xt, wt, levels - 1, scale, mn);
  if (w) {
    weight = F8{};
    for (int j = 0; j < 32; j++) weight += wt[j];
  }
  uint8_t sc[8], m[8], q[8][32];
  const float d = fp16_round(fit_scale_of_scales(scale, weight, sc));
  const float dmin = fp16_round(fit_scale_of_scales(mn, weight, m));
  for (int i = 0; i < 8; i++) {
    const float step = d * sc[i], offset = dmin * m[i];
    for (int j = 0; j < 32; j++)
      q[i][j] = static_cast<uint8_t>(step != 0 ? clampf(std::rint((x[32 * i + j] + offset) / step), 0, levels - 1) : 0.0f);
  }
  put_half(out, d);
  put_half(out + 2, dmin);
  for (int i = 0; i < 4; i++) {  // the 6-bit scales and mins: quants.pack_scales
    out[4 + i] = sc[i] | ((sc[i + 4] >> 4) << 6);
    out[8 + i] = m[i] | ((m[i + 4] >> 4) << 6);
    out[12 + i] = (sc[i + 4] & 15) | ((m[i + 4] & 15) << 4);
  }
  uint8_t* qs = out + 16;
  if (levels == 32) {  // the 5th bit of sub-block i's value l in bit i of qh[l]
    for (int l = 0; l < 32; l++) {
      uint8_t bits = 0;
      for (int i = 0; i < 8; i++) bits |= (q[i][l] >> 4) << i;
      qs[l] = bits;
    }
    qs += 32;
  }
  for (int c = 0; c < 4; c++)  // chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high
    for (int l = 0; l < 32; l++) qs[32 * c + l] = (q[2 * c][l] & 15) | ((q[2 * c + 1][l] & 15) << 4);
}

// One block of 256 of q6_k: 16 symmetric scales, themselves stored as int8 times one fp16 d.
void q6_k(const float* x, const float* w, uint8_t* out) {
  float scales[16];
  for (int h = 0; h < 2; h++) {  // sub-blocks 0..7, then 8..15
    F8 xt[16], wt[16];
    to_lanes(x + 128 * h, w ? w + 128 * h : nullptr, 8, xt, wt);
    const F8 half = symmetric_scales(xt, wt, -32, 31);
    for (int l = 0; l < 8; l++) scales[8 * h + l] = half[l];
  }
  float extreme = 0, largest = -1;  // the largest scale in magnitude becomes -128
  for (int i = 0; i < 16; i++)
    if (std::fabs(scales[i]) > largest) largest = std::fabs(scales[i]), extreme = scales[i];
  const float d = extreme == 0 ? 0.0f : fp16_round(extreme / -128.0f);
  uint8_t q[256];
  for (int i = 0; i < 16; i++) {
    const float sc = d != 0 ? clampf(std::rint(scales[i] / d), -128, 127) : 0.0f, step = d * sc;
    out[192 + i] = static_cast<uint8_t>(static_cast<int8_t>(sc));
    for (int j = 0; j < 16; j++)
      q[16 * i + j] = static_cast<uint8_t>((step != 0 ? clampf(std::rint(x[16 * i + j] / step), -32, 31) : 0.0f) + 32);
  }
  for (int h = 0; h < 2; h++)  // value 128 h + 32 k + l: low 4 bits in ql, top 2 in bits 2k, 2k + 1 of qh[l]
    for (int l = 0; l < 32; l++) {
      const uint8_t* v = q + 128 * h + l;
      out[64 * h + l] = (v[0] & 15) | ((v[64] & 15) << 4);
      out[64 * h + 32 + l] = (v[32] & 15) | ((v[96] & 15) << 4);
      out[128 + 32 * h + l] = (v[0] >> 4) | ((v[32] >> 4) << 2) | ((v[64] >> 4) << 4) | ((v[96] >> 4) << 6);
    }
  put_half(out + 208, d);
}

// One row of n values (weights w, or null) into its blocks.
void quantize_row(c10::string_view type, const float* x, const float* w, int64_t n, uint8_t* out) {
  if (type == "q8_0" || type == "q4_0") {
    const bool q4 = type == "q4_0";
    for (int64_t at = 0; at < n; at += 256) {
      const int blocks = static_cast<int>(std::min<int64_t>(8, (n - at) / 32));
      q8_0_or_q4_0(q4, x + at, w ? w + at : nullptr, blocks, out + at / 32 * (q4 ? 18 : 34));
    }
  } else if (type == "q4_k" || type == "q5_k") {
    const int levels = type == "q4_k" ? 16 : 32, size = type == "q4_k" ? 144 : 176;
    for (int64_t at = 0; at < n; at += 256) q4_k_or_q5_k(levels, x + at, w ? w + at : nullptr, out + at / 256 * size);
  } else {
    for (int64_t at = 0; at < n; at += 256) q6_k(x + at, w ? w + at : nullptr, out + at / 256 * 210);
  }
}

Tensor quantize_blocks(const Tensor& w, const c10::optional<Tensor>& importance, c10::string_view type) {
  const bool k = type == "q4_k" || type == "q5_k" || type == "q6_k";
  TORCH_CHECK(k || type == "q8_0" || type == "q4_0", "mixtral_cpu.quantize_blocks: unknown block type ", type);
  const int qk = k ? 256 : 32, size = type == "q8_0" ? 34 : type == "q4_0" ? 18 : type == "q4_k" ? 144
                                                       : type == "q5_k" ? 176 : 210;
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous() && w.size(1) % qk == 0,
              "mixtral_cpu.quantize_blocks: contiguous float32 rows of a multiple of ", qk, " values expected, got ",
              w.scalar_type(), " ", w.sizes());
  const int64_t rows = w.size(0), n = w.size(1);
  const float* weights = nullptr;
  int64_t weights_stride = 0;
  if (importance.has_value()) {
    const Tensor& imp = *importance;
    TORCH_CHECK(imp.scalar_type() == at::kFloat && imp.dim() == 2 && imp.size(0) == rows && imp.size(1) == n &&
                    imp.stride(1) == 1,
                "mixtral_cpu.quantize_blocks: importance float32 [", rows, ", ", n, "] with unit stride along a row expected");
    weights = imp.data_ptr<float>(), weights_stride = imp.stride(0);
  }
  Tensor out = at::empty({rows, n / qk * size}, w.options().dtype(at::kByte));
  const float* x = w.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      quantize_row(type, x + r * n, weights ? weights + r * weights_stride : nullptr, n, dst + r * (n / qk * size));
  });
  return out;
}

}  // namespace

// TORCH_LIBRARY_FRAGMENT names its namespace as written: this indirection expands MIXTRAL_OPS first.
#define MIXTRAL_QUANTIZE_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define MIXTRAL_QUANTIZE_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

MIXTRAL_QUANTIZE_FRAGMENT(MIXTRAL_OPS, m) {
  m.def("quantize_blocks(Tensor w, Tensor? importance, str type) -> Tensor");
}

MIXTRAL_QUANTIZE_IMPL(MIXTRAL_OPS, CPU, m) {
  m.impl("quantize_blocks", &quantize_blocks);
}
