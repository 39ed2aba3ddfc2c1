// Scaled dot-product attention for bf16 on CPUs with AVX512-BF16: torch.ops.deepcache.attention_bf16.
//
// Why: PyTorch's CPU SDPA kernel runs at 65-85 GFLOP/s for head dims 32-80 in bf16 as in fp32 (measured on a
// 2-core AMD EPYC whose bf16 matmul peaks at 433 GFLOP/s, bench/attention_forms.py), so attention gains
// nothing from bf16 and is a third of a bf16 DeepCache shallow step. Its query-key product has a reduction of
// only head-dim (40 in SD 1.5's first level) per score, which a GEMM library tiles badly. This kernel keeps a
// block of query rows' scores in registers while it reduces over head-dim with VDPBF16PS, then runs the softmax
// over the block's whole rows (in L1/L2: rows x keys fp32) and the probability-value product, also with
// VDPBF16PS. No mask, no dropout, not causal: the only attention diffusion U-Nets and DiTs run; the compiler
// (deepcache_compile/graph/attention.py) substitutes it only for such SDPA calls.
//
// Layouts (bf16 pairs, as VDPBF16PS multiplies them: lane l accumulates a[2l]*b[2l] + a[2l+1]*b[2l+1]):
//   keys   packed per 16 keys:   [key block][head-dim pair][16 keys][2]
//   values packed per key pair:  [key pair][16-dim chunk][16 dims][2 keys]
//   queries and probabilities are read as 32-bit words (one bf16 pair) and broadcast.
// Accumulation is fp32 throughout; the softmax is exact up to the exp polynomial (relative error ~2e-7).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace deepcache {
namespace {

constexpr int64_t kRows = 8;      // query rows per block (accumulators: 2 x 8 scores, 8 x 3 outputs)
constexpr int64_t kKeyBlock = 32;  // keys per step of the query-key product (two registers of 16)
constexpr int64_t kChunks = 3;     // 16-dim output chunks per pass over the keys (head dim up to 48 in one)

#define DC_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

bool cpu_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return supported;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The padded sizes of one call, derived once from its key count and head dim.
struct Layout {
  Layout(int64_t keys, int64_t dim)
      : keys(keys), dim(dim), dim_padded(round_up(dim, 2)), keys_padded(round_up(keys, kKeyBlock)),
        chunks(round_up(dim, 16) / 16) {}
  int64_t keys, dim;
  int64_t dim_padded;   // head dim in bf16 pairs
  int64_t keys_padded;  // keys in query-key steps
  int64_t chunks;       // 16-dim output chunks
  int64_t keys_size() const { return keys_padded * dim_padded; }  // packed keys of one head, in bf16
  int64_t head_size() const { return keys_size() + keys_padded * chunks * 16; }  // plus its packed values
};

// One thread's working memory for blocks of kRows query rows.
struct Scratch {
  explicit Scratch(const Layout& l)
      : q_block(kRows * l.dim_padded), probs(kRows * l.keys_padded), scores(kRows * l.keys_padded),
        out_block(kRows * l.chunks * 16) {}
  std::vector<uint16_t> q_block, probs;
  std::vector<float> scores, out_block;
};

// e^x for x <= 0 (scores minus their row maximum): Cody-Waite range reduction, degree-6 polynomial, vscalefps.
DC_AVX512_BF16 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One (batch, head)'s keys in the query-key layout: dst[kb][p][l][e] = k[kb*16 + l][2p + e], zero padded. A
// head-dim pair is one 32-bit word in both layouts: words are copied, the last one of an odd dim half padded.
void pack_keys(const at::BFloat16* k, int64_t stride, int64_t keys, int64_t dim, int64_t keys_padded,
               int64_t dim_padded, uint16_t* dst) {
  std::memset(dst, 0, keys_padded * dim_padded * sizeof(uint16_t));
  auto* dst32 = reinterpret_cast<uint32_t*>(dst);
  const int64_t pairs = dim / 2;
  for (int64_t j = 0; j < keys; ++j) {
    uint32_t* block = dst32 + (j / 16) * 8 * dim_padded + (j % 16);
    const at::BFloat16* row = k + j * stride;
    for (int64_t p = 0; p < pairs; ++p) {
      uint32_t word;
      std::memcpy(&word, row + 2 * p, sizeof(word));
      block[p * 16] = word;
    }
    if (dim % 2) block[pairs * 16] = row[dim - 1].x;
  }
}

// One (batch, head)'s values in the probability-value layout: dst[jp][c][l][e] = v[2jp + e][16c + l], each
// (key pair, dim) one 32-bit word.
void pack_values(const at::BFloat16* v, int64_t stride, int64_t keys, int64_t dim, int64_t keys_padded,
                 int64_t chunks, uint16_t* dst) {
  std::memset(dst, 0, keys_padded * chunks * 16 * sizeof(uint16_t));
  auto* dst32 = reinterpret_cast<uint32_t*>(dst);
  for (int64_t j = 0; j < keys; j += 2) {
    const at::BFloat16* first = v + j * stride;
    const at::BFloat16* second = j + 1 < keys ? first + stride : nullptr;
    uint32_t* pair = dst32 + (j / 2) * chunks * 16;
    for (int64_t d = 0; d < dim; ++d)
      pair[d] = first[d].x | (second ? static_cast<uint32_t>(second[d].x) << 16 : 0u);
  }
}

// scores[i][j] = sum_d q[i][d] k[j][d] for kRows rows (q: kRows x dim_padded bf16) and keys_padded keys.
DC_AVX512_BF16 void query_key(const uint16_t* q, const uint16_t* packed_keys, int64_t dim_padded,
                              int64_t keys_padded, float* scores) {
  const int64_t pairs = dim_padded / 2;
  const auto* q32 = reinterpret_cast<const int32_t*>(q);
  for (int64_t kb = 0; kb < keys_padded; kb += kKeyBlock) {
    __m512 acc0[kRows], acc1[kRows];
    for (int64_t i = 0; i < kRows; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    const uint16_t* k0 = packed_keys + kb * dim_padded;
    const uint16_t* k1 = k0 + 16 * dim_padded;
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(k0 + p * 32);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(k1 + p * 32);
      for (int64_t i = 0; i < kRows; ++i) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(q32[i * pairs + p]);
        acc0[i] = _mm512_dpbf16_ps(acc0[i], a, b0);
        acc1[i] = _mm512_dpbf16_ps(acc1[i], a, b1);
      }
    }
    for (int64_t i = 0; i < kRows; ++i) {
      _mm512_storeu_ps(scores + i * keys_padded + kb, acc0[i]);
      _mm512_storeu_ps(scores + i * keys_padded + kb + 16, acc1[i]);
    }
  }
}

// probs[j] = e^{scale (scores[j] - max)} as bf16 (0 past `keys`); returns their sum (of the fp32 values).
DC_AVX512_BF16 float softmax_row(const float* scores, int64_t keys, int64_t keys_padded, float scale,
                                 uint16_t* probs) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= keys; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(scores + j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (keys - j)) - 1);
  if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, scores + j));
  const __m512 neg_max_scaled = _mm512_set1_ps(-_mm512_reduce_max_ps(vmax) * scale);
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j < keys_padded; j += 32) {
    __m512 e[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t start = j + 16 * h;
      const int64_t valid = std::clamp<int64_t>(keys - start, 0, 16);
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
      const __m512 s = _mm512_maskz_loadu_ps(mask, scores + start);
      e[h] = _mm512_maskz_mov_ps(mask, exp_nonpositive(_mm512_fmadd_ps(s, vscale, neg_max_scaled)));
      sum = _mm512_add_ps(sum, e[h]);
    }
    _mm512_storeu_si512(probs + j, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
  }
  return _mm512_reduce_add_ps(sum);
}

// out[i][d] = sum_j probs[i][j] v[j][d] / sums[i] for the kRows rows, `chunks` 16-dim chunks from `first`.
template <int Chunks>
DC_AVX512_BF16 void prob_value(const uint16_t* probs, const uint16_t* packed_values, int64_t keys_padded,
                               int64_t all_chunks, int64_t first, const float* sums, float* out, int64_t out_stride) {
  __m512 acc[kRows][Chunks];
  for (int64_t i = 0; i < kRows; ++i)
    for (int c = 0; c < Chunks; ++c) acc[i][c] = _mm512_setzero_ps();
  const auto* p32 = reinterpret_cast<const int32_t*>(probs);
  const int64_t pairs = keys_padded / 2;
  for (int64_t jp = 0; jp < pairs; ++jp) {
    __m512bh b[Chunks];
    for (int c = 0; c < Chunks; ++c)
      b[c] = (__m512bh)_mm512_loadu_si512(packed_values + (jp * all_chunks + first + c) * 32);
    for (int64_t i = 0; i < kRows; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(p32[i * pairs + jp]);
      for (int c = 0; c < Chunks; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], a, b[c]);
    }
  }
  for (int64_t i = 0; i < kRows; ++i) {
    const __m512 inv = _mm512_set1_ps(sums[i] > 0 ? 1.0f / sums[i] : 0.0f);
    for (int c = 0; c < Chunks; ++c)
      _mm512_storeu_ps(out + i * out_stride + (first + c) * 16, _mm512_mul_ps(acc[i][c], inv));
  }
}

DC_AVX512_BF16 void attention_rows(const at::BFloat16* q, int64_t q_stride, int64_t rows, const uint16_t* packed,
                                   const Layout& l, float scale, at::BFloat16* out, int64_t out_stride,
                                   Scratch& scratch) {
  std::vector<uint16_t>& q_block = scratch.q_block;
  std::vector<uint16_t>& probs = scratch.probs;
  std::fill(q_block.begin(), q_block.end(), 0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < l.dim; ++d) q_block[i * l.dim_padded + d] = q[i * q_stride + d].x;
  query_key(q_block.data(), packed, l.dim_padded, l.keys_padded, scratch.scores.data());
  float sums[kRows] = {};  // rows past `rows` (a last, partial block) keep zero probabilities and sums
  std::fill(probs.begin() + rows * l.keys_padded, probs.end(), 0);
  for (int64_t i = 0; i < rows; ++i)
    sums[i] = softmax_row(scratch.scores.data() + i * l.keys_padded, l.keys, l.keys_padded, scale,
                          probs.data() + i * l.keys_padded);
  const uint16_t* values = packed + l.keys_size();
  const int64_t width = l.chunks * 16;
  float* acc = scratch.out_block.data();
  for (int64_t c = 0; c < l.chunks; c += kChunks) {
    switch (std::min<int64_t>(kChunks, l.chunks - c)) {
      case 1: prob_value<1>(probs.data(), values, l.keys_padded, l.chunks, c, sums, acc, width); break;
      case 2: prob_value<2>(probs.data(), values, l.keys_padded, l.chunks, c, sums, acc, width); break;
      default: prob_value<3>(probs.data(), values, l.keys_padded, l.chunks, c, sums, acc, width);
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < l.dim; ++d) out[i * out_stride + d] = static_cast<at::BFloat16>(acc[i * width + d]);
}

at::Tensor attention_bf16(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale) {
  TORCH_CHECK(cpu_supported(), "deepcache::attention_bf16 needs a CPU with AVX512-BF16 (this one has none): "
              "compile with backend_options={'attention': 'sdpa'}");
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(),
              "deepcache::attention_bf16 runs on the CPU; got ", query.device());
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
                  value.scalar_type() == at::kBFloat16,
              "deepcache::attention_bf16 takes bf16 query, key and value; got ", query.scalar_type(), ", ",
              key.scalar_type(), ", ", value.scalar_type());
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
              "deepcache::attention_bf16 takes (batch, heads, tokens, head dim) tensors");
  const int64_t batch = query.size(0), heads = query.size(1), rows = query.size(2), dim = query.size(3);
  const int64_t keys = key.size(2);
  TORCH_CHECK(key.size(0) == batch && value.size(0) == batch && key.size(1) == heads && value.size(1) == heads &&
                  key.size(3) == dim && value.size(3) == dim && value.size(2) == keys,
              "deepcache::attention_bf16: query ", query.sizes(), ", key ", key.sizes(), " and value ", value.sizes(),
              " must share batch, heads and head dim, key and value their tokens");
  TORCH_CHECK(keys > 0, "deepcache::attention_bf16 needs at least one key (a softmax over none is undefined)");
  const at::Tensor q = query.stride(3) == 1 ? query : query.contiguous();
  const at::Tensor k = key.stride(3) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(3) == 1 ? value : value.contiguous();
  // (batch, tokens, heads, dim) storage, seen as (batch, heads, tokens, dim): the reshape back to
  // (batch, tokens, heads * dim) that follows attention in a U-Net is then free, as after aten's CPU kernel.
  at::Tensor out = at::empty({batch, rows, heads, dim}, query.options()).transpose(1, 2);
  if (out.numel() == 0) return out;

  const Layout layout(keys, dim);
  std::vector<uint16_t> packed(batch * heads * layout.head_size());
  const auto* qp = q.const_data_ptr<at::BFloat16>();
  const auto* kp = k.const_data_ptr<at::BFloat16>();
  const auto* vp = v.const_data_ptr<at::BFloat16>();
  auto* op = out.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      uint16_t* dst = packed.data() + bh * layout.head_size();
      pack_keys(kp + b * k.stride(0) + h * k.stride(1), k.stride(2), keys, dim, layout.keys_padded,
                layout.dim_padded, dst);
      pack_values(vp + b * v.stride(0) + h * v.stride(1), v.stride(2), keys, dim, layout.keys_padded,
                  layout.chunks, dst + layout.keys_size());
    }
  });
  const int64_t blocks = (rows + kRows - 1) / kRows;
  const float scale_f = static_cast<float>(scale);
  at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(layout);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, first = (task % blocks) * kRows;
      const int64_t b = bh / heads, h = bh % heads;
      attention_rows(qp + b * q.stride(0) + h * q.stride(1) + first * q.stride(2), q.stride(2),
                     std::min(kRows, rows - first), packed.data() + bh * layout.head_size(), layout, scale_f,
                     op + b * out.stride(0) + h * out.stride(1) + first * out.stride(2), out.stride(2), scratch);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepcache, m) {
  m.def("attention_bf16(Tensor query, Tensor key, Tensor value, float scale) -> Tensor");
  m.def("attention_bf16_supported() -> bool", [] { return cpu_supported(); });
}

TORCH_LIBRARY_IMPL(deepcache, CPU, m) { m.impl("attention_bf16", &attention_bf16); }

std::string native_op_missing(const std::string& name) {
  if (name != "deepcache::attention_bf16")
    return "this runtime has no " + name + " (a newer deepcache_compile made it)";
  return cpu_supported() ? "" : "this CPU has no AVX512-BF16 instructions";
}

}  // namespace deepcache
