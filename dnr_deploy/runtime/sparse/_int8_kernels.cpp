// int8 direct sparse convolution (int8.py): uint8 activations x int8 CSR weights, int32
// accumulation, and one fused epilogue (per-row scale, bias, residual, ReLU, requantization to
// uint8 or a float output). The same shifted-plane formulation as _kernels.cpp, in bytes: a
// nonzero weight reads one contiguous stretch of uint8 activations at its offset.
//
// The dot-product instructions (vpdpbusd, vpmaddubsw) sum 4 (or 2) adjacent bytes, but the
// nonzeros of an irregular row read unrelated stretches. So a row's nonzeros go in groups of 4
// (the last one padded with zero weights), and for each group the 4 stretches are interleaved
// byte by byte in registers (two rounds of unpack) into the 4-byte pairs the instruction wants.
// The unpacks work inside 128-bit lanes, which permutes the positions inside a chunk; the
// epilogue undoes that with one lane transpose per chunk, so the inner loop never shuffles
// across lanes.
//
// Paths, chosen at run time (or forced by the caller): AVX-512 VNNI (64 positions a chunk),
// AVX-VNNI and AVX2 (32 positions; AVX2's vpmaddubsw saturates 16-bit pair sums, exact only for
// weights in [-64, 64], which the caller checks), and a portable scalar loop. All of them give
// bit-identical results: integer accumulation, then the same float operations in the same order
// (built with -ffp-contract=off, so no multiply-add is fused behind the reference's back).
#include <stdint.h>

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DNR_X86 1
#endif

namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3 };

}  // namespace

extern "C" {

// The arguments of one call (see dnr_int8_sparse_conv).
struct Int8ConvArgs {
  const uint8_t* src;
  const int32_t* off;    // 4 byte offsets a group
  const int64_t* gptr;   // row o's groups: gptr[o] .. gptr[o + 1]
  const int32_t* wq;     // 4 int8 weights a group, packed little-endian
  const int32_t* corr;   // per row: input zero point x the row's weight sum
  const float* scale;    // per row: input scale x weight scale
  const float* bias;     // per row
  const int64_t* pos;    // where each chunk of 64 positions starts (the same in every row)
  int64_t chunks;
  int64_t half;          // 1: chunks of 32 positions (short rows), 0: of 64
  int64_t rows;
  int64_t threads;
  int64_t relu;
  const float* res;      // residual rows (float, same positions), or null
  int64_t res_stride;
  float out_scale;       // > 0: requantize to uint8; else write floats
  int64_t out_zero_point;
  uint8_t* out_u8;
  float* out_f32;
  int64_t out_stride;
  int64_t isa;
};

}  // extern "C"

namespace {

constexpr float kClamp = 1024.0f;  // quantized values past this saturate anyway

// The epilogue of one position, the reference every vector path matches.
inline void finish_one(const Int8ConvArgs& a, int64_t o, int64_t q, int32_t acc) {
  float y = static_cast<float>(acc - a.corr[o]) * a.scale[o];
  y = y + a.bias[o];
  if (a.res) y = y + a.res[o * a.res_stride + q];
  if (a.relu) y = y > 0.0f ? y : 0.0f;
  if (a.out_scale > 0.0f) {
    float t = y / a.out_scale;
    t = std::min(std::max(t, -kClamp), kClamp);
    int32_t v = static_cast<int32_t>(std::nearbyint(t)) + static_cast<int32_t>(a.out_zero_point);
    a.out_u8[o * a.out_stride + q] = static_cast<uint8_t>(std::min(std::max(v, 0), 255));
  } else {
    a.out_f32[o * a.out_stride + q] = y;
  }
}

void row_portable(const Int8ConvArgs& a, int64_t o, int64_t t0, int64_t t1) {
  int32_t acc[64];
  const int width = a.half ? 32 : 64;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t q = a.pos[t];
    for (int i = 0; i < 64; ++i) acc[i] = 0;
    for (int64_t g = a.gptr[o]; g < a.gptr[o + 1]; ++g) {
      const uint32_t packed = static_cast<uint32_t>(a.wq[g]);
      for (int k = 0; k < 4; ++k) {
        const int32_t w = static_cast<int8_t>(packed >> (8 * k));
        const uint8_t* s = a.src + a.off[4 * g + k] + q;
        for (int i = 0; i < width; ++i) acc[i] += w * static_cast<int32_t>(s[i]);
      }
    }
    for (int i = 0; i < width; ++i) finish_one(a, o, q + i, acc[i]);
  }
}

#ifdef DNR_X86
// 16 (AVX-512) or 8 (AVX2) ordered positions at q: the epilogue, vectorised.
__attribute__((target("avx512f,avx512bw"))) inline void finish16(const Int8ConvArgs& a, int64_t o,
                                                                  int64_t q, __m512i acc) {
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_set1_epi32(a.corr[o]))),
                           _mm512_set1_ps(a.scale[o]));
  y = _mm512_add_ps(y, _mm512_set1_ps(a.bias[o]));
  if (a.res) y = _mm512_add_ps(y, _mm512_loadu_ps(a.res + o * a.res_stride + q));
  if (a.relu) y = _mm512_max_ps(y, _mm512_setzero_ps());
  if (a.out_scale > 0.0f) {
    __m512 t = _mm512_div_ps(y, _mm512_set1_ps(a.out_scale));
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-kClamp)), _mm512_set1_ps(kClamp));
    __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(t),
                                 _mm512_set1_epi32(static_cast<int32_t>(a.out_zero_point)));
    v = _mm512_min_epi32(_mm512_max_epi32(v, _mm512_setzero_si512()), _mm512_set1_epi32(255));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.out_u8 + o * a.out_stride + q),
                     _mm512_cvtepi32_epi8(v));
  } else {
    _mm512_storeu_ps(a.out_f32 + o * a.out_stride + q, y);
  }
}

__attribute__((target("avx2"))) inline void finish8(const Int8ConvArgs& a, int64_t o, int64_t q,
                                                    __m256i acc) {
  __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc, _mm256_set1_epi32(a.corr[o]))),
                           _mm256_set1_ps(a.scale[o]));
  y = _mm256_add_ps(y, _mm256_set1_ps(a.bias[o]));
  if (a.res) y = _mm256_add_ps(y, _mm256_loadu_ps(a.res + o * a.res_stride + q));
  if (a.relu) y = _mm256_max_ps(y, _mm256_setzero_ps());
  if (a.out_scale > 0.0f) {
    __m256 t = _mm256_div_ps(y, _mm256_set1_ps(a.out_scale));
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-kClamp)), _mm256_set1_ps(kClamp));
    __m256i v = _mm256_add_epi32(_mm256_cvtps_epi32(t),
                                 _mm256_set1_epi32(static_cast<int32_t>(a.out_zero_point)));
    v = _mm256_min_epi32(_mm256_max_epi32(v, _mm256_setzero_si256()), _mm256_set1_epi32(255));
    // 8 int32 in [0, 255] -> 8 bytes
    const __m256i bytes = _mm256_shuffle_epi8(
        v, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    const int32_t lo = _mm256_extract_epi32(bytes, 0), hi = _mm256_extract_epi32(bytes, 4);
    uint8_t* out = a.out_u8 + o * a.out_stride + q;
    __builtin_memcpy(out, &lo, 4);
    __builtin_memcpy(out + 4, &hi, 4);
  } else {
    _mm256_storeu_ps(a.out_f32 + o * a.out_stride + q, y);
  }
}

// AVX-512 VNNI: chunks of 64 positions, two at a time (8 accumulators).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void row_avx512vnni(
    const Int8ConvArgs& a, int64_t o, int64_t t0, int64_t t1) {
  const int64_t g0 = a.gptr[o], g1 = a.gptr[o + 1];
  for (int64_t t = t0; t < t1; t += 2) {
    const int nc = t + 1 < t1 ? 2 : 1;
    const int64_t qs[2] = {a.pos[t], a.pos[t + nc - 1]};
    __m512i acc[2][4];
    for (int c = 0; c < 2; ++c)
      for (int k = 0; k < 4; ++k) acc[c][k] = _mm512_setzero_si512();
    for (int64_t g = g0; g < g1; ++g) {
      const __m512i w = _mm512_set1_epi32(a.wq[g]);
      const int32_t* off = a.off + 4 * g;
      for (int c = 0; c < nc; ++c) {
        const uint8_t* s = a.src + qs[c];
        const __m512i x0 = _mm512_loadu_si512(s + off[0]), x1 = _mm512_loadu_si512(s + off[1]);
        const __m512i x2 = _mm512_loadu_si512(s + off[2]), x3 = _mm512_loadu_si512(s + off[3]);
        const __m512i lo01 = _mm512_unpacklo_epi8(x0, x1), hi01 = _mm512_unpackhi_epi8(x0, x1);
        const __m512i lo23 = _mm512_unpacklo_epi8(x2, x3), hi23 = _mm512_unpackhi_epi8(x2, x3);
        acc[c][0] = _mm512_dpbusd_epi32(acc[c][0], _mm512_unpacklo_epi16(lo01, lo23), w);
        acc[c][1] = _mm512_dpbusd_epi32(acc[c][1], _mm512_unpackhi_epi16(lo01, lo23), w);
        acc[c][2] = _mm512_dpbusd_epi32(acc[c][2], _mm512_unpacklo_epi16(hi01, hi23), w);
        acc[c][3] = _mm512_dpbusd_epi32(acc[c][3], _mm512_unpackhi_epi16(hi01, hi23), w);
      }
    }
    for (int c = 0; c < nc; ++c) {
      // acc[k] lane m holds positions 16 m + 4 k .. + 3: transpose the 4 x 4 lanes
      const __m512i t0 = _mm512_shuffle_i32x4(acc[c][0], acc[c][1], 0x44);
      const __m512i t1 = _mm512_shuffle_i32x4(acc[c][2], acc[c][3], 0x44);
      const __m512i t2 = _mm512_shuffle_i32x4(acc[c][0], acc[c][1], 0xEE);
      const __m512i t3 = _mm512_shuffle_i32x4(acc[c][2], acc[c][3], 0xEE);
      const int64_t base = qs[c];
      finish16(a, o, base, _mm512_shuffle_i32x4(t0, t1, 0x88));
      finish16(a, o, base + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));
      finish16(a, o, base + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));
      finish16(a, o, base + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));
    }
  }
}

// The 256-bit paths: chunks of 32 positions, two at a time; DOT(acc, x, w) is the 4-byte dot
// product. A macro, not a template: GCC inlines target-specific intrinsics only into functions
// that carry the target attribute themselves.
#define DNR_ROW_256(DOT)                                                                     \
  const int64_t g0 = a.gptr[o], g1 = a.gptr[o + 1];                                          \
  const int halves = a.half ? 1 : 2;                                                         \
  for (int64_t t = t0; t < t1; ++t) { /* a chunk of 64: two halves of 32 */                \
    const int64_t q = a.pos[t];                                                              \
    __m256i acc[2][4];                                                                       \
    for (int c = 0; c < 2; ++c)                                                              \
      for (int k = 0; k < 4; ++k) acc[c][k] = _mm256_setzero_si256();                        \
    for (int64_t g = g0; g < g1; ++g) {                                                      \
      const __m256i w = _mm256_set1_epi32(a.wq[g]);                                          \
      const int32_t* off = a.off + 4 * g;                                                    \
      for (int c = 0; c < halves; ++c) {                                                     \
        const uint8_t* s = a.src + q + 32 * c;                                               \
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + off[0])); \
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + off[1])); \
        const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + off[2])); \
        const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + off[3])); \
        const __m256i lo01 = _mm256_unpacklo_epi8(x0, x1), hi01 = _mm256_unpackhi_epi8(x0, x1); \
        const __m256i lo23 = _mm256_unpacklo_epi8(x2, x3), hi23 = _mm256_unpackhi_epi8(x2, x3); \
        acc[c][0] = DOT(acc[c][0], _mm256_unpacklo_epi16(lo01, lo23), w);                     \
        acc[c][1] = DOT(acc[c][1], _mm256_unpackhi_epi16(lo01, lo23), w);                     \
        acc[c][2] = DOT(acc[c][2], _mm256_unpacklo_epi16(hi01, hi23), w);                     \
        acc[c][3] = DOT(acc[c][3], _mm256_unpackhi_epi16(hi01, hi23), w);                     \
      }                                                                                      \
    }                                                                                        \
    for (int c = 0; c < halves; ++c) { /* acc[k] lane m: positions 16 m + 4 k .. + 3 */      \
      const int64_t base = q + 32 * c;                                                       \
      finish8(a, o, base, _mm256_permute2x128_si256(acc[c][0], acc[c][1], 0x20));            \
      finish8(a, o, base + 8, _mm256_permute2x128_si256(acc[c][2], acc[c][3], 0x20));        \
      finish8(a, o, base + 16, _mm256_permute2x128_si256(acc[c][0], acc[c][1], 0x31));       \
      finish8(a, o, base + 24, _mm256_permute2x128_si256(acc[c][2], acc[c][3], 0x31));       \
    }                                                                                        \
  }

// vpmaddubsw: u8 x s8 pair sums in 16 bits (saturating), then vpmaddwd sums the pairs.
#define DNR_DOT_AVX2(acc, x, w) \
  _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)))
#define DNR_DOT_AVXVNNI(acc, x, w) _mm256_dpbusd_avx_epi32(acc, x, w)
#define DNR_DOT_AVX512VL(acc, x, w) _mm256_dpbusd_epi32(acc, x, w)

__attribute__((target("avx2"))) void row_avx2(const Int8ConvArgs& a, int64_t o, int64_t t0,
                                              int64_t t1) {
  DNR_ROW_256(DNR_DOT_AVX2)
}

// AVX-512 VNNI on 256-bit vectors (AVX512VL), for rows of 32 positions or fewer.
__attribute__((target("avx2,avx512f,avx512vl,avx512vnni"))) void row_avx512vl(
    const Int8ConvArgs& a, int64_t o, int64_t t0, int64_t t1) {
  DNR_ROW_256(DNR_DOT_AVX512VL)
}

__attribute__((target("avx2,avxvnni"))) void row_avxvnni(const Int8ConvArgs& a, int64_t o,
                                                         int64_t t0, int64_t t1) {
  DNR_ROW_256(DNR_DOT_AVXVNNI)
}
#endif

bool supported(int64_t isa) {
#ifdef DNR_X86
  switch (isa) {
    case kAvx512Vnni:
      return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
    case kAvxVnni:
      return __builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("avx2");
    case kAvx2:
      return __builtin_cpu_supports("avx2");
    default:
      return isa == kPortable;
  }
#else
  return isa == kPortable;
#endif
}

}  // namespace

extern "C" {

// 1 when this CPU runs path `isa` (0 portable, 1 AVX2, 2 AVX-VNNI, 3 AVX-512 VNNI).
int dnr_int8_supported(int64_t isa) { return supported(isa) ? 1 : 0; }

// For each output row o and position q in the chunks pos[t] .. pos[t] + 63 (t < chunks):
//   acc = sum over row o's groups g and k < 4 of int8(wq[g] >> 8k) * src[off[4g + k] + q]
//   y = float(acc - corr[o]) * scale[o] + bias[o] (+ res[o * res_stride + q]), ReLU if relu,
// then out_u8[o * out_stride + q] = clamp(round_half_even(y / out_scale) + zero point, 0, 255),
// or out_f32[...] = y when out_scale <= 0. `src` must hold off + pos + 64 bytes for every
// offset and chunk. Listing chunks lets a caller skip the garbage columns of the shifted-plane
// formulation where a row's pixels fill whole chunks. Returns 0, or -1 when `isa` is not
// supported here (nothing is computed).
int dnr_int8_sparse_conv(const Int8ConvArgs* a) {
  if (!supported(a->isa)) return -1;
  const int64_t block = 16;  // chunks a task: its stretches stay in L1/L2 across rows
  const int64_t nblocks = (a->chunks + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(a->threads))
  for (int64_t task = 0; task < a->rows * nblocks; ++task) {
    const int64_t blk = task / a->rows, o = task % a->rows;
    const int64_t q0 = blk * block, q1 = std::min(a->chunks, q0 + block);
#ifdef DNR_X86
    if (a->isa == kAvx512Vnni && a->half) { row_avx512vl(*a, o, q0, q1); continue; }
    if (a->isa == kAvx512Vnni) { row_avx512vnni(*a, o, q0, q1); continue; }
    if (a->isa == kAvxVnni) { row_avxvnni(*a, o, q0, q1); continue; }
    if (a->isa == kAvx2) { row_avx2(*a, o, q0, q1); continue; }
#endif
    row_portable(*a, o, q0, q1);
  }
  return 0;
}

// planes[((a * stride + b) * chans + c) * hq * wq * batch + (i * wq + j) * batch + n] =
// x[c * xc + (stride * i + a - pad) * xrow + (stride * j + b - pad) * batch + n] for the phases
// with used[a * stride + b]; cells in the padding are left as they are (the zero point).
// _kernels.cpp's dnr_split_phases in bytes: a strided conv's polyphase planes.
void dnr_int8_split_phases(const uint8_t* x, int64_t chans, int64_t xc, int64_t xrow,
                           int64_t height, int64_t width, int64_t batch, int64_t stride,
                           int64_t pad, const uint8_t* used, uint8_t* planes, int64_t hq,
                           int64_t wq) {
  const int64_t plane = hq * wq * batch;
  for (int64_t a = 0; a < stride; ++a)
    for (int64_t b = 0; b < stride; ++b) {
      if (!used[a * stride + b]) continue;
      const int64_t j0 = std::max<int64_t>(0, (pad - b + stride - 1) / stride);
      const int64_t j1 = std::min<int64_t>(wq, (width - 1 + pad - b) / stride + 1);
      for (int64_t c = 0; c < chans; ++c)
        for (int64_t i = 0; i < hq; ++i) {
          const int64_t h = stride * i + a - pad;
          if (h < 0 || h >= height) continue;
          const uint8_t* line = x + c * xc + h * xrow + (stride * j0 + b - pad) * batch;
          uint8_t* o = planes + ((a * stride + b) * chans + c) * plane + (i * wq + j0) * batch;
          for (int64_t j = j0; j < j1; ++j, line += stride * batch, o += batch)
            std::copy(line, line + batch, o);
        }
    }
}

// out[k] = table[a[i] << 8 | b[i]] for the k-th index i of a 4-D index space `shape`, row
// major, whose last axis is contiguous in a and b (strides in bytes for the first three axes);
// out is contiguous. An Add of two uint8 tensors and its requantization, as one lookup in a
// 256 x 256 table that int8_graph.py computes with the graph's own float32 steps.
void dnr_int8_table_add(const uint8_t* a, const int64_t* a_strides, const uint8_t* b,
                        const int64_t* b_strides, const int64_t* shape, const uint8_t* table,
                        uint8_t* out) {
  for (int64_t i0 = 0; i0 < shape[0]; ++i0)
    for (int64_t i1 = 0; i1 < shape[1]; ++i1)
      for (int64_t i2 = 0; i2 < shape[2]; ++i2) {
        const uint8_t* pa = a + i0 * a_strides[0] + i1 * a_strides[1] + i2 * a_strides[2];
        const uint8_t* pb = b + i0 * b_strides[0] + i1 * b_strides[1] + i2 * b_strides[2];
        for (int64_t i3 = 0; i3 < shape[3]; ++i3)
          *out++ = table[(static_cast<uint32_t>(pa[i3]) << 8) | pb[i3]];
      }
}

}  // extern "C"
