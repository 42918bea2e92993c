// The inner dot products of kernels/cpu.cpp for AVX-512 with VNNI and BF16 (Intel since Cooper Lake and
// Sapphire Rapids, AMD since Zen 4), 512-bit vectors and 32 registers. Where AVX2 spends several
// instructions on each product, one does here:
//  - int4: vpdpbusd multiplies 64 unsigned nibbles by 64 int8 activations and adds each four products
//    to an int32 lane (AVX2: two vpmaddubsw, an add and a vpmaddwd for half as many);
//  - int8: vpdpwssd multiplies 32 widened weights by 32 int16 activations and adds each pair to a lane;
//  - bf16 weights with bf16 activations: vdpbf16ps multiplies 32 pairs and adds each pair to a float32
//    lane, with no widening (the products of two bf16 values are exact in float32).
// Included by cpu.cpp, after the types it uses (Vectors, Int4, prefetch_ahead); see there for what each
// function computes.
namespace isa {

// int4 activations are reordered a chunk of this many values at a time (evens, then odds): the values
// whose weights' low and high nibbles one 64-byte load holds.
constexpr int64_t kChunk = 128;
// Vectors a pass over a row takes: with 32 registers, 4 for every kind of row (a batch's tokens share
// each load and conversion of the weights).
constexpr int kMostFloat = 4, kMostQuantized = 4;
// bf16 weights meet bf16 activations in vdpbf16ps.
constexpr bool kBF16Dot = true;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// Float rows times float32 vectors over the first K rounded down to 16 values (returned). U independent
// accumulators per (row, vector) pair keep R * MC * U >= 4 multiply-adds in flight.
template <typename W, int R, int MC>
inline int64_t dot_tile(const W* const* rows, const float* x, int64_t K, float* out) {
  constexpr int U = R * MC >= 4 ? 1 : 4 / (R * MC);
  constexpr int64_t kLine = 64 / sizeof(W);  // values in a cache line of weights: prefetched once each
  __m512 acc[R][MC][U];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    for (int r = 0; r < R; ++r)
      for (int64_t p = 0; p < 16 * U; p += kLine) prefetch_ahead(rows[r] + k + p);
    for (int u = 0; u < U; ++u) {
      __m512 xv[MC];
      for (int m = 0; m < MC; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k + 16 * u);
      for (int r = 0; r < R; ++r) {
        const __m512 w = load16(rows[r] + k + 16 * u);
        for (int m = 0; m < MC; ++m) acc[r][m][u] = _mm512_fmadd_ps(w, xv[m], acc[r][m][u]);
      }
    }
  }
  for (; k + 16 <= K; k += 16)
    for (int r = 0; r < R; ++r) {
      const __m512 w = load16(rows[r] + k);
      for (int m = 0; m < MC; ++m) acc[r][m][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[r][m][0]);
    }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) {
      __m512 a = acc[r][m][0];
      for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[r][m][u]);
      out[r * MC + m] = _mm512_reduce_add_ps(a);
    }
  return k;
}

// bf16 rows times bf16 vectors, all K values (the last < 32 through masked loads, which read zeros).
template <int R, int MC>
inline int64_t dot_tile_bf16(const c10::BFloat16* const* rows, const c10::BFloat16* x, int64_t K, float* out) {
  constexpr int U = R * MC >= 4 ? 1 : 4 / (R * MC);
  auto load = [](const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); };
  __m512 acc[R][MC][U];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    for (int u = 0; u < U; ++u) {
      __m512bh xv[MC];
      for (int m = 0; m < MC; ++m) xv[m] = load(x + m * K + k + 32 * u);
      for (int r = 0; r < R; ++r) {
        prefetch_ahead(rows[r] + k + 32 * u);
        const __m512bh w = load(rows[r] + k + 32 * u);
        for (int m = 0; m < MC; ++m) acc[r][m][u] = _mm512_dpbf16_ps(acc[r][m][u], w, xv[m]);
      }
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    for (int r = 0; r < R; ++r) {
      const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(mask, rows[r] + k);
      for (int m = 0; m < MC; ++m)
        acc[r][m][0] = _mm512_dpbf16_ps(acc[r][m][0], w, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) {
      __m512 a = acc[r][m][0];
      for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[r][m][u]);
      out[r * MC + m] = _mm512_reduce_add_ps(a);
    }
  return K;
}

// int8 rows times int16 vectors over the whole blocks of 64 values: exact integer sums within a block
// (each lane adds 4 products of at most 127 * 32767), then scaled and added in float32.
template <int R, int MC>
inline void dot_tile_int8(const int8_t* const* rows, const Vectors& x, float* out) {
  const int64_t K = x.K, full_blocks = K / kBlock;
  __m512 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < full_blocks; ++b) {
    const int64_t k0 = b * kBlock;
    for (int r = 0; r < R; ++r) prefetch_ahead(rows[r] + k0);
    __m512i sums[R][MC];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MC; ++m) sums[r][m] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k0 + kBlock; k += 32) {
      __m512i xv[MC];
      for (int m = 0; m < MC; ++m) xv[m] = _mm512_loadu_si512(x.q + m * K + k);
      for (int r = 0; r < R; ++r) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + k)));
        for (int m = 0; m < MC; ++m) sums[r][m] = _mm512_dpwssd_epi32(sums[r][m], w, xv[m]);
      }
    }
    for (int m = 0; m < MC; ++m) {
      const __m512 scale = _mm512_set1_ps(x.scale[m * x.blocks + b]);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][m]), scale, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) out[r * MC + m] = _mm512_reduce_add_ps(acc[r][m]);
}

// int4 rows times int8 vectors over whole chunks [c0, c1) of 128 values, added to out: 64 bytes of
// weights split into their low nibbles (the chunk's even values) and high nibbles (odd), each multiplied
// with the matching half of the reordered activations. Lane j of the int32 sums holds values 8j..8j+7,
// so lanes 4i..4i+3 are the chunk's block i; block_scale[r][b - b0] is the weight scale of row r's block b.
template <int R, int MC>
inline void int4_chunks(const uint8_t* const* rows, const float (*block_scale)[kSegmentBlocks], int64_t b0, int64_t c0,
                        int64_t c1, const Vectors& x, float* out) {
  const int64_t K = x.K;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t c = c0; c < c1; ++c) {
    for (int r = 0; r < R; ++r) prefetch_ahead(rows[r] + c * kChunk / 2);
    __m512i even[MC], odd[MC];
    for (int m = 0; m < MC; ++m) {
      even[m] = _mm512_loadu_si512(x.q8 + m * K + c * kChunk);
      odd[m] = _mm512_loadu_si512(x.q8 + m * K + c * kChunk + 64);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i packed = _mm512_loadu_si512(rows[r] + c * kChunk / 2);
      const __m512i low = _mm512_and_si512(packed, nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
      // The scales of blocks 4c .. 4c + 3, each for its four lanes.
      const __m512 w_scale = _mm512_permutexvar_ps(quads, _mm512_castps128_ps512(_mm_loadu_ps(block_scale[r] + 4 * c - b0)));
      for (int m = 0; m < MC; ++m) {
        const __m512i start = _mm512_loadu_si512(x.lane_offset + (m * x.chunks + c) * 16);  // the nibbles' offset
        const __m512i sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, low, even[m]), high, odd[m]);
        const __m512 scale = _mm512_mul_ps(w_scale, _mm512_loadu_ps(x.chunk_scale + (m * x.chunks + c) * 16));
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) out[r * MC + m] += _mm512_reduce_add_ps(acc[r][m]);
}

}  // namespace isa
