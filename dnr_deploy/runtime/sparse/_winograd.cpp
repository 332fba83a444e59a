// Winograd F(4x4, 3x3) transforms (Lavin and Gray, CVPR 2016) for the 3x3 stride-1 layers that
// DNR keeps 25-50% dense: there the sparse kernel does density x 9 multiply-adds per output and
// pixel, while Winograd does 36 / 16 = 2.25 on dense weights, as one batched GEMM that numpy's
// BLAS runs (winograd.py). These two loops are the rest: the input tiles into the GEMM's
// operand, and its product back to pixels, with the conv epilogue (bias, residual, ReLU).
// Written here rather than in numpy: the einsums and the tile transposes cost 4-10x the GEMM.
//
// Layout: CHWN activations (batch innermost, see _kernels.cpp), so every transform runs on
// vectors of images; the GEMM's operands are V (36, C, T) and M (36, O, T), T = tiles x batch,
// column t = (ty * tiles_w + tx) * batch + n. Plain C ABI, loaded with ctypes by native.py.
#include <stdint.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define DNR_X86 1
#endif

namespace {

constexpr int kRun = 8;  // tiles the output transform gathers at once

// Lanes of images as one value: GCC / Clang vector extensions, so each path below compiles
// them to its own registers (AVX-512, AVX2, or SSE on the portable path); plain float for a
// batch that is no multiple of 4. (The auto-vectorizer left most of these loops
// scalar: it cannot rule out that the residual aliases the output.)
typedef float Lanes4 __attribute__((vector_size(16)));
typedef float Lanes8 __attribute__((vector_size(32)));
typedef float Lanes16 __attribute__((vector_size(64)));
typedef int Mask4 __attribute__((vector_size(16)));
typedef int Mask8 __attribute__((vector_size(32)));
typedef int Mask16 __attribute__((vector_size(64)));

template <class V>
__attribute__((always_inline)) inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V>
__attribute__((always_inline)) inline void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// branch-free (maxss): as a branch, outputs of random sign mispredicted half the time, a third
// of a batch-1 output transform
__attribute__((always_inline)) inline float relu(float v) { return std::max(v, 0.0f); }
__attribute__((always_inline)) inline Lanes4 relu(Lanes4 v) {
  return (Lanes4)((Mask4)v & (Mask4)(v > Lanes4{}));
}
__attribute__((always_inline)) inline Lanes8 relu(Lanes8 v) {
  return (Lanes8)((Mask8)v & (Mask8)(v > Lanes8{}));
}
__attribute__((always_inline)) inline Lanes16 relu(Lanes16 v) {
  return (Lanes16)((Mask16)v & (Mask16)(v > Lanes16{}));
}

// Lane u of a value of lanes (a plain float is its own single lane).
__attribute__((always_inline)) inline float lane(float v, int) { return v; }
template <class V>
__attribute__((always_inline)) inline float lane(V v, int u) { return v[u]; }

// B^T (6 x 6) applied to six rows of lanes; A^T (4 x 6) likewise. G (6 x 3) of the weights is
// applied in winograd.py.
template <class V>
__attribute__((always_inline)) inline void input_rows(const V* d, V* r) {
  r[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
  r[1] = -4.0f * d[1] - 4.0f * d[2] + d[3] + d[4];
  r[2] = 4.0f * d[1] - 4.0f * d[2] - d[3] + d[4];
  r[3] = -2.0f * d[1] - d[2] + 2.0f * d[3] + d[4];
  r[4] = 2.0f * d[1] - d[2] - 2.0f * d[3] + d[4];
  r[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

template <class V>
__attribute__((always_inline)) inline void output_rows(const V* m, V* r) {
  r[0] = m[0] + m[1] + m[2] + m[3] + m[4];
  r[1] = m[1] - m[2] + 2.0f * m[3] - 2.0f * m[4];
  r[2] = m[1] + m[2] + 4.0f * m[3] + 4.0f * m[4];
  r[3] = m[1] - m[2] + 8.0f * m[3] - 8.0f * m[4] + m[5];
}

// One 6 x 6 input tile (rows `rs` floats apart, pixels `ps`) of one lane value of images into
// its 36 rows of V (`ks` floats apart): B^T d B.
template <class V>
__attribute__((always_inline)) inline void input_tile(const float* tile, int64_t rs, int64_t ps,
                                                      float* dst, int64_t ks) {
  V column[6], rows[6][6], line[6], cells[6];
  for (int j = 0; j < 6; ++j) {  // B^T d, column by column
    for (int i = 0; i < 6; ++i) column[i] = load<V>(tile + i * rs + j * ps);
    V combined[6];
    input_rows(column, combined);
    for (int i = 0; i < 6; ++i) rows[i][j] = combined[i];
  }
  for (int i = 0; i < 6; ++i) {  // (B^T d) B, row by row
    for (int j = 0; j < 6; ++j) line[j] = rows[i][j];
    input_rows(line, cells);
    for (int j = 0; j < 6; ++j) store(dst + (i * 6 + j) * ks, cells[j]);
  }
}

// One tile's 36 rows of M (`ks` floats apart) into its 4 x 4 output pixels (rows `rs` floats
// apart, pixels `ps`): A^T M A, plus bias and the residual (rows `res_rs` apart), then ReLU.
template <class V>
__attribute__((always_inline)) inline void output_pixels(const float* m, int64_t ks,
                                                         V (&pixels)[4][4]) {
  V column[6], rows[4][6], line[6];
  for (int j = 0; j < 6; ++j) {  // A^T M, column by column
    for (int i = 0; i < 6; ++i) column[i] = load<V>(m + (i * 6 + j) * ks);
    V combined[4];
    output_rows(column, combined);
    for (int i = 0; i < 4; ++i) rows[i][j] = combined[i];
  }
  for (int i = 0; i < 4; ++i) {  // (A^T M) A, row by row
    for (int j = 0; j < 6; ++j) line[j] = rows[i][j];
    output_rows(line, pixels[i]);
  }
}

template <class V>
__attribute__((always_inline)) inline void output_tile(const float* m, int64_t ks, float bias,
                                                       const float* res, int64_t res_rs,
                                                       bool use_relu, float* dst, int64_t rs,
                                                       int64_t ps) {
  V pixels[4][4];
  output_pixels(m, ks, pixels);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      V value = pixels[i][j] + bias;
      if (res) value += load<V>(res + i * res_rs + j * ps);
      store(dst + i * rs + j * ps, use_relu ? relu(value) : value);
    }
}

enum Path : int64_t { kPortable = 1, kAvx2 = 2, kAvx512 = 3 };


// One input-transform call: tiles tile0 .. tile0 + tiles (row-major, tiles_w a row) of the
// zero-bordered input planes (channel c's 6 x 6 tile (ty, tx) starts at src + c * chan_stride +
// 4 * ty * row_stride + 4 * tx * batch) into V (36, chans, tiles * batch).
struct WinoIn {
  const float* src;
  int64_t chans, chan_stride, row_stride, tiles_w, tile0, tiles, batch, threads;
  float* v;
  int64_t v_stride;  // floats from V[k] to V[k + 1]: C x T plus a pad (see winograd.py)
  int64_t path;      // kPortable, kAvx2 or kAvx512, one this CPU runs (dnr_winograd_has_path)
};

// One output-transform call: M (36, chans, tiles * batch) of tiles tile0 .. tile0 + tiles into
// out (channel o's pixel (i, j) at out + o * chan_stride + i * row_stride + j * batch), adding
// bias, the residual (same strides as its own, or null) and applying ReLU.
struct WinoOut {
  const float* m;
  int64_t chans, tiles_w, tile0, tiles, batch, threads;
  const float* bias;
  int64_t relu;
  float* out;
  int64_t chan_stride, row_stride;
  const float* res;
  int64_t res_chan_stride, res_row_stride;
  int64_t m_stride;  // floats from M[k] to M[k + 1]
  int64_t path;
};


// Single images have no lanes of images: their transforms take L consecutive tiles of a tile
// row as the lanes instead. At batch 1, V's column t is tile t, so a run's lanes are
// consecutive columns. The run's 6 x 6 windows (overlapping, 4 pixels apart) are staged
// lane-major first. One float at a time, the transforms had cost as much as the GEMMs saved
// over the sparse kernel (decisions/2026-12-06-single-images-and-thread-trial.md).
template <class V, int L>
__attribute__((always_inline)) inline void input_run(const WinoIn* a, int64_t c, int64_t t,
                                                     int64_t ty, int64_t tx) {
  alignas(64) float staged[36 * L];
  const float* base = a->src + c * a->chan_stride + 4 * ty * a->row_stride + 4 * tx;
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 6; ++j)
      for (int u = 0; u < L; ++u)
        staged[(i * 6 + j) * L + u] = base[i * a->row_stride + 4 * u + j];
  input_tile<V>(staged, 6 * L, L, a->v + c * a->tiles + t, a->v_stride);
}

// L consecutive tiles of a tile row of one single image's M (row k at m + k * ks) into their
// 4 output rows: the lanes' pixels are put back in order, then bias, residual and ReLU run
// along each contiguous row.
template <class V, int L>
__attribute__((always_inline)) inline void output_run(const WinoOut* a, int64_t o,
                                                      const float* m, int64_t ks, int64_t ty,
                                                      int64_t tx) {
  V pixels[4][4];
  output_pixels(m, ks, pixels);
  alignas(64) float rows[4][4 * L];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      for (int u = 0; u < L; ++u) rows[i][4 * u + j] = lane(pixels[i][j], u);
  const float bias = a->bias[o];
  for (int i = 0; i < 4; ++i) {
    const int64_t at = (4 * ty + i) * a->row_stride + 4 * tx;
    float* dst = a->out + o * a->chan_stride + at;
    const float* res = a->res ? a->res + o * a->res_chan_stride + (4 * ty + i) *
                                    a->res_row_stride + 4 * tx : nullptr;
    for (int x = 0; x < 4 * L; ++x) {
      float value = rows[i][x] + bias + (res ? res[x] : 0.0f);
      dst[x] = a->relu ? relu(value) : value;
    }
  }
}

// How many tiles the next run of a single image takes as lanes: 16, 8 or 4 consecutive tiles
// of one tile row where that many remain (16 only where the path has 16-float vectors), else 1.
inline int run_lanes(int64_t tiles_left, int64_t tiles_w, int64_t tx, bool wide) {
  const int64_t run = std::min(tiles_left, tiles_w - tx);
  return wide && run >= 16 ? 16 : run >= 8 ? 8 : run >= 4 ? 4 : 1;
}

// One input channel c of an input-transform call: its tiles into V.
__attribute__((always_inline)) inline void input_channel(const WinoIn* a, int64_t c) {
  const int64_t ps = a->batch, cols = a->tiles * a->batch;
  if (ps == 1) {
    for (int64_t t = 0; t < a->tiles;) {
      const int64_t ty = (a->tile0 + t) / a->tiles_w, tx = (a->tile0 + t) % a->tiles_w;
      const int lanes = run_lanes(a->tiles - t, a->tiles_w, tx, a->path == kAvx512);
      if (lanes == 16) input_run<Lanes16, 16>(a, c, t, ty, tx);
      else if (lanes == 8) input_run<Lanes8, 8>(a, c, t, ty, tx);
      else if (lanes == 4) input_run<Lanes4, 4>(a, c, t, ty, tx);
      else input_tile<float>(a->src + c * a->chan_stride + 4 * ty * a->row_stride + 4 * tx,
                             a->row_stride, 1, a->v + c * cols + t, a->v_stride);
      t += lanes;
    }
    return;
  }
  const int lanes = ps % 16 == 0 ? 16 : ps % 8 == 0 ? 8 : ps % 4 == 0 ? 4 : 1;
  for (int64_t t = 0; t < a->tiles; ++t) {
    const int64_t ty = (a->tile0 + t) / a->tiles_w, tx = (a->tile0 + t) % a->tiles_w;
    for (int64_t n = 0; n < ps; n += lanes) {
      const float* tile = a->src + c * a->chan_stride + 4 * ty * a->row_stride + 4 * tx * ps + n;
      float* dst = a->v + c * cols + t * ps + n;
      if (lanes == 16) input_tile<Lanes16>(tile, a->row_stride, ps, dst, a->v_stride);
      else if (lanes == 8) input_tile<Lanes8>(tile, a->row_stride, ps, dst, a->v_stride);
      else if (lanes == 4) input_tile<Lanes4>(tile, a->row_stride, ps, dst, a->v_stride);
      else input_tile<float>(tile, a->row_stride, ps, dst, a->v_stride);
    }
  }
}

// One output channel o of an output-transform call: its tiles of M into pixels.
__attribute__((always_inline)) inline void output_channel(const WinoOut* a, int64_t o) {
  const int64_t ps = a->batch, cols = a->tiles * ps;
  const int lanes = ps % 16 == 0 ? 16 : ps % 8 == 0 ? 8 : ps % 4 == 0 ? 4 : 1;
  const int64_t per_run = std::max<int64_t>(1, kRun * 16 / ps);  // tiles a run copies
  const bool use_relu = a->relu != 0;
  const float bias = a->bias[o];
  // M's 36 rows of a run of tiles, copied close together first: read a tile at a time, 32
  // bytes from each of 36 rows, they left the prefetchers behind
  float run[36][kRun * 16];
  for (int64_t t0 = 0; t0 < a->tiles; t0 += per_run) {
    const int64_t count = std::min(per_run, a->tiles - t0);
    for (int k = 0; k < 36; ++k) {
      const float* row = a->m + k * a->m_stride + o * cols + t0 * ps;
      std::copy(row, row + count * ps, run[k]);
    }
    if (ps == 1) {  // single images: runs of consecutive tiles as lanes
      for (int64_t t = t0; t < t0 + count;) {
        const int64_t ty = (a->tile0 + t) / a->tiles_w, tx = (a->tile0 + t) % a->tiles_w;
        const int lanes = run_lanes(t0 + count - t, a->tiles_w, tx, a->path == kAvx512);
        const float* m = &run[0][0] + (t - t0);
        if (lanes == 16) output_run<Lanes16, 16>(a, o, m, kRun * 16, ty, tx);
        else if (lanes == 8) output_run<Lanes8, 8>(a, o, m, kRun * 16, ty, tx);
        else if (lanes == 4) output_run<Lanes4, 4>(a, o, m, kRun * 16, ty, tx);
        else output_run<float, 1>(a, o, m, kRun * 16, ty, tx);
        t += lanes;
      }
      continue;
    }
    for (int64_t t = t0; t < t0 + count; ++t) {
      const int64_t ty = (a->tile0 + t) / a->tiles_w, tx = (a->tile0 + t) % a->tiles_w;
      for (int64_t n = 0; n < ps; n += lanes) {
        const float* m = &run[0][0] + (t - t0) * ps + n;
        const int64_t x = 4 * tx * ps + n, y = 4 * ty;
        float* dst = a->out + o * a->chan_stride + y * a->row_stride + x;
        const float* res = a->res ? a->res + o * a->res_chan_stride + y * a->res_row_stride + x
                                  : nullptr;
        if (lanes == 16)
          output_tile<Lanes16>(m, kRun * 16, bias, res, a->res_row_stride, use_relu, dst,
                               a->row_stride, ps);
        else if (lanes == 8)
          output_tile<Lanes8>(m, kRun * 16, bias, res, a->res_row_stride, use_relu, dst,
                              a->row_stride, ps);
        else if (lanes == 4)
          output_tile<Lanes4>(m, kRun * 16, bias, res, a->res_row_stride, use_relu, dst,
                              a->row_stride, ps);
        else
          output_tile<float>(m, kRun * 16, bias, res, a->res_row_stride, use_relu, dst,
                             a->row_stride, ps);
      }
    }
  }
}

// The same loops compiled for each instruction set (a call per channel, so the per-call cost
// is nothing beside a channel's tiles); the caller picks one by `path`.
void input_portable(const WinoIn* a, int64_t c) { input_channel(a, c); }
void output_portable(const WinoOut* a, int64_t o) { output_channel(a, o); }
#ifdef DNR_X86
__attribute__((target("avx2,fma"))) void input_avx2(const WinoIn* a, int64_t c) {
  input_channel(a, c);
}
__attribute__((target("avx2,fma"))) void output_avx2(const WinoOut* a, int64_t o) {
  output_channel(a, o);
}
__attribute__((target("avx512f"))) void input_avx512(const WinoIn* a, int64_t c) {
  input_channel(a, c);
}
__attribute__((target("avx512f"))) void output_avx512(const WinoOut* a, int64_t o) {
  output_channel(a, o);
}
#endif

bool has_path(int64_t path) {
#ifdef DNR_X86
  if (path == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (path == kAvx512) return __builtin_cpu_supports("avx512f");
#endif
  return path == kPortable;
}

}  // namespace

extern "C" {

// 1 when this CPU runs path (1 portable, 2 AVX2 + FMA, 3 AVX-512), else 0.
int dnr_winograd_has_path(int64_t path) { return has_path(path) ? 1 : 0; }

void dnr_winograd_input(const WinoIn* a) {
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(a->threads))
  for (int64_t c = 0; c < a->chans; ++c) {
#ifdef DNR_X86
    if (a->path == kAvx512) { input_avx512(a, c); continue; }
    if (a->path == kAvx2) { input_avx2(a, c); continue; }
#endif
    input_portable(a, c);
  }
}

// cblas_sgemm with 64-bit integers, as numpy's bundled OpenBLAS exports it
typedef void (*Sgemm64)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                        const float*, int64_t, float, float*, int64_t);

struct WinoGemms {
  void* sgemm;       // the BLAS's cblas_sgemm (native.blas_sgemm: from the loaded library)
  const float* w;    // (36, rows, inner), C-contiguous
  const float* v;    // 36 slices of (inner, cols), `v_stride` floats apart
  float* m;          // 36 slices of (rows, cols), `m_stride` floats apart
  int64_t rows, inner, cols, v_stride, m_stride, threads;
};

// M[k] = W[k] V[k] for the 36 k, shared among threads by rows of M, each part one BLAS call
// on the calling thread (the BLAS kept to one thread of its own): numpy's batched matmul ran
// them on one thread inside a layer split over OpenMP, since BLAS threads and OpenMP's
// spinning workers fought for the cores, so Winograd layers did not speed up at 2 threads.
// Rows, not slices k, so that a thread writes the rows of M that the output transform (a
// static schedule over output channels, the same cut) reads on that thread, from its own L2.
void dnr_winograd_gemms(const WinoGemms* a) {
  const auto sgemm = reinterpret_cast<Sgemm64>(a->sgemm);
  const int64_t threads = std::max<int64_t>(1, a->threads);
  const int64_t part = (a->rows + threads - 1) / threads;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(threads))
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t r0 = t * part, rows = std::min(a->rows, r0 + part) - r0;
    if (rows <= 0) continue;
    for (int64_t k = 0; k < 36; ++k)
      sgemm(101, 111, 111, rows, a->cols, a->inner, 1.0f,
            a->w + (k * a->rows + r0) * a->inner, a->inner, a->v + k * a->v_stride, a->cols,
            0.0f, a->m + k * a->m_stride + r0 * a->cols, a->cols);
  }
}

void dnr_winograd_output(const WinoOut* a) {
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(a->threads))
  for (int64_t o = 0; o < a->chans; ++o) {
#ifdef DNR_X86
    if (a->path == kAvx512) { output_avx512(a, o); continue; }
    if (a->path == kAvx2) { output_avx2(a, o); continue; }
#endif
    output_portable(a, o);
  }
}

}  // extern "C"
