// Machine code generated at load time for one sparse conv layer (AVX-512), so that its mask
// is compiled in: codegen.py, and docs/decisions/2026-12-06-generated-code.md.
//
// The ahead-of-time kernel (_kernels.cpp) keeps one output channel's tile in registers and
// reads an offset and a value per nonzero. The code here keeps R output channels of one
// vector position in registers (zmm0 .. zmm{R-1}) and walks the input columns (channel, tap)
// that any of the R channels uses: each column's vector is loaded once and multiply-added into
// every channel with a weight there, the weight a broadcast memory operand. No index, no
// branch per nonzero. benchmarks/generated_code.py measured what such code buys with gcc
// standing in for this emitter (a deployment has no compiler): 1.5-2.5x the kernel on layers
// at density 0.3-0.6.
//
// Weights are data, never code: every value an instruction carries is a register number, a
// displacement bounded below 2^31 and checked here, or a fixed opcode. Pages are written, then
// made read + execute (never writable and executable at once). No assembler library exists
// on the package registries that ships in a wheel for every platform and is maintained
// (asmjit and xbyak are C++ sources), and seven vector instruction forms, a prefetch and a
// few fixed general-purpose ones are all this needs; tests/test_codegen.py disassembles the
// code with objdump and refuses any other mnemonic.
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int kMaxRows = 28;  // accumulators zmm0 .. zmm27; zmm30 zero, zmm31 the input
constexpr int kZero = 30, kInput = 31;
constexpr int64_t kMaxCode = int64_t{1} << 28;  // 256 MiB: a bound, far above any layer
constexpr int64_t kMaxSpans = 4096;  // segments a block when cut at fixed offsets
// Offsets, strides and weight slots are refused from here up: below 2^31 with room for the
// moving pointers' steps (each at most 8 KiB + 64 past an offset), so that no displacement or
// immediate can overflow its 32 bits
constexpr int64_t kMaxDisp = (int64_t{1} << 31) - (int64_t{1} << 16);

// General-purpose register numbers (the low 3 bits go in ModRM, bit 3 in REX / EVEX.B).
enum Gpr { kRax = 0, kRcx = 1, kRdx = 2, kRbx = 3, kRsi = 6, kRdi = 7, kR8 = 8, kR9 = 9,
           kR10 = 10, kR11 = 11, kR12 = 12, kR13 = 13, kR14 = 14, kR15 = 15 };

class Emitter {
 public:
  std::vector<uint8_t> code;

  void bytes(std::initializer_list<uint8_t> list) { code.insert(code.end(), list); }
  void dword(int64_t v) {
    for (int i = 0; i < 4; ++i) code.push_back(static_cast<uint8_t>((v >> (8 * i)) & 0xff));
  }

  // A 512-bit EVEX instruction: `reg` in ModRM.reg, `nds` in EVEX.vvvv (0 when unused), and
  // either a register (`rm_zmm` >= 0) or the memory operand [base + disp32] (`bcast`: a 32-bit
  // element broadcast to 16). map: 1 = 0F, 2 = 0F38; pp: 0 = none, 1 = 66.
  // A displacement that is a multiple of the operand's size `n` (64 for a whole vector, 4 for
  // a broadcast float) within 127 of them takes one byte (EVEX's compressed disp8), else four.
  void evex(int map, int pp, uint8_t opcode, int reg, int nds, int rm_zmm, int base,
            int64_t disp, bool bcast = false, int n = 64) {
    const bool memory = rm_zmm < 0;
    const int rm = memory ? base : rm_zmm;
    const uint8_t p0 = static_cast<uint8_t>(((~reg >> 3) & 1) << 7 |
                                            (memory ? 1 : ((~rm >> 4) & 1)) << 6 |
                                            ((~rm >> 3) & 1) << 5 | ((~reg >> 4) & 1) << 4 | map);
    const uint8_t p1 = static_cast<uint8_t>((~nds & 0xf) << 3 | 1 << 2 | pp);
    const uint8_t p2 = static_cast<uint8_t>(2 << 5 | (bcast ? 1 : 0) << 4 |
                                            ((~nds >> 4) & 1) << 3);
    bytes({0x62, p0, p1, p2, opcode});
    if (memory && disp % n == 0 && disp / n >= -128 && disp / n <= 127) {
      code.push_back(static_cast<uint8_t>(0x40 | (reg & 7) << 3 | (base & 7)));  // mod 01
      code.push_back(static_cast<uint8_t>(disp / n));
    } else if (memory) {
      code.push_back(static_cast<uint8_t>(0x80 | (reg & 7) << 3 | (base & 7)));  // mod 10
      dword(disp);
    } else {
      code.push_back(static_cast<uint8_t>(0xc0 | (reg & 7) << 3 | (rm & 7)));
    }
  }

  void broadcast(int zmm, int base, int64_t disp) {
    evex(2, 1, 0x18, zmm, 0, -1, base, disp, false, 4);
  }
  void load(int zmm, int base, int64_t disp) { evex(1, 0, 0x10, zmm, 0, -1, base, disp); }
  void store(int zmm, int base, int64_t disp) { evex(1, 0, 0x11, zmm, 0, -1, base, disp); }
  // acc += x * (broadcast float at [base + disp])
  void fma_broadcast(int acc, int x, int base, int64_t disp) {
    evex(2, 1, 0xb8, acc, x, -1, base, disp, true, 4);
  }
  void add(int zmm, int base, int64_t disp) { evex(1, 0, 0x58, zmm, zmm, -1, base, disp); }
  void max(int zmm, int other) { evex(1, 0, 0x5f, zmm, zmm, other, 0, 0); }
  void zero(int zmm) { evex(1, 1, 0xef, zmm, zmm, zmm, 0, 0); }  // vpxord

  // mov dst, [src + disp8]
  void load_gpr(int dst, int src, int disp8) {
    bytes({static_cast<uint8_t>(0x48 | ((dst >> 3) & 1) << 2), 0x8b,
           static_cast<uint8_t>(0x40 | (dst & 7) << 3 | (src & 7)),
           static_cast<uint8_t>(disp8)});
  }
  // lea dst, [base + rax * 4]
  void lea_index4(int dst, int base) {
    bytes({static_cast<uint8_t>(0x48 | ((dst >> 3) & 1) << 2 | ((base >> 3) & 1)), 0x8d,
           static_cast<uint8_t>((dst & 7) << 3 | 4),
           static_cast<uint8_t>(0x80 | (base & 7))});
  }
  int64_t here() const { return static_cast<int64_t>(code.size()); }
  // a rel32 jump's target, patched once known
  void patch(int64_t at, int64_t target) {
    const int64_t rel = target - (at + 4);
    for (int i = 0; i < 4; ++i) code[at + i] = static_cast<uint8_t>((rel >> (8 * i)) & 0xff);
  }
};

// What the generated function reads (its only argument, in rdi).
struct Frame {
  const float* src;  // input planes, at the first vector position's base
  float* out;        // this block's first output channel
  const float* data; // this block's biases, then its weights in the order the code reads them
  const int32_t* pos;  // vector positions (floats), `count` of them, count >= 1
  int64_t count;
  const float* res;  // this block's first residual channel, or null
  int64_t res_stride_bytes;
  // output vector positions, `count` of them: `pos` read at a stride (a strided conv reading
  // its input planes in place) or the same array
  const int32_t* out_pos;
  const uint8_t* next_code;  // the code of the segment that runs next, prefetched meanwhile
};

// (column offset, row) of a nonzero of a block, and its index in the CSR.
struct Use {
  int32_t offset;
  int row;
  int32_t index;
};

// One segment of a block: the function for rows [0, rows) of the block over the nonzeros
// uses[u0 .. u1), looping over the call's positions. The first segment starts from the
// biases, a later one from the partial sums the one before stored; the last adds the residual
// and applies ReLU. Weights are read from `data` at slot rows + u (the biases at 0 .. rows).
// Returns false when a displacement would not fit in 32 bits.
bool emit_segment(Emitter& e, const std::vector<Use>& uses, size_t u0, size_t u1, int rows,
                  int64_t out_stride, bool first, bool last, bool relu, size_t prefetch) {
  e.bytes({0x53, 0x41, 0x54, 0x41, 0x55, 0x41, 0x56, 0x41, 0x57});  // push rbx, r12 .. r15
  e.load_gpr(kRsi, kRdi, offsetof(Frame, out));
  e.load_gpr(kR15, kRdi, offsetof(Frame, next_code));
  e.load_gpr(kR14, kRdi, offsetof(Frame, out_pos));
  e.load_gpr(kR12, kRdi, offsetof(Frame, data));
  e.load_gpr(kRcx, kRdi, offsetof(Frame, pos));
  e.load_gpr(kR8, kRdi, offsetof(Frame, count));
  e.load_gpr(kR9, kRdi, offsetof(Frame, res));
  e.load_gpr(kRbx, kRdi, offsetof(Frame, res_stride_bytes));
  e.load_gpr(kRdi, kRdi, offsetof(Frame, src));
  e.zero(kZero);
  const int64_t loop = e.here();
  e.bytes({0x48, 0x63, 0x01,    // movsxd rax, dword [rcx]
           0x4c, 0x89, 0xe2});  // mov rdx, r12: the block's data
  e.lea_index4(kR10, kRdi);     // r10: the input at this position
  e.bytes({0x49, 0x63, 0x06});  // movsxd rax, dword [r14]
  e.lea_index4(kR11, kRsi);     // r11: the output at this position (and rax its offset)
  e.bytes({0x4d, 0x8d, 0x6a, 0x20});  // lea r13, [r10 + 32]
  for (int r = 0; r < rows; ++r) {
    if (first)
      e.broadcast(r, kRdx, 4 * r);  // the bias
    else
      e.load(r, kR11, r * out_stride * 4);  // the partial sum
  }
  // rdx moves along the weights, 256 at a time, so each multiply-add's weight is a one-byte
  // displacement: 7 bytes of code a nonzero instead of 10
  int64_t base = 0;
  // Likewise r10 and r13 (r10 + 32: a pixel of 8 images is 32 bytes) move along the input, so
  // that a column's load is a one-byte multiple of 64 from one of them: 8 bytes, not 11
  int64_t input_base = 0;
  for (size_t u = u0; u < u1; ++u) {
    if (u == u0 || uses[u].offset != uses[u - 1].offset) {
      const int64_t at = int64_t{uses[u].offset} * 4;
      if (at > kMaxDisp || at < 0) return false;
      const bool odd = at % 64 != 0;
      if (at - (odd ? 32 : 0) - input_base > 127 * 64) {
        const int64_t next = at - at % 64 + 128 * 64;
        e.bytes({0x49, 0x81, 0xc2});  // add r10, imm32
        e.dword(next - input_base);
        e.bytes({0x49, 0x81, 0xc5});  // add r13, imm32
        e.dword(next - input_base);
        input_base = next;
      }
      e.load(kInput, odd ? kR13 : kR10, at - (odd ? 32 : 0) - input_base);
    }
    const int64_t slot = rows + static_cast<int64_t>(u);
    if (4 * slot - base > 127 * 4) {
      e.bytes({0x48, 0x81, 0xc2});  // add rdx, imm32
      e.dword(4 * slot + 128 * 4 - base);
      base = 4 * slot + 128 * 4;
    }
    e.fma_broadcast(uses[u].row, kInput, kRdx, 4 * slot - base);
    // every `prefetch` multiply-adds, a line of the next segment's code towards L2: a layer's
    // code (1.6 MB on VGG16's first 4x4 layer) is not in cache at its call, and fetching code
    // has far fewer misses in flight than loading data; asked for all at once before a segment
    // ran, the lines gained nothing (probe)
    if (prefetch > 0 && (u - u0) % prefetch == prefetch - 1) {
      const int64_t line = 64 * static_cast<int64_t>((u - u0) / prefetch);
      if (line > kMaxDisp) return false;
      e.bytes({0x41, 0x0f, 0x18, 0x97});  // prefetcht1 [r15 + disp32]
      e.dword(line);
    }
  }
  if (last) {
    e.bytes({0x4d, 0x85, 0xc9, 0x0f, 0x84});  // test r9, r9; jz plain
    const int64_t to_plain = e.here();
    e.dword(0);
    e.lea_index4(kRax, kR9);  // rax: the residual at this position
    for (int r = 0; r < rows; ++r) {
      e.add(r, kRax, 0);
      e.bytes({0x48, 0x01, 0xd8});  // add rax, rbx
    }
    e.patch(to_plain, e.here());
  }
  for (int r = 0; r < rows; ++r) {
    if (last && relu) e.max(r, kZero);
    e.store(r, kR11, r * out_stride * 4);
  }
  e.bytes({0x48, 0x83, 0xc1, 0x04,   // add rcx, 4
           0x49, 0x83, 0xc6, 0x04,   // add r14, 4
           0x49, 0xff, 0xc8,         // dec r8
           0x0f, 0x85});             // jnz loop
  const int64_t to_loop = e.here();
  e.dword(0);
  e.patch(to_loop, loop);
  e.bytes({0x41, 0x5f, 0x41, 0x5e, 0x41, 0x5d, 0x41, 0x5c, 0x5b,  // pop r15 .. r12, rbx
           0xc5, 0xf8, 0x77, 0xc3});       // vzeroupper; ret
  return e.here() <= kMaxCode;
}

// A block's nonzeros by column (each column's vector is loaded once per position), cut into
// segments of about `segment` multiply-adds at column boundaries (0: one segment). A
// segment's code then runs over all the call's positions while it is in the instruction cache
// (a block's whole code at density 0.06 was about 40 KB, more than the 32 KB L1i here).
std::vector<size_t> segment_bounds(const std::vector<Use>& uses, int64_t segment) {
  std::vector<size_t> bounds{0};
  for (size_t u = 1; u < uses.size(); ++u)
    if (segment > 0 && static_cast<int64_t>(u - bounds.back()) >= segment &&
        uses[u].offset != uses[u - 1].offset)
      bounds.push_back(u);
  bounds.push_back(uses.size());
  return bounds;
}

// The same cut at fixed input offsets: segment k holds the nonzeros whose column offset lies in
// [k * span, (k + 1) * span), `count` segments, some of them empty. Every block of a layer then
// has its k-th segment over the same input channels, and a call can run segment k of every
// block before segment k + 1 of any: those channels' input is read from L2 by each block,
// where a block-by-block order read the whole input from L3 once per block.
std::vector<size_t> span_bounds(const std::vector<Use>& uses, int64_t span, int64_t count) {
  std::vector<size_t> bounds{0};
  size_t u = 0;
  for (int64_t k = 1; k < count; ++k) {
    while (u < uses.size() && uses[u].offset < k * span) ++u;
    bounds.push_back(u);
  }
  bounds.push_back(uses.size());
  return bounds;
}

using BlockFn = void (*)(const Frame*);

struct LayerCode {
  void* pages = nullptr;
  size_t size = 0;
  int64_t block_rows = 0, out_stride = 0;
  int64_t spans = 0;  // > 0: every block has this many segments over the same input offsets
  std::vector<std::vector<BlockFn>> blocks;  // each block's segments, in order
  std::vector<int64_t> data_start;  // each block's first float in `data`
  std::vector<float> data;
};

bool has_avx512() {
#if defined(__x86_64__)
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

}  // namespace

extern "C" {

// 1 when this CPU runs generated code (x86-64 with AVX-512).
int dnr_codegen_available() { return has_avx512() ? 1 : 0; }

struct CodegenSpec {
  int64_t rows;            // output channels
  const int64_t* indptr;   // rows + 1 (CSR)
  const int32_t* offsets;  // per nonzero: its column's offset in the input planes (floats)
  const float* values;     // per nonzero
  const float* bias;       // per row
  int64_t block_rows;      // output channels per block: 1 .. 28
  int64_t out_stride;      // floats between output channels
  int64_t relu;
  int64_t segment;         // multiply-adds a segment (about; 0: one segment a block)
  int64_t span;            // if > 0: segments cut at multiples of this many input floats instead
  int64_t prefetch;        // multiply-adds between prefetches of the next segment's code (0: none)
};

// The layer's code, or null (no AVX-512, a displacement too large, no executable pages).
void* dnr_codegen_compile(const CodegenSpec* s) {
  if (!has_avx512() || s->rows < 1 || s->block_rows < 1 || s->block_rows > kMaxRows ||
      s->out_stride < 0)
    return nullptr;
  for (int64_t o = 0; o < s->rows; ++o)
    if (s->indptr[o + 1] < s->indptr[o]) return nullptr;
  int64_t spans = 0;  // segments a block when cut at fixed offsets (bounded: each costs code)
  if (s->span > 0) {
    int64_t reach = 0;
    for (int64_t j = 0; j < s->indptr[s->rows]; ++j)
      reach = std::max<int64_t>(reach, s->offsets[j]);
    spans = reach / s->span + 1;
    if (spans > kMaxSpans) return nullptr;
  }
  auto* layer = new LayerCode;
  layer->spans = spans;
  layer->block_rows = s->block_rows;
  layer->out_stride = s->out_stride;
  Emitter e;
  std::vector<std::vector<int64_t>> starts;
  for (int64_t first = 0; first < s->rows; first += s->block_rows) {
    const int rows = static_cast<int>(std::min(s->block_rows, s->rows - first));
    std::vector<Use> uses;
    for (int r = 0; r < rows; ++r)
      for (int64_t j = s->indptr[first + r]; j < s->indptr[first + r + 1]; ++j)
        uses.push_back({s->offsets[j], r, static_cast<int32_t>(j)});
    std::stable_sort(uses.begin(), uses.end(),
                     [](const Use& a, const Use& b) { return a.offset < b.offset; });
    // the output rows' and the weight slots' displacements (the input's are checked per
    // column as the code is written)
    if ((rows - 1) * s->out_stride * 4 > kMaxDisp ||
        (rows + static_cast<int64_t>(uses.size())) * 4 > kMaxDisp) {
      delete layer;
      return nullptr;
    }
    const std::vector<size_t> bounds = s->span > 0 ? span_bounds(uses, s->span, spans)
                                                   : segment_bounds(uses, s->segment);
    starts.emplace_back();
    for (size_t k = 0; k + 1 < bounds.size(); ++k) {
      starts.back().push_back(e.here());
      if (!emit_segment(e, uses, bounds[k], bounds[k + 1], rows, s->out_stride, k == 0,
                        k + 2 == bounds.size(), s->relu != 0,
                        static_cast<size_t>(std::clamp<int64_t>(s->prefetch, 0, 1 << 20)))) {
        delete layer;
        return nullptr;
      }
      while (e.code.size() % 64) e.code.push_back(0xcc);  // each on its own cache line
    }
    layer->data_start.push_back(static_cast<int64_t>(layer->data.size()));
    for (int r = 0; r < rows; ++r) layer->data.push_back(s->bias[first + r]);
    for (const Use& use : uses) layer->data.push_back(s->values[use.index]);
  }
  layer->size = e.code.size();
  void* pages = mmap(nullptr, layer->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
  if (pages == MAP_FAILED) {
    delete layer;
    return nullptr;
  }
  memcpy(pages, e.code.data(), layer->size);
  if (mprotect(pages, layer->size, PROT_READ | PROT_EXEC) != 0) {  // W^X: never both
    munmap(pages, layer->size);
    delete layer;
    return nullptr;
  }
  layer->pages = pages;
  for (const auto& block : starts) {
    layer->blocks.emplace_back();
    for (int64_t start : block)
      layer->blocks.back().push_back(
          reinterpret_cast<BlockFn>(static_cast<uint8_t*>(pages) + start));
  }
  return layer;
}

// Bytes of generated code (for reports and the tests' disassembly).
int64_t dnr_codegen_size(const void* handle) {
  return static_cast<int64_t>(static_cast<const LayerCode*>(handle)->size);
}

// Where the generated code lies (the tests check its pages' permissions).
const void* dnr_codegen_pages(const void* handle) {
  return static_cast<const LayerCode*>(handle)->pages;
}

// A copy of the generated code (the tests disassemble it).
void dnr_codegen_copy(const void* handle, uint8_t* out) {
  const auto* layer = static_cast<const LayerCode*>(handle);
  memcpy(out, layer->pages, layer->size);
}

void dnr_codegen_free(void* handle) {
  auto* layer = static_cast<LayerCode*>(handle);
  if (layer->pages) munmap(layer->pages, layer->size);
  delete layer;
}

struct CodegenCall {
  const void* handle;
  const float* src;
  float* out;  // output channel o's vector at position q: out[o * out_stride + q]
  const int32_t* pos;
  int64_t npos;
  const float* res;  // residual, laid out as the output with its own channel stride, or null
  int64_t res_stride;
  int64_t threads;
  int64_t chunk;  // positions a task
  const int32_t* out_pos;  // where each position's output goes, or null: at `pos`
};

// out[o * out_stride + t + i] = relu(bias[o] + sum_j val[j] * src[off[j] + q + i]
// (+ res[o * res_stride + t + i])), i < 16, for every q in pos and t the out_pos beside it (q
// itself without out_pos): as dnr_sparse_conv with 16-float vectors. Tasks are (chunk of
// positions, block of channels), chunk-major, so a chunk's input stays in cache across the
// blocks.
void dnr_codegen_conv(const CodegenCall* c) {
  const auto* layer = static_cast<const LayerCode*>(c->handle);
  const int64_t nblocks = static_cast<int64_t>(layer->blocks.size());
  // smaller chunks of positions where there are too few tasks to share evenly among threads
  // (a layer of 8 x 8 pixels and 11 blocks made 11 tasks: 6 on one thread, 5 on the other)
  int64_t chunk = std::max<int64_t>(1, c->chunk);
  while (c->threads > 1 && chunk > 8 && (c->npos + chunk - 1) / chunk * nblocks < 8 * c->threads)
    chunk /= 2;
  const int64_t nchunks = (c->npos + chunk - 1) / chunk;
  auto frame = [&](int64_t k, int64_t b) {
    const int64_t first = b * layer->block_rows, p0 = k * chunk;
    return Frame{c->src, c->out + first * layer->out_stride,
                 layer->data.data() + layer->data_start[b], c->pos + p0,
                 std::min(chunk, c->npos - p0),
                 c->res ? c->res + first * c->res_stride : nullptr, c->res_stride * 4,
                 (c->out_pos ? c->out_pos : c->pos) + p0, nullptr};
  };
  auto code = [&](int64_t b, int64_t g) {  // where a segment's code starts
    return reinterpret_cast<const uint8_t*>(layer->blocks[b][g]);
  };
  if (layer->spans > 0 && c->threads == 1) {
    // segment-major: a segment's input channels serve every block while in L2
    for (int64_t k = 0; k < nchunks; ++k)
      for (int64_t g = 0; g < layer->spans; ++g)
        for (int64_t b = 0; b < nblocks; ++b) {
          Frame f = frame(k, b);
          f.next_code = b + 1 < nblocks ? code(b + 1, g)
                        : g + 1 < layer->spans ? code(0, g + 1) : code(b, g);
          layer->blocks[b][g](&f);
        }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(c->threads))
  for (int64_t task = 0; task < nchunks * nblocks; ++task) {
    const int64_t b = task % nblocks;
    Frame f = frame(task / nblocks, b);
    const auto& segments = layer->blocks[b];
    for (size_t g = 0; g < segments.size(); ++g) {
      f.next_code = code(b, g + 1 < segments.size() ? g + 1 : g);
      segments[g](&f);
    }
  }
}

}  // extern "C"
