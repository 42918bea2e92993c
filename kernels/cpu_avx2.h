// kernels/cpu.cpp's vector vocabulary for AVX2 (with FMA and F16C): 256-bit vectors, every x86-64 CPU of
// the last decade. Built with -DMIXTRAL_ISA_AVXVNNI as well, the integer products take AVX-VNNI's fused
// multiply-add-accumulate (vpdpbusd, vpdpwssd) on the same vectors.
// cpu_avx512.h defines the same names at twice the width; cpu.cpp writes its loops once in these names.
// Included by cpu.cpp, after what it uses (prefetch_ahead).
namespace isa {

constexpr int kFloats = 8;  // float32 (or int32) lanes of a vector; it holds 4 * kFloats bytes
// Vectors a pass over a row takes: float rows 4 (their widening is shared by 4 products, and 4 * R
// accumulators still fit the 16 registers); quantized rows 2 (their integer sums need registers too).
constexpr int kMostFloat = 4, kMostQuantized = 2;
// No bf16 dot product: bf16 weights are widened to float32 and meet float32 activations.
constexpr bool kBF16Dot = false;

using Float = __m256;  // kFloats float32
using Int = __m256i;   // kFloats int32, 2 * kFloats int16 or 4 * kFloats int8

inline Float zero() { return _mm256_setzero_ps(); }
inline Float broadcast(float v) { return _mm256_set1_ps(v); }
inline Float add(Float a, Float b) { return _mm256_add_ps(a, b); }
inline Float mul(Float a, Float b) { return _mm256_mul_ps(a, b); }
inline Float fma(Float a, Float b, Float c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c
inline Float to_float(Int v) { return _mm256_cvtepi32_ps(v); }

inline void store(float* p, Float v) { _mm256_storeu_ps(p, v); }
inline float sum(Float v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// kFloats weights as float32.
inline Float load(const float* p) { return _mm256_loadu_ps(p); }
inline Float load(const c10::BFloat16* p) {  // bf16 is the top half of a float32: widen, shift into place
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline Float load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// kFloats / 4 floats, each repeated over 4 consecutive lanes: the scales of sums that come in 4 lanes each.
inline Float spread4(const float* s) {
  const __m256 pair = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(s)));
  return _mm256_permutevar8x32_ps(pair, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

inline Int int_zero() { return _mm256_setzero_si256(); }
inline Int load_int(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline Int widen_int8(const int8_t* p) {  // 2 * kFloats int8 -> int16
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Int bit_or(Int a, Int b) { return _mm256_or_si256(a, b); }
inline Int low_nibbles(Int bytes) { return _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F)); }
inline Int high_nibbles(Int bytes) { return _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(0x0F)); }

// sums + each int32 lane's pair of int16 products a * b.
inline Int dot_int16(Int sums, Int a, Int b) {
#ifdef MIXTRAL_ISA_AVXVNNI
  return _mm256_dpwssd_avx_epi32(sums, a, b);
#else
  return _mm256_add_epi32(sums, _mm256_madd_epi16(a, b));
#endif
}

// sums + each int32 lane's four products of unsigned bytes a and signed bytes b, plus those of c and d.
// Without VNNI, vpmaddubsw adds pairs into int16 lanes, saturating: callers keep a and c <= 63 (6 bits),
// so that the 4 products an int16 lane adds stay within 4 * 63 * 127.
inline Int dot_bytes2(Int sums, Int a, Int b, Int c, Int d) {
#ifdef MIXTRAL_ISA_AVXVNNI
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(sums, a, b), c, d);
#else
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a, b), _mm256_maddubs_epi16(c, d));
  return _mm256_add_epi32(sums, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

// sums + each int32 lane's four products of signed bytes w1 and a1, plus those of w2 and a2 (|a| <= 127):
// |w| times a with w's sign, which the unsigned-by-signed products take. Without VNNI each vector's
// pairs (up to 2 * 128 * 127) are widened apart, as two would not fit an int16 lane together.
inline Int dot_signed2(Int sums, Int w1, Int a1, Int w2, Int a2) {
#ifdef MIXTRAL_ISA_AVXVNNI
  sums = _mm256_dpbusd_avx_epi32(sums, _mm256_abs_epi8(w1), _mm256_sign_epi8(a1, w1));
  return _mm256_dpbusd_avx_epi32(sums, _mm256_abs_epi8(w2), _mm256_sign_epi8(a2, w2));
#else
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(a1, w1)), ones);
  const __m256i p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w2), _mm256_sign_epi8(a2, w2)), ones);
  return _mm256_add_epi32(sums, _mm256_add_epi32(p1, p2));
#endif
}

// GGUF's blocks, a vector of bytes at a time. A unit is 32 values (32 bytes), kFloats / 8 of them a vector.

// kFloats / 4 groups of 16 bytes, from p, p + stride, ... (here two).
inline Int gather16(const uint8_t* p, int64_t stride) {
  const __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_inserti128_si256(_mm256_castsi128_si256(low), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + stride)), 1);
}

// kFloats / 8 units, from unit `first`, of 32-byte groups at p whose low nibbles are unit 2k and high
// nibbles unit 2k + 1 (here one).
inline Int split_nibbles(const uint8_t* p, int first) {
  const Int group = load_int(p + 32 * (first / 2));
  return first % 2 ? high_nibbles(group) : low_nibbles(group);
}

// kFloats / 8 units' top bits from the same 32 bytes p: unit i's are bits shift + i * step, `mask` of
// them, moved to bit 4 (here one unit). The 16-bit shift moves a neighbour's bits into a byte's top, which
// the mask drops.
inline Int unit_bits(const uint8_t* p, int shift, int, int mask) {
  const Int bits = _mm256_and_si256(_mm256_srli_epi16(load_int(p), shift), _mm256_set1_epi8(char(mask)));
  return _mm256_slli_epi16(bits, 4);
}

// The first 16 bytes of each unit of a, then of b; and the last 16.
inline Int pair_low(Int a, Int b) { return _mm256_permute2x128_si256(a, b, 0x20); }
inline Int pair_high(Int a, Int b) { return _mm256_permute2x128_si256(a, b, 0x31); }
// Per 16 bytes, the first 8 of a and of b; and the last 8.
inline Int unpack_low64(Int a, Int b) { return _mm256_unpacklo_epi64(a, b); }
inline Int unpack_high64(Int a, Int b) { return _mm256_unpackhi_epi64(a, b); }

// kFloats / 2 floats, each repeated over 2 consecutive lanes.
inline Float spread2(const float* s) {
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s)), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
}

// None: kBF16Dot is false (declared for cpu.cpp's branch that never runs here).
template <int R, int MC>
void dot_tile_bf16(const c10::BFloat16* const* rows, const c10::BFloat16* x, int64_t K, float* out);

}  // namespace isa
