// Direct sparse convolution (Park et al., ICLR 2017) for the sparse runtime: see kernels.py for
// the CHWN layout and the shifted-plane formulation. Each task keeps a tile of up to 8 vectors
// of 8 (AVX2) or 16 (AVX-512) output floats of one output channel in registers while its nonzeros
// stream past: one broadcast, one offset and up to 8 unaligned loads and FMAs per nonzero, no
// store until the channel's nonzeros are done (the numba kernel loads and stores the
// accumulator for every nonzero: about 2-3x slower here, docs/notes/issue13.md).
//
// A tile's vectors sit at positions the caller lists, so the stretch need not be contiguous:
// where a row's pixels fill whole vectors, only pixels are listed and the garbage columns of
// the shifted-plane formulation are never computed (half the work of a 2x2 layer, a third of a
// 4x4 one), and the layer can write straight into the next layer's zero-bordered input planes.
// The epilogue adds a residual (ResNet's shortcut) and applies ReLU, so an addition costs no
// pass of its own. Plain C ABI, loaded with ctypes: no Python headers, no build-time numpy.
// Pooling and the polyphase split live here too: numba's dispatch of a strided array cost
// 5-10 us a call, as much as a small net's whole layer.
#include <stdint.h>

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DNR_X86 1
#endif

namespace {

constexpr int kTile = 8;  // vectors a tile: 8 FMAs for each nonzero's two scalar loads

// One output channel's part of a task.
struct Row {
  const float* src;
  const int32_t* off;  // the channel's nonzeros: input offsets and values
  const float* val;
  int64_t count;
  float bias;
  const float* res;  // residual row (same positions as the output), or null
  int relu;
  float* out;
  // a segment of the channel's nonzeros (dnr_sparse_conv with segments): start from the
  // partial sums in `out` instead of the bias, and leave out the residual and ReLU unless it
  // is the last segment
  bool from_partial = false, finish = true;
};

#ifdef DNR_X86
// One tile: NV vectors of 8 output floats, at pos[0 .. NV). kRun: the vectors lie side by side
// (pos[v] = pos[0] + 8 v), so each load is a constant displacement from one pointer a nonzero;
// with eight positions in registers the compiler spilled, and spent an address sum per FMA
// (docs/decisions/2026-12-07-avx2-segments.md).
template <int NV, bool kRun = false>
__attribute__((target("avx2,fma"), always_inline)) inline void tile_avx2(Row r,
                                                                         const int32_t* pos) {
  // an FMA takes 4 cycles and two issue a cycle, so 8 independent chains keep the units
  // busy: a tile of fewer than 8 vectors takes even and odd nonzeros in two sets of chains
  constexpr bool kTwoSets = NV <= 4;
  constexpr int kSets = kTwoSets ? 2 : 1;
  int32_t q[NV];
  for (int v = 0; v < NV; ++v) q[v] = kRun ? 8 * v : pos[v];
  if (kRun) {  // everything relative to the run's first vector
    r.src += pos[0];
    r.out += pos[0];
    if (r.res) r.res += pos[0];
  }
  __m256 acc[kSets][NV];
  for (int v = 0; v < NV; ++v) {
    acc[0][v] = r.from_partial ? _mm256_loadu_ps(r.out + q[v]) : _mm256_set1_ps(r.bias);
    if (kTwoSets) acc[kSets - 1][v] = _mm256_setzero_ps();
  }
  const float* src = r.src;
  const int32_t* off = r.off;
  const float* val = r.val;
  const int64_t count = r.count;
  int64_t j = 0;
  for (; j + 1 < count; j += 2) {
    const __m256 w0 = _mm256_set1_ps(val[j]), w1 = _mm256_set1_ps(val[j + 1]);
    const float* p0 = src + off[j];
    const float* p1 = src + off[j + 1];
    for (int v = 0; v < NV; ++v) {
      acc[0][v] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p0 + q[v]), acc[0][v]);
      acc[kSets - 1][v] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p1 + q[v]), acc[kSets - 1][v]);
    }
  }
  if (j < count) {
    const __m256 w = _mm256_set1_ps(val[j]);
    const float* p = src + off[j];
    for (int v = 0; v < NV; ++v)
      acc[0][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + q[v]), acc[0][v]);
  }
  for (int v = 0; v < NV; ++v) {
    __m256 a = kTwoSets ? _mm256_add_ps(acc[0][v], acc[kSets - 1][v]) : acc[0][v];
    if (r.finish && r.res) a = _mm256_add_ps(a, _mm256_loadu_ps(r.res + q[v]));
    if (r.finish && r.relu) a = _mm256_max_ps(a, _mm256_setzero_ps());
    _mm256_storeu_ps(r.out + q[v], a);
  }
}

// `tiles` tiles of NV vectors each, at pos[0 .. NV * tiles).
template <int NV>
__attribute__((target("avx2,fma"))) void tiles_avx2(const Row& r, const int32_t* pos,
                                                    int64_t tiles) {
  for (int64_t t = 0; t < tiles; ++t, pos += NV) {
    bool run = true;
    for (int v = 1; v < NV; ++v) run = run && pos[v] == pos[0] + 8 * v;
    if (run)
      tile_avx2<NV, true>(r, pos);
    else
      tile_avx2<NV>(r, pos);
  }
}

// The same tile in AVX-512 (16 floats a vector), for chunks of 8 images, whose pixels pair up
// into 16-float vectors. A copy of tile_avx2 with the wider intrinsics: GCC's target attribute
// cannot be a template parameter, and a shared template without one inlines into neither.
template <int NV>
__attribute__((target("avx512f"), always_inline)) inline void tile_avx512(const Row& r,
                                                                           const int32_t* pos) {
  constexpr bool kTwoSets = NV <= 4;
  constexpr int kSets = kTwoSets ? 2 : 1;
  int32_t q[NV];
  for (int v = 0; v < NV; ++v) q[v] = pos[v];
  __m512 acc[kSets][NV];
  for (int v = 0; v < NV; ++v) {
    acc[0][v] = r.from_partial ? _mm512_loadu_ps(r.out + q[v]) : _mm512_set1_ps(r.bias);
    if (kTwoSets) acc[kSets - 1][v] = _mm512_setzero_ps();
  }
  const float* src = r.src;
  const int32_t* off = r.off;
  const float* val = r.val;
  const int64_t count = r.count;
  int64_t j = 0;
  for (; j + 1 < count; j += 2) {
    const __m512 w0 = _mm512_set1_ps(val[j]), w1 = _mm512_set1_ps(val[j + 1]);
    const float* p0 = src + off[j];
    const float* p1 = src + off[j + 1];
    for (int v = 0; v < NV; ++v) {
      acc[0][v] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p0 + q[v]), acc[0][v]);
      acc[kSets - 1][v] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(p1 + q[v]), acc[kSets - 1][v]);
    }
  }
  if (j < count) {
    const __m512 w = _mm512_set1_ps(val[j]);
    const float* p = src + off[j];
    for (int v = 0; v < NV; ++v)
      acc[0][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + q[v]), acc[0][v]);
  }
  for (int v = 0; v < NV; ++v) {
    __m512 a = kTwoSets ? _mm512_add_ps(acc[0][v], acc[kSets - 1][v]) : acc[0][v];
    if (r.finish && r.res) a = _mm512_add_ps(a, _mm512_loadu_ps(r.res + q[v]));
    if (r.finish && r.relu) a = _mm512_max_ps(a, _mm512_setzero_ps());
    _mm512_storeu_ps(r.out + q[v], a);
  }
}

template <int NV>
__attribute__((target("avx512f"))) void tiles_avx512(const Row& r, const int32_t* pos,
                                                     int64_t tiles) {
  for (int64_t t = 0; t < tiles; ++t, pos += NV) tile_avx512<NV>(r, pos);
}
#endif

// Portable path (no AVX2): the same tiles, left to the compiler's vectoriser.
void tile_generic(const Row& r, const int32_t* pos, int nv, int width) {
  for (int v = 0; v < nv; ++v) {
    for (int h = 0; h < width; h += 8) {
      const int64_t q = pos[v] + h;
      float acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = r.from_partial ? r.out[q + i] : r.bias;
      for (int64_t j = 0; j < r.count; ++j) {
        const float w = r.val[j];
        const float* p = r.src + r.off[j] + q;
        for (int i = 0; i < 8; ++i) acc[i] += w * p[i];
      }
      for (int i = 0; i < 8; ++i) {
        float a = r.finish && r.res ? acc[i] + r.res[q + i] : acc[i];
        r.out[q + i] = (r.finish && r.relu && a < 0.0f) ? 0.0f : a;
      }
    }
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

bool has_avx512() {
#ifdef DNR_X86
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

// Which instruction set runs a call with vectors of `width` floats (8 or 16).
enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa pick_isa(int64_t width) {
  if (width == 16 && has_avx512()) return Isa::kAvx512;
  if (width == 8 && has_avx2()) return Isa::kAvx2;
  return Isa::kGeneric;
}


// The last, shorter tile of a channel: `rest` (1 .. kTile - 1) vectors.
template <template <int> class Tiles>
void last_tile(const Row& r, const int32_t* last, int64_t rest) {
  switch (rest) {
    case 7: Tiles<7>::run(r, last); break;
    case 6: Tiles<6>::run(r, last); break;
    case 5: Tiles<5>::run(r, last); break;
    case 4: Tiles<4>::run(r, last); break;
    case 3: Tiles<3>::run(r, last); break;
    case 2: Tiles<2>::run(r, last); break;
    case 1: Tiles<1>::run(r, last); break;
    default: break;
  }
}

#ifdef DNR_X86
template <int NV>
struct OneAvx2 {
  static void run(const Row& r, const int32_t* pos) { tiles_avx2<NV>(r, pos, 1); }
};
template <int NV>
struct OneAvx512 {
  static void run(const Row& r, const int32_t* pos) { tiles_avx512<NV>(r, pos, 1); }
};
#endif

// Tiles t0 .. t1 of one output channel: full tiles, then the last, shorter one.
void run_tiles(const Row& r, const int32_t* pos, int64_t npos, int64_t t0, int64_t t1, Isa isa,
               int width) {
  const int64_t full = std::min(t1, npos / kTile);
#ifdef DNR_X86
  if (isa == Isa::kAvx512) {
    if (full > t0) tiles_avx512<kTile>(r, pos + kTile * t0, full - t0);
    if (t1 > full) last_tile<OneAvx512>(r, pos + kTile * full, npos - kTile * full);
    return;
  }
  if (isa == Isa::kAvx2) {
    if (full > t0) tiles_avx2<kTile>(r, pos + kTile * t0, full - t0);
    if (t1 > full) last_tile<OneAvx2>(r, pos + kTile * full, npos - kTile * full);
    return;
  }
#endif
  for (int64_t t = t0; t < t1; ++t)
    tile_generic(r, pos + kTile * t, static_cast<int>(std::min<int64_t>(kTile, npos - kTile * t)),
                 width);
}

// row(output row, top input row, bottom input row) for each output row of a 2 x 2 pool.
template <class RowFn>
void pool2_rows(const float* x, int64_t chans, int64_t xc, int64_t xrow, int64_t ho, float* out,
                int64_t oc, int64_t orow, RowFn row) {
  for (int64_t c = 0; c < chans; ++c)
    for (int64_t i = 0; i < ho; ++i) {
      const float* top = x + c * xc + 2 * i * xrow;
      row(out + c * oc + i * orow, top, top + xrow);
    }
}

}  // namespace

extern "C" {

// 1 when the AVX2 + FMA path runs on this CPU, 0 for the portable one.
int dnr_sparse_avx2() { return has_avx2() ? 1 : 0; }

// 1 when the AVX-512 path runs on this CPU (the caller may then pass 16-float vectors).
int dnr_sparse_avx512() { return has_avx512() ? 1 : 0; }

// The arguments of one convolution call, in one struct: ctypes converts each argument of a
// call anew (about 0.15 us each), which for 15 arguments was a fifth of a small layer's time.
struct ConvArgs {
  const float* src;
  const int32_t* off;
  const int64_t* indptr;
  const float* val;
  const float* bias;
  const int32_t* pos;
  int64_t npos;
  int64_t block;
  int64_t rows;
  int64_t threads;
  int64_t relu;
  float* out;
  int64_t out_stride;
  const float* res;
  int64_t res_stride;
  int64_t width;  // floats a listed vector position covers: 8 (AVX2) or 16 (AVX-512)
  // > 0: the nonzeros come in `segments` segments of input channels, segment-major:
  // seg[s * rows + o] .. seg[s * rows + o + 1] are row o's in segment s (`indptr` unused), and
  // a task runs every segment over `group` tiles before the next tiles (dnr_sparse_conv)
  int64_t segments;
  const int64_t* seg;
  int64_t group;
};

static void conv_segments(const ConvArgs* a);

// For each output channel o and each listed vector position q (pos[0 .. npos), in floats):
//   out[o * out_stride + q + i] = relu(bias[o] + sum_j val[j] * src[off[j] + q + i]
//                                      + res[o * res_stride + q + i]),  i < width,
// over row o's nonzeros (indptr[o] <= j < indptr[o + 1]); `res` may be null (no residual).
// Positions go 8 to a tile; tasks are (block of `block` tiles, output channel), block-major,
// so the input a block reads stays in cache across the output channels. `src` must hold
// off[j] + q + width floats for every j and q.
void dnr_sparse_conv(const ConvArgs* a) {
  if (a->segments > 0) return conv_segments(a);
  const int64_t tiles = (a->npos + kTile - 1) / kTile;
  const int64_t nblocks = (tiles + a->block - 1) / a->block;
  const Isa isa = pick_isa(a->width);
  const int width = static_cast<int>(a->width);
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(a->threads))
  for (int64_t task = 0; task < a->rows * nblocks; ++task) {
    const int64_t blk = task / a->rows, o = task % a->rows;
    const int64_t j0 = a->indptr[o];
    const Row r{a->src, a->off + j0, a->val + j0, a->indptr[o + 1] - j0, a->bias[o],
                a->res ? a->res + o * a->res_stride : nullptr, static_cast<int>(a->relu),
                a->out + o * a->out_stride};
    run_tiles(r, a->pos, a->npos, blk * a->block, std::min(tiles, (blk + 1) * a->block), isa,
              width);
  }
}

// dnr_sparse_conv over segments of input channels: a task takes `group` tiles of positions
// and runs segment 0 of every output channel of its rows, then segment 1, ..., keeping the
// partial sums in `out`. The input a segment reads for those tiles stays in cache while every
// channel uses it; block-major over whole channels, each of a tile's loads came from L2, and
// the AVX2 kernel ran at half its speed on inputs that fit L1 (docs/decisions/
// 2026-12-07-avx2-segments.md). Tasks are (tile group, block of rows) so that small layers still
// share among threads.
static void conv_segments(const ConvArgs* a) {
  const int64_t tiles = (a->npos + kTile - 1) / kTile;
  const int64_t group = std::max<int64_t>(1, a->group);
  const int64_t ngroups = (tiles + group - 1) / group;
  // rows in blocks only where tile groups are too few to share among threads
  int64_t row_blocks = 1;
  while (a->threads > 1 && ngroups * row_blocks < 4 * a->threads && row_blocks * 2 <= a->rows)
    row_blocks *= 2;
  const int64_t rows_per_block = (a->rows + row_blocks - 1) / row_blocks;
  const Isa isa = pick_isa(a->width);
  const int width = static_cast<int>(a->width);
  const int64_t last = a->segments - 1;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(a->threads))
  for (int64_t task = 0; task < ngroups * row_blocks; ++task) {
    const int64_t t0 = task / row_blocks * group, t1 = std::min(tiles, t0 + group);
    const int64_t o0 = task % row_blocks * rows_per_block;
    const int64_t o1 = std::min(a->rows, o0 + rows_per_block);
    for (int64_t s = 0; s <= last; ++s)
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t j0 = a->seg[s * a->rows + o], j1 = a->seg[s * a->rows + o + 1];
        if (j0 == j1 && s > 0 && s < last) continue;  // nothing to add, nothing to finish
        Row r{a->src, a->off + j0, a->val + j0, j1 - j0, a->bias[o],
              a->res ? a->res + o * a->res_stride : nullptr, static_cast<int>(a->relu),
              a->out + o * a->out_stride};
        r.from_partial = s > 0;
        r.finish = s == last;
        run_tiles(r, a->pos, a->npos, t0, t1, isa, width);
      }
  }
}

// out[c * oc + i * orow + j * batch + n] = the max over the k x k window of
// x[c * xc + (i * k + a) * xrow + (j * k + b) * batch + n], for i < ho, j < wo, n < batch:
// CHWN in and out, each side with its own channel and row strides (floats), so the input can
// be a layer's output with garbage columns and the output the next layer's padded planes.
void dnr_max_pool(const float* x, int64_t chans, int64_t xc, int64_t xrow, int64_t ho,
                  int64_t wo, int64_t batch, int64_t k, float* out, int64_t oc, int64_t orow) {
#ifdef DNR_X86
  if (k == 2 && batch % 4 == 0) {  // VGG's pools on chunks of 4 images: 4 floats a vector
    pool2_rows(x, chans, xc, xrow, ho, out, oc, orow,
               [wo, batch](float* o, const float* top, const float* bottom) {
                 for (int64_t j = 0; j < wo; ++j)
                   for (int64_t n = 0; n < batch; n += 4) {
                     const int64_t a = 2 * j * batch + n, b = a + batch;
                     const __m128 m =
                         _mm_max_ps(_mm_max_ps(_mm_loadu_ps(top + a), _mm_loadu_ps(top + b)),
                                    _mm_max_ps(_mm_loadu_ps(bottom + a), _mm_loadu_ps(bottom + b)));
                     _mm_storeu_ps(o + j * batch + n, m);
                   }
               });
    return;
  }
#endif
  if (k == 2 && batch == 1) {  // single images (the default net's batch 1): no window loops
    pool2_rows(x, chans, xc, xrow, ho, out, oc, orow,
               [wo](float* o, const float* top, const float* bottom) {
                 for (int64_t j = 0; j < wo; ++j)
                   o[j] = std::max(std::max(top[2 * j], top[2 * j + 1]),
                                   std::max(bottom[2 * j], bottom[2 * j + 1]));
               });
    return;
  }
  for (int64_t c = 0; c < chans; ++c)
    for (int64_t i = 0; i < ho; ++i) {
      float* o = out + c * oc + i * orow;
      const float* top = x + c * xc + i * k * xrow;
      for (int64_t j = 0; j < wo; ++j)
        for (int64_t n = 0; n < batch; ++n) {
          const float* window = top + j * k * batch + n;
          float m = window[0];
          for (int64_t a = 0; a < k; ++a)
            for (int64_t b = 0; b < k; ++b) m = std::max(m, window[a * xrow + b * batch]);
          o[j * batch + n] = m;
        }
    }
}

// out[c * batch + n] = the mean of x[c * xc + h * xrow + w * batch + n] over h < height,
// w < width: global average pooling of a CHWN view (garbage columns skipped).
void dnr_global_avg_pool(const float* x, int64_t chans, int64_t xc, int64_t xrow,
                         int64_t height, int64_t width, int64_t batch, float* out) {
  const float scale = 1.0f / static_cast<float>(height * width);
  if (batch == 1) {  // a sum per channel in registers: through `out` (which may alias x, for
    // all the compiler knows) each addition waited for the last one's store: 8.6 us for the
    // default net's 128 x 4 x 4 at batch 1, a tenth of its whole call
    for (int64_t c = 0; c < chans; ++c) {
      float even = 0.0f, odd = 0.0f;
      for (int64_t h = 0; h < height; ++h) {
        const float* line = x + c * xc + h * xrow;
        int64_t w = 0;
        for (; w + 1 < width; w += 2) {
          even += line[w];
          odd += line[w + 1];
        }
        if (w < width) even += line[w];
      }
      out[c] = (even + odd) * scale;
    }
    return;
  }
  for (int64_t c = 0; c < chans; ++c) {
    float* o = out + c * batch;
    for (int64_t n = 0; n < batch; ++n) o[n] = 0.0f;
    for (int64_t h = 0; h < height; ++h) {
      const float* line = x + c * xc + h * xrow;
      for (int64_t w = 0; w < width; ++w)
        for (int64_t n = 0; n < batch; ++n) o[n] += line[w * batch + n];
    }
    for (int64_t n = 0; n < batch; ++n) o[n] *= scale;
  }
}

// planes[(a * stride + b) * chans + c][i][j][n] = x[c][stride * i + a - pad][stride * j + b - pad][n]
// for the phases with used[a * stride + b] (planes of hq x wq pixels of batch floats each);
// cells that fall in the padding are left as they are (zero). x is CHWN with (width, batch)
// contiguous and the given channel and row strides (floats).
void dnr_split_phases(const float* x, int64_t chans, int64_t xc, int64_t xrow, int64_t height,
                      int64_t width, int64_t batch, int64_t stride, int64_t pad,
                      const uint8_t* used, float* planes, int64_t hq, int64_t wq) {
  const int64_t plane = hq * wq * batch;
  for (int64_t a = 0; a < stride; ++a)
    for (int64_t b = 0; b < stride; ++b) {
      if (!used[a * stride + b]) continue;
      // the plane columns j whose source column stride * j + b - pad lies inside the image
      const int64_t j0 = std::max<int64_t>(0, (pad - b + stride - 1) / stride);
      const int64_t j1 = std::min<int64_t>(wq, (width - 1 + pad - b) / stride + 1);
      for (int64_t c = 0; c < chans; ++c)
        for (int64_t i = 0; i < hq; ++i) {
          const int64_t h = stride * i + a - pad;
          if (h < 0 || h >= height) continue;
          const float* line = x + c * xc + h * xrow + (stride * j0 + b - pad) * batch;
          float* o = planes + ((a * stride + b) * chans + c) * plane + (i * wq + j0) * batch;
          if (batch == 1) {  // a strided row copy: the loop below spent its time on loop
            // control for one float a pixel (ResNet-18's six stride-2 layers at batch 1 lost
            // 0.28 ms of 6 to their splits)
            for (int64_t j = 0; j < j1 - j0; ++j) o[j] = line[stride * j];
            continue;
          }
          for (int64_t j = j0; j < j1; ++j, line += stride * batch, o += batch)
            for (int64_t n = 0; n < batch; ++n) o[n] = line[n];
        }
    }
}

}  // extern "C"
