// y = x · Wᵀ for a few rows of x, W in bfloat16, on x86 CPUs with AVX2 + FMA.
//
// Why: the dual path's decode step multiplies every shared weight by 2B rows (B = batch), and
// stock torch is slow at that shape on the CPUs we measured (benchmarks/dualpath_speed.py):
// - without native bf16 (AMD Zen 3), its GEMM widens W to float32 once per row, so 2 rows cost
//   nearly twice one row (docs/benchmarks.md). Here each W element is loaded and widened once and used for every row;
// - with native bf16 (Intel Sapphire Rapids, AVX512-BF16 + AMX), oneDNN's product for 1-2 rows
//   took several times what this file's AVX512-BF16 loop does (docs/benchmarks.md).
// The AVX512-BF16 loop is chosen at run time where the CPU has it (`vdpbf16ps`: bf16 pairs
// multiplied exactly and summed into float32). Either way accumulation is float32 and the result
// is rounded to nearest even once, as torch does.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

// The row limit is one constant, aligndial.kernels.MAX_ROWS, passed in by the build.
#ifndef ALIGNDIAL_MAX_ROWS
#error "build through aligndial.kernels, which defines ALIGNDIAL_MAX_ROWS"
#endif
static_assert(ALIGNDIAL_MAX_ROWS >= 1 && ALIGNDIAL_MAX_ROWS <= 4, "the row loops below are written for 1-4 rows");

static inline __m256 widen8(const uint16_t* p) {  // 8 bf16 -> 8 float32 (bf16 is the top half)
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float widen(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t narrow(float f) {  // float32 -> bf16, round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// O weight rows × R input rows: O·R accumulators in registers (at most 8 + R + 1 of the 16).
template <int O, int R>
static void block(const uint16_t* w, const float* x, float* y, int64_t o, int64_t in, int64_t out) {
  __m256 acc[O][R];
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < R; ++r) acc[a][r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * in + i);
    for (int a = 0; a < O; ++a) {
      __m256 wv = widen8(w + (o + a) * in + i);
      for (int r = 0; r < R; ++r) acc[a][r] = _mm256_fmadd_ps(wv, xv[r], acc[a][r]);
    }
  }
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[a][r]);
      for (int64_t j = i; j < in; ++j) s += widen(w[(o + a) * in + j]) * x[r * in + j];
      y[r * out + o + a] = s;
    }
}

// The AVX512-BF16 loop prefetches W this many blocks ahead. On weights streamed from memory, the
// hardware prefetcher alone left a second row of x costing much of a first one; prefetching, and
// blocks of 8 weight rows for 1-2 rows of x, brought it close to free (docs/benchmarks.md).
// Prefetches never fault, so the last blocks may safely prefetch past the end of W.
constexpr int kPrefetchBlocks = 2;

// The same block with AVX512-BF16: 32 bf16 of W and x per instruction, no widening. x is bf16.
template <int O, int R>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void block_bf16(const uint16_t* w, const uint16_t* x, float* y, int64_t o, int64_t in, int64_t out) {
  __m512 acc[O][R];
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < R; ++r) acc[a][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_loadu_si512(x + r * in + i);
    for (int a = 0; a < O; ++a) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (o + a + kPrefetchBlocks * O) * in + i), _MM_HINT_T0);
      __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (o + a) * in + i);
      for (int r = 0; r < R; ++r) acc[a][r] = _mm512_dpbf16_ps(acc[a][r], wv, xv[r]);
    }
  }
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < R; ++r) {
      float s = _mm512_reduce_add_ps(acc[a][r]);
      for (int64_t j = i; j < in; ++j) s += widen(w[(o + a) * in + j]) * widen(x[r * in + j]);
      y[r * out + o + a] = s;
    }
}

template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void rows_bf16(const uint16_t* w, const uint16_t* x, float* y, int64_t begin, int64_t end, int64_t in, int64_t out) {
  constexpr int O = R <= 2 ? 8 : 4;  // O·R accumulators + R + 1 registers of the 32
  int64_t o = begin;
  for (; o + O <= end; o += O) block_bf16<O, R>(w, x, y, o, in, out);
  for (; o < end; ++o) block_bf16<1, R>(w, x, y, o, in, out);
}

static bool has_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return yes;
}

template <int R>
static void rows(const uint16_t* w, const float* x, float* y, int64_t begin, int64_t end, int64_t in, int64_t out) {
  constexpr int O = R <= 2 ? 4 : 2;
  int64_t o = begin;
  for (; o + O <= end; o += O) block<O, R>(w, x, y, o, in, out);
  for (; o < end; ++o) block<1, R>(w, x, y, o, in, out);
}

// x: (R, in) bf16 contiguous, 1 <= R <= ALIGNDIAL_MAX_ROWS; w: (out, in) bf16 contiguous. Returns (R, out) bf16.
// `avx512_bf16`: use that loop (the CPU must have it; `few_rows_bf16` decides).
static torch::Tensor product(const torch::Tensor& x, const torch::Tensor& w, bool avx512_bf16) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "few_rows_bf16: x (R, in) and w (out, in)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "few_rows_bf16: bfloat16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.device().is_cpu(), "few_rows_bf16: contiguous CPU tensors");
  const int64_t n = x.size(0), in = w.size(1), out = w.size(0);
  TORCH_CHECK(n >= 1 && n <= ALIGNDIAL_MAX_ROWS, "few_rows_bf16: 1 to ", ALIGNDIAL_MAX_ROWS, " rows, got ", n);
  const uint16_t* xh = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* wh = reinterpret_cast<const uint16_t*>(w.data_ptr());
  std::vector<float> yf(n * out);
  if (avx512_bf16) {
    at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
      switch (n) {
        case 1: rows_bf16<1>(wh, xh, yf.data(), b, e, in, out); break;
        case 2: rows_bf16<2>(wh, xh, yf.data(), b, e, in, out); break;
        case 3: rows_bf16<3>(wh, xh, yf.data(), b, e, in, out); break;
        default: rows_bf16<4>(wh, xh, yf.data(), b, e, in, out); break;
      }
    });
  } else {
    std::vector<float> xf(n * in);
    for (int64_t k = 0; k < n * in; ++k) xf[k] = widen(xh[k]);
    at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
      switch (n) {
        case 1: rows<1>(wh, xf.data(), yf.data(), b, e, in, out); break;
        case 2: rows<2>(wh, xf.data(), yf.data(), b, e, in, out); break;
        case 3: rows<3>(wh, xf.data(), yf.data(), b, e, in, out); break;
        default: rows<4>(wh, xf.data(), yf.data(), b, e, in, out); break;
      }
    });
  }
  auto y = torch::empty({n, out}, x.options());
  uint16_t* yh = reinterpret_cast<uint16_t*>(y.data_ptr());
  for (int64_t k = 0; k < n * out; ++k) yh[k] = narrow(yf[k]);
  return y;
}

torch::Tensor few_rows_bf16(const torch::Tensor& x, const torch::Tensor& w) { return product(x, w, has_avx512_bf16()); }
torch::Tensor few_rows_bf16_avx2(const torch::Tensor& x, const torch::Tensor& w) { return product(x, w, false); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("few_rows_bf16", &few_rows_bf16, "y = x · Wᵀ for 1 to ALIGNDIAL_MAX_ROWS rows, bf16 (AVX512-BF16 where the CPU has it, else AVX2)");
  m.def("few_rows_bf16_avx2", &few_rows_bf16_avx2, "the same, always the AVX2 loop (for tests)");
  m.def("has_avx512_bf16", &has_avx512_bf16, "whether few_rows_bf16 uses the AVX512-BF16 loop here");
}
