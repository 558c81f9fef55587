// Packed-weight integer kernels of quantdiff (see quantdiff/nn/kernels/packed.py for why and how they are used).
//
// * quantdiff::packed_linear / quantdiff::packed_conv2d: uint8 activations x int8 weights on Intel AMX tiles
//   (TDPBUSD, int32 accumulation); the input is fp32 (quantized here) or already uint8 (compiled graphs, where
//   the quantization fuses into the op that produces it). The weights stay packed: 4-bit weights as two nibbles per byte in the tile
//   order below, unpacked into int8 tiles per block of 32 output channels just before use. The fp32 input is
//   quantized here with exactly the reference formula clamp(round(x / s) + z, lo, hi) (IEEE division, round
//   half to even), so the integers equal the reference path's. K is permuted at build time so that every
//   64-wide step of the reduction lies inside one scale group: each group's int32 tile is turned into fp32 and
//   multiplied by its scale (per-group weights), or the whole reduction is (per-channel weights).
// * quantdiff::dequantize_into: stored 4/8-bit weights -> (q - z) * s into a caller-owned fp32 buffer (the same
//   arithmetic as quantdiff.primitives.dequantize, bit for bit) or bf16 buffer (that value rounded to nearest
//   even), for weight-only layers.
// * quantdiff::fake_quantize: the float path's input fake-quantization in one pass (auto execution, small
//   layers where the float op beats the kernel).
//
// Weight layout (built in Python, packed.py: pack_tiles): blocks of 16 output channels x 64 reduction values;
// inside a block the int8 tile is AMX's "VNNI" B layout, byte r*64 + j*4 + i = W[n0 + j, k0 + 4r + i]. 8-bit
// weights store that tile as is (1024 bytes). 4-bit weights store 512 bytes: byte c*64 + j holds tile byte
// c*128 + j in its low nibble and tile byte c*128 + 64 + j in its high nibble (two's complement), so one
// 64-byte load unpacks into two 64-byte rows of the tile with a table lookup.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "amx_common.h"

namespace {

using quantdiff_amx::amx_status;  // capability, buffers, tile layout: amx_common.h
using quantdiff_amx::Scratch;
using quantdiff_amx::configure_tiles;

// ------------------------------------------------------------------------------------------------ quantize
// Exactly clamp(round(x / s) + z, lo, hi) in float32 (round half to even), as uint8.
struct Quantizer {
  float scale, zero_point, low, high;
};

QD_AMX inline __m512 quantize16(__m512 v, const Quantizer& q) {
  v = _mm512_div_ps(v, _mm512_set1_ps(q.scale));
  v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_add_ps(v, _mm512_set1_ps(q.zero_point));
  return _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(q.low)), _mm512_set1_ps(q.high));
}

// n floats -> n bytes; returns true if any value was NaN (it has no integer image: the caller answers NaN).
QD_AMX bool quantize_row(const float* x, int64_t n, uint8_t* out, const Quantizer& q) {
  __mmask16 nan_seen = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
    nan_seen |= _mm512_mask_cmp_ps_mask(mask, v, v, _CMP_UNORD_Q);
    _mm512_mask_cvtusepi32_storeu_epi8(out + i, mask, _mm512_cvtps_epi32(quantize16(v, q)));
  }
  return nan_seen != 0;
}

// Transpose 16 rows of 16 bytes (one per channel) into 16 rows of 16 bytes (one per pixel).
QD_AMX inline void transpose16x16(__m128i r[16]) {
  __m128i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 2; ++j) {
      r[4 * i + 2 * j] = _mm_unpacklo_epi16(t[4 * i + j], t[4 * i + j + 2]);
      r[4 * i + 2 * j + 1] = _mm_unpackhi_epi16(t[4 * i + j], t[4 * i + j + 2]);
    }
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + 2 * j] = _mm_unpacklo_epi32(r[8 * i + j], r[8 * i + j + 4]);
      t[8 * i + 2 * j + 1] = _mm_unpackhi_epi32(r[8 * i + j], r[8 * i + j + 4]);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[2 * j] = _mm_unpacklo_epi64(t[j], t[j + 8]);
    r[2 * j + 1] = _mm_unpackhi_epi64(t[j], t[j + 8]);
  }
}

// ------------------------------------------------------------------------------------------------ GEMM core
// How the rows of A (uint8, pitch Kp) of one chunk are produced: quantized Linear rows, or im2col segments.
struct RowSource {
  // Linear: x rows of K floats to quantize, or of K uint8 already quantized (compiled graphs).
  const float* x = nullptr;
  const uint8_t* x_u8 = nullptr;
  int64_t k = 0;
  Quantizer quantizer{};
  std::atomic<bool>* nan_seen = nullptr;
  // Conv: quantized, zero-point padded NHWC input and the segment table (tap, c_start, length, dst).
  const uint8_t* xq = nullptr;
  int64_t channels = 0, padded_h = 0, padded_w = 0, out_h = 0, out_w = 0;
  int64_t stride_h = 1, stride_w = 1;
  const int32_t* segments = nullptr;
  int64_t segment_count = 0;
  const int64_t* tap_offsets = nullptr;  // byte offset of each tap in xq relative to the window's origin
};

// n bytes from src to dst with unmasked moves that never write outside [dst, dst + n): the last move of each
// size overlaps the one before it (a run of 14 bytes is two 8-byte moves).
QD_AMX inline void copy_bytes(uint8_t* dst, const uint8_t* src, int64_t n) {
  if (n >= 64) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) _mm512_storeu_si512(dst + i, _mm512_loadu_si512(src + i));
    if (i < n) _mm512_storeu_si512(dst + n - 64, _mm512_loadu_si512(src + n - 64));
  } else if (n >= 32) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + n - 32),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + n - 32)));
  } else if (n >= 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + n - 16),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + n - 16)));
  } else if (n >= 8) {
    uint64_t head, tail;
    std::memcpy(&head, src, 8);
    std::memcpy(&tail, src + n - 8, 8);
    std::memcpy(dst, &head, 8);
    std::memcpy(dst + n - 8, &tail, 8);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

QD_AMX void build_rows(const RowSource& src, int64_t m0, int64_t rows, int64_t m_total, uint8_t* a, int64_t pitch) {
  const int64_t valid = std::min(rows, m_total - m0);
  if (src.x_u8 != nullptr) {
    for (int64_t r = 0; r < valid; ++r) copy_bytes(a + r * pitch, src.x_u8 + (m0 + r) * src.k, src.k);
    return;
  }
  if (src.x != nullptr) {
    bool nan = false;
    for (int64_t r = 0; r < valid; ++r) nan |= quantize_row(src.x + (m0 + r) * src.k, src.k, a + r * pitch, src.quantizer);
    if (nan) src.nan_seen->store(true, std::memory_order_relaxed);
    return;
  }
  // each row's window origin in the padded input, then segment by segment over the rows (one descriptor read
  // per segment and chunk, not per row)
  const int64_t pixels = src.out_h * src.out_w;
  int64_t origin[256];
  for (int64_t r = 0; r < valid; ++r) {
    const int64_t m = m0 + r, image = m / pixels, oh = (m % pixels) / src.out_w, ow = m % src.out_w;
    origin[r] = ((image * src.padded_h + oh * src.stride_h) * src.padded_w + ow * src.stride_w) * src.channels;
  }
  for (int64_t s = 0; s < src.segment_count; ++s) {
    const int32_t* seg = src.segments + 4 * s;  // tap, c_start, length, dst
    const uint8_t* from = src.xq + src.tap_offsets[seg[0]] + seg[1];
    uint8_t* to = a + seg[3];
    const int64_t length = seg[2];
    for (int64_t r = 0; r < valid; ++r) copy_bytes(to + r * pitch, from + origin[r], length);
  }
}

QD_AMX inline void unpack_tile(const uint8_t* packed, int8_t* tile) {
  // two's complement nibble -> int8: 0..7 -> 0..7, 8..15 -> -8..-1
  const __m512i lut = _mm512_set4_epi32(int(0xFFFEFDFC), int(0xFBFAF9F8), 0x07060504, 0x03020100);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < 8; ++c) {
    const __m512i v = _mm512_loadu_si512(packed + c * 64);
    _mm512_store_si512(tile + c * 128, _mm512_shuffle_epi8(lut, _mm512_and_si512(v, low4)));
    _mm512_store_si512(tile + c * 128 + 64, _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4)));
  }
}

struct Gemm {
  int64_t m = 0, n = 0, np = 0, kp = 0, groups = 1, group_steps = 0, bits = 8;
  int64_t chunk_rows = 0, chunks = 0, n_splits = 1;
  const uint8_t* weight = nullptr;   // packed tiles
  const float* scales = nullptr;     // the layer's weight_scale: (C_out, G), or (1, G) for one scale per tensor
  int64_t scale_rows = 1;
  const void* rowsums = nullptr;     // (G, Np) int16 (per group) or int32: sum of each group's weights
  bool rowsums_int16 = false;
  int32_t x_zp = 0;
  const float* bias = nullptr;
  float x_scale = 1.f;
  float* y = nullptr;  // (M, N)
};

// 2 x 2 tiles of 16 rows x 16 output channels: C[0..3] += A[0..1] x B[0..1] over reduction steps [begin, end).
QD_AMX inline void issue_steps(const uint8_t* a0, const uint8_t* a1, const int8_t* b0, const int8_t* b1, int64_t kp,
                               int64_t begin, int64_t end) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t ks = begin; ks < end; ++ks) {
    _tile_loadd(4, a0 + ks * 64, kp);
    _tile_loadd(5, a1 + ks * 64, kp);
    _tile_loadd(6, b0 + ks * 1024, 64);
    _tile_loadd(7, b1 + ks * 1024, 64);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
}

QD_AMX inline void store_tiles(int32_t (*c)[16][16]) {
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
}

// Per-channel weights: y = (acc - zero point x rowsum) x (x_scale x w_scale) (+ bias), exact integers until then.
QD_AMX inline void write_channel_rows(const Gemm& g, int32_t (*c)[16][16], const float* scale_panel,
                                      const int32_t* comp_panel, int64_t m0, int64_t n0) {
  for (int t = 0; t < 4; ++t) {
    const int64_t nn = n0 + (t & 1) * 16, mm = m0 + (t >> 1) * 16;
    if (nn >= g.n) continue;
    const __mmask16 nmask = g.n - nn >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (g.n - nn)) - 1);
    const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(nmask, g.bias + nn) : _mm512_setzero_ps();
    const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(scale_panel + (t & 1) * 16), _mm512_set1_ps(g.x_scale));
    const __m512i comp = _mm512_loadu_si512(comp_panel + (t & 1) * 16);
    const int rows = int(std::min<int64_t>(16, g.m - mm));
    for (int r = 0; r < rows; ++r) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c[t][r]), comp));
      _mm512_mask_storeu_ps(g.y + (mm + r) * g.n + nn, nmask, _mm512_fmadd_ps(v, scale, bias));
    }
  }
}

thread_local Scratch tls_rows, tls_panel, tls_input, tls_epilogue;

QD_AMX void gemm_items(const Gemm& g, const RowSource& src, int64_t begin, int64_t end) {
  configure_tiles();
  const int64_t ksteps = g.kp / 64, pairs = g.np / 32;
  const int64_t tile_bytes = g.bits == 4 ? 512 : 1024;
  const int64_t pairs_per_split = (pairs + g.n_splits - 1) / g.n_splits;
  uint8_t* a = tls_rows.get(g.chunk_rows * g.kp + 64);
  int8_t* panel = reinterpret_cast<int8_t*>(tls_panel.get(2 * ksteps * 1024 + 64));
  alignas(64) int32_t cbuf[2][4][16][16];  // two groups' tiles: one drained while the next is computed
  alignas(64) float facc[4][16][16];
  alignas(64) float offset[32];
  // per pair of tiles: each group's 32 scales (0 for padding channels) and zero point x weight sums
  float* scale_panel = reinterpret_cast<float*>(tls_epilogue.get(g.groups * 32 * 8 + 64));
  int32_t* comp_panel = reinterpret_cast<int32_t*>(scale_panel + g.groups * 32);
  int64_t built_chunk = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t chunk = item / g.n_splits, split = item % g.n_splits;
    const int64_t m_begin = chunk * g.chunk_rows, m_end = std::min(m_begin + g.chunk_rows, (g.m + 31) / 32 * 32);
    if (chunk != built_chunk) {
      build_rows(src, m_begin, m_end - m_begin, g.m, a, g.kp);
      built_chunk = chunk;
    }
    const int64_t pair_end = std::min(pairs, (split + 1) * pairs_per_split);
    for (int64_t pair = split * pairs_per_split; pair < pair_end; ++pair) {
      const uint8_t* blocks = g.weight + 2 * pair * ksteps * tile_bytes;  // blocks 2*pair and 2*pair + 1
      const int8_t* b0;
      if (g.bits == 4) {
        for (int64_t t = 0; t < 2 * ksteps; ++t) unpack_tile(blocks + t * 512, panel + t * 1024);
        b0 = panel;
      } else {
        b0 = reinterpret_cast<const int8_t*>(blocks);
      }
      const int8_t* b1 = b0 + ksteps * 1024;
      const int64_t n0 = pair * 32;
      for (int64_t group = 0; group < g.groups; ++group) {
        for (int64_t j = 0; j < 32; ++j) {
          const int64_t channel = n0 + j, row = g.scale_rows == 1 ? 0 : channel;
          scale_panel[group * 32 + j] = channel < g.n ? g.scales[row * g.groups + group] : 0.f;
          const int64_t sum = g.rowsums_int16 ? static_cast<const int16_t*>(g.rowsums)[group * g.np + channel]
                                              : static_cast<const int32_t*>(g.rowsums)[group * g.np + channel];
          comp_panel[group * 32 + j] = int32_t(sum * g.x_zp);
        }
      }
      if (g.groups > 1) {  // the zero point's share of the whole sum, sum_g s_g * z * rowsum_g (subtracted once)
        for (int64_t j = 0; j < 32; ++j) {
          double total = 0;
          for (int64_t group = 0; group < g.groups; ++group)
            total += double(scale_panel[group * 32 + j]) * double(comp_panel[group * 32 + j]);
          offset[j] = float(total);
        }
      }
      for (int64_t m0 = m_begin; m0 < m_end; m0 += 32) {
        const uint8_t* a0 = a + (m0 - m_begin) * g.kp;
        const uint8_t* a1 = a0 + 16 * g.kp;
        if (g.groups == 1) {
          issue_steps(a0, a1, b0, b1, g.kp, 0, ksteps);
          store_tiles(cbuf[0]);
          write_channel_rows(g, cbuf[0], scale_panel, comp_panel, m0, n0);
          continue;
        }
        // Per group: its int32 tiles go to memory, the next group's tile work is issued, then this group's
        // tiles are scaled into fp32 on the vector units while the tile unit computes the next.
        issue_steps(a0, a1, b0, b1, g.kp, 0, g.group_steps);
        for (int64_t group = 0; group < g.groups; ++group) {
          int32_t(*c)[16][16] = cbuf[group & 1];
          store_tiles(c);
          if (group + 1 < g.groups)
            issue_steps(a0, a1, b0, b1, g.kp, (group + 1) * g.group_steps, (group + 2) * g.group_steps);
          for (int t = 0; t < 4; ++t) {  // facc += acc * group scale
            const __m512 scale = _mm512_loadu_ps(scale_panel + group * 32 + (t & 1) * 16);
            if (group == 0) {
              for (int r = 0; r < 16; ++r)
                _mm512_store_ps(facc[t][r], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[t][r])), scale));
            } else {
              for (int r = 0; r < 16; ++r) {
                const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c[t][r]));
                _mm512_store_ps(facc[t][r], _mm512_fmadd_ps(v, scale, _mm512_load_ps(facc[t][r])));
              }
            }
          }
        }
        for (int t = 0; t < 4; ++t) {  // y = (facc - zero point share) * x_scale (+ bias)
          const int64_t nn = n0 + (t & 1) * 16, mm = m0 + (t >> 1) * 16;
          if (nn >= g.n) continue;
          const __mmask16 nmask = g.n - nn >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (g.n - nn)) - 1);
          const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(nmask, g.bias + nn) : _mm512_setzero_ps();
          const __m512 shift = _mm512_load_ps(offset + (t & 1) * 16), scale = _mm512_set1_ps(g.x_scale);
          const int rows = int(std::min<int64_t>(16, g.m - mm));
          for (int r = 0; r < rows; ++r) {
            const __m512 v = _mm512_sub_ps(_mm512_load_ps(facc[t][r]), shift);
            _mm512_mask_storeu_ps(g.y + (mm + r) * g.n + nn, nmask, _mm512_fmadd_ps(v, scale, bias));
          }
        }
      }
    }
  }
  _tile_release();
}

void run_gemm(Gemm& g, const RowSource& src) {
  // Chunks of rows whose A rows stay in L2 (about 512 KiB) while every weight panel of the split passes by.
  const int64_t mp = (g.m + 31) / 32 * 32;
  g.chunk_rows = std::clamp<int64_t>((512 * 1024 / g.kp) / 32 * 32, 32, 256);
  g.chunk_rows = std::min(g.chunk_rows, mp);
  g.chunks = (mp + g.chunk_rows - 1) / g.chunk_rows;
  const int64_t threads = at::get_num_threads(), pairs = g.np / 32;
  // Few row chunks: split the output channels as well, so that every thread has work.
  g.n_splits = g.chunks >= threads ? 1 : std::min(pairs, (threads + g.chunks - 1) / g.chunks);
  at::parallel_for(0, g.chunks * g.n_splits, 1, [&](int64_t begin, int64_t end) { gemm_items(g, src, begin, end); });
}

void check_weights(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& rowsums, int64_t n,
                   int64_t group_cols, int64_t bits) {
  TORCH_CHECK(amx_status() == 0, "quantdiff packed kernels: AMX-INT8 is not usable in this process");
  TORCH_CHECK(bits == 4 || bits == 8, "packed weights are 4 or 8 bits, got ", bits);
  TORCH_CHECK(weight.is_contiguous() && weight.element_size() == 1 && weight.dim() == 3, "packed weight layout");
  TORCH_CHECK(weight.size(2) == (bits == 4 ? 512 : 1024), "packed weight tile size");
  const int64_t np = weight.size(0) * 16, kp = weight.size(1) * 64;
  TORCH_CHECK(group_cols % 64 == 0 && group_cols > 0 && kp % group_cols == 0, "packed weight: group columns");
  const int64_t groups = kp / group_cols;
  TORCH_CHECK(np % 32 == 0 && np >= n, "packed weight: output channels");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  (scales.size(0) == n || scales.size(0) == 1) && scales.size(1) == groups,
              "weight scales: (C_out or 1, groups) float32");
  TORCH_CHECK((rowsums.scalar_type() == at::kShort || rowsums.scalar_type() == at::kInt) && rowsums.is_contiguous() &&
                  rowsums.dim() == 2 && rowsums.size(0) == groups && rowsums.size(1) == np,
              "weight sums: (groups, Np) int16 or int32");
}

Gemm make_gemm(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& rowsums, int64_t m, int64_t n,
               int64_t group_cols, int64_t bits, double x_scale, int64_t x_zp,
               const c10::optional<at::Tensor>& bias, float* y) {
  Gemm g;
  g.m = m;
  g.n = n;
  g.np = weight.size(0) * 16;
  g.kp = weight.size(1) * 64;
  g.groups = g.kp / group_cols;
  g.group_steps = group_cols / 64;
  g.bits = bits;
  g.weight = static_cast<const uint8_t*>(weight.data_ptr());
  g.scales = scales.data_ptr<float>();
  g.scale_rows = scales.size(0);
  g.rowsums = rowsums.data_ptr();
  g.rowsums_int16 = rowsums.scalar_type() == at::kShort;
  g.x_zp = int32_t(x_zp);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n, "bias layout");
    g.bias = bias->data_ptr<float>();
  }
  g.x_scale = float(x_scale);
  g.y = y;
  return g;
}

Quantizer make_quantizer(double x_scale, int64_t x_zp, int64_t q_low, int64_t q_high) {
  TORCH_CHECK(0 <= q_low && q_low <= q_high && q_high <= 255, "input integers must lie in [0, 255]");
  return Quantizer{float(x_scale), float(x_zp), float(q_low), float(q_high)};
}

// ------------------------------------------------------------------------------------------------ ops
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                         const at::Tensor& rowsums, int64_t n, int64_t group_cols, int64_t bits, double x_scale,
                         int64_t x_zp, int64_t q_low, int64_t q_high, const c10::optional<at::Tensor>& bias) {
  check_weights(weight, scales, rowsums, n, group_cols, bits);
  const bool quantized = x.scalar_type() == at::kByte;  // already uint8 (compiled graphs fuse the quantization)
  TORCH_CHECK((quantized || x.scalar_type() == at::kFloat) && x.device().is_cpu(),
              "packed_linear takes float32 (or quantized uint8) CPU inputs");
  const int64_t k = x.size(-1);
  TORCH_CHECK(k <= weight.size(1) * 64, "packed_linear: input has ", k, " features, the weight fewer");
  const at::Tensor rows = x.contiguous();
  const int64_t m = k ? rows.numel() / k : 0;
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  at::Tensor y = at::empty(out_sizes, x.options().dtype(at::kFloat));
  if (m == 0) return y;
  Gemm g = make_gemm(weight, scales, rowsums, m, n, group_cols, bits, x_scale, x_zp, bias, y.data_ptr<float>());
  std::atomic<bool> nan_seen{false};
  RowSource src;
  if (quantized) {
    src.x_u8 = rows.data_ptr<uint8_t>();
  } else {
    src.x = rows.data_ptr<float>();
  }
  src.k = k;
  src.quantizer = make_quantizer(x_scale, x_zp, q_low, q_high);
  src.nan_seen = &nan_seen;
  run_gemm(g, src);
  if (nan_seen.load()) y.fill_(std::numeric_limits<float>::quiet_NaN());  // NaN has no uint8 image
  return y;
}

// One input row (all channels) of an NCHW uint8 image -> its pixels in the NHWC buffer, 16 x 16 at a time.
QD_AMX void transpose_nchw_u8_row(const uint8_t* x, int64_t channels, int64_t h, int64_t w, int64_t image,
                                  int64_t row, uint8_t* xq, int64_t pad_w) {
  const uint8_t* base = x + (image * channels) * h * w + row * w;
  for (int64_t c0 = 0; c0 < channels; c0 += 16) {
    const int64_t cn = std::min<int64_t>(16, channels - c0);
    for (int64_t w0 = 0; w0 < w; w0 += 16) {
      const int64_t wn = std::min<int64_t>(16, w - w0);
      const __mmask16 wmask = wn == 16 ? __mmask16(0xFFFF) : __mmask16((1u << wn) - 1);
      __m128i block[16];
      for (int64_t c = 0; c < 16; ++c)
        block[c] = c < cn ? _mm_maskz_loadu_epi8(wmask, base + (c0 + c) * h * w + w0) : _mm_setzero_si128();
      transpose16x16(block);
      const __mmask16 cmask = cn == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cn) - 1);
      for (int64_t p = 0; p < wn; ++p) _mm_mask_storeu_epi8(xq + (pad_w + w0 + p) * channels + c0, cmask, block[p]);
    }
  }
}

QD_AMX bool quantize_nchw_rows(const float* x, int64_t channels, int64_t h, int64_t w, int64_t image, int64_t row,
                               uint8_t* xq, int64_t padded_w, int64_t pad_w, const Quantizer& q) {
  // one input row (all channels) of an NCHW image -> its pixels in the NHWC buffer, 16 x 16 at a time
  __mmask16 nan_seen = 0;
  const float* base = x + (image * channels) * h * w + row * w;
  for (int64_t c0 = 0; c0 < channels; c0 += 16) {
    const int64_t cn = std::min<int64_t>(16, channels - c0);
    for (int64_t w0 = 0; w0 < w; w0 += 16) {
      const int64_t wn = std::min<int64_t>(16, w - w0);
      const __mmask16 wmask = wn == 16 ? __mmask16(0xFFFF) : __mmask16((1u << wn) - 1);
      __m128i block[16];
      for (int64_t c = 0; c < 16; ++c) {
        if (c < cn) {
          const __m512 v = _mm512_maskz_loadu_ps(wmask, base + (c0 + c) * h * w + w0);
          nan_seen |= _mm512_mask_cmp_ps_mask(wmask, v, v, _CMP_UNORD_Q);
          block[c] = _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(quantize16(v, q)));
        } else {
          block[c] = _mm_setzero_si128();
        }
      }
      transpose16x16(block);
      const __mmask16 cmask = cn == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cn) - 1);
      for (int64_t p = 0; p < wn; ++p) _mm_mask_storeu_epi8(xq + (pad_w + w0 + p) * channels + c0, cmask, block[p]);
    }
  }
  (void)padded_w;
  return nan_seen != 0;
}

at::Tensor packed_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                         const at::Tensor& rowsums, const at::Tensor& segments, int64_t n, at::IntArrayRef kernel,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t group_cols, int64_t bits, double x_scale, int64_t x_zp, int64_t q_low,
                         int64_t q_high, const c10::optional<at::Tensor>& bias) {
  check_weights(weight, scales, rowsums, n, group_cols, bits);
  const bool quantized = x.scalar_type() == at::kByte;  // already uint8 (compiled graphs fuse the quantization)
  TORCH_CHECK((quantized || x.scalar_type() == at::kFloat) && x.device().is_cpu() && x.dim() == 4,
              "packed_conv2d takes float32 (or quantized uint8) CPU inputs (N, C, H, W)");
  TORCH_CHECK(segments.scalar_type() == at::kInt && segments.is_contiguous() && segments.dim() == 2 &&
                  segments.size(1) == 4,
              "packed_conv2d: segment table layout");
  const int64_t images = x.size(0), channels = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  const int64_t hp = h + 2 * ph, wp = w + 2 * pw;
  const int64_t out_h = (hp - dh * (kh - 1) - 1) / sh + 1, out_w = (wp - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(out_h > 0 && out_w > 0, "packed_conv2d: the kernel is larger than the padded input");
  at::Tensor y = at::empty({images, n, out_h, out_w},
                           x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t m = images * out_h * out_w;
  if (m == 0) return y;
  // 1. the quantized input, NHWC, framed by its padding (value: the zero point, i.e. a real 0)
  const Quantizer quantizer = make_quantizer(x_scale, x_zp, q_low, q_high);
  uint8_t* xq = tls_input.get(images * hp * wp * channels + 64);
  std::atomic<bool> nan_seen{false};
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const at::Tensor input = channels_last ? x : x.contiguous();
  const float* xp = quantized ? nullptr : input.data_ptr<float>();
  const uint8_t* xp_u8 = quantized ? input.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, images * hp, 1, [&](int64_t begin, int64_t end) {
    bool nan = false;
    for (int64_t index = begin; index < end; ++index) {
      const int64_t image = index / hp, prow = index % hp, row = prow - ph;
      uint8_t* out = xq + index * wp * channels;
      if (row < 0 || row >= h) {
        std::memset(out, int(x_zp), wp * channels);
        continue;
      }
      std::memset(out, int(x_zp), pw * channels);
      std::memset(out + (pw + w) * channels, int(x_zp), pw * channels);
      if (quantized && channels_last) {
        std::memcpy(out + pw * channels, xp_u8 + ((image * h + row) * w) * channels, w * channels);
      } else if (quantized) {
        transpose_nchw_u8_row(xp_u8, channels, h, w, image, row, out, pw);
      } else if (channels_last) {
        const float* pixels = xp + ((image * h + row) * w) * channels;
        nan |= quantize_row(pixels, w * channels, out + pw * channels, quantizer);
      } else {
        nan |= quantize_nchw_rows(xp, channels, h, w, image, row, out, wp, pw, quantizer);
      }
    }
    if (nan) nan_seen.store(true, std::memory_order_relaxed);
  });
  // 2. the GEMM, with A rows gathered from the window of each output pixel (segments of K in the weight's order)
  std::vector<int64_t> tap_offsets(kh * kw);
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) tap_offsets[i * kw + j] = (i * dh * wp + j * dw) * channels;
  Gemm g = make_gemm(weight, scales, rowsums, m, n, group_cols, bits, x_scale, x_zp, bias, y.data_ptr<float>());
  RowSource src;
  src.xq = xq;
  src.channels = channels;
  src.padded_h = hp;
  src.padded_w = wp;
  src.out_h = out_h;
  src.out_w = out_w;
  src.stride_h = sh;
  src.stride_w = sw;
  src.segments = segments.data_ptr<int32_t>();
  src.segment_count = segments.size(0);
  src.tap_offsets = tap_offsets.data();
  run_gemm(g, src);
  if (nan_seen.load()) y.fill_(std::numeric_limits<float>::quiet_NaN());
  return y;
}

// ------------------------------------------------------------------------------------------------ weight-only
// One row of stored weights -> values: 4-bit rows hold element 2j in the low nibble of byte j (two's complement
// when signed), 8-bit rows one value per byte.
__attribute__((target_clones("avx512f", "avx2", "default"))) void unpack_row(const uint8_t* stored, int64_t k,
                                                                            int64_t bits, bool signed_values,
                                                                            int16_t* values) {
  if (bits == 4) {
    for (int64_t j = 0; j < k / 2; ++j) {
      const int16_t lo = stored[j] & 15, hi = stored[j] >> 4;
      values[2 * j] = signed_values ? int16_t((lo ^ 8) - 8) : lo;
      values[2 * j + 1] = signed_values ? int16_t((hi ^ 8) - 8) : hi;
    }
    if (k % 2) {
      const int16_t lo = stored[k / 2] & 15;
      values[k - 1] = signed_values ? int16_t((lo ^ 8) - 8) : lo;
    }
  } else if (signed_values) {
    const int8_t* s8 = reinterpret_cast<const int8_t*>(stored);
    for (int64_t j = 0; j < k; ++j) values[j] = s8[j];
  } else {
    for (int64_t j = 0; j < k; ++j) values[j] = stored[j];
  }
}

// (q - z) * s per group, as quantdiff.primitives.dequantize computes it (q - z exact in float32, one rounding).
__attribute__((target_clones("avx512f", "avx2", "default"))) void scale_row(const int16_t* values, int64_t k,
                                                                           const float* scale,
                                                                           const int32_t* zero_point,
                                                                           int64_t group_size, int64_t groups,
                                                                           float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * group_size, end = std::min(k, begin + group_size);
    const float s = scale[g], z = zero_point ? float(zero_point[g]) : 0.f;
    for (int64_t j = begin; j < end; ++j) out[j] = (float(values[j]) - z) * s;
  }
}

// The same values rounded to bfloat16 (round to nearest even; weights are finite).
__attribute__((target_clones("avx512f", "avx2", "default"))) void scale_row_bf16(const int16_t* values, int64_t k,
                                                                                const float* scale,
                                                                                const int32_t* zero_point,
                                                                                int64_t group_size, int64_t groups,
                                                                                uint16_t* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * group_size, end = std::min(k, begin + group_size);
    const float s = scale[g], z = zero_point ? float(zero_point[g]) : 0.f;
    for (int64_t j = begin; j < end; ++j) {
      const float v = (float(values[j]) - z) * s;
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      out[j] = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }
  }
}

void dequantize_into(const at::Tensor& weight_q, const at::Tensor& scale, const c10::optional<at::Tensor>& zero_point,
                     int64_t k, int64_t bits, int64_t group_size, bool signed_values, at::Tensor out) {
  TORCH_CHECK(bits == 4 || bits == 8, "dequantize_into: 4 or 8 bits, got ", bits);
  TORCH_CHECK(weight_q.is_contiguous() && weight_q.element_size() == 1 && weight_q.dim() == 2, "weight_q layout");
  const int64_t rows = weight_q.size(0);
  TORCH_CHECK(weight_q.size(1) == (bits == 4 ? (k + 1) / 2 : k), "dequantize_into: weight_q has the wrong width");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2, "scale layout");
  TORCH_CHECK(scale.size(0) == rows || scale.size(0) == 1, "dequantize_into: one scale row per output channel");
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || out.scalar_type() == at::kFloat) && out.is_contiguous() && out.numel() == rows * k,
              "dequantize_into: out must be a contiguous float32 or bfloat16 tensor of C_out x K values");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(group_size > 0 && (k + group_size - 1) / group_size == groups, "dequantize_into: group size");
  const int32_t* zp = nullptr;
  if (zero_point.has_value()) {
    TORCH_CHECK(zero_point->scalar_type() == at::kInt && zero_point->sizes() == scale.sizes() &&
                    zero_point->is_contiguous(),
                "zero point layout");
    zp = zero_point->data_ptr<int32_t>();
  }
  const uint8_t* stored = static_cast<const uint8_t*>(weight_q.data_ptr());
  const float* sp = scale.data_ptr<float>();
  void* op = out.data_ptr();
  const int64_t width = weight_q.size(1);
  const bool per_tensor = scale.size(0) == 1;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> values(k + 1);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t srow = per_tensor ? 0 : r;
      unpack_row(stored + r * width, k, bits, signed_values, values.data());
      const float* row_scale = sp + srow * groups;
      const int32_t* row_zp = zp ? zp + srow * groups : nullptr;
      if (bf16) {
        scale_row_bf16(values.data(), k, row_scale, row_zp, group_size, groups, static_cast<uint16_t*>(op) + r * k);
      } else {
        scale_row(values.data(), k, row_scale, row_zp, group_size, groups, static_cast<float*>(op) + r * k);
      }
    }
  });
}

// x -> clamp(round(x / s) + 0, lo, hi) * s in float32, one pass: the float path's input fake-quantization
// (lo, hi: the integer range minus the zero point), bit for bit what torch computes in five passes (IEEE
// division, round half to even, "+ 0" turning -0 into +0, NaN kept by the clamp, one rounding of the product).
__attribute__((target_clones("avx512f", "avx2", "default"))) void fake_quantize_span(const float* x, int64_t n,
                                                                                   float scale, float low,
                                                                                   float high, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    float v = std::nearbyint(x[i] / scale) + 0.0f;
    v = v < low ? low : v;  // NaN compares false both times and stays NaN, as in torch.clamp
    v = v > high ? high : v;
    out[i] = v * scale;
  }
}

at::Tensor fake_quantize(const at::Tensor& x, double scale, double low, double high) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "fake_quantize: float32 CPU input");
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const float* src = input.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float s = float(scale), lo = float(low), hi = float(high);
  at::parallel_for(0, input.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    fake_quantize_span(src + begin, end - begin, s, lo, hi, dst + begin);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(quantdiff_packed, m) {
  m.def("amx_status() -> int", &amx_status);
  m.def(
      "packed_linear(Tensor x, Tensor weight, Tensor scales, Tensor rowsums, int n, int group_cols, int bits, "
      "float x_scale, int x_zp, int q_low, int q_high, Tensor? bias) -> Tensor");
  m.def(
      "packed_conv2d(Tensor x, Tensor weight, Tensor scales, Tensor rowsums, Tensor segments, int n, int[2] kernel, "
      "int[2] stride, int[2] padding, int[2] dilation, int group_cols, int bits, float x_scale, int x_zp, "
      "int q_low, int q_high, Tensor? bias) -> Tensor");
  m.def(
      "dequantize_into(Tensor weight_q, Tensor scale, Tensor? zero_point, int k, int bits, int group_size, "
      "bool signed_values, "
      "Tensor(a!) out) -> ()");
  m.def("fake_quantize(Tensor x, float scale, float low, float high) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantdiff_packed, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("packed_conv2d", &packed_conv2d);
  m.impl("dequantize_into", &dequantize_into);
  m.impl("fake_quantize", &fake_quantize);
}
