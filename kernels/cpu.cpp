// CPU kernels for decoding: a few tokens times weight matrices, where every weight is read from memory
// once and the arithmetic must keep up with memory. PyTorch's own matrix-vector kernels need not: on
// CPUs without bf16 or int8 dot-product instructions they convert weights more slowly than memory
// delivers them, and none of them reads an MoE's chosen experts in place. kernels/README.md explains
// the layouts and the tricks below.
//
// One primitive does all the work: a tile of 1 or 2 weight rows times a few activation vectors. Float
// weights meet float32 activations (bf16 weights, where the vector unit has a bf16 dot product, meet
// bf16 activations); int8 weights meet int16 activations, int4 weights and GGUF's blocks int8 activations
// (see Vectors below). Each thread streams its rows in order, prefetching ahead.
//
// This file is compiled once per instruction set, with that set's flags (kernels/cpu.py chooses the
// best the CPU has), and holds everything: the activations' quantization, the row loops, threading, the
// ops and their registration. The loops are written in a small vocabulary of vector types and
// operations (isa::Float, isa::Int, isa::load, isa::fma, isa::dot_bytes2, ...) that each set's header
// defines at its own width, with its own instructions for what differs:
//   cpu_avx2.h    AVX2 + FMA + F16C (MIXTRAL_ISA_AVX2), and with AVX-VNNI's integer products (MIXTRAL_ISA_AVXVNNI)
//   cpu_avx512.h  AVX-512 with VNNI and BF16 (MIXTRAL_ISA_AVX512), and its bf16 dot product's loop
// Each build registers its ops in its own namespace, MIXTRAL_OPS (mixtral_cpu_avx2, ...), so that one
// process can hold several: the tests compare every set the machine has.
//
// Ops (torch.ops.MIXTRAL_OPS.*), each told its weights' format by name ('full', 'int8', 'int4', or
// GGUF's 'q8_0', 'q4_0', 'q4_k', 'q5_k', 'q6_k'), which the ops check against the tensors' dtypes:
//   linear(x [M, K], weight [N, K], scales [N]?, format) -> [M, N]          y = x @ (weight * scales).T
//   moe(x [T, D], experts [T, Kx], weights [T, Kx], w1 [E, I, D], w3 [E, I, D], w2 [E, D, I],
//       w1_scales [E, I]?, w3_scales [E, I]?, w2_scales [E, D]?, format) -> [T, D]
//   dequantize_int8(q [..., C], scales [...], dtype) -> [..., C]    q * scales, for prompts
//   dequantize_int4(packed [..., C/2], scales [..., C/group], dtype) -> [..., C]
// moe reads each chosen expert in place, once per call however many tokens chose it, with w1 and w3 in
// one pass and silu(w1 x) * (w3 x) computed as the rows come in. Formats: 'full', float32, bf16 or fp16
// weights; 'int8', int8 weights with float scales per output row; 'int4', uint8 weights (two values a
// byte) with float scales per group of `group` values along a row (then scales [N, K/group] and
// [E, I, D/group], [E, D, I/group]); GGUF's, uint8 blocks as a GGUF file stores them, which hold their
// scales (a row of K values is K / values * bytes of them). Activations any of the three float types.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_exp.h"

#ifndef MIXTRAL_OPS
#error "MIXTRAL_OPS (the ops' namespace) is set by kernels/cpu.py"
#endif

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------- weights and activations

// Eight weights as float32 (AVX2, which every instruction set here includes): int4's group scales and
// the dequantization for prompts.
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

// int4 weights: a uint8 [..., K/2] row holds values 2j (low nibble) and 2j+1 (high nibble) in byte j,
// each stored as q + 8 for q in [-8, 7]; S is the type of their group scales.
template <typename S>
struct Int4 {
  uint8_t pair;
  using Scale = S;
};
template <typename W> struct is_int4 : std::false_type {};
template <typename S> struct is_int4<Int4<S>> : std::true_type {};

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

// One core alone keeps too few cache misses in flight to stream at the memory's speed: it waits on
// latency. Asking for the weights a few KB ahead, into L2 (whose queue of misses is deeper than L1's),
// lets far more reads overlap; the hardware prefetcher also stops at every 4 KB page, this does not.
// The distance and the L2 hint are the best of those tried (BENCHMARKS.md, kernel design).
constexpr int kPrefetchBytes = 4096;

template <typename W>
inline void prefetch_ahead(const W* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T1);
}

// The vector vocabulary of this build's instruction set (namespace isa).
#if defined(MIXTRAL_ISA_AVX512)
#include "cpu_avx512.h"
#elif defined(MIXTRAL_ISA_AVX2) || defined(MIXTRAL_ISA_AVXVNNI)
#include "cpu_avx2.h"
#else
#error "an instruction set (MIXTRAL_ISA_*) is set by kernels/cpu.py"
#endif

// int4 activations are reordered a chunk of this many values at a time (evens, then odds): the values
// whose weights' low and high nibbles one vector of packed bytes holds.
constexpr int64_t kInt4Chunk = 8 * isa::kFloats;

// GGUF's block formats (ggml-common.h), read in place: a row of K values is K / kValues blocks of kBytes
// bytes, as a GGUF file stores them. Each type decodes its blocks for the one loop that multiplies them
// all (dot_tile_gguf), in units of 32 values (the activations' blocks), kUnits units at a time:
//  - pair(blocks, first, x, y): units first .. first + kUnits - 1 (counted from `blocks`) as two vectors
//    of bytes q, each unit split in two sets of 16 values, one in x and one in y, at the same place:
//    values 0-15 and 16-31 (halves), or, for types whose scales cover 16 values (kQuarters: q6_k), 0-7
//    and 16-23 in x, 8-15 and 24-31 in y, so that each int32 lane of the products holds 8 values of one
//    scale. The activations are stored in the same order (quantize_blocks). q is unsigned (at most 63)
//    unless kSigned;
//  - scales(blocks, scale, mins): the float scale of each kSubBlock values of 256 (a K-quant's block, or
//    8 blocks of 32) in one store (the loads that follow then read from it), and for the types with mins
//    (kMins), each unit's min;
// so that w = scale * (q - kOffset) - min.
constexpr int kUnits = isa::kFloats / 4;  // units of 32 values in a pair of vectors of bytes

inline uint16_t half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}
inline float half_to_float(const uint8_t* p) { return _cvtsh_ss(half_at(p)); }

// The fp16 scales of 8 blocks `stride` bytes apart, as floats.
inline __m256 eight_halves(const uint8_t* p, int64_t stride) {
  auto h = [&](int i) { return short(half_at(p + i * stride)); };
  return _mm256_cvtph_ps(_mm_setr_epi16(h(0), h(1), h(2), h(3), h(4), h(5), h(6), h(7)));
}

struct Q8_0 {  // fp16 d, 32 int8 q: w = d * q
  static constexpr int64_t kValues = 32, kBytes = 34, kSubBlock = 32;
  static constexpr int kOffset = 0;
  static constexpr bool kSigned = true, kMins = false, kQuarters = false;
  static void pair(const uint8_t* b, int first, isa::Int& x, isa::Int& y) {
    x = isa::gather16(b + first * kBytes + 2, kBytes), y = isa::gather16(b + first * kBytes + 18, kBytes);
  }
  static void scales(const uint8_t* b, float* scale, __m256*) { _mm256_storeu_ps(scale, eight_halves(b, kBytes)); }
};

struct Q4_0 {  // fp16 d, 16 bytes: value j in the low nibble of byte j, j + 16 in the high one; w = d * (q - 8)
  static constexpr int64_t kValues = 32, kBytes = 18, kSubBlock = 32;
  static constexpr int kOffset = 8;
  static constexpr bool kSigned = false, kMins = false, kQuarters = false;
  static void pair(const uint8_t* b, int first, isa::Int& x, isa::Int& y) {
    const isa::Int q = isa::gather16(b + first * kBytes + 2, kBytes);
    x = isa::low_nibbles(q), y = isa::high_nibbles(q);
  }
  static void scales(const uint8_t* b, float* scale, __m256*) { _mm256_storeu_ps(scale, eight_halves(b, kBytes)); }
};

// q4_k's and q5_k's eight 6-bit scales and mins, packed in 12 bytes (a, b, c: four each): the first four
// scales are a's low 6 bits and mins b's; the last four take their low 4 bits from c (scales the low
// nibbles, mins the high ones) and their top 2 from a's and b's top bits.
inline __m256 scales_of_six_bits(const uint8_t* p, float d, float dmin, __m256* mins) {
  uint32_t a, b, c;
  std::memcpy(&a, p, 4), std::memcpy(&b, p + 4, 4), std::memcpy(&c, p + 8, 4);
  const uint64_t sc = (a & 0x3F3F3F3F) | uint64_t((c & 0x0F0F0F0F) | ((a >> 2) & 0x30303030)) << 32;
  const uint64_t m = (b & 0x3F3F3F3F) | uint64_t(((c >> 4) & 0x0F0F0F0F) | ((b >> 2) & 0x30303030)) << 32;
  auto floats = [](uint64_t v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(v)))); };
  *mins = _mm256_mul_ps(floats(m), _mm256_set1_ps(dmin));
  return _mm256_mul_ps(floats(sc), _mm256_set1_ps(d));
}

struct Q4_K {  // fp16 d, dmin; 12 bytes of 6-bit scales sc and mins m of 8 sub-blocks of 32; 128 bytes of q,
               // 32 per 64 values (low nibbles the first 32, high nibbles the next). w = d * sc * q - dmin * m
  static constexpr int64_t kValues = 256, kBytes = 144, kSubBlock = 32;
  static constexpr int kOffset = 0;
  static constexpr bool kSigned = false, kMins = true, kQuarters = false;
  static void pair(const uint8_t* b, int first, isa::Int& x, isa::Int& y) {
    const isa::Int low = isa::split_nibbles(b + 16, first), high = isa::split_nibbles(b + 16, first + kUnits / 2);
    x = isa::pair_low(low, high), y = isa::pair_high(low, high);
  }
  static void scales(const uint8_t* b, float* scale, __m256* mins) {
    _mm256_storeu_ps(scale, scales_of_six_bits(b + 4, half_to_float(b), half_to_float(b + 2), mins));
  }
};

struct Q5_K {  // q4_k's d, dmin and scales, then 32 bytes qh (bit u of byte j: the fifth bit of value j of
               // sub-block u), then q4_k's 128 bytes of low 4 bits.
  static constexpr int64_t kValues = 256, kBytes = 176, kSubBlock = 32;
  static constexpr int kOffset = 0;
  static constexpr bool kSigned = false, kMins = true, kQuarters = false;
  static void pair(const uint8_t* b, int first, isa::Int& x, isa::Int& y) {
    auto units = [&](int u) { return isa::bit_or(isa::split_nibbles(b + 48, u), isa::unit_bits(b + 16, u, 1, 1)); };
    const isa::Int low = units(first), high = units(first + kUnits / 2);
    x = isa::pair_low(low, high), y = isa::pair_high(low, high);
  }
  static void scales(const uint8_t* b, float* scale, __m256* mins) { Q4_K::scales(b, scale, mins); }
};

struct Q6_K {  // 128 bytes ql, 64 bytes qh, 16 int8 scales sc (one per 16 values), fp16 d. Per half of 128
               // values: 64 bytes of ql, whose low nibbles are the low 4 bits of its first 64 values and
               // high nibbles those of the next 64; 32 bytes of qh, bits 2i, 2i + 1 of byte j the top two
               // of value 32i + j. w = d * sc * (q - 32)
  static constexpr int64_t kValues = 256, kBytes = 210, kSubBlock = 16;
  static constexpr int kOffset = 32;
  static constexpr bool kSigned = false, kMins = false, kQuarters = true;
  static void pair(const uint8_t* b, int first, isa::Int& x, isa::Int& y) {
    auto units = [&](int u) {  // kFloats / 8 units from u, within a half: its bytes' low or high nibbles
      const int half = u / 4, i = u % 4;
      const isa::Int bytes = isa::load_int(b + 64 * half + 32 * (i % 2));
      return isa::bit_or(i / 2 ? isa::high_nibbles(bytes) : isa::low_nibbles(bytes), isa::unit_bits(b + 128 + 32 * half, 2 * i, 2, 3));
    };
    const isa::Int low = units(first), high = units(first + kUnits / 2);
    const isa::Int x16 = isa::pair_low(low, high), y16 = isa::pair_high(low, high);  // halves, then quarters
    x = isa::unpack_low64(x16, y16), y = isa::unpack_high64(x16, y16);
  }
  static void scales(const uint8_t* b, float* scale, __m256*) {
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    const __m256 d = _mm256_set1_ps(half_to_float(b + 208));
    _mm256_storeu_ps(scale, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)), d));
    _mm256_storeu_ps(scale + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))), d));
  }
};

// A GGUF row's element: one byte of blocks of type B.
template <typename B>
struct Gguf {
  uint8_t byte;
  using Block = B;
};
template <typename W> struct is_gguf : std::false_type {};
template <typename B> struct is_gguf<Gguf<B>> : std::true_type {};

// The elements of a row of K values of weights W.
template <typename W>
constexpr int64_t row_length(int64_t K) {
  if constexpr (is_int4<W>::value) return K / 2;
  if constexpr (is_gguf<W>::value) return K / W::Block::kValues * W::Block::kBytes;
  return K;
}

// Activation vectors, M of K values each: float32, and where the weights call for it also:
//  - bf16 weights, where the instruction set multiplies bf16 pairs and the activations are bf16: the
//    activations in bf16. A model run in bf16 holds them in bf16 anyway; only the MoE's hidden
//    activations h, which this file computes in float32, are rounded (to the bf16 the reference
//    model rounds them to).
//  - int8 weights: int16 in blocks of 64 values with one float scale per block (x ~= q * scale,
//    |q| <= 32767). int8 weights times int16 activations multiply and add pairs in one instruction
//    where widening each int8 to float took three. The step, 2^-15 of a block's largest value, is finer
//    than bf16's rounding for values down to 1/128 of that largest one.
//  - int4 weights: int8 in blocks of 32 values (|q| <= 127), llama.cpp's Q8_0. The unsigned nibbles
//    times int8 activations multiply and add in one or two instructions. The step, 1/254 of a block's
//    largest value, is a small fraction of the int4 weights' own (1/16 of a group's range).
//    Each kInt4Chunk values ("a chunk": the values one load of packed weights holds) are stored evens
//    first, then odds: the order in which the low and high nibbles of the weights come out. The int32
//    sums of a chunk's products come out in lanes of 8 consecutive values, four lanes a block. Per
//    chunk, two vectors line up with those lanes, stored once per activation vector (the inner loop,
//    run once per weight row, then only loads them): the activations' block scales, and each lane's
//    -8 * sum(q), which the integer sums start from so that the nibbles' offset of 8 comes off exactly
//    and for free.
//  - GGUF weights: int8 in blocks of 32 values as for int4, zeros past K up to a multiple of 256
//    (kPadded), stored kUnits blocks at a time as the weights' pairs of vectors hold them (see Q8_0 and
//    the other block types): each block split in two sets of 16 values (halves, or quarters for
//    q6_k), the first sets of the kUnits blocks, then the second sets. An int32 lane of the products
//    then holds 8 values of one block; per lane, the block's scale and, for weights whose q carry an
//    offset, -offset * the lane's sum of q (the offset off for free, as for int4); per block its scale
//    * sum(q), which the K-quants' mins multiply (llama.cpp's Q8_K keeps these sums too).
constexpr int64_t kBlock = 64, kBlock8 = 32, kPadded = 256;
// int4 rows are taken in segments of this many blocks, whose weight scales are first converted to one
// float per block: the inner loop then neither converts nor divides.
constexpr int64_t kSegmentBlocks = 128;

struct Vectors {
  const float* f;
  const c10::BFloat16* bf = nullptr;   // bf16 copy
  const int16_t* q = nullptr;          // int16 blocks
  const float* scale = nullptr;
  const int8_t* q8 = nullptr;          // int8 blocks, chunks reordered
  const float* scale8 = nullptr;       // per block
  const float* chunk_scale = nullptr;  // per chunk, a vector's lanes (kInt4Chunk / 8 of them)
  const int32_t* lane_offset = nullptr;  // per chunk and lane: -8 * the sum of its 8 values of q8
  const int8_t* qb = nullptr;          // int8 blocks in pairs of vectors, `padded` apart (GGUF)
  const float* lane_scale = nullptr;   // per lane of 8 values: its block's scale
  const int32_t* lane_start = nullptr;  // per lane: -offset * the sum of its 8 values of qb (offset > 0)
  const float* block_sum = nullptr;    // per block: its scale * the sum of its values of qb
  int64_t K = 0, blocks = 0, blocks8 = 0, chunks = 0, padded = 0;

  Vectors at(int64_t m) const {
    Vectors v = *this;
    v.f = f + m * K;
    if (bf) v.bf = bf + m * K;
    if (q) v.q = q + m * K, v.scale = scale + m * blocks;
    if (q8) {
      v.q8 = q8 + m * K, v.scale8 = scale8 + m * blocks8;
      v.chunk_scale = chunk_scale + m * chunks * isa::kFloats, v.lane_offset = lane_offset + m * chunks * isa::kFloats;
    }
    if (qb) {
      v.qb = qb + m * padded, v.lane_scale = lane_scale + m * padded / 8, v.block_sum = block_sum + m * padded / kBlock8;
      if (lane_start) v.lane_start = lane_start + m * padded / 8;
    }
    return v;
  }
};

struct VectorStore {  // owns what a Vectors view points to
  std::vector<c10::BFloat16> bf;
  std::vector<int16_t> q;
  std::vector<int8_t> q8, qb;
  std::vector<float> scale, scale8, chunk_scale, lane_scale, block_sum;
  std::vector<int32_t> lane_offset, lane_start;
  Vectors view;
};

void round_bf16(const float* x, int64_t M, int64_t K, VectorStore& v) {
  v.bf.assign(x, x + M * K);  // rounds to nearest even
  v.view.bf = v.bf.data();
}

// The sum of 8 floats.
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The largest magnitude of 8 * n floats (n >= 1), and x * inverse rounded to nearest even (as
// std::nearbyint does) in int32 lanes: the activations' quantization, 8 values an instruction.
inline float largest(const float* x, int n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 top = _mm256_andnot_ps(sign, _mm256_loadu_ps(x));
  for (int i = 1; i < n; ++i) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * i)));
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

inline __m256i rounded(const float* x, float inverse) {
  return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), _mm256_set1_ps(inverse)));
}

void quantize_int16(const float* x, int64_t M, int64_t K, VectorStore& v) {
  const int64_t blocks = v.view.blocks;
  v.q.resize(M * K), v.scale.resize(M * blocks);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * kBlock, k1 = std::min(K, k0 + kBlock);
      const float* xb = x + m * K + k0;
      int16_t* q = v.q.data() + m * K + k0;
      float amax = 0.0f;
      if (k1 - k0 == kBlock) amax = largest(xb, kBlock / 8);
      else
        for (int64_t k = 0; k < k1 - k0; ++k) amax = std::max(amax, std::fabs(xb[k]));
      const float scale = amax / 32767.0f, inverse = amax > 0.0f ? 32767.0f / amax : 0.0f;
      v.scale[m * blocks + b] = scale;
      int64_t k = 0;
      if (k1 - k0 == kBlock)
        for (; k < kBlock; k += 16) {  // packs interleaves the two vectors' 128-bit halves: put them back in order
          const __m256i both = _mm256_packs_epi32(rounded(xb + k, inverse), rounded(xb + k + 8, inverse));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permute4x64_epi64(both, 0b11011000));
        }
      for (; k < k1 - k0; ++k) q[k] = static_cast<int16_t>(std::nearbyint(xb[k] * inverse));
    }
  v.view.q = v.q.data(), v.view.scale = v.scale.data();
}

// K is a multiple of 32 here (int4 groups are); a last, partial chunk is stored like a whole one, evens first.
void quantize_int8(const float* x, int64_t M, int64_t K, VectorStore& v) {
  constexpr int64_t kChunk = kInt4Chunk, kLanes = kChunk / 8, kLanesPerBlock = kBlock8 / 8, per_chunk = kChunk / kBlock8;
  const int64_t blocks = K / kBlock8, chunks = K / kChunk;
  v.view.blocks8 = blocks, v.view.chunks = chunks;
  v.q8.resize(M * K), v.scale8.resize(M * blocks);
  v.chunk_scale.resize(M * chunks * kLanes), v.lane_offset.resize(M * chunks * kLanes);
  // Bytes of a block in order (after the packs, which interleave 128-bit halves and 4-byte groups) ...
  const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // ... then each 16 bytes' evens before its odds, and the two halves' evens before their odds.
  const __m256i evens_odds = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                              0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + m * K + b * kBlock8;
      const float amax = largest(xb, kBlock8 / 8);
      const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m256i q0 = rounded(xb, inverse), q1 = rounded(xb + 8, inverse), q2 = rounded(xb + 16, inverse),
                    q3 = rounded(xb + 24, inverse);
      __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
      q = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(q, in_order), evens_odds), 0b11011000);
      // The block's 16 evens and 16 odds, each at its place among its chunk's evens and odds.
      const int64_t c0 = b * kBlock8 / kChunk * kChunk, span = std::min(kChunk, K - c0) / 2;
      int8_t* at = v.q8.data() + m * K + c0 + (b * kBlock8 - c0) / 2;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(at), _mm256_castsi256_si128(q));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(at + span), _mm256_extracti128_si256(q, 1));
      v.scale8[m * blocks + b] = amax / 127.0f;
      if (b / per_chunk < chunks) {  // the block's 4 lanes of its whole chunk: -8 * the sums of q0 .. q3
        const __m256i pairs = _mm256_hadd_epi32(_mm256_hadd_epi32(q0, q1), _mm256_hadd_epi32(q2, q3));
        const __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(v.lane_offset.data() + (m * chunks + b / per_chunk) * kLanes +
                                                    b % per_chunk * kLanesPerBlock),
                         _mm_mullo_epi32(sums, _mm_set1_epi32(-8)));
      }
    }
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t l = 0; l < kLanes; ++l)
        v.chunk_scale[(m * chunks + c) * kLanes + l] = v.scale8[m * blocks + c * (kChunk / kBlock8) + l / kLanesPerBlock];
  }
  v.view.q8 = v.q8.data(), v.view.scale8 = v.scale8.data();
  v.view.chunk_scale = v.chunk_scale.data(), v.view.lane_offset = v.lane_offset.data();
}

// GGUF weights' activations (K a multiple of 32): see Vectors. `offset` is the weights' kOffset,
// `quarters` their kQuarters.
void quantize_blocks(const float* x, int64_t M, int64_t K, int offset, bool quarters, VectorStore& v) {
  constexpr int64_t kPair = kUnits * kBlock8;  // values of a pair of vectors
  const int64_t padded = (K + kPadded - 1) / kPadded * kPadded, blocks = K / kBlock8;
  v.view.padded = padded;
  v.qb.assign(M * padded, 0), v.lane_scale.assign(M * padded / 8, 0.0f), v.block_sum.assign(M * padded / kBlock8, 0.0f);
  if (offset) v.lane_start.assign(M * padded / 8, 0);
  const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' and hadds' interleaving
  // The two sets of 16 values, as 64-bit parts of the block in order: halves 0, 1 and 2, 3; quarters 0, 2
  // and 1, 3. Lane i of the 4 a block has holds 4 values of each set, sums[i] + sums[i + 4] of the
  // 4-value sums in order (halves), or sums[2i'] + sums[2i' + 1]... as `lane_of` says.
  const int first_set = quarters ? 0b1000 : 0b0100, second_set = quarters ? 0b1101 : 0b1110;
  const __m256i lane_of = quarters ? _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7) : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + m * K + b * kBlock8;
      const float amax = largest(xb, kBlock8 / 8), scale = amax / 127.0f;
      const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m256i q0 = rounded(xb, inverse), q1 = rounded(xb + 8, inverse), q2 = rounded(xb + 16, inverse),
                    q3 = rounded(xb + 24, inverse);
      const __m256i q = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3)), in_order);
      int8_t* pair = v.qb.data() + m * padded + b / kUnits * kPair + b % kUnits * 16;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(pair), _mm256_castsi256_si128(_mm256_permute4x64_epi64(q, first_set)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(pair + kPair / 2), _mm256_castsi256_si128(_mm256_permute4x64_epi64(q, second_set)));
      // The sums of values 4j .. 4j + 3 (j = 0..7), then of each lane's two sets' 4 values.
      const __m256i sums = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(_mm256_hadd_epi32(q0, q1), _mm256_hadd_epi32(q2, q3)), in_order);
      const __m256i paired = _mm256_permutevar8x32_epi32(sums, lane_of);
      const __m128i lanes = _mm_add_epi32(_mm256_castsi256_si128(paired), _mm256_extracti128_si256(paired, 1));
      const int64_t lane0 = (m * padded + b * kBlock8) / 8;
      _mm_storeu_ps(v.lane_scale.data() + lane0, _mm_set1_ps(scale));
      if (offset) _mm_storeu_si128(reinterpret_cast<__m128i*>(v.lane_start.data() + lane0), _mm_mullo_epi32(lanes, _mm_set1_epi32(-offset)));
      const __m128i two = _mm_add_epi32(lanes, _mm_unpackhi_epi64(lanes, lanes));
      v.block_sum[m * padded / kBlock8 + b] = scale * float(_mm_cvtsi128_si32(two) + _mm_extract_epi32(two, 1));
    }
  v.view.qb = v.qb.data(), v.view.lane_scale = v.lane_scale.data(), v.view.block_sum = v.block_sum.data();
  if (offset) v.view.lane_start = v.lane_start.data();
}

// Activation vectors x [M, K] as weights W meet them: bf16_activations says whether the op's
// activations are bf16.
template <typename W>
VectorStore vectors_for(const float* x, int64_t M, int64_t K, bool bf16_activations) {
  VectorStore v;
  v.view.f = x, v.view.K = K, v.view.blocks = (K + kBlock - 1) / kBlock;
  if constexpr (std::is_same_v<W, int8_t>) quantize_int16(x, M, K, v);
  if constexpr (is_int4<W>::value) quantize_int8(x, M, K, v);
  if constexpr (is_gguf<W>::value) quantize_blocks(x, M, K, W::Block::kOffset, W::Block::kQuarters, v);
  if constexpr (std::is_same_v<W, c10::BFloat16> && isa::kBF16Dot)
    if (bf16_activations) round_bf16(x, M, K, v);
  return v;
}

// ---------------------------------------------------------------------------- dot products

// out[r * MC + m] = dot(rows[r], x + m * K) for float rows and float32 vectors: the whole vectors of
// values in the instruction set's width, then the last few in scalar float32. U independent accumulators
// per (row, vector) pair keep R * MC * U >= 4 multiply-adds in flight.
template <typename W, int R, int MC>
inline void dot_tile_float(const W* const* rows, const float* x, int64_t K, float* out) {
  constexpr int V = isa::kFloats, U = R * MC >= 4 ? 1 : 4 / (R * MC);
  constexpr int64_t kLine = 64 / sizeof(W);  // values in a cache line of weights: prefetched once each
  isa::Float acc[R][MC][U];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = isa::zero();
  int64_t k = 0;
  for (; k + V * U <= K; k += V * U) {
    for (int r = 0; r < R; ++r)
      for (int64_t p = 0; p < V * U; p += kLine) prefetch_ahead(rows[r] + k + p);
    for (int u = 0; u < U; ++u) {
      isa::Float xv[MC];
      for (int m = 0; m < MC; ++m) xv[m] = isa::load(x + m * K + k + V * u);
      for (int r = 0; r < R; ++r) {
        const isa::Float w = isa::load(rows[r] + k + V * u);
        for (int m = 0; m < MC; ++m) acc[r][m][u] = isa::fma(w, xv[m], acc[r][m][u]);
      }
    }
  }
  for (; k + V <= K; k += V)
    for (int r = 0; r < R; ++r) {
      const isa::Float w = isa::load(rows[r] + k);
      for (int m = 0; m < MC; ++m) acc[r][m][0] = isa::fma(w, isa::load(x + m * K + k), acc[r][m][0]);
    }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) {
      isa::Float a = acc[r][m][0];
      for (int u = 1; u < U; ++u) a = isa::add(a, acc[r][m][u]);
      float s = isa::sum(a);
      for (int64_t j = k; j < K; ++j) s += to_float(rows[r][j]) * x[m * K + j];
      out[r * MC + m] = s;
    }
}

// out[r * MC + m] = dot(rows[r], x[m]) for int8 rows and int16 vectors: exact integer sums within each
// whole block of 64 values (its products, at most 127 * 32767 each, fit an int32 lane many times over),
// then scaled and added in float32; the last, partial block in scalar.
template <int R, int MC>
inline void dot_tile_int8(const int8_t* const* rows, const Vectors& x, float* out) {
  constexpr int V = isa::kFloats;  // 2V int16 values a vector
  const int64_t K = x.K, full_blocks = K / kBlock;
  isa::Float acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = isa::zero();
  for (int64_t b = 0; b < full_blocks; ++b) {
    const int64_t k0 = b * kBlock;
    for (int r = 0; r < R; ++r) prefetch_ahead(rows[r] + k0);
    isa::Int sums[R][MC];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MC; ++m) sums[r][m] = isa::int_zero();
    for (int64_t k = k0; k < k0 + kBlock; k += 2 * V) {
      isa::Int xv[MC];
      for (int m = 0; m < MC; ++m) xv[m] = isa::load_int(x.q + m * K + k);
      for (int r = 0; r < R; ++r) {
        const isa::Int w = isa::widen_int8(rows[r] + k);
        for (int m = 0; m < MC; ++m) sums[r][m] = isa::dot_int16(sums[r][m], w, xv[m]);
      }
    }
    for (int m = 0; m < MC; ++m) {
      const isa::Float scale = isa::broadcast(x.scale[m * x.blocks + b]);
      for (int r = 0; r < R; ++r) acc[r][m] = isa::fma(isa::to_float(sums[r][m]), scale, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) {
      float s = isa::sum(acc[r][m]);
      for (int64_t k = full_blocks * kBlock; k < K; ++k)
        s += float(rows[r][k]) * float(x.q[m * K + k]) * x.scale[m * x.blocks + k / kBlock];
      out[r * MC + m] = s;
    }
}

// out[r * MC + m] = dot(rows[r], x[m]) for float and int8 rows.
template <typename W, int R, int MC>
inline void dot_tile(const W* const* rows, const Vectors& x, float* out) {
  if constexpr (std::is_same_v<W, int8_t>) {
    dot_tile_int8<R, MC>(rows, x, out);
  } else {
    if constexpr (std::is_same_v<W, c10::BFloat16> && isa::kBF16Dot)
      if (x.bf) {
        isa::dot_tile_bf16<R, MC>(rows, x.bf, x.K, out);  // every value, the last through masked loads
        return;
      }
    dot_tile_float<W, R, MC>(rows, x.f, x.K, out);
  }
}

// int4 rows times int8 vectors over whole chunks [c0, c1) of kInt4Chunk values, added to out: a vector
// of packed bytes split into its low nibbles (the chunk's even values) and high nibbles (odd), each
// multiplied with the matching half of the reordered activations. Lane j of the int32 sums holds values
// 8j..8j+7, so each block of 32 is 4 lanes; block_scale[r][b - b0] is the weight scale of row r's block b.
template <int R, int MC>
inline void int4_chunks(const uint8_t* const* rows, const float (*block_scale)[kSegmentBlocks], int64_t b0, int64_t c0,
                        int64_t c1, const Vectors& x, float* out) {
  constexpr int V = isa::kFloats;
  constexpr int64_t kBytes = kInt4Chunk / 2;  // of packed weights a chunk
  const int64_t K = x.K;
  isa::Float acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = isa::zero();
  for (int64_t c = c0; c < c1; ++c) {
    if (c * kBytes % 64 == 0)  // once a cache line
      for (int r = 0; r < R; ++r) prefetch_ahead(rows[r] + c * kBytes);
    isa::Int even[MC], odd[MC];
    for (int m = 0; m < MC; ++m) {
      even[m] = isa::load_int(x.q8 + m * K + c * kInt4Chunk);
      odd[m] = isa::load_int(x.q8 + m * K + c * kInt4Chunk + kInt4Chunk / 2);
    }
    for (int r = 0; r < R; ++r) {
      const isa::Int packed = isa::load_int(rows[r] + c * kBytes);
      const isa::Int low = isa::low_nibbles(packed), high = isa::high_nibbles(packed);
      const isa::Float w_scale = isa::spread4(block_scale[r] + c * (kInt4Chunk / kBlock8) - b0);
      for (int m = 0; m < MC; ++m) {
        const isa::Int start = isa::load_int(x.lane_offset + (m * x.chunks + c) * V);  // the nibbles' offset
        const isa::Int sums = isa::dot_bytes2(start, low, even[m], high, odd[m]);
        const isa::Float scale = isa::mul(w_scale, isa::load(x.chunk_scale + (m * x.chunks + c) * V));
        acc[r][m] = isa::fma(isa::to_float(sums), scale, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) out[r * MC + m] += isa::sum(acc[r][m]);
}

// out[r * MC + m] = dot(rows[r], x[m]) for int4 rows (with their group scales) and int8 vectors, a
// segment of blocks at a time: the blocks' weight scales converted first, then the whole chunks, then
// what is left of a last, partial chunk in scalar.
template <typename S, int R, int MC>
inline void dot_tile_int4(const uint8_t* const* rows, const S* const* scales, int64_t group, const Vectors& x,
                          float* out) {
  const int64_t K = x.K, blocks = x.blocks8, blocks_per_group = group / kBlock8, per_chunk = kInt4Chunk / kBlock8;
  // repeat[n / 2][j]: lanes 8j..8j+7 of eight values each repeated n times (n = 1, 2, 4).
  static const __m256i repeat[3][4] = {
      {_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)},
      {_mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)},
      {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
       _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)}};
  for (int i = 0; i < R * MC; ++i) out[i] = 0.0f;
  alignas(64) float block_scale[R][kSegmentBlocks];
  for (int64_t b0 = 0; b0 < blocks; b0 += kSegmentBlocks) {
    const int64_t b1 = std::min(blocks, b0 + kSegmentBlocks);
    for (int r = 0; r < R; ++r) {
      int64_t b = b0;
      // Groups of 32, 64 or 128 (segments start on a group): eight scales converted at a time and each
      // repeated for its 1, 2 or 4 blocks.
      if (blocks_per_group == 1 || blocks_per_group == 2 || blocks_per_group == 4)
        for (const S* group_scales = scales[r] + b0 / blocks_per_group; b + 8 * blocks_per_group <= b1;
             b += 8 * blocks_per_group, group_scales += 8) {  // no division: it would cost more than the rest
          const __m256 w = load8(group_scales);
          for (int64_t j = 0; j < blocks_per_group; ++j)
            _mm256_store_ps(block_scale[r] + b - b0 + 8 * j, _mm256_permutevar8x32_ps(w, repeat[blocks_per_group / 2][j]));
        }
      for (int64_t g = b / blocks_per_group; b < b1; ++g) {
        const float w = to_float(scales[r][g]);
        const int64_t end = std::min(b1, (g + 1) * blocks_per_group);
        for (; b < end; ++b) block_scale[r][b - b0] = w;
      }
    }
    // Whole chunks of this segment (it starts on a chunk), then what is left of the last chunk.
    const int64_t c0 = b0 / per_chunk, c1 = b1 / per_chunk;
    int4_chunks<R, MC>(rows, block_scale, b0, c0, c1, x, out);
    if (b1 == blocks && blocks % per_chunk) {  // blocks of 32 values: 16 bytes each, evens then odds in the activations
      const int64_t k0 = c1 * kInt4Chunk, span = (K - k0) / 2;
      for (int64_t b = c1 * per_chunk; b < blocks; ++b)
        for (int r = 0; r < R; ++r)
          for (int m = 0; m < MC; ++m) {
            int32_t sum = 0;
            for (int64_t j = (b * kBlock8 - k0) / 2; j < (b * kBlock8 - k0) / 2 + kBlock8 / 2; ++j) {
              const uint8_t pair = rows[r][k0 / 2 + j];
              sum += ((pair & 15) - 8) * x.q8[m * K + k0 + j] + ((pair >> 4) - 8) * x.q8[m * K + k0 + span + j];
            }
            out[r * MC + m] += float(sum) * x.scale8[m * blocks + b] * block_scale[r][b - b0];
          }
    }
  }
}

// out[r * MC + m] = dot(rows[r], x[m]) for rows of GGUF blocks of type B and int8 vectors. A step takes
// 256 values (whole blocks, whole pairs of vectors of kUnits units): first each row's scales
// (per sub-block, and mins per unit), then each pair of vectors of q from the blocks, multiplied with
// each token's activations into int32 lanes of 8 values of a unit, exactly, starting from the lanes'
// -offset * sum(q) of the activations (so the q's offset comes off), scaled per lane (weight scale
// times activation scale) into float32 sums. The mins, dmin * m per unit, meet the activations' scale
// * sum(q) per block once a step. A last, partial step (rows of 32-value blocks that do not fill one) is
// read from a copy padded with zero blocks, which add nothing (the activations past K are zeros, and
// so are their scales).
template <typename B, int R, int MC>
inline void dot_tile_gguf(const uint8_t* const* rows, const Vectors& x, float* out) {
  constexpr int64_t kPair = kUnits * 32, kStep = 256, kBlocks = kStep / B::kValues, kStepBytes = kBlocks * B::kBytes;
  const int64_t blocks = x.K / B::kValues, steps = blocks / kBlocks;
  isa::Float acc[R][MC];
  __m256 mins[R][MC];  // the 8 units' mins of a step
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = isa::zero(), mins[r][m] = _mm256_setzero_ps();

  auto step = [&](const uint8_t* const* at, int64_t k0) {  // at[r]: row r's blocks of the step, from value k0
    alignas(64) float scale[R][kStep / B::kSubBlock];
    __m256 wmin[R];
    for (int r = 0; r < R; ++r) B::scales(at[r], scale[r], &wmin[r]);
    for (int first = 0; first < kStep / 32; first += kUnits) {  // the pair's first unit within the step
      const int64_t k = k0 + first * 32;
      isa::Int ax[MC], ay[MC];
      for (int m = 0; m < MC; ++m)
        ax[m] = isa::load_int(x.qb + m * x.padded + k), ay[m] = isa::load_int(x.qb + m * x.padded + k + kPair / 2);
      for (int r = 0; r < R; ++r) {
        isa::Int wx, wy;
        B::pair(at[r], first, wx, wy);
        const float* s = scale[r] + first * 32 / B::kSubBlock;
        const isa::Float w_scale = B::kQuarters ? isa::spread2(s) : isa::spread4(s);
        for (int m = 0; m < MC; ++m) {
          isa::Int sums = B::kOffset ? isa::load_int(x.lane_start + m * x.padded / 8 + k / 8) : isa::int_zero();
          sums = B::kSigned ? isa::dot_signed2(sums, wx, ax[m], wy, ay[m]) : isa::dot_bytes2(sums, wx, ax[m], wy, ay[m]);
          const isa::Float a_scale = isa::load(x.lane_scale + m * x.padded / 8 + k / 8);
          acc[r][m] = isa::fma(isa::to_float(sums), isa::mul(w_scale, a_scale), acc[r][m]);
        }
      }
    }
    if constexpr (B::kMins)
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MC; ++m)
          mins[r][m] = _mm256_fmadd_ps(wmin[r], _mm256_loadu_ps(x.block_sum + m * x.padded / kBlock8 + k0 / 32), mins[r][m]);
  };

  int64_t fetched = 0;  // bytes of each row prefetched so far: every cache line once
  for (int64_t s = 0; s < steps; ++s) {
    for (; fetched < (s + 1) * kStepBytes; fetched += 64)
      for (int r = 0; r < R; ++r) prefetch_ahead(rows[r] + fetched);
    const uint8_t* at[R];
    for (int r = 0; r < R; ++r) at[r] = rows[r] + s * kStepBytes;
    step(at, s * kStep);
  }
  if (blocks % kBlocks) {
    uint8_t padded[R][kStepBytes] = {};
    const uint8_t* at[R];
    for (int r = 0; r < R; ++r) {
      std::memcpy(padded[r], rows[r] + steps * kStepBytes, blocks % kBlocks * B::kBytes);
      at[r] = padded[r];
    }
    step(at, steps * kStep);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) out[r * MC + m] = isa::sum(acc[r][m]) - (B::kMins ? sum8(mins[r][m]) : 0.0f);
}

// Where each of a tile's int4 rows finds its group scales (unused for other weights).
struct GroupScales {
  const void* const* rows = nullptr;
  int64_t group = 0;
};

// dots[r * M + m] = dot(rows[r], x[m]) for R rows and any M vectors, a few vectors at a time: the rows
// stay in L1 while the vectors pass, so the weights come from memory once.
template <typename W, int R>
inline void dot_rows(const W* const* rows, const Vectors& x, int64_t M, float* dots, GroupScales gs = {}) {
  constexpr bool quantized = is_int4<W>::value || std::is_same_v<W, int8_t>;
  // GGUF rows: 4 vectors a pass on every set. Their decoding costs more than int4's, and a vector's sums
  // need only one register, so that even AVX2's 16 hold 4.
  constexpr int kMost = is_gguf<W>::value ? 4 : quantized ? isa::kMostQuantized : isa::kMostFloat;
  static_assert(kMost <= 4);
  float out[R * 4];
  for (int64_t m = 0; m < M;) {
    const int MC = static_cast<int>(std::min<int64_t>(kMost, M - m));
    auto tile = [&](auto mc) {
      constexpr int C = decltype(mc)::value;
      if constexpr (C <= kMost) {
        if constexpr (is_int4<W>::value) {
          using S = typename W::Scale;
          dot_tile_int4<S, R, C>(reinterpret_cast<const uint8_t* const*>(rows), reinterpret_cast<const S* const*>(gs.rows),
                                 gs.group, x.at(m), out);
        } else if constexpr (is_gguf<W>::value) {
          dot_tile_gguf<typename W::Block, R, C>(reinterpret_cast<const uint8_t* const*>(rows), x.at(m), out);
        } else {
          dot_tile<W, R, C>(rows, x.at(m), out);
        }
      }
    };
    switch (MC) {
      case 4: tile(std::integral_constant<int, 4>{}); break;
      case 3: tile(std::integral_constant<int, 3>{}); break;
      case 2: tile(std::integral_constant<int, 2>{}); break;
      default: tile(std::integral_constant<int, 1>{});
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < MC; ++c) dots[r * M + m + c] = out[r * MC + c];
    m += MC;
  }
}

// Vectors one pass over a row takes (the rest take another pass, the row then in L1).
constexpr int64_t kMaxVectors = 64;
// Rows a thread takes at a time: large enough that scheduling costs nothing, small enough that two
// threads split a 1024-row matrix evenly.
constexpr int64_t kRowsPerTask = 64;

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// A float32, bf16 or fp16 tensor's values read (and written) as float32 where they are used: converting
// whole tensors with torch ops would add a dozen small ops to every call, whose fixed costs are a
// noticeable share of a decode step.
struct Floats {
  void* data = nullptr;
  at::ScalarType type = at::kFloat;

  Floats() = default;
  explicit Floats(const Tensor& t) : data(t.data_ptr()), type(t.scalar_type()) {
    TORCH_CHECK(t.is_contiguous(), "mixtral_cpu: contiguous tensors expected");
    TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf,
                "mixtral_cpu: float32, bfloat16 or float16 expected, got ", type);
  }
  explicit Floats(const c10::optional<Tensor>& t) { if (t) *this = Floats(*t); }
  bool present() const { return data != nullptr; }

  float operator[](int64_t i) const {
    switch (type) {
      case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]);
      case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(data)[i]);
      default: return static_cast<const float*>(data)[i];
    }
  }
  void set(int64_t i, float v) const {
    switch (type) {
      case at::kBFloat16: static_cast<c10::BFloat16*>(data)[i] = c10::BFloat16(v); break;
      case at::kHalf: static_cast<c10::Half*>(data)[i] = c10::Half(v); break;
      default: static_cast<float*>(data)[i] = v;
    }
  }
  std::vector<float> to_vector(int64_t n) const {
    std::vector<float> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = (*this)[i];
    return v;
  }
};

// ---------------------------------------------------------------------------- formats

// The weight formats, named by the caller (formats.py's kernel_name): the dtypes alone cannot tell
// them apart (every packed format is uint8).
enum class Format { kFull, kInt8, kInt4, kQ8_0, kQ4_0, kQ4_K, kQ5_K, kQ6_K };

struct FormatInfo {
  const char* name;
  Format format;
  int64_t values, elements;  // a row is whole runs of `values` values, stored in `elements` elements each
  const char* weights;       // what the format stores, for the messages
};
constexpr FormatInfo kFormats[] = {
    {"full", Format::kFull, 1, 1, "float32, bfloat16 or float16 weights and no scales"},
    {"int8", Format::kInt8, 1, 1, "int8 weights and scales"},
    {"int4", Format::kInt4, 2, 1, "uint8 weights (two values a byte) and scales"},
    {"q8_0", Format::kQ8_0, Q8_0::kValues, Q8_0::kBytes, "uint8 GGUF blocks (34 bytes per 32 values) and no scales"},
    {"q4_0", Format::kQ4_0, Q4_0::kValues, Q4_0::kBytes, "uint8 GGUF blocks (18 bytes per 32 values) and no scales"},
    {"q4_k", Format::kQ4_K, Q4_K::kValues, Q4_K::kBytes, "uint8 GGUF blocks (144 bytes per 256 values) and no scales"},
    {"q5_k", Format::kQ5_K, Q5_K::kValues, Q5_K::kBytes, "uint8 GGUF blocks (176 bytes per 256 values) and no scales"},
    {"q6_k", Format::kQ6_K, Q6_K::kValues, Q6_K::kBytes, "uint8 GGUF blocks (210 bytes per 256 values) and no scales"},
};

// torch's name of a dtype (ATen's own says Char and Byte for int8 and uint8).
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    default: return c10::toString(t);
  }
}

// The format called `name`, checked against the weights' dtype and whether scales came: a mismatch is
// refused, rather than the bytes read as another format's.
const FormatInfo& format_of(c10::string_view name, const Tensor& w, const c10::optional<Tensor>& scales, const char* op) {
  for (const FormatInfo& f : kFormats) {
    if (name != f.name) continue;
    const at::ScalarType t = w.scalar_type();
    const bool dtype_fits = f.format == Format::kFull ? (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf)
                            : f.format == Format::kInt8 ? t == at::kChar
                                                        : t == at::kByte;
    const bool scaled = f.format == Format::kInt8 || f.format == Format::kInt4;
    TORCH_CHECK(dtype_fits && scales.has_value() == scaled, op, ": format '", f.name, "' takes ", f.weights, "; got ",
                dtype_name(t), " weights and ", scales ? "scales" : "no scales");
    return f;
  }
  TORCH_CHECK(false, op, ": unknown weight format '", name, "'; one of full, int8, int4, q8_0, q4_0, q4_k, q5_k, q6_k expected");
}

// Whether a row of K values in format f is `elements` elements long (whole runs of the format's values).
inline bool row_fits(const FormatInfo& f, int64_t K, int64_t elements) {
  return K % f.values == 0 && elements == K / f.values * f.elements;
}

// How a row of K values is stored, for the messages: "[N, K]", "[N, K/2]", "[N, K/256*144]".
std::string row_shape(const FormatInfo& f, const char* K) {
  if (f.values == 1) return std::string("[N, ") + K + "]";
  if (f.elements == 1) return std::string("[N, ") + K + "/" + std::to_string(f.values) + "]";
  return std::string("[N, ") + K + "/" + std::to_string(f.values) + "*" + std::to_string(f.elements) + "]";
}

// Calls f with a null pointer of the weights' element type (int4: Int4 of their scales' type; GGUF:
// Gguf of its block type).
template <typename F>
void dispatch_weight_type(Format format, const Tensor& w, const c10::optional<Tensor>& scales, F&& f) {
  switch (format) {
    case Format::kFull:
      switch (w.scalar_type()) {
        case at::kFloat: return f(static_cast<const float*>(nullptr));
        case at::kBFloat16: return f(static_cast<const c10::BFloat16*>(nullptr));
        default: return f(static_cast<const c10::Half*>(nullptr));  // format_of allows no other
      }
    case Format::kInt8: return f(static_cast<const int8_t*>(nullptr));
    case Format::kInt4:
      switch (scales->scalar_type()) {
        case at::kFloat: return f(static_cast<const Int4<float>*>(nullptr));
        case at::kBFloat16: return f(static_cast<const Int4<c10::BFloat16>*>(nullptr));
        case at::kHalf: return f(static_cast<const Int4<c10::Half>*>(nullptr));
        default: TORCH_CHECK(false, "mixtral_cpu: int4 scales of dtype ", scales->scalar_type(), " are not supported");
      }
    case Format::kQ8_0: return f(static_cast<const Gguf<Q8_0>*>(nullptr));
    case Format::kQ4_0: return f(static_cast<const Gguf<Q4_0>*>(nullptr));
    case Format::kQ4_K: return f(static_cast<const Gguf<Q4_K>*>(nullptr));
    case Format::kQ5_K: return f(static_cast<const Gguf<Q5_K>*>(nullptr));
    case Format::kQ6_K: return f(static_cast<const Gguf<Q6_K>*>(nullptr));
  }
}

// Checks the scales of weights w [..., N, K / values per element] in format f (format_of has checked
// that they come where f needs them), and returns the number of groups per row (0 unless int4).
int64_t check_scales(Format f, const c10::optional<Tensor>& scales, const Tensor& w, int64_t K) {
  if (!scales) return 0;
  TORCH_CHECK(scales->is_contiguous(), "mixtral_cpu: scales must be contiguous");
  const auto rows = w.sizes().slice(0, w.dim() - 1);
  if (f == Format::kInt8) {
    TORCH_CHECK(scales->sizes() == rows, "mixtral_cpu: scales of shape ", scales->sizes(), " do not fit int8 weights of shape ",
                w.sizes());
    return 0;
  }
  const int64_t groups = scales->size(-1);
  TORCH_CHECK(scales->dim() == w.dim() && scales->sizes().slice(0, w.dim() - 1) == rows && groups > 0 &&
                  K % groups == 0 && (K / groups) % kBlock8 == 0,
              "mixtral_cpu: int4 scales of shape ", scales->sizes(), " do not fit weights of shape ", w.sizes(),
              " (groups of a multiple of 32 values along the rows expected)");
  return groups;
}

// ---------------------------------------------------------------------------- linear

// y[m, n] = scale[n] * dot(w[n], x[m]) for rows n in [n0, n1). One row at a time: the rows lie one after
// another in memory, so a thread reads one sequential stream, which the hardware prefetcher follows
// best (tiles of several rows interleave streams: BENCHMARKS.md, kernel design).
// int4: scales are the rows' group scales, `groups` per row, and no scale per row.
template <typename W>
void linear_rows(const W* w, const Floats& scales, int64_t groups, const Vectors& x, int64_t M, int64_t K, int64_t n0,
                 int64_t n1, const Floats& y, int64_t N) {
  float dots[kMaxVectors];
  for (int64_t n = n0; n < n1; ++n) {
    const W* row[1] = {w + n * row_length<W>(K)};
    float s = scales.present() ? scales[n] : 1.0f;
    const void* group_scales[1] = {nullptr};
    if constexpr (is_int4<W>::value)
      group_scales[0] = static_cast<const typename W::Scale*>(scales.data) + n * groups, s = 1.0f;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxVectors) {
      const int64_t Mc = std::min(kMaxVectors, M - m0);
      dot_rows<W, 1>(row, x.at(m0), Mc, dots, {group_scales, K / std::max<int64_t>(groups, 1)});
      for (int64_t m = 0; m < Mc; ++m) y.set((m0 + m) * N + n, dots[m] * s);
    }
  }
}

Tensor linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& scales, c10::string_view format_name) {
  const FormatInfo& f = format_of(format_name, weight, scales, "mixtral_cpu.linear");
  const Format format = f.format;
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && row_fits(f, x.size(1), weight.size(1)), "mixtral_cpu.linear: x [M, K] and ",
              f.name, " weight ", row_shape(f, "K"), " expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "mixtral_cpu.linear: weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int64_t groups = check_scales(format, scales, weight, K);
  const std::vector<float> xf = Floats(x.contiguous()).to_vector(M * K);
  const Floats s(scales);
  Tensor y = at::empty({M, N}, x.options());
  const Floats out(y);
  dispatch_weight_type(format, weight, scales, [&](auto tag) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const W* w = static_cast<const W*>(weight.data_ptr());
    const VectorStore xv = vectors_for<W>(xf.data(), M, K, x.scalar_type() == at::kBFloat16);
    const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      linear_rows<W>(w, s, groups, xv.view, M, K, t0 * kRowsPerTask, std::min(N, t1 * kRowsPerTask), out, N);
    });
  });
  return y;
}

// ---------------------------------------------------------------------------- mixture of experts

// The (token, expert) pairs grouped by expert: group g is expert expert_of[g], pairs [start[g], start[g+1]).
struct Groups {
  std::vector<int64_t> expert_of, start, token, slot;  // slot: the pair's index in experts.flatten()
};

Groups group_by_expert(const Tensor& experts, int64_t E) {
  TORCH_CHECK(experts.scalar_type() == at::kLong && experts.is_contiguous(), "mixtral_cpu.moe: int64 expert ids expected");
  const Tensor& ex = experts;
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

// Scales: int8 one per row, int4 `groups1` per row of w1 and w3 and `groups2` per row of w2, GGUF none
// (its blocks hold them). bf16: the op's activations are bf16.
template <typename W>
void moe_experts(const Groups& g, const float* x, bool bf16, const Floats& pair_weight, const W* w1, const W* w3,
                 const W* w2, const Floats& s1, const Floats& s3, const Floats& s2, int64_t groups1, int64_t groups2,
                 int64_t D, int64_t I, float* y) {
  const int64_t G = g.expert_of.size(), P = g.token.size();
  const int64_t row1 = row_length<W>(D), row2 = row_length<W>(I);  // elements of a row of w1 and w3, of w2
  constexpr bool int4 = is_int4<W>::value;
  using S = std::conditional_t<int4, typename std::conditional_t<int4, W, Int4<float>>::Scale, float>;
  auto group_scales = [](const Floats& s, int64_t row, int64_t groups) -> const void* {
    return int4 ? static_cast<const S*>(s.data) + row * groups : nullptr;
  };
  auto row_scale = [](const Floats& s, int64_t row) { return s.present() && !int4 ? s[row] : 1.0f; };
  // Each group's tokens side by side, so that an expert's rows meet all of its tokens in one pass.
  std::vector<float> xg(P * D), h(P * I);
  for (int64_t q = 0; q < P; ++q) std::copy(x + g.token[q] * D, x + (g.token[q] + 1) * D, xg.begin() + q * D);
  const VectorStore xv = vectors_for<W>(xg.data(), P, D, bf16);

  // w1 and w3 together, row by row: h = silu(w1 x) * (w3 x) over the group's tokens.
  const int64_t tiles_per_expert = (I + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, G * tiles_per_expert, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> dots;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t grp = t / tiles_per_expert, e = g.expert_of[grp];
      const int64_t q0 = g.start[grp], M = g.start[grp + 1] - q0;
      const W* e1 = w1 + e * I * row1;
      const W* e3 = w3 + e * I * row1;
      dots.resize(2 * M);
      const int64_t i1 = std::min(I, (t % tiles_per_expert + 1) * kRowsPerTask);
      for (int64_t i = (t % tiles_per_expert) * kRowsPerTask; i < i1; ++i) {
        const W* rows[2] = {e1 + i * row1, e3 + i * row1};
        const void* scales[2] = {group_scales(s1, e * I + i, groups1), group_scales(s3, e * I + i, groups1)};
        dot_rows<W, 2>(rows, xv.view.at(q0), M, dots.data(), {scales, D / std::max<int64_t>(groups1, 1)});
        const float a1 = row_scale(s1, e * I + i), a3 = row_scale(s3, e * I + i);
        for (int64_t m = 0; m < M; ++m) h[(q0 + m) * I + i] = silu(dots[m] * a1) * (dots[M + m] * a3);
      }
    }
  });

  // w2: each thread owns a range of output rows d and adds every pair's contribution to them.
  const VectorStore hv = vectors_for<W>(h.data(), P, I, bf16);
  const int64_t tasks = (D + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> dots;
    for (int64_t grp = 0; grp < G; ++grp) {
      const int64_t e = g.expert_of[grp], q0 = g.start[grp], M = g.start[grp + 1] - q0;
      const W* e2 = w2 + e * D * row2;
      dots.resize(M);
      for (int64_t d = t0 * kRowsPerTask; d < std::min(D, t1 * kRowsPerTask); ++d) {
        const W* row[1] = {e2 + d * row2};
        const void* scales[1] = {group_scales(s2, e * D + d, groups2)};
        dot_rows<W, 1>(row, hv.view.at(q0), M, dots.data(), {scales, I / std::max<int64_t>(groups2, 1)});
        const float a2 = row_scale(s2, e * D + d);
        for (int64_t m = 0; m < M; ++m)
          y[g.token[q0 + m] * D + d] += pair_weight[g.slot[q0 + m]] * a2 * dots[m];
      }
    }
  });
}

Tensor moe(const Tensor& x, const Tensor& experts, const Tensor& weights, const Tensor& w1, const Tensor& w3,
           const Tensor& w2, const c10::optional<Tensor>& w1_scales, const c10::optional<Tensor>& w3_scales,
           const c10::optional<Tensor>& w2_scales, c10::string_view format_name) {
  TORCH_CHECK(x.dim() == 2 && experts.dim() == 2 && weights.sizes() == experts.sizes() && experts.size(0) == x.size(0),
              "mixtral_cpu.moe: x [T, D], experts and weights [T, K] expected");
  const FormatInfo& f = format_of(format_name, w1, w1_scales, "mixtral_cpu.moe");
  const Format format = f.format;
  format_of(format_name, w3, w3_scales, "mixtral_cpu.moe");
  format_of(format_name, w2, w2_scales, "mixtral_cpu.moe");
  TORCH_CHECK(w1.dim() == 3 && w1.sizes() == w3.sizes() && w2.dim() == 3 && w2.size(0) == w1.size(0) &&
                  w2.size(1) == x.size(1) && row_fits(f, x.size(1), w1.size(2)) && row_fits(f, w1.size(1), w2.size(2)),
              "mixtral_cpu.moe: x [T, D], ", f.name, " w1, w3 [E, I, D'] and w2 [E, D, I'] expected, rows ",
              row_shape(f, "D"), " and ", row_shape(f, "I"), ", got ", x.sizes(), ", ", w1.sizes(), ", ", w3.sizes(), ", ",
              w2.sizes());
  TORCH_CHECK(w1.scalar_type() == w3.scalar_type() && w1.scalar_type() == w2.scalar_type(),
              "mixtral_cpu.moe: w1, w3 and w2 must share a dtype");
  TORCH_CHECK(w1.is_contiguous() && w3.is_contiguous() && w2.is_contiguous(), "mixtral_cpu.moe: weights must be contiguous");
  const int64_t E = w1.size(0), I = w1.size(1), D = x.size(1);
  const int64_t groups1 = check_scales(format, w1_scales, w1, D);
  TORCH_CHECK(check_scales(format, w3_scales, w3, D) == groups1 && (!w3_scales || w3_scales->scalar_type() == w1_scales->scalar_type()),
              "mixtral_cpu.moe: w1 and w3 must share their scales' shape and dtype");
  const int64_t groups2 = check_scales(format, w2_scales, w2, I);
  TORCH_CHECK(!w2_scales || w2_scales->scalar_type() == w1_scales->scalar_type(),
              "mixtral_cpu.moe: w1 and w2 must share their scales' dtype");
  const int64_t T = x.size(0);
  const std::vector<float> xf = Floats(x.contiguous()).to_vector(T * D);
  std::vector<float> yf(T * D, 0.0f);
  const Groups g = group_by_expert(experts, E);
  dispatch_weight_type(format, w1, w1_scales, [&](auto tag) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    moe_experts<W>(g, xf.data(), x.scalar_type() == at::kBFloat16, Floats(weights.contiguous()), static_cast<const W*>(w1.data_ptr()),
                   static_cast<const W*>(w3.data_ptr()), static_cast<const W*>(w2.data_ptr()), Floats(w1_scales),
                   Floats(w3_scales), Floats(w2_scales), groups1, groups2, D, I, yf.data());
  });
  Tensor y = at::empty({T, D}, x.options());
  const Floats out(y);
  for (int64_t i = 0; i < T * D; ++i) out.set(i, yf[i]);
  return y;
}

// ---------------------------------------------------------------------------- dequantization

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

inline void store8(c10::BFloat16* p, __m256 v) {
  // Round to nearest even: add 0x7fff plus the lowest kept bit, keep the top 16 bits.
  __m256i i = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
  i = _mm256_srli_epi32(_mm256_add_epi32(i, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(i, i), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// Calls run with out's data as float*, BFloat16* or Half*.
template <typename F>
void for_output_type(const Tensor& out, F&& run) {
  switch (out.scalar_type()) {
    case at::kFloat: return run(out.data_ptr<float>());
    case at::kBFloat16: return run(out.data_ptr<c10::BFloat16>());
    case at::kHalf: return run(out.data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "mixtral_cpu: dequantizing to ", out.scalar_type(), " is not supported");
  }
}

// out[r, c] = q[r, c] * scales[r], in one pass over q: a prompt multiplies full-precision copies of its
// int8 weights, made one matrix at a time.
Tensor dequantize_int8(const Tensor& q, const Tensor& scales, at::ScalarType dtype) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() >= 1,
              "mixtral_cpu.dequantize_int8: contiguous int8 weights expected");
  TORCH_CHECK(scales.numel() * q.size(-1) == q.numel(), "mixtral_cpu.dequantize_int8: one scale per row expected, got ",
              scales.sizes(), " for weights ", q.sizes());
  const int64_t C = q.size(-1), rows = scales.numel();
  const std::vector<float> s = Floats(scales.contiguous()).to_vector(rows);
  Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  const int8_t* src = q.data_ptr<int8_t>();
  auto run = [&](auto* dst) {
    using T = std::remove_pointer_t<decltype(dst)>;
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const __m256 scale = _mm256_set1_ps(s[r]);
        int64_t c = 0;
        for (; c + 8 <= C; c += 8) store8(dst + r * C + c, _mm256_mul_ps(load8(src + r * C + c), scale));
        for (; c < C; ++c) dst[r * C + c] = static_cast<T>(float(src[r * C + c]) * s[r]);
      }
    });
  };
  for_output_type(out, run);
  return out;
}

// out[r, c] = (nibble c of row r - 8) * scales[r, c / group], eight values (four bytes) at a time.
Tensor dequantize_int4(const Tensor& packed, const Tensor& scales, at::ScalarType dtype) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() >= 1,
              "mixtral_cpu.dequantize_int4: contiguous uint8 weights expected");
  const int64_t C = packed.size(-1) * 2, rows = packed.numel() / std::max<int64_t>(packed.size(-1), 1);
  const int64_t groups = check_scales(Format::kInt4, scales, packed, C), group = C / groups;
  const std::vector<float> s = Floats(scales).to_vector(rows * groups);
  std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end());
  shape.back() = C;
  Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), eight = _mm256_set1_epi32(8);
  auto run = [&](auto* dst) {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < C; c += 8) {  // group is a multiple of 32: eight values share a scale
          int32_t four;
          std::memcpy(&four, src + (r * C + c) / 2, 4);
          const __m256i nibbles = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(four), shifts), _mm256_set1_epi32(15));
          const __m256 values = _mm256_cvtepi32_ps(_mm256_sub_epi32(nibbles, eight));
          store8(dst + r * C + c, _mm256_mul_ps(values, _mm256_set1_ps(s[r * groups + c / group])));
        }
    });
  };
  for_output_type(out, run);
  return out;
}

// ---------------------------------------------------------------------------- attention

// One new token's attention over the cache, as layers.decode_attention computes it (float32 scores
// q . k * scale, -inf where the mask forbids, softmax, then the probabilities times v), but reading the
// cache in place in its own dtype: PyTorch's path converts the whole cache to float32 at every step first,
// whose cost grows with the context. For each sequence and key/value head, its G query heads in turn.
constexpr int64_t kMostHead = 256;  // values of a head the kernel holds (dispatch.ATTENTION_MAX_HEAD)

template <typename T>
void attend(const float* q, const T* k, const T* v, const bool* allowed, int64_t S, int64_t Dh, int64_t G,
            float scale, float* p, float* out) {
  using namespace isa;
  const int64_t V = Dh / kFloats;
  for (int64_t g = 0; g < G; ++g, q += Dh, out += Dh) {
    float top = -INFINITY;
    for (int64_t s = 0; s < S; ++s) {
      if (!allowed[s]) {
        p[s] = -INFINITY;
        continue;
      }
      Float acc = zero();
      for (int64_t j = 0; j < V; ++j) acc = fma(load(q + j * kFloats), load(k + s * Dh + j * kFloats), acc);
      p[s] = sum(acc) * scale;
      top = std::max(top, p[s]);
    }
    // exp(score - top), 0 where forbidden; then each divided by their sum, as softmax does.
    __m256 total = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) {
      const __m256 x = _mm256_loadu_ps(p + s);
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(x, _mm256_set1_ps(top))),
                                     _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
      _mm256_storeu_ps(p + s, e);
      total = _mm256_add_ps(total, e);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, total);
    float denominator = 0.0f;
    for (int i = 0; i < 8; ++i) denominator += lanes[i];
    for (; s < S; ++s) {
      p[s] = allowed[s] ? std::exp(p[s] - top) : 0.0f;
      denominator += p[s];
    }
    Float acc[kMostHead / kFloats];
    for (int64_t j = 0; j < V; ++j) acc[j] = zero();
    for (int64_t s2 = 0; s2 < S; ++s2) {
      if (p[s2] == 0.0f) continue;
      const Float w = broadcast(p[s2] / denominator);
      for (int64_t j = 0; j < V; ++j) acc[j] = fma(w, load(v + s2 * Dh + j * kFloats), acc[j]);
    }
    for (int64_t j = 0; j < V; ++j) store(out + j * kFloats, acc[j]);
  }
}

Tensor attention(const Tensor& q_, const Tensor& k, const Tensor& v, const Tensor& mask_, double scale) {
  TORCH_CHECK(q_.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == q_.size(0) &&
                  k.size(3) == q_.size(2) && q_.size(1) % k.size(1) == 0,
              "mixtral_cpu.attention: q [B, H, Dh], k and v [B, KV, S, Dh] with KV dividing H expected, got ",
              q_.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = k.size(0), KV = k.size(1), S = k.size(2), Dh = k.size(3), H = q_.size(1), G = H / KV;
  TORCH_CHECK(Dh % isa::kFloats == 0 && Dh <= kMostHead, "mixtral_cpu.attention: head size ", Dh,
              " is not a multiple of ", isa::kFloats, " up to ", kMostHead);
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && k.is_contiguous() && v.is_contiguous(),
              "mixtral_cpu.attention: k and v must be contiguous and of one dtype");
  const Tensor mask = mask_.to(at::kBool).expand({B, S}).contiguous();
  const Tensor q = q_.to(at::kFloat).contiguous();
  Tensor out = at::empty({B, H, Dh}, q.options());
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(S);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KV;
      const float* qt = q.data_ptr<float>() + t * G * Dh;  // [B, KV, G, Dh]: the query heads of kv head t % KV
      float* ot = out.data_ptr<float>() + t * G * Dh;
      const bool* allowed = mask.data_ptr<bool>() + b * S;
      const int64_t at_kv = t * S * Dh;
      switch (k.scalar_type()) {
        case at::kFloat: attend(qt, k.data_ptr<float>() + at_kv, v.data_ptr<float>() + at_kv, allowed, S, Dh, G, scale, p.data(), ot); break;
        case at::kBFloat16:
          attend(qt, k.data_ptr<c10::BFloat16>() + at_kv, v.data_ptr<c10::BFloat16>() + at_kv, allowed, S, Dh, G, scale, p.data(), ot);
          break;
        case at::kHalf: attend(qt, k.data_ptr<c10::Half>() + at_kv, v.data_ptr<c10::Half>() + at_kv, allowed, S, Dh, G, scale, p.data(), ot); break;
        default: TORCH_CHECK(false, "mixtral_cpu.attention: a cache of float32, bf16 or fp16 expected, got ", k.scalar_type());
      }
    }
  });
  return out.to(q_.scalar_type());
}

}  // namespace

// TORCH_LIBRARY names its namespace as written: this indirection expands MIXTRAL_OPS first.
#define MIXTRAL_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define MIXTRAL_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

MIXTRAL_LIBRARY(MIXTRAL_OPS, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? scales, str format) -> Tensor");
  m.def("moe(Tensor x, Tensor experts, Tensor weights, Tensor w1, Tensor w3, Tensor w2, Tensor? w1_scales, "
        "Tensor? w3_scales, Tensor? w2_scales, str format) -> Tensor");
  m.def("dequantize_int8(Tensor q, Tensor scales, ScalarType dtype) -> Tensor");
  m.def("dequantize_int4(Tensor packed, Tensor scales, ScalarType dtype) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

MIXTRAL_LIBRARY_IMPL(MIXTRAL_OPS, CPU, m) {
  m.impl("linear", &linear);
  m.impl("moe", &moe);
  m.impl("dequantize_int8", &dequantize_int8);
  m.impl("dequantize_int4", &dequantize_int4);
  m.impl("attention", &attention);
}
