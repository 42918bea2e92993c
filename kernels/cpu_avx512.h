// kernels/cpu.cpp's vector vocabulary for AVX-512 with VNNI and BF16 (Intel since Cooper Lake and
// Sapphire Rapids, AMD since Zen 4): 512-bit vectors and 32 registers. Where AVX2 spends several
// instructions on a product, one does here:
//  - int4: vpdpbusd multiplies 64 unsigned nibbles by 64 int8 activations and adds each four products
//    to an int32 lane (AVX2: two vpmaddubsw, an add and a vpmaddwd for half as many);
//  - int8: vpdpwssd multiplies 32 widened weights by 32 int16 activations and adds each pair to a lane;
//  - bf16 weights with bf16 activations: vdpbf16ps multiplies 32 pairs and adds each pair to a float32
//    lane, with no widening (the products of two bf16 values are exact in float32): dot_tile_bf16, the
//    one loop of its own here.
// cpu_avx2.h defines the same names at half the width; cpu.cpp writes its loops once in these names.
// Included by cpu.cpp, after what it uses (prefetch_ahead).
namespace isa {

constexpr int kFloats = 16;  // float32 (or int32) lanes of a vector; it holds 4 * kFloats bytes
// Vectors a pass over a row takes: with 32 registers, 4 for every kind of row (a batch's tokens share
// each load and conversion of the weights).
constexpr int kMostFloat = 4, kMostQuantized = 4;
// bf16 weights meet bf16 activations in vdpbf16ps.
constexpr bool kBF16Dot = true;

using Float = __m512;  // kFloats float32
using Int = __m512i;   // kFloats int32, 2 * kFloats int16 or 4 * kFloats int8

inline Float zero() { return _mm512_setzero_ps(); }
inline Float broadcast(float v) { return _mm512_set1_ps(v); }
inline Float add(Float a, Float b) { return _mm512_add_ps(a, b); }
inline Float mul(Float a, Float b) { return _mm512_mul_ps(a, b); }
inline Float fma(Float a, Float b, Float c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline Float to_float(Int v) { return _mm512_cvtepi32_ps(v); }
inline void store(float* p, Float v) { _mm512_storeu_ps(p, v); }
inline float sum(Float v) { return _mm512_reduce_add_ps(v); }

// kFloats weights as float32.
inline Float load(const float* p) { return _mm512_loadu_ps(p); }
inline Float load(const c10::BFloat16* p) {  // bf16 is the top half of a float32: widen, shift into place
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline Float load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// kFloats / 4 floats, each repeated over 4 consecutive lanes: the scales of sums that come in 4 lanes each.
inline Float spread4(const float* s) {
  const __m512i quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(quads, _mm512_castps128_ps512(_mm_loadu_ps(s)));
}

inline Int int_zero() { return _mm512_setzero_si512(); }
inline Int load_int(const void* p) { return _mm512_loadu_si512(p); }
inline Int widen_int8(const int8_t* p) {  // 2 * kFloats int8 -> int16
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Int bit_or(Int a, Int b) { return _mm512_or_si512(a, b); }
inline Int low_nibbles(Int bytes) { return _mm512_and_si512(bytes, _mm512_set1_epi8(0x0F)); }
inline Int high_nibbles(Int bytes) { return _mm512_and_si512(_mm512_srli_epi16(bytes, 4), _mm512_set1_epi8(0x0F)); }

// sums + each int32 lane's pair of int16 products a * b.
inline Int dot_int16(Int sums, Int a, Int b) { return _mm512_dpwssd_epi32(sums, a, b); }

// sums + each int32 lane's four products of unsigned bytes a and signed bytes b, plus those of c and d.
inline Int dot_bytes2(Int sums, Int a, Int b, Int c, Int d) {
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sums, a, b), c, d);
}

// sums + each int32 lane's four products of signed bytes w1 and a1, plus those of w2 and a2 (|a| <= 127):
// |w| times a with w's sign, which the unsigned-by-signed product takes (there is no vpsignb at this
// width: a is negated where w < 0).
inline Int dot_signed2(Int sums, Int w1, Int a1, Int w2, Int a2) {
  auto signed_a = [](Int w, Int a) { return _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(w), _mm512_setzero_si512(), a); };
  sums = _mm512_dpbusd_epi32(sums, _mm512_abs_epi8(w1), signed_a(w1, a1));
  return _mm512_dpbusd_epi32(sums, _mm512_abs_epi8(w2), signed_a(w2, a2));
}

// GGUF's blocks, a vector of bytes at a time. A unit is 32 values (32 bytes), kFloats / 8 of them a vector.

// kFloats / 4 groups of 16 bytes, from p, p + stride, ... (here four).
inline Int gather16(const uint8_t* p, int64_t stride) {
  auto at = [&](int i) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i * stride)); };
  const __m512i v = _mm512_inserti32x4(_mm512_castsi128_si512(at(0)), at(1), 1);
  return _mm512_inserti32x4(_mm512_inserti32x4(v, at(2), 2), at(3), 3);
}

// Per 16-bit lane, a shift of `a` in the vector's low half and of `b` in its high half.
inline __m512i halves(int a, int b) { return _mm512_inserti64x4(_mm512_set1_epi16(short(a)), _mm256_set1_epi16(short(b)), 1); }

// kFloats / 8 units, from unit `first` (even), of 32-byte groups at p whose low nibbles are unit 2k and
// high nibbles unit 2k + 1 (here two: one group, both nibbles).
inline Int split_nibbles(const uint8_t* p, int first) {
  const __m512i group = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * (first / 2))));
  return _mm512_and_si512(_mm512_srlv_epi16(group, halves(0, 4)), _mm512_set1_epi8(0x0F));
}

// kFloats / 8 units' top bits from the same 32 bytes p: unit i's are bits shift + i * step, `mask` of
// them, moved to bit 4 (here two units). The 16-bit shift moves a neighbour's bits into a byte's top,
// which the mask drops.
inline Int unit_bits(const uint8_t* p, int shift, int step, int mask) {
  const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i bits = _mm512_and_si512(_mm512_srlv_epi16(q, halves(shift, shift + step)), _mm512_set1_epi8(char(mask)));
  return _mm512_slli_epi16(bits, 4);
}

// The first 16 bytes of each unit of a, then of b; and the last 16.
inline Int pair_low(Int a, Int b) { return _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(2, 0, 2, 0)); }
inline Int pair_high(Int a, Int b) { return _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 1, 3, 1)); }
// Per 16 bytes, the first 8 of a and of b; and the last 8.
inline Int unpack_low64(Int a, Int b) { return _mm512_unpacklo_epi64(a, b); }
inline Int unpack_high64(Int a, Int b) { return _mm512_unpackhi_epi64(a, b); }

// kFloats / 2 floats, each repeated over 2 consecutive lanes.
inline Float spread2(const float* s) {
  const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  return _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(_mm256_loadu_ps(s)));
}

// out[r * MC + m] = dot(rows[r], x + m * K) for bf16 rows and bf16 vectors, all K values (the last < 32
// through masked loads, which read zeros). U independent accumulators per (row, vector) pair keep
// R * MC * U >= 4 multiply-adds in flight.
template <int R, int MC>
inline void dot_tile_bf16(const c10::BFloat16* const* rows, const c10::BFloat16* x, int64_t K, float* out) {
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
}

}  // namespace isa
