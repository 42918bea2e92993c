// CPU kernels for prompts: many tokens times int8, int4 or GGUF's block types' weights, read in place. A prompt's tokens
// share each weight, so its products are compute-bound; what used to cost most was making a full-
// precision copy of every weight matrix in memory before PyTorch's matmul could use it. Here each
// thread expands a small block of weight rows at a time into its cache and multiplies it with all the
// tokens while it is there. kernels/README.md explains the layouts and the choices below.
//
// Two ways to multiply, chosen per call (prompt_linear, prompt_moe):
//  - AMX (Intel since Sapphire Rapids), for bf16 activations: a block of 32 weight rows is expanded to
//    bf16 in L2, in the layout of AMX's tiles (int4 nibbles through a 16-entry table of the group's
//    bf16 values (q - 8) * scale; int8 values exactly, their row scale applied to the sums; GGUF's
//    blocks decoded 32 values at a time, as llama.cpp computes them in float32), and
//    multiplied with the bf16 activations by TDPBF16PS, 16 x 16 x 32 products an instruction. The
//    activations are used as they are: no rounding beyond the model's own.
//  - Integer dot products, everywhere else (no AMX, or float32 / fp16 activations): activations are
//    rounded to int16 in blocks of 256 values (step max|block| / 32767: a few hundredths of bf16's own
//    rounding error), a block of 32 weight rows is expanded once to int16 pairs, and pairs multiply and
//    add into int32 lanes (vpdpwssd with AVX-512 VNNI or AVX-VNNI, vpmaddwd with AVX2), one lane per
//    row. Exact integer sums over each run of values that shares its scales, float32 across runs.
// Both work on blocks of 32 rows, in parallel, and hand each block's products for all tokens to the
// op's own ending: the linear layer's output; silu(w1 x) * (w3 x) (w1's and w3's rows are taken 16 and
// 16 in one block); w2's rows added to each token's output, times the routing weight.
//
// This file is compiled once per instruction set with that set's flags, into the same library as
// cpu.cpp (kernels/cpu.py), and registers its ops in the same namespace (MIXTRAL_OPS):
//   prompt_linear(x [M, K], weight, scales, format) -> [M, N]
//   prompt_moe(x [T, D], experts [T, Kx], weights [T, Kx], w1, w3 [E, I, D], w2 [E, D, I], their scales,
//              format, down_format) -> [T, D]
//   prompt_use_amx(use) -> whether AMX is in use from now on (false where the CPU or the OS lacks it)
// format 'int8': int8 [N, K] weights, one scale per row [N]; 'int4': uint8 [N, K/2], value 2j in the low
// nibble of byte j and 2j+1 in the high one, stored q + 8, scales [N, K/group] for groups of a multiple
// of 32; 'q8_0', 'q4_0', 'q4_k', 'q5_k', 'q6_k': uint8 [N, K / values * bytes], GGUF's blocks as they are,
// no scales (quants.py's table). prompt_moe's w2 may have its own (down_format). Scales are float32,
// bf16 or fp16; activations float32, bf16 or fp16; K a multiple of 32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numeric>
#include <vector>

#include "cpu_exp.h"

#ifndef MIXTRAL_OPS
#error "MIXTRAL_OPS (the ops' namespace) is set by kernels/cpu.py"
#endif

namespace {

using at::Tensor;

// Buffers on cache lines: a tile row or vector that straddles two lines costs two loads (half of AMX's
// speed, measured).
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const LineAligned&) const { return true; }
};
template <typename T>
using Buffer = std::vector<T, LineAligned<T>>;

// ---------------------------------------------------------------------------- weights, read in place

enum class Format { kInt8, kInt4, kQ8_0, kQ4_0, kQ4_K, kQ5_K, kQ6_K };
constexpr const char* kFormatNames[] = {"int8", "int4", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k"};

// GGUF's block types (quants.py's table): their scales are inside the blocks.
bool blocks(Format f) { return f >= Format::kQ8_0; }
int64_t block_values(Format f) { return f == Format::kQ8_0 || f == Format::kQ4_0 ? 32 : 256; }
int64_t block_bytes(Format f) {
  switch (f) {
    case Format::kQ8_0: return 34;
    case Format::kQ4_0: return 18;
    case Format::kQ4_K: return 144;
    case Format::kQ5_K: return 176;
    default: return 210;  // q6_k
  }
}

// One weight matrix: int8 [N, K] with a scale per row, int4 uint8 [N, K/2] with `groups` scales per row,
// or a GGUF block type's rows of K / values blocks, one after another (no separate scales).
struct Matrix {
  Format format = Format::kInt8;
  const uint8_t* data = nullptr;
  const void* scales = nullptr;
  at::ScalarType scale_type = at::kFloat;
  int64_t N = 0, K = 0, groups = 1;

  int64_t row_bytes() const {
    return format == Format::kInt4 ? K / 2 : blocks(format) ? K / block_values(format) * block_bytes(format) : K;
  }
  const uint8_t* row(int64_t n) const { return data + n * row_bytes(); }
  float scale(int64_t n, int64_t g = 0) const {
    const int64_t i = n * groups + g;
    switch (scale_type) {
      case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(scales)[i]);
      case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(scales)[i]);
      default: return static_cast<const float*>(scales)[i];
    }
  }
  // Row n's scales (one for int8, `groups` for int4) as floats, 16 at a time.
  void row_scales(int64_t n, float* out) const {
    const int64_t count = format == Format::kInt4 ? groups : 1;
    const char* p = static_cast<const char*>(scales) + n * groups * c10::elementSize(scale_type);
    int64_t g = 0;
    if (scale_type == at::kFloat) return (void)std::memcpy(out, p, count * sizeof(float));
    for (; g + 8 <= count; g += 8) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * g));
      _mm256_storeu_ps(out + g, scale_type == at::kHalf ? _mm256_cvtph_ps(v)
                                                        : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
    }
    for (; g < count; ++g) out[g] = scale(n, g);
  }
  // Expert e of stacked weights [E, N, ...] and scales [E, N, ...].
  Matrix expert(int64_t e) const {
    Matrix m = *this;
    m.data += e * N * row_bytes();
    if (scales) m.scales = static_cast<const char*>(scales) + e * N * groups * c10::elementSize(scale_type);
    return m;
  }
};

constexpr int64_t kBlockRows = 32;  // rows a block multiplies with every token (both paths)
constexpr int64_t kSpan = 16;       // rows of w1, and then of w3, in a block of the MoE's first pass

// The rows a pass multiplies ("logical rows"): one matrix's in order, or w1's and w3's taken 16 and 16
// in turn (rows 0-15 of w1, 0-15 of w3, 16-31 of w1, ...), so that a block of 32 holds both factors of
// silu(w1 x) * (w3 x) for 16 rows of h. A row past a matrix's end is a row of zeros.
struct Rows {
  const Matrix* m[2] = {nullptr, nullptr};
  int count = 1;

  int64_t size() const { return count == 1 ? m[0]->N : 2 * ((m[0]->N + kSpan - 1) / kSpan * kSpan); }
  const Matrix& matrix(int64_t l) const { return *m[count == 1 ? 0 : (l / kSpan) % 2]; }
  int64_t row(int64_t l) const { return count == 1 ? l : l / (2 * kSpan) * kSpan + l % kSpan; }
  bool present(int64_t l) const { return l < size() && row(l) < matrix(l).N; }
};

// ---------------------------------------------------------------------------- GGUF's blocks, decoded

// GGUF's rows are decoded a step of 32 values at a time: w[i] = step[i / 16] * q[i] - offset, the codes q as
// 32 int8 in order. step and offset are exact in float32 (an fp16 times a 6- or 8-bit integer), and so is
// step * q but for q6_k's, which rounds once, as llama.cpp's and quants.py's decoding does: a weight made
// from these is bit for bit theirs. A block's scales are decoded once for all its steps (Decoder).

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// The 4 or 2 bits of each byte from bit `shift` on (a 16-bit shift, then a mask, keeps bytes apart).
inline __m256i bits(__m256i v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(static_cast<char>(mask)));
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// One row's steps, in any order; the scales of the block last used are kept.
struct Decoder {
  Format format = Format::kQ8_0;
  const uint8_t* row = nullptr;
  int shift = 0;  // log2 of the steps a block holds (1 or 8): a step's block by a shift, not a division
  int64_t bytes = 34, block = -1;
  const uint8_t* b = nullptr;  // the block of `block`
  float step[16], offset[8];   // its sub-blocks' (q8_0, q4_0: step[0]; q6_k: 16 sub-blocks of 16 values)

  Decoder(Format f, const uint8_t* r) : format(f), row(r), shift(block_values(f) == 256 ? 3 : 0), bytes(block_bytes(f)) {}

  void load_block(int64_t n) {
    block = n, b = row + n * bytes;
    switch (format) {
      case Format::kQ8_0:
      case Format::kQ4_0:
        step[0] = fp16(b);
        break;
      case Format::kQ4_K:
      case Format::kQ5_K: {  // 12 bytes of 6-bit scales and mins after d and dmin
        const float d = fp16(b), dmin = fp16(b + 2);
        const uint8_t* sm = b + 4;
        for (int u = 0; u < 4; ++u) step[u] = d * (sm[u] & 63), offset[u] = dmin * (sm[u + 4] & 63);
        for (int u = 4; u < 8; ++u) {
          step[u] = d * ((sm[u + 4] & 15) | ((sm[u - 4] >> 6) << 4));
          offset[u] = dmin * ((sm[u + 4] >> 4) | ((sm[u] >> 6) << 4));
        }
        break;
      }
      default: {  // q6_k: 16 int8 scales, then d
        const float d = fp16(b + 208);
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
        for (int i = 0; i < 16; ++i) step[i] = d * sc[i];
      }
    }
  }

  // Step s: its codes; its steps (values 0-15, 16-31) and offset go to step2, off.
  __m256i codes(int64_t s, float* step2, float& off) {
    if (s >> shift != block) load_block(s >> shift);
    const int t = static_cast<int>(s & ((1 << shift) - 1));  // the step within the block
    off = 0.0f;
    switch (format) {
      case Format::kQ8_0:  // d | 32 int8 q
        step2[0] = step2[1] = step[0];
        return load32(b + 2);
      case Format::kQ4_0: {  // d | 16 bytes: value j in the low nibble of byte j, j + 16 in the high one; q - 8
        step2[0] = step2[1] = step[0];
        const __m256i v = _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
        return _mm256_sub_epi8(_mm256_inserti128_si256(bits(v, 0, 15), _mm256_castsi256_si128(bits(v, 4, 15)), 1),
                               _mm256_set1_epi8(8));
      }
      case Format::kQ4_K:
      case Format::kQ5_K: {  // sub-blocks 2i and 2i + 1 share 32 bytes of nibbles: the low ones, then the high
        const bool five = format == Format::kQ5_K;
        step2[0] = step2[1] = step[t], off = offset[t];
        __m256i q = bits(load32(b + (five ? 48 : 16) + 32 * (t / 2)), 4 * (t % 2), 15);
        if (five)  // bit t of byte l: value l's fifth bit
          q = _mm256_or_si256(q, _mm256_slli_epi16(bits(load32(b + 16), t, 1), 4));
        return q;
      }
      default: {  // q6_k: value 32 k + l of a half of 128: low 4 bits in ql, top 2 in qh; q - 32
        const int half = t / 4, k = t % 4;
        step2[0] = step[2 * t], step2[1] = step[2 * t + 1];
        const __m256i low = bits(load32(b + 64 * half + 32 * (k % 2)), 4 * (k / 2), 15);
        const __m256i high = bits(load32(b + 128 + 32 * half), 2 * k, 3);
        return _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
      }
    }
  }
};

// A float32, bf16 or fp16 row of n values as float32.
void to_floats(const void* src, at::ScalarType type, int64_t n, float* dst) {
  if (type == at::kFloat) return (void)std::memcpy(dst, src, n * sizeof(float));
  if (type == at::kBFloat16)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(static_cast<const c10::BFloat16*>(src)[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(static_cast<const c10::Half*>(src)[i]);
}

// silu(a) * b for 8 values (exp8: cpu_exp.h): the MoE's hidden activations, n of them a block, too many for
// std::exp one at a time.
inline __m256 silu_times(__m256 a, __m256 b) {
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), a));
  return _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), b);
}

// ---------------------------------------------------------------------------- integer dot products

// Activations for the integer path: int16 in blocks of 256 values along a row, one float scale each
// (x ~= q * scale, scale = max|block| / 32767, round to nearest even), for M tokens (a multiple of the
// tile's; the extra ones are zeros). Blocks of 256 err a few hundredths of bf16's rounding
// (scripts/bench_prompt.py --rounding), and an int32 lane holds a block's 256 products of at most
// 127 * 32767 each.
constexpr int64_t kBlock = 256;

struct Quantized {
  int64_t M = 0, K = 0;
  Buffer<int16_t> q;    // [M][K]
  Buffer<float> scale;  // [M][blocks()]
  Buffer<float> sums;   // [M][K / 32]: each 32 values' sum, for the K-quants' mins (sum of q, times the scale)
  int64_t blocks() const { return (K + kBlock - 1) / kBlock; }
};

Quantized quantize(const float* x, int64_t M_real, int64_t M, int64_t K) {
  Quantized v;
  v.M = M, v.K = K;
  v.q.assign(M * K, 0), v.scale.assign(M * v.blocks(), 0.0f), v.sums.assign(M * K / 32, 0.0f);
  at::parallel_for(0, M_real, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < v.blocks(); ++b) {
        const int64_t k0 = b * kBlock, n = std::min(kBlock, K - k0);  // n: a multiple of 32
        const float* xb = x + m * K + k0;
        __m256 top = _mm256_setzero_ps();
        for (int64_t k = 0; k < n; k += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_loadu_ps(xb + k)));
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        const float amax = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
        const float inverse = amax > 0.0f ? 32767.0f / amax : 0.0f;
        v.scale[m * v.blocks() + b] = amax / 32767.0f;
        int16_t* q = v.q.data() + m * K + k0;
        for (int64_t k = 0; k < n; k += 16) {  // rounded to nearest even; packs interleaves 128-bit halves: put back
          const __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k), _mm256_set1_ps(inverse)));
          const __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 8), _mm256_set1_ps(inverse)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0b11011000));
        }
        for (int64_t k = 0; k < n; k += 32) {
          int32_t sum = 0;
          for (int64_t i = 0; i < 32; ++i) sum += q[k + i];
          v.sums[m * (K / 32) + (k0 + k) / 32] = static_cast<float>(sum) * v.scale[m * v.blocks() + b];
        }
      }
  });
  return v;
}

// The weights of a block of 32 rows, expanded once for all the tokens: W [K/2][32] int32 lanes, lane
// r of row kp holding values 2kp and 2kp + 1 of row r as two int16 (int8: as they are; int4: q - 8),
// the pair that one lane of vpdpwssd / vpmaddwd multiplies with a token's pair (broadcast to every lane).
// So a vector of sums holds a vector's worth of rows for one token: no sums across lanes.
#if defined(MIXTRAL_ISA_AVX512)
namespace simd {
constexpr int64_t kLanes = 16;
// A tile: 6 tokens by 32 rows (2 vectors): 12 integer sums and 12 float sums of the 32 registers.
constexpr int kTokens = 6, kVectors = 2;
using VI = __m512i;
using VF = __m512;
using Addresses = __m512i;  // 8 of them
inline VI load(const void* p) { return _mm512_load_si512(p); }
inline VF loadf(const float* p) { return _mm512_load_ps(p); }
inline void storef(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VI pair(const int16_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }
inline VI dot(VI sums, VI a, VI b) { return _mm512_dpwssd_epi32(sums, a, b); }
inline VI zeros() { return _mm512_setzero_si512(); }
inline VF to_float(VI v) { return _mm512_cvtepi32_ps(v); }
inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF zero() { return _mm512_setzero_ps(); }
inline VF broadcast(float v) { return _mm512_set1_ps(v); }
// Four bytes from each of 16 rows (row r's at address[r] + offset): 8 at a time, 64-bit addresses,
// as the rows may lie in two tensors (w1's and w3's).
inline VI gather(const __m512i* address, int64_t offset) {
  const __m512i o = _mm512_set1_epi64(offset);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_i64gather_epi32(_mm512_add_epi64(address[0], o), nullptr, 1)),
                            _mm512_i64gather_epi32(_mm512_add_epi64(address[1], o), nullptr, 1), 1);
}
// Byte i of each lane, an int4 pair: (its low nibble - 8, its high nibble - 8) as int16.
inline VI nibble_pair(VI d, int i) {
  const VI b = _mm512_and_si512(_mm512_srli_epi32(d, 8 * i), _mm512_set1_epi32(0xFF));
  // (b | b << 12) & 0x000F000F: the low nibble in the low int16, the high one in the high int16.
  const VI p = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
  return _mm512_sub_epi16(p, _mm512_set1_epi16(8));
}
// Bytes 2i and 2i + 1 of each lane, an int8 pair, as int16: each moved to the high byte of its int16
// (vpshufb, within 128-bit lanes: dword j's bytes are 4 (j % 4) .. + 3), then shifted back with its sign.
inline VI int8_pair(VI d, int i) {
  const VI index = _mm512_add_epi32(_mm512_set1_epi32(i == 0 ? 0x01800080 : 0x03800280),
                                    _mm512_setr_epi32(0, 0x04000400, 0x08000800, 0x0C000C00, 0, 0x04000400, 0x08000800,
                                                      0x0C000C00, 0, 0x04000400, 0x08000800, 0x0C000C00, 0, 0x04000400,
                                                      0x08000800, 0x0C000C00));
  return _mm512_srai_epi16(_mm512_shuffle_epi8(d, index), 8);
}
inline void store(void* p, VI v) { _mm512_store_si512(p, v); }
// A block type's 32 codes (int8) as int16 pairs: `part` 0 holds pairs 0-15 (values 0-31), all of them here.
constexpr int kPartsPerStep = 1;
inline VI widen_codes(__m256i q, int) { return _mm512_cvtepi8_epi16(q); }
// 16 x 16 lanes transposed in four rounds of pairs (32-bit, 64-bit, then 128-bit lanes twice): v[i] holds
// row i before and column kColumn[i] after.
constexpr int kColumn[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
inline void transpose(VF* v) {
  VF t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int j = 0; j < 2; ++j) {
      v[i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + j]), _mm512_castps_pd(t[i + j + 2])));
      v[i + j + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + j]), _mm512_castps_pd(t[i + j + 2])));
    }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(v[i + j], v[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(v[i + j], v[i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    v[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    v[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
}
inline VF as_float(VI v) { return _mm512_castsi512_ps(v); }
inline VI as_int(VF v) { return _mm512_castps_si512(v); }
#else
namespace simd {
constexpr int64_t kLanes = 8;
// A tile: 3 tokens by 16 rows (2 vectors): 6 integer and 6 float sums of the 16 registers.
constexpr int kTokens = 3, kVectors = 2;
using VI = __m256i;
using VF = __m256;
using Addresses = __m256i;  // 4 of them
inline VI load(const void* p) { return _mm256_load_si256(static_cast<const __m256i*>(p)); }
inline VF loadf(const float* p) { return _mm256_load_ps(p); }
inline void storef(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VI pair(const int16_t* p) { return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }
inline VI dot(VI sums, VI a, VI b) {
#ifdef MIXTRAL_ISA_AVXVNNI
  return _mm256_dpwssd_avx_epi32(sums, a, b);
#else
  return _mm256_add_epi32(sums, _mm256_madd_epi16(a, b));
#endif
}
inline VI zeros() { return _mm256_setzero_si256(); }
inline VF to_float(VI v) { return _mm256_cvtepi32_ps(v); }
inline VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF zero() { return _mm256_setzero_ps(); }
inline VF broadcast(float v) { return _mm256_set1_ps(v); }
inline VI gather(const __m256i* address, int64_t offset) {  // 8 rows, 4 at a time
  const __m256i o = _mm256_set1_epi64x(offset);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm256_i64gather_epi32(nullptr, _mm256_add_epi64(address[0], o), 1)),
                                 _mm256_i64gather_epi32(nullptr, _mm256_add_epi64(address[1], o), 1), 1);
}
inline VI nibble_pair(VI d, int i) {
  const VI b = _mm256_and_si256(_mm256_srli_epi32(d, 8 * i), _mm256_set1_epi32(0xFF));
  const VI p = _mm256_and_si256(_mm256_or_si256(b, _mm256_slli_epi32(b, 12)), _mm256_set1_epi32(0x000F000F));
  return _mm256_sub_epi16(p, _mm256_set1_epi16(8));
}
inline VI int8_pair(VI d, int i) {
  const VI index = _mm256_add_epi32(_mm256_set1_epi32(i == 0 ? 0x01800080 : 0x03800280),
                                    _mm256_setr_epi32(0, 0x04000400, 0x08000800, 0x0C000C00, 0, 0x04000400, 0x08000800,
                                                      0x0C000C00));
  return _mm256_srai_epi16(_mm256_shuffle_epi8(d, index), 8);
}
inline void store(void* p, VI v) { _mm256_store_si256(static_cast<__m256i*>(p), v); }
// A block type's 32 codes (int8) as int16 pairs: `part` 0 holds pairs 0-7 (values 0-15), part 1 pairs 8-15.
constexpr int kPartsPerStep = 2;
inline VI widen_codes(__m256i q, int part) {
  return _mm256_cvtepi8_epi16(part ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q));
}
// 8 x 8 lanes transposed: v[i] holds row i before and column kColumn[i] = i after.
constexpr int kColumn[8] = {0, 1, 2, 3, 4, 5, 6, 7};
inline void transpose(VF* v) {
  VF t[8], u[8];
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]), t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      u[i + 2 * j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0x44);
      u[i + 2 * j + 1] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0xEE);
    }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
inline VF as_float(VI v) { return _mm256_castsi256_ps(v); }
inline VI as_int(VF v) { return _mm256_castps_si256(v); }
#endif
}  // namespace simd

constexpr int64_t kVectorsPerBlock = kBlockRows / simd::kLanes;

// A block of rows expanded for the integer path: W (see above) and, for int4 and GGUF's blocks, each
// group's scales of the 32 rows, [groups][32] floats (int8 rows' scales are applied to the products,
// after); for q4_k and q5_k also each sub-block's offset (d min), [K / 32][32].
struct Panel {
  Buffer<int32_t> W;
  Buffer<float> scales, offsets;
  std::vector<uint8_t> zeros;  // a row past the end reads these (int4: 0x88, the nibbles of 0)
  int64_t group = kBlock;      // values a weight scale covers (int8: the rows' scales come after; a block)
  bool scaled = false;         // scales holds the weights' own (int4, GGUF's blocks)
  bool offset = false;         // offsets holds them (q4_k, q5_k)

  void expand(const Rows& rows, int64_t l0, int64_t K) {
    const Matrix& m = *rows.m[0];
    if (blocks(m.format)) return expand_blocks(rows, l0, K);
    const bool int4 = m.format == Format::kInt4;
    W.resize(K / 2 * kBlockRows);
    zeros.assign(m.row_bytes(), int4 ? 0x88 : 0);
    alignas(64) int64_t address[kBlockRows];
    for (int64_t r = 0; r < kBlockRows; ++r)
      address[r] = reinterpret_cast<int64_t>(rows.present(l0 + r) ? rows.matrix(l0 + r).row(rows.row(l0 + r)) : zeros.data());
    for (int64_t v = 0; v < kVectorsPerBlock; ++v) {  // a vector's rows at a time, 4 bytes of each
      const auto* lanes = reinterpret_cast<const simd::Addresses*>(address + v * simd::kLanes);
      int32_t* out = W.data() + v * simd::kLanes;
      for (int64_t byte = 0; byte < m.row_bytes(); byte += 4) {
        const simd::VI d = simd::gather(lanes, byte);
        if (int4)  // bytes b .. b + 3: pairs b .. b + 3
          for (int i = 0; i < 4; ++i) simd::store(out + (byte + i) * kBlockRows, simd::nibble_pair(d, i));
        else  // bytes b .. b + 3: pairs b / 2, b / 2 + 1
          for (int i = 0; i < 2; ++i) simd::store(out + (byte / 2 + i) * kBlockRows, simd::int8_pair(d, i));
      }
    }
    group = int4 ? K / m.groups : kBlock;
    scaled = int4, offset = false;
    if (!int4) return;
    scales.assign(m.groups * kBlockRows, 0.0f);
    std::vector<float> row(m.groups);
    for (int64_t r = 0; r < kBlockRows; ++r) {
      if (!rows.present(l0 + r)) continue;
      rows.matrix(l0 + r).row_scales(rows.row(l0 + r), row.data());
      for (int64_t g = 0; g < m.groups; ++g) scales[g * kBlockRows + r] = row[g];
    }
  }

  // GGUF's blocks, a vector's rows at a time: each row's step of 32 codes widened to 16 int16 pairs, the
  // rows' pairs turned (a transposition in registers) into the pair-rows of W, a vector of rows each; the
  // step's scales to groups of 32 values (q6_k: 16) and its offset.
  void expand_blocks(const Rows& rows, int64_t l0, int64_t K) {
    using namespace simd;
    const Format f = rows.m[0]->format;
    const int64_t steps = K / 32;
    group = f == Format::kQ6_K ? 16 : 32;
    scaled = true, offset = f == Format::kQ4_K || f == Format::kQ5_K;
    W.resize(K / 2 * kBlockRows);
    scales.assign(K / group * kBlockRows, 0.0f);
    if (offset) offsets.assign(steps * kBlockRows, 0.0f);
    for (int64_t v = 0; v < kVectorsPerBlock; ++v) {
      std::vector<Decoder> decoders;
      for (int64_t i = 0; i < kLanes; ++i) {
        const int64_t l = l0 + v * kLanes + i;
        decoders.emplace_back(f, rows.present(l) ? rows.matrix(l).row(rows.row(l)) : nullptr);
      }
      for (int64_t s = 0; s < steps; ++s) {
        VF pairs[kPartsPerStep][kLanes];  // [part][row]: a row's pairs of the part
        for (int64_t i = 0; i < kLanes; ++i) {
          const int64_t r = v * kLanes + i;
          if (!decoders[i].row) {
            for (int part = 0; part < kPartsPerStep; ++part) pairs[part][i] = zero();
            continue;
          }
          float step[2], off;
          const __m256i q = decoders[i].codes(s, step, off);
          for (int part = 0; part < kPartsPerStep; ++part) pairs[part][i] = as_float(widen_codes(q, part));
          if (group == 16) {
            scales[2 * s * kBlockRows + r] = step[0], scales[(2 * s + 1) * kBlockRows + r] = step[1];
          } else {
            scales[s * kBlockRows + r] = step[0];
          }
          if (offset) offsets[s * kBlockRows + r] = off;
        }
        for (int part = 0; part < kPartsPerStep; ++part) {  // pairs[part][j]: pair kColumn[j] of the part, each row
          transpose(pairs[part]);
          for (int64_t j = 0; j < kLanes; ++j)
            store(W.data() + (s * 16 + part * kLanes + kColumn[j]) * kBlockRows + v * kLanes, as_int(pairs[part][j]));
        }
      }
    }
  }
};

// out[m][r] (rows of 32) = tokens m0 .. m0 + kTokens - 1 times the panel's rows v0 * kLanes .. +
// kVectors * kLanes: exact integer sums over each run of values that share their scales (a block of
// the activations and, for int4 and GGUF's blocks, a group of the weights), then scaled and added in
// float32; a K-quant's offsets come off as offset * (the token's sum of those 32 values).
inline void integer_tile(const Panel& p, const Quantized& x, int64_t m0, int64_t v0, float* out) {
  using namespace simd;
  constexpr int T = kTokens, V = kVectors;
  const int64_t K = x.K;
  VF acc[T][V];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[t][v] = zero();
  for (int64_t k0 = 0; k0 < K;) {
    const int64_t k1 = std::min({K, (k0 / kBlock + 1) * kBlock, (k0 / p.group + 1) * p.group});
    VI sums[T][V];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) sums[t][v] = zeros();
    const int32_t* w = p.W.data() + v0 * kLanes;
    const int16_t* xq = x.q.data() + m0 * K;
    for (int64_t kp = k0 / 2; kp < k1 / 2; ++kp) {
      VI wv[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) wv[v] = load(w + kp * kBlockRows + v * kLanes);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const VI xp = pair(xq + t * K + 2 * kp);
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) sums[t][v] = dot(sums[t][v], wv[v], xp);
      }
    }
    const int64_t block = k0 / kBlock, group = k0 / p.group;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const VF xs = broadcast(x.scale[(m0 + t) * x.blocks() + block]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const VF scale = p.scaled ? mul(loadf(p.scales.data() + group * kBlockRows + (v0 + v) * kLanes), xs) : xs;
        acc[t][v] = fmadd(to_float(sums[t][v]), scale, acc[t][v]);
      }
    }
    if (p.offset) {  // a run is one sub-block of 32 here
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const VF sum = broadcast(-x.sums[(m0 + t) * (K / 32) + k0 / 32]);
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[t][v] = fmadd(loadf(p.offsets.data() + k0 / 32 * kBlockRows + (v0 + v) * kLanes), sum, acc[t][v]);
      }
    }
    k0 = k1;
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) storef(out + t * kBlockRows + (v0 + v) * kLanes, acc[t][v]);
}

// Logical rows [l0, l1) (whole blocks) times every token of x: each block's products out[m][l] go to
// done(l0, 32, out). A block's weights are expanded once, then every tile of tokens passes over them.
template <typename Done>
void integer_rows(const Rows& rows, int64_t l0, int64_t l1, const Quantized& x, Done& done) {
  Panel panel;
  Buffer<float> out(x.M * kBlockRows);
  for (int64_t b = l0; b < l1; b += kBlockRows) {
    panel.expand(rows, b, x.K);
    for (int64_t m0 = 0; m0 < x.M; m0 += simd::kTokens)
      for (int64_t v0 = 0; v0 < kVectorsPerBlock; v0 += simd::kVectors) integer_tile(panel, x, m0, v0, out.data() + m0 * kBlockRows);
    done(b, kBlockRows, out.data());
  }
}

// ---------------------------------------------------------------------------- AMX

#if defined(MIXTRAL_ISA_AVX512)
#define MIXTRAL_AMX __attribute__((target("amx-tile,amx-bf16")))

// AMX needs the CPU (CPUID leaf 7: AMX-TILE, AMX-BF16) and the OS, which saves the 8 KB of tile state
// only for processes that ask (Linux 5.16 and later).
bool amx_supported() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 24)) || !(d & (1u << 22))) return false;
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

std::atomic<bool> amx_wanted{true};

bool use_amx() {
  static const bool supported = amx_supported();
  return supported && amx_wanted.load();
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: sums (16 rows x 16 tokens, float32); 4, 5: weights (16 rows x 32 values, bf16); 6, 7:
// activations (16 pairs of values x 16 tokens, bf16 pairs).
MIXTRAL_AMX void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  // GCC's _tile_loadconfig tells the compiler it reads 8 bytes only: without this the other stores are dropped.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

MIXTRAL_AMX void release_tiles() { _tile_release(); }

// Activations as AMX takes its second operand: tile (mt, s) holds tokens 16 mt .. 16 mt + 15 and values
// 32 s .. 32 s + 31, row r the pairs of values 2r, 2r + 1 of the 16 tokens (dword c: token c's pair).
// x: bf16 [M][K], contiguous; tokens past M are zeros.
struct Packed {
  int64_t M = 0, K = 0, MT = 0, S = 0;
  Buffer<uint32_t> tiles;  // [MT][S][16][16]
  const uint32_t* tile(int64_t mt, int64_t s) const { return tiles.data() + (mt * S + s) * 256; }
};

Packed pack(const c10::BFloat16* x, int64_t M, int64_t K) {
  Packed p;
  p.M = M, p.K = K, p.MT = (M + 15) / 16, p.S = K / 32;
  p.tiles.resize(p.MT * p.S * 256);
  const int64_t pairs = K / 2;  // dwords a token holds
  const __m512i tokens = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int32_t>(pairs)));
  at::parallel_for(0, p.MT, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t mt = t0; mt < t1; ++mt) {
      const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(16, M - 16 * mt)) - 1);
      const int* base = reinterpret_cast<const int*>(x) + 16 * mt * pairs;
      for (int64_t s = 0; s < p.S; ++s)
        for (int r = 0; r < 16; ++r)
          _mm512_storeu_si512(p.tiles.data() + ((mt * p.S + s) * 16 + r) * 16,
                              _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, tokens, base + s * 16 + r, 4));
    }
  });
  return p;
}

// A block's weight rows in bf16 as AMX takes its first operand, over steps [s0, s1) of 32 values:
// A [s1 - s0][2][16][32], at each step rows 0-15 then 16-31. int8 values are exact in bf16 (their row
// scale is applied to the sums); int4 values are (q - 8) * scale and GGUF's values their float32 decoding
// (Decoder), rounded to bf16, as a bf16 model holds its weights. A row past the end is zeros. Expanded one (row, step) at a time, so that the work can
// be spread among the products of the block before (AMX's tile unit runs alongside the vector units).
struct Expansion {
  Format format = Format::kInt8;
  int64_t s0 = 0, s1 = 0, steps_per_group = 1, groups = 0;
  const uint8_t* row[kBlockRows] = {};  // nullptr: a row of zeros
  Buffer<float> scales;                 // int4: [32][groups], each row's group scales
  uint16_t* A = nullptr;
  int64_t r = 0, s = 0;                 // where expand() goes on: row r, step s

  void prepare(const Rows& rows, int64_t l0, int64_t from, int64_t to, uint16_t* buffer) {
    s0 = from, s1 = to, A = buffer, format = rows.m[0]->format, r = 0, s = s0;
    for (int64_t i = 0; i < kBlockRows; ++i) row[i] = rows.present(l0 + i) ? rows.matrix(l0 + i).row(rows.row(l0 + i)) : nullptr;
    if (format != Format::kInt4) return;
    const Matrix& m = *rows.m[0];
    steps_per_group = m.K / m.groups / 32, groups = m.groups;
    scales.resize(kBlockRows * groups);
    for (int64_t i = 0; i < kBlockRows; ++i)
      if (row[i]) rows.matrix(l0 + i).row_scales(rows.row(l0 + i), scales.data() + i * groups);
  }
  int64_t units() const { return kBlockRows * (s1 - s0); }  // (row, step) pairs

  // Expands the next n units: along row r from step s, then the rows after it.
  void expand(int64_t n) {
    for (; n > 0 && r < kBlockRows; ++r, s = s0) {
      const int64_t end = std::min(s1, s + n);
      n -= end - s;
      uint16_t* out = A + (r / 16) * 512 + (r % 16) * 32 - s0 * 1024;  // + s * 1024: step s
      const uint8_t* w = row[r];
      if (!w) {
        for (; s < end; ++s) _mm512_storeu_si512(out + s * 1024, _mm512_setzero_si512());
      } else if (format == Format::kInt8) {
        for (; s < end; ++s) {
          const __m128i* p = reinterpret_cast<const __m128i*>(w + 32 * s);
          const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
          const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
          _mm512_storeu_si512(out + s * 1024, (__m512i)_mm512_cvtne2ps_pbh(high, low));
        }
      } else if (format == Format::kQ4_K || format == Format::kQ4_0 || format == Format::kQ5_K) {
        // Codes of 4 or 5 bits index a table of the step's 16 or 32 values, as int4's nibbles do: fewer
        // conversions than converting every value (the same values: step q is exact for these types).
        const bool five = format == Format::kQ5_K, offset_codes = format == Format::kQ4_0;  // q4_0: q in -8..7
        const __m512 low_codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 codes = offset_codes ? _mm512_sub_ps(low_codes, _mm512_set1_ps(8.0f)) : low_codes;
        const __m512 high_codes = _mm512_add_ps(low_codes, _mm512_set1_ps(16.0f));
        Decoder decoder(format, w);
        for (; s < end; ++s) {
          float steps[2], off;
          const __m256i q = decoder.codes(s, steps, off);
          const __m512 step = _mm512_set1_ps(steps[0]), offset = _mm512_set1_ps(off);
          const __m512 values = _mm512_sub_ps(_mm512_mul_ps(codes, step), offset);
          const __m512i table = five ? (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(_mm512_mul_ps(high_codes, step), offset), values)
                                     : _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
          __m512i index = _mm512_cvtepi8_epi16(q);
          if (offset_codes) index = _mm512_add_epi16(index, _mm512_set1_epi16(8));
          _mm512_storeu_si512(out + s * 1024, _mm512_permutexvar_epi16(index, table));
        }
      } else if (blocks(format)) {  // q8_0, q6_k: each value converted
        Decoder decoder(format, w);
        for (; s < end; ++s) {
          float step[2], off;
          const __m256i q = decoder.codes(s, step, off);
          const __m512 low = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), _mm512_set1_ps(step[0]));
          const __m512 high = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), _mm512_set1_ps(step[1]));
          _mm512_storeu_si512(out + s * 1024, (__m512i)_mm512_cvtne2ps_pbh(high, low));
        }
      } else {
        // 16 bf16 values (q - 8) * scale for q = 0..15, rounded to nearest even: a group's weights,
        // which its nibbles index. Made again where a group begins.
        const __m512 q = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
        const float* scale = scales.data() + r * groups;
        int64_t g = s / steps_per_group, group_end = (g + 1) * steps_per_group;
        __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(q, _mm512_set1_ps(scale[g]))));
        for (; s < end; ++s) {
          if (s == group_end) {
            group_end += steps_per_group;
            table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(q, _mm512_set1_ps(scale[++g]))));
          }
          // Byte j of the 16 to dword j; (d | d << 12) & 0x000F000F puts its low nibble (value 2j)
          // in the dword's low half and its high nibble (2j + 1) in the high half: table indices.
          const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * s)));
          const __m512i index = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
          _mm512_storeu_si512(out + s * 1024, _mm512_permutexvar_epi16(index, table));
        }
      }
      if (s < s1) return;  // n ran out within the row
    }
  }
};

// C (rows of ldc floats) += or = the block's 32 rows (A, steps s0 .. s1) times every token (x), two tiles
// of rows by two of tokens at a time: each tile loaded serves two products. Meanwhile the vector units
// expand the next block (`next`), a few units per step.
template <bool kTwo>
MIXTRAL_AMX inline void amx_tiles(const uint16_t* A, const Packed& x, int64_t mt, int64_t s0, int64_t s1, bool first,
                                  float* C, int64_t ldc, Expansion& next, int64_t per_step) {
  const int64_t stride = ldc * sizeof(float);
  const uint32_t* b0 = x.tile(mt, 0);
  const uint32_t* b1 = x.tile(kTwo ? mt + 1 : mt, 0);
  float* c0 = C + mt * 16;
  float* c1 = C + (mt + 1) * 16;
  if (first) {
    _tile_zero(0);
    _tile_zero(2);
    if (kTwo) {
      _tile_zero(1);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, c0, stride);
    _tile_loadd(2, c0 + 16 * ldc, stride);
    if (kTwo) {
      _tile_loadd(1, c1, stride);
      _tile_loadd(3, c1 + 16 * ldc, stride);
    }
  }
  for (int64_t s = s0; s < s1; ++s) {
    next.expand(per_step);
    const uint16_t* a = A + (s - s0) * 1024;
    _tile_loadd(4, a, 64);
    _tile_loadd(6, b0 + s * 256, 64);
    _tile_loadd(5, a + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (kTwo) {
      _tile_loadd(7, b1 + s * 256, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c0, stride);
  _tile_stored(2, c0 + 16 * ldc, stride);
  if (kTwo) {
    _tile_stored(1, c1, stride);
    _tile_stored(3, c1 + 16 * ldc, stride);
  }
}

// out[m][r] = C[r][m]: a block's products, rows by tokens, turned tokens by rows (16 x 16 at a time).
void transpose_block(const float* C, int64_t ldc, int64_t tokens, float* out) {
  for (int64_t m0 = 0; m0 < tokens; m0 += 16)
    for (int64_t r0 = 0; r0 < kBlockRows; r0 += 16) {
      __m512 v[16];
      for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(C + (r0 + i) * ldc + m0);
      simd::transpose(v);  // v[i]: token m0 + kColumn[i]
      for (int i = 0; i < 16; ++i) {
        const int64_t m = m0 + simd::kColumn[i];
        if (m < tokens) _mm512_storeu_ps(out + m * kBlockRows + r0, v[i]);
      }
    }
}

// Logical rows [l0, l1) (whole blocks) times every token of x: each block's products out[m][l] go to
// done(l0, 32, out). K is taken in chunks whose activations (all tokens) stay in L2, and rows in runs
// of blocks whose float32 sums stay there too. Within a run, each (chunk, block) is expanded while the
// products of the one before run, a share of it at each step.
template <typename Done>
void amx_rows(const Rows& rows, int64_t l0, int64_t l1, const Packed& x, int64_t K, Done& done) {
  const int64_t ldc = x.MT * 16, S = K / 32, pairs = (x.MT + 1) / 2;
  const int64_t fit = std::max<int64_t>(1, (768 << 10) / (ldc * 64));  // steps of all tokens' activations
  const int64_t chunks = (S + fit - 1) / fit, chunk = (S + chunks - 1) / chunks;
  const int64_t run = std::max<int64_t>(1, (256 << 10) / (kBlockRows * ldc * 4));
  Buffer<uint16_t> buffers[2] = {Buffer<uint16_t>(chunk * 1024), Buffer<uint16_t>(chunk * 1024)};
  Buffer<float> C(run * kBlockRows * ldc), out(ldc * kBlockRows);
  Expansion expansions[2];
  configure_tiles();
  for (int64_t r0 = l0; r0 < l1; r0 += run * kBlockRows) {
    const int64_t blocks = std::min(run, (l1 - r0) / kBlockRows), items = chunks * blocks;
    auto prepare = [&](int64_t i, Expansion& e) {  // item i: chunk i / blocks of block i % blocks
      const int64_t c = i / blocks;
      e.prepare(rows, r0 + i % blocks * kBlockRows, c * chunk, std::min(S, (c + 1) * chunk), buffers[i % 2].data());
    };
    prepare(0, expansions[0]);
    expansions[0].expand(expansions[0].units());
    for (int64_t i = 0; i < items; ++i) {
      const Expansion& current = expansions[i % 2];
      Expansion& next = expansions[(i + 1) % 2];
      if (i + 1 < items) prepare(i + 1, next);
      const int64_t steps = current.s1 - current.s0;
      const int64_t per_step = i + 1 < items ? (next.units() + pairs * steps - 1) / (pairs * steps) : 0;
      float* c = C.data() + i % blocks * kBlockRows * ldc;
      int64_t mt = 0;
      for (; mt + 2 <= x.MT; mt += 2)
        amx_tiles<true>(current.A, x, mt, current.s0, current.s1, i < blocks, c, ldc, next, per_step);
      if (mt < x.MT) amx_tiles<false>(current.A, x, mt, current.s0, current.s1, i < blocks, c, ldc, next, per_step);
      if (i + 1 < items) next.expand(next.units());  // what is left
    }
    for (int64_t b = 0; b < blocks; ++b) {
      transpose_block(C.data() + b * kBlockRows * ldc, ldc, x.M, out.data());
      done(r0 + b * kBlockRows, kBlockRows, out.data());
    }
  }
  release_tiles();
}
#else
bool use_amx() { return false; }
#endif

// ---------------------------------------------------------------------------- both paths

// The activations as the chosen path takes them.
struct Activations {
  bool amx = false;
  int64_t M = 0;  // tokens (the integer path pads them to a multiple of its tile: zeros)
#if defined(MIXTRAL_ISA_AVX512)
  Packed packed;
#endif
  Quantized quantized;
};

// Every logical row of `rows` times every token of x, a block of rows at a time, the blocks shared
// among the threads in contiguous runs; each block's products out[m][l] (tokens by the block's `width`
// rows, int8: before the row scales) go to done(l0, width, out).
template <typename Done>
void multiply(const Rows& rows, const Activations& x, int64_t K, Done&& done) {
  const int64_t blocks = (rows.size() + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
#if defined(MIXTRAL_ISA_AVX512)
    if (x.amx) return amx_rows(rows, b0 * kBlockRows, b1 * kBlockRows, x.packed, K, done);
#endif
    integer_rows(rows, b0 * kBlockRows, b1 * kBlockRows, x.quantized, done);
  });
}

// x: M rows of K values (float32, bf16 or fp16; row m at x + m * K elements), for the path this call takes.
Activations prepare(const void* x, at::ScalarType type, int64_t M, int64_t K) {
  Activations a;
  a.M = M;
#if defined(MIXTRAL_ISA_AVX512)
  if (type == at::kBFloat16 && use_amx()) {
    a.amx = true;
    a.packed = pack(static_cast<const c10::BFloat16*>(x), M, K);
    return a;
  }
#endif
  const int64_t padded = (M + simd::kTokens - 1) / simd::kTokens * simd::kTokens;
  std::vector<float> xf(M * K);
  const int64_t size = c10::elementSize(type);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) to_floats(static_cast<const char*>(x) + m * K * size, type, K, xf.data() + m * K);
  });
  a.quantized = quantize(xf.data(), M, padded, K);
  return a;
}

Format parse(c10::string_view format) {
  for (int f = 0; f < 7; ++f)
    if (format == kFormatNames[f]) return static_cast<Format>(f);
  TORCH_CHECK(false, "mixtral_cpu.prompt: format 'int8', 'int4', 'q8_0', 'q4_0', 'q4_k', 'q5_k' or 'q6_k' expected, got '",
              std::string(format), "'");
}

// The matrix stored in GGUF's blocks: weight uint8 [..., N, K / values * bytes], no scales.
Matrix block_matrix(const Tensor& weight, const c10::optional<Tensor>& scales, Format format, int64_t K, const char* name) {
  const int64_t values = block_values(format), bytes = block_bytes(format);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && weight.dim() >= 2, "mixtral_cpu.prompt: ",
              name, " must be contiguous uint8 (", kFormatNames[static_cast<int>(format)], " blocks) [..., N, bytes], got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(K % values == 0 && weight.size(-1) == K / values * bytes, "mixtral_cpu.prompt: ", name, " of shape ",
              weight.sizes(), " does not hold ", K, " inputs in ", kFormatNames[static_cast<int>(format)], " blocks of ",
              values, " (", bytes, " bytes each)");
  TORCH_CHECK(!scales.has_value() || !scales->defined(), "mixtral_cpu.prompt: ", kFormatNames[static_cast<int>(format)],
              " keeps its scales in its blocks: pass none for ", name);
  Matrix m;
  m.format = format, m.data = static_cast<const uint8_t*>(weight.data_ptr()), m.N = weight.size(-2), m.K = K;
  return m;
}

// The matrix stored in weight [..., N, K / values a byte] with scales [..., N] (int8) or [..., N, groups]
// (int4), or in GGUF's blocks, checked against K.
Matrix matrix(const Tensor& weight, const c10::optional<Tensor>& scales_, Format format, int64_t K, const char* name) {
  if (blocks(format)) return block_matrix(weight, scales_, format, K, name);
  TORCH_CHECK(scales_.has_value() && scales_->defined(), "mixtral_cpu.prompt: ", name, " in ",
              kFormatNames[static_cast<int>(format)], " needs its scales");
  const Tensor& scales = *scales_;
  const bool int4 = format == Format::kInt4;
  TORCH_CHECK(weight.scalar_type() == (int4 ? at::kByte : at::kChar) && weight.is_contiguous(), "mixtral_cpu.prompt: ",
              name, " must be contiguous ", int4 ? "uint8 (int4)" : "int8", " weights, got ", weight.scalar_type());
  TORCH_CHECK(weight.size(-1) * (int4 ? 2 : 1) == K, "mixtral_cpu.prompt: ", name, " of shape ", weight.sizes(),
              " does not take ", K, " inputs");
  TORCH_CHECK(K % 32 == 0, "mixtral_cpu.prompt: rows of a multiple of 32 values expected, got ", K);
  const auto type = scales.scalar_type();
  TORCH_CHECK(scales.is_contiguous() && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf),
              "mixtral_cpu.prompt: ", name, " scales must be contiguous float32, bf16 or fp16");
  const auto rows = weight.sizes().slice(0, weight.dim() - 1);
  const int64_t groups = int4 ? scales.size(-1) : 1;
  TORCH_CHECK(int4 ? scales.dim() == weight.dim() && scales.sizes().slice(0, weight.dim() - 1) == rows && groups > 0 &&
                         K % groups == 0 && (K / groups) % 32 == 0
                   : scales.sizes() == rows,
              "mixtral_cpu.prompt: scales of shape ", scales.sizes(), " do not fit ", name, " of shape ", weight.sizes());
  Matrix m;
  m.format = format, m.data = static_cast<const uint8_t*>(weight.data_ptr()), m.scales = scales.data_ptr();
  m.scale_type = type, m.N = weight.size(-2), m.K = K, m.groups = groups;
  return m;
}

void check_activations(const Tensor& x) {
  const auto type = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf),
              "mixtral_cpu.prompt: activations [M, K] in float32, bf16 or fp16 expected, got ", x.sizes(), " ", type);
}

// A row of n float32 values into dst of `type`, rounded to nearest even, 8 at a time.
void store_row(const float* src, int64_t n, at::ScalarType type, void* dst) {
  if (type == at::kFloat) return (void)std::memcpy(dst, src, n * sizeof(float));
  int64_t i = 0;
  auto* out = static_cast<__m128i*>(dst);
  if (type == at::kHalf)
    for (; i + 8 <= n; i += 8) _mm_storeu_si128(out + i / 8, _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  else
    for (; i + 8 <= n; i += 8) {
      // bf16: add 0x7fff plus the lowest kept bit, keep the top 16 bits (NaN stays a quiet NaN).
      const __m256 v = _mm256_loadu_ps(src + i);
      __m256i b = _mm256_castps_si256(v);
      b = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1)),
                                               _mm256_set1_epi32(0x7fff)));
      b = _mm256_srli_epi32(b, 16);
      b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      _mm_storeu_si128(out + i / 8, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0b1000)));
    }
  for (; i < n; ++i) {
    if (type == at::kHalf) static_cast<c10::Half*>(dst)[i] = c10::Half(src[i]);
    else static_cast<c10::BFloat16*>(dst)[i] = c10::BFloat16(src[i]);
  }
}

// What a block's products are multiplied by: int8 rows their scale, int4 rows (already scaled) 1.
void block_scales(const Rows& rows, int64_t l0, int64_t width, float* out) {
  for (int64_t i = 0; i < width; ++i)
    out[i] = !rows.present(l0 + i) ? 0.0f : rows.m[0]->format == Format::kInt8 ? rows.matrix(l0 + i).scale(rows.row(l0 + i)) : 1.0f;
}

// ---------------------------------------------------------------------------- ops

Tensor prompt_linear(const Tensor& x_, const Tensor& weight, const c10::optional<Tensor>& scales, c10::string_view format_) {
  check_activations(x_);
  const Tensor x = x_.contiguous();
  const Format format = parse(format_);
  const int64_t M = x.size(0), K = x.size(1);
  const Matrix w = matrix(weight, scales, format, K, "weight");
  TORCH_CHECK(weight.dim() == 2, "mixtral_cpu.prompt_linear: weight [N, K] expected, got ", weight.sizes());
  const int64_t N = w.N, size = c10::elementSize(x.scalar_type());
  Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  Rows rows;
  rows.m[0] = &w;
  const Activations a = prepare(x.data_ptr(), x.scalar_type(), M, K);
  char* out = static_cast<char*>(y.data_ptr());
  multiply(rows, a, K, [&](int64_t l0, int64_t width, const float* products) {
    const int64_t n = std::min(width, N - l0);
    if (n <= 0) return;
    float scale[kBlockRows], row[kBlockRows];
    block_scales(rows, l0, n, scale);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 0; i < n; ++i) row[i] = products[m * width + i] * scale[i];
      store_row(row, n, x.scalar_type(), out + (m * N + l0) * size);
    }
  });
  return y;
}

Tensor prompt_moe(const Tensor& x_, const Tensor& experts_, const Tensor& weights_, const Tensor& w1, const Tensor& w3,
                  const Tensor& w2, const c10::optional<Tensor>& s1, const c10::optional<Tensor>& s3,
                  const c10::optional<Tensor>& s2, c10::string_view format_, c10::optional<c10::string_view> down_format) {
  check_activations(x_);
  const Tensor x = x_.contiguous(), experts = experts_.contiguous();
  const Format format = parse(format_), down = down_format.has_value() ? parse(*down_format) : format;
  TORCH_CHECK(experts.dim() == 2 && experts.scalar_type() == at::kLong && experts.size(0) == x.size(0) &&
                  weights_.sizes() == experts.sizes(),
              "mixtral_cpu.prompt_moe: experts (int64) and weights [T, K] for x [T, D] expected");
  TORCH_CHECK(w1.dim() == 3 && w3.sizes() == w1.sizes() && w2.dim() == 3 && w2.size(0) == w1.size(0) &&
                  w2.size(1) == x.size(1),
              "mixtral_cpu.prompt_moe: w1, w3 [E, I, D] and w2 [E, D, I] expected, got ", w1.sizes(), ", ", w3.sizes(),
              ", ", w2.sizes(), " for x ", x.sizes());
  const int64_t T = x.size(0), D = x.size(1), E = w1.size(0), I = w1.size(1), Kx = experts.size(1);
  const Matrix m1 = matrix(w1, s1, format, D, "w1"), m3 = matrix(w3, s3, format, D, "w3");
  const Matrix m2 = matrix(w2, s2, down, I, "w2");
  TORCH_CHECK(m1.groups == m3.groups && m1.scale_type == m3.scale_type,
              "mixtral_cpu.prompt_moe: w1 and w3 must share their scales' shape and dtype");
  std::vector<float> pair_weight(T * Kx);
  {
    const Tensor wf = weights_.to(at::kFloat).contiguous();
    std::memcpy(pair_weight.data(), wf.data_ptr<float>(), T * Kx * sizeof(float));
  }
  // The (token, expert) pairs grouped by expert, tokens in order within each.
  const int64_t* chosen = experts.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> pairs(E);
  for (int64_t p = 0; p < T * Kx; ++p) {
    TORCH_CHECK(chosen[p] >= 0 && chosen[p] < E, "mixtral_cpu.prompt_moe: expert id ", chosen[p], " out of range for ",
                E, " experts");
    pairs[chosen[p]].push_back(p);
  }
  const at::ScalarType type = x.scalar_type();
  const int64_t size = c10::elementSize(type);
  const char* xs = static_cast<const char*>(x.data_ptr());
  std::vector<float> y(T * D, 0.0f);
  std::vector<char> gathered;
  std::vector<char> h;  // the hidden activations of an expert's tokens
  for (int64_t e = 0; e < E; ++e) {
    const std::vector<int64_t>& mine = pairs[e];
    const int64_t M = mine.size();
    if (!M) continue;
    const Matrix e1 = m1.expert(e), e3 = m3.expert(e), e2 = m2.expert(e);
    gathered.resize(M * D * size);
    for (int64_t m = 0; m < M; ++m) std::memcpy(gathered.data() + m * D * size, xs + mine[m] / Kx * D * size, D * size);
    const Activations a = prepare(gathered.data(), type, M, D);
    Rows gate_up;
    gate_up.m[0] = &e1, gate_up.m[1] = &e3, gate_up.count = 2;
    // h [M][I] = silu(w1 x) * (w3 x), in bf16 where AMX multiplies it next (as a bf16 model holds it),
    // else in float32 (then rounded to int16 blocks). A block holds 16 rows of each (the integer
    // path's 64: twice), which give 16 columns of h.
    const at::ScalarType h_type = a.amx ? at::kBFloat16 : at::kFloat;
    h.resize(M * I * c10::elementSize(h_type));
    multiply(gate_up, a, D, [&](int64_t l0, int64_t width, const float* products) {
      for (int64_t half = 0; half < width; half += 2 * kSpan) {
        const int64_t i0 = (l0 + half) / 2, n = std::min(kSpan, I - i0);
        if (n <= 0) return;
        alignas(32) float scale[2 * kSpan], a1[kSpan], a3[kSpan];
        block_scales(gate_up, l0 + half, 2 * kSpan, scale);
        for (int64_t m = 0; m < M; ++m) {
          const float* p = products + m * width + half;
          for (int64_t i = 0; i < kSpan; i += 8) {
            const __m256 x1 = _mm256_mul_ps(_mm256_loadu_ps(p + i), _mm256_load_ps(scale + i));
            const __m256 x3 = _mm256_mul_ps(_mm256_loadu_ps(p + kSpan + i), _mm256_load_ps(scale + kSpan + i));
            _mm256_store_ps(a1 + i, silu_times(x1, x3));
          }
          store_row(a1, n, h_type, h.data() + (m * I + i0) * c10::elementSize(h_type));
        }
      }
    });
    const Activations b = prepare(h.data(), h_type, M, I);
    Rows down;
    down.m[0] = &e2;
    multiply(down, b, I, [&](int64_t l0, int64_t width, const float* products) {
      const int64_t n = std::min(width, D - l0);
      float scale[kBlockRows];
      block_scales(down, l0, n, scale);
      for (int64_t m = 0; m < M; ++m) {
        const float wt = pair_weight[mine[m]];
        float* yt = y.data() + mine[m] / Kx * D + l0;
        for (int64_t i = 0; i < n; ++i) yt[i] += wt * scale[i] * products[m * width + i];
      }
    });
  }
  Tensor out = at::empty({T, D}, x.options());
  for (int64_t t = 0; t < T; ++t) store_row(y.data() + t * D, D, type, static_cast<char*>(out.data_ptr()) + t * D * size);
  return out;
}

bool prompt_use_amx(bool use) {
#if defined(MIXTRAL_ISA_AVX512)
  amx_wanted.store(use);
#endif
  return use && use_amx();
}

}  // namespace

// TORCH_LIBRARY_FRAGMENT names its namespace as written: this indirection expands MIXTRAL_OPS first.
#define MIXTRAL_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define MIXTRAL_FRAGMENT_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

MIXTRAL_FRAGMENT(MIXTRAL_OPS, m) {
  m.def("prompt_linear(Tensor x, Tensor weight, Tensor? scales, str format) -> Tensor");
  m.def("prompt_moe(Tensor x, Tensor experts, Tensor weights, Tensor w1, Tensor w3, Tensor w2, Tensor? w1_scales, "
        "Tensor? w3_scales, Tensor? w2_scales, str format, str? down_format=None) -> Tensor");
  m.def("prompt_use_amx(bool use) -> bool", &prompt_use_amx);  // no tensors: one kernel for every backend
}

MIXTRAL_FRAGMENT_IMPL(MIXTRAL_OPS, CPU, m) {
  m.impl("prompt_linear", &prompt_linear);
  m.impl("prompt_moe", &prompt_moe);
}
