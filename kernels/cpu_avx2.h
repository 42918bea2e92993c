// The inner dot products of kernels/cpu.cpp for AVX2 (with FMA and F16C), 256-bit vectors: every x86-64
// CPU of the last decade. Built with -DMIXTRAL_ISA_AVXVNNI as well, the integer products take AVX-VNNI's
// fused multiply-add-accumulate (vpdpbusd, vpdpwssd) on its 256-bit vectors.
// Included by cpu.cpp, after the types it uses (Vectors, Int4, load8, prefetch_ahead); see there for
// what each function computes.
namespace isa {

// int4 activations are reordered a chunk of this many values at a time (evens, then odds): the values
// whose weights' low and high nibbles one 32-byte load holds.
constexpr int64_t kChunk = 64;
// Vectors a pass over a row takes: float rows 4 (their widening is shared by 4 products, and 4 * R
// accumulators still fit the 16 registers); quantized rows 2 (their integer sums need registers too).
constexpr int kMostFloat = 4, kMostQuantized = 2;
// No bf16 dot product: bf16 weights are widened to float32 and meet float32 activations.
constexpr bool kBF16Dot = false;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sums + pairwise sums of int16 products a * b, per int32 lane.
inline __m256i add_products16(__m256i sums, __m256i a, __m256i b) {
#ifdef MIXTRAL_ISA_AVXVNNI
  return _mm256_dpwssd_avx_epi32(sums, a, b);
#else
  return _mm256_add_epi32(sums, _mm256_madd_epi16(a, b));
#endif
}

// start + the int32 lanes' sums of four unsigned bytes of a times signed bytes of b, and of c times d.
inline __m256i products8(__m256i start, __m256i a, __m256i b, __m256i c, __m256i d) {
#ifdef MIXTRAL_ISA_AVXVNNI
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(start, a, b), c, d);
#else
  // At most 2 * 15 * 127 per int16 lane, twice: no saturation.
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a, b), _mm256_maddubs_epi16(c, d));
  return _mm256_add_epi32(start, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

// out[r * MC + m] = dot(rows[r], x + m * K) over the first K8 = K rounded down to 8 values, for R rows
// and MC vectors (float32). U independent accumulators per (row, vector) pair keep R * MC * U >= 4
// multiply-adds in flight. Returns K8.
template <typename W, int R, int MC>
inline int64_t dot_tile(const W* const* rows, const float* x, int64_t K, float* out) {
  constexpr int U = R * MC >= 4 ? 1 : 4 / (R * MC);
  __m256 acc[R][MC][U];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int r = 0; r < R; ++r) prefetch_ahead(rows[r] + k);
    for (int u = 0; u < U; ++u) {
      __m256 xv[MC];
      for (int m = 0; m < MC; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k + 8 * u);
      for (int r = 0; r < R; ++r) {
        __m256 w = load8(rows[r] + k + 8 * u);
        for (int m = 0; m < MC; ++m) acc[r][m][u] = _mm256_fmadd_ps(w, xv[m], acc[r][m][u]);
      }
    }
  }
  for (; k + 8 <= K; k += 8) {
    for (int r = 0; r < R; ++r) {
      __m256 w = load8(rows[r] + k);
      for (int m = 0; m < MC; ++m) acc[r][m][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k), acc[r][m][0]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) {
      __m256 a = acc[r][m][0];
      for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[r][m][u]);
      out[r * MC + m] = horizontal_sum(a);
    }
  return k;
}

// int8 rows times int16 vectors over the whole blocks of 64 values: exact integer sums within a block
// (64 products of at most 127 * 32767 fit an int32 lane many times over), then scaled and added in
// float32.
template <int R, int MC>
inline void dot_tile_int8(const int8_t* const* rows, const Vectors& x, float* out) {
  const int64_t K = x.K, full_blocks = K / kBlock;
  __m256 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < full_blocks; ++b) {
    const int64_t k0 = b * kBlock;
    for (int r = 0; r < R; ++r) prefetch_ahead(rows[r] + k0);
    __m256i sums[R][MC];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MC; ++m) sums[r][m] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k0 + kBlock; k += 16) {
      __m256i xv[MC];
      for (int m = 0; m < MC; ++m) xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + m * K + k));
      for (int r = 0; r < R; ++r) {
        __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + k)));
        for (int m = 0; m < MC; ++m) sums[r][m] = add_products16(sums[r][m], w, xv[m]);
      }
    }
    for (int m = 0; m < MC; ++m) {
      const __m256 scale = _mm256_set1_ps(x.scale[m * x.blocks + b]);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][m]), scale, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) out[r * MC + m] = horizontal_sum(acc[r][m]);
}

// int4 rows times int8 vectors over whole chunks [c0, c1) of 64 values, added to out: 32 bytes of
// weights split into their low nibbles (the chunk's even values) and high nibbles (odd), each multiplied
// with the matching half of the reordered activations. Lane j of the int32 sums holds values 8j..8j+7,
// so lanes 0-3 are the chunk's first block and 4-7 its second; block_scale[r][b - b0] is the weight
// scale of row r's block b.
template <int R, int MC>
inline void int4_chunks(const uint8_t* const* rows, const float (*block_scale)[kSegmentBlocks], int64_t b0, int64_t c0,
                        int64_t c1, const Vectors& x, float* out) {
  const int64_t K = x.K;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t c = c0; c < c1; ++c) {
    if (c % 2 == 0)
      for (int r = 0; r < R; ++r) prefetch_ahead(rows[r] + c * kChunk / 2);
    __m256i even[MC], odd[MC];
    for (int m = 0; m < MC; ++m) {
      even[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q8 + m * K + c * kChunk));
      odd[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q8 + m * K + c * kChunk + 32));
    }
    for (int r = 0; r < R; ++r) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + c * kChunk / 2));
      const __m256i low = _mm256_and_si256(packed, nibble);
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
      // [scale of block 2c] * 4, [scale of block 2c + 1] * 4
      const __m256 pair = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(block_scale[r] + 2 * c - b0)));
      const __m256 w_scale = _mm256_permutevar8x32_ps(pair, halves);
      for (int m = 0; m < MC; ++m) {
        const __m256i start = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lane_offset + (m * x.chunks + c) * 8));
        const __m256i sums = products8(start, low, even[m], high, odd[m]);  // start: the nibbles' offset
        const __m256 scale = _mm256_mul_ps(w_scale, _mm256_loadu_ps(x.chunk_scale + (m * x.chunks + c) * 8));
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) out[r * MC + m] += horizontal_sum(acc[r][m]);
}

// Unused: kBF16Dot is false.
template <int R, int MC>
inline int64_t dot_tile_bf16(const c10::BFloat16* const*, const c10::BFloat16*, int64_t, float*) { return 0; }

}  // namespace isa
