// Direct sparse convolution (Park et al., ICLR 2017) for the sparse runtime: see kernels.py for
// the CHWN layout and the shifted-plane formulation. Each task keeps a tile of 8 * NV output
// floats of one output channel in NV AVX2 registers while that channel's nonzeros stream past:
// one broadcast, NV unaligned loads and NV FMAs per nonzero, no store until the row is done
// (the numba kernel loads and stores the accumulator for every nonzero: about 2-3x slower here,
// ISSUE13_NOTES.md). Plain C ABI, loaded with ctypes: no Python headers, no build-time numpy.
#include <stdint.h>

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DNR_X86 1
#endif

namespace {

#ifdef DNR_X86
template <int NV>
__attribute__((target("avx2,fma"))) void row_tiles_avx2(
    const float* src, const int64_t* off, const float* val, int64_t j0, int64_t j1, float bias,
    int relu, int64_t s0, int64_t s1, float* out) {
  for (int64_t s = s0; s < s1; s += 8 * NV) {
    __m256 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_set1_ps(bias);
    for (int64_t j = j0; j < j1; ++j) {
      const __m256 w = _mm256_set1_ps(val[j]);
      const float* p = src + off[j] + s;
      for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 8 * v), acc[v]);
    }
    for (int v = 0; v < NV; ++v) {
      if (relu) acc[v] = _mm256_max_ps(acc[v], _mm256_setzero_ps());
      _mm256_storeu_ps(out + s + 8 * v, acc[v]);
    }
  }
}
#endif

// Portable path (no AVX2): the same tiles, left to the compiler's vectoriser.
void row_tiles_generic(const float* src, const int64_t* off, const float* val, int64_t j0,
                       int64_t j1, float bias, int relu, int64_t s0, int64_t s1, float* out) {
  for (int64_t s = s0; s < s1; s += 8) {
    float acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = bias;
    for (int64_t j = j0; j < j1; ++j) {
      const float w = val[j];
      const float* p = src + off[j] + s;
      for (int i = 0; i < 8; ++i) acc[i] += w * p[i];
    }
    for (int i = 0; i < 8; ++i) out[s + i] = (relu && acc[i] < 0.0f) ? 0.0f : acc[i];
  }
}

bool has_avx2() {
#ifdef DNR_X86
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

}  // namespace

extern "C" {

// 1 when the AVX2 + FMA path runs on this CPU, 0 for the portable one.
int dnr_sparse_avx2() { return has_avx2() ? 1 : 0; }

// out[o, :length] = bias[o] + sum_j val[j] * src[off[j] : off[j] + length] over row o's
// nonzeros (indptr[o] <= j < indptr[o + 1]), then ReLU if `relu`. `length` is a multiple of
// 8 * nv (nv in 1, 2, 4); `src` must hold off[j] + length floats for every j. Tasks are
// (block of `block` floats, output channel), block-major, so the input a block reads stays
// in cache across the output channels.
void dnr_sparse_conv(const float* src, const int64_t* off, const int64_t* indptr,
                     const float* val, const float* bias, int relu, int64_t rows,
                     int64_t length, int64_t block, int nv, int threads, float* out) {
  const int64_t nblocks = (length + block - 1) / block;
  const bool avx2 = has_avx2();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t task = 0; task < rows * nblocks; ++task) {
    const int64_t blk = task / rows, o = task % rows;
    const int64_t s0 = blk * block, s1 = std::min(length, s0 + block);
    float* row = out + o * length;
    const int64_t j0 = indptr[o], j1 = indptr[o + 1];
#ifdef DNR_X86
    if (avx2) {
      if (nv == 4) row_tiles_avx2<4>(src, off, val, j0, j1, bias[o], relu, s0, s1, row);
      else if (nv == 2) row_tiles_avx2<2>(src, off, val, j0, j1, bias[o], relu, s0, s1, row);
      else row_tiles_avx2<1>(src, off, val, j0, j1, bias[o], relu, s0, s1, row);
      continue;
    }
#endif
    row_tiles_generic(src, off, val, j0, j1, bias[o], relu, s0, s1, row);
  }
}

}  // extern "C"
