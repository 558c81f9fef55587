// int8 scaled-dot-product attention on Intel AMX tiles (see quantdiff/nn/int8_attention.py for the math and why).
//
// quantdiff_attention::int8_attention(query, key, value, key_mean, scale) -> out: fp32 (B, heads, T, d) inputs
// (any strides with d contiguous: diffusers hands over transposed views) and the mean key of each head over its
// tokens (B * heads, d), computed by the caller so that both paths subtract the same floats. Per head, one pass
// quantizes Q (per token), K - mean (per token) and V (per channel) with the reference's formulas, straight into
// the tile layouts below. Then per block of 32 queries:
//   1. S = Q K^T on TDPBSSD (int8 x int8 -> int32), the whole row strip of Tk keys at once (32 x Tk int32, in
//      L2 for Tk up to a few thousand): no online softmax is needed, so P is rounded as in the reference;
//   2. per row, in fp32: s = S * q_scale * k_scale, max, P = exp(s - max), and P_q = round(65535 P) as two
//      uint8 digits (high and low byte) with its integer row sum;
//   3. O = 256 (P_high V) + P_low V, each on TDPBUSD (uint8 x int8 -> int32), then O * (v_scale / sum P_q).
// The integers equal the reference's; only the softmax's floats are computed differently (q_scale applied after
// the max, exp as a polynomial of 2^f: ~1e-7 relative), which can flip the rounding of a P_q now and then.
// A NaN or infinity in Q, K or V makes the whole output NaN.
// The reduction of QK^T (d) is split into equal steps of at most 64 bytes, a multiple of 4 (d = 40: one step of
// 40), so that no zero padding to 64 is multiplied. Layouts:
//   Q rows: (Tq rounded up to 32) x (steps * kc) bytes, zero padded;
//   K tiles: per block of 16 keys and per step, the AMX "VNNI" B layout: byte r*64 + j*4 + i = K[key0 + j,
//     step*kc + 4r + i] (kc / 4 rows of 64 bytes);
//   V tiles: per block of 16 value channels and per 64 keys: byte r*64 + j*4 + i = V[key0 + 4r + i, c0 + j].

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

#include "amx_common.h"

namespace {

using quantdiff_amx::amx_status;  // capability, buffers, tile layout: amx_common.h
using quantdiff_amx::Scratch;
using quantdiff_amx::configure_tiles;

constexpr int64_t kRows = 32;  // queries per block: two 16-row A tiles

thread_local Scratch tls_scores, tls_probs, tls_out;


// 65535 2^t for t <= 0 (t = log2 e x (s - rowmax)), to about 1e-7 relative: 2^n x 65535 x 2^f with f in
// [-0.5, 0.5], a degree-5 polynomial of 2^f fitted for relative error (7.7e-8 on the interval) with the factor
// 65535 folded into its coefficients. Five FMAs: the softmax is ALU-bound (section 7 of benchmarks/KERNELS.md),
// and a last-bit error only flips a P_q's rounding now and then. A very negative t gives 0 (scalef underflows).
constexpr float kLevels = 65535.0f;  // P_q's 16 bits, held as two uint8 digits

QD_AMX inline __m512 exp2_levels_ps(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kLevels * 0.0013266979924401229f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLevels * 0.00967546939535019f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLevels * 0.05550742675408632f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLevels * 0.240221215762287f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLevels * 0.6931469490692165f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLevels * 1.0000000710651664f));
  return _mm512_scalef_ps(p, n);
}

struct Shapes {
  int64_t bh, tq, tk, d, dv;
  int64_t steps, kc;     // QK^T reduction: steps of kc bytes (kc a multiple of 4, <= 64), steps * kc >= d
  int64_t tkp;           // keys rounded up to 64 (one PV step)
  int64_t tqp;           // queries rounded up to 32
  int64_t vtiles;        // value channels / 16, rounded up
};

// ------------------------------------------------------------------------------------------------ quantize
// The reference's formulas (quantdiff/nn/int8_attention.py: _symmetric), bit for bit: scale = max(amax / 127,
// 1e-30), q = clamp(round(x / scale), -127, 127) with IEEE division and round half to even.
constexpr float kTiny = 1e-30f;

// Lanes i .. i + 15 that lie below n (none from n on: the softmax walks the keys up to Tkp).
inline __mmask16 tail_mask(int64_t n, int64_t i) {
  return n - i >= 16 ? __mmask16(0xFFFF) : n <= i ? __mmask16(0) : __mmask16((1u << (n - i)) - 1);
}

// NaN and infinities have no int8 image (and max() would drop a NaN): they are counted, and the call answers NaN.
constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;  // fpclass: QNaN, +Inf, -Inf, SNaN

QD_AMX float row_scale(const float* x, int64_t n, bool& non_finite) {
  __m512 top = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n, i), x + i);
    bad |= _mm512_fpclass_ps_mask(v, kNonFinite);
    top = _mm512_max_ps(top, _mm512_abs_ps(v));
  }
  non_finite |= bad != 0;
  return std::max(_mm512_reduce_max_ps(top) / 127.0f, kTiny);
}

// n values / (one scale, or a scale per value) -> int8
QD_AMX inline __m512i quantize16(__m512 v, __m512 scale) {
  const __m512i q = _mm512_cvtps_epi32(
      _mm512_roundscale_ps(_mm512_div_ps(v, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
}

QD_AMX void quantize_row(const float* x, int64_t n, float scale, int8_t* out) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n, i);
    _mm512_mask_cvtepi32_storeu_epi8(out + i, mask, quantize16(_mm512_maskz_loadu_ps(mask, x + i), s));
  }
}

// Strided fp32 (B, H, T, d) with d contiguous: the row of token t of flattened head bh.
struct View {
  const float* data;
  int64_t heads, stride_b, stride_h, stride_t;
  const float* row(int64_t bh, int64_t t) const {
    return data + (bh / heads) * stride_b + (bh % heads) * stride_h + t * stride_t;
  }
};

View view_of(const at::Tensor& x) {
  return View{x.data_ptr<float>(), x.size(1), x.stride(0), x.stride(1), x.stride(2)};
}

struct Packed {
  int8_t* q_rows;   // (BH, Tqp, steps * kc)
  int8_t* k_tiles;  // (BH, Tkp / 16, steps, kc * 16)
  int8_t* v_tiles;  // (BH, vtiles, Tkp / 64, 1024)
  float* q_scale;   // (BH, Tq): per query token, times the softmax scale
  float* k_scale;   // (BH, Tk)
  float* v_scale;   // (BH, dv)
};

// Quantize and lay out the queries, keys and values of flattened head b (one thread).
// Returns whether any input value of the head is not finite.
QD_AMX bool quantize_head(const Shapes& s, const View& q, const View& k, const View& v, const float* key_mean,
                          float softmax_scale, int64_t b, const Packed& out) {
  bool non_finite = false;
  const int64_t pitch = s.steps * s.kc, tile = s.kc * 16, kblocks = s.tkp / 16, ksteps = s.tkp / 64;
  int8_t row[1024];
  float smoothed[1024];
  // queries: rows of steps * kc bytes, zero padded
  int8_t* q_rows = out.q_rows + b * s.tqp * pitch;
  std::memset(q_rows, 0, s.tqp * pitch);
  for (int64_t t = 0; t < s.tq; ++t) {
    const float* x = q.row(b, t);
    const float scale = row_scale(x, s.d, non_finite);
    quantize_row(x, s.d, scale, q_rows + t * pitch);
    out.q_scale[b * s.tq + t] = scale * softmax_scale;
  }
  // keys minus their mean over the tokens, per token, into the VNNI tiles of their block of 16
  int8_t* k_tiles = out.k_tiles + b * kblocks * s.steps * tile;
  std::memset(k_tiles, 0, kblocks * s.steps * tile);
  const float* mean = key_mean + b * s.d;
  for (int64_t t = 0; t < s.tk; ++t) {
    const float* x = k.row(b, t);
    for (int64_t i = 0; i < s.d; i += 16) {
      const __mmask16 mask = tail_mask(s.d, i);
      _mm512_mask_storeu_ps(smoothed + i, mask,
                            _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + i), _mm512_maskz_loadu_ps(mask, mean + i)));
    }
    const float scale = row_scale(smoothed, s.d, non_finite);
    quantize_row(smoothed, s.d, scale, row);
    out.k_scale[b * s.tk + t] = scale;
    int8_t* block = k_tiles + (t / 16) * s.steps * tile + (t % 16) * 4;
    for (int64_t step = 0, c = 0; step < s.steps; ++step) {
      int8_t* dst = block + step * tile;
      for (int64_t w = 0; w < s.kc && c < s.d; w += 4, c += 4) {  // 4 channels = one 32-bit lane of row w / 4
        int32_t quad = 0;
        std::memcpy(&quad, row + c, std::min<int64_t>(4, s.d - c));
        std::memcpy(dst + (w / 4) * 64, &quad, 4);
      }
    }
  }
  // values: one scale per channel over the tokens, then 4 tokens x 16 channels per 64-byte tile row
  float* v_scale = out.v_scale + b * s.dv;
  for (int64_t i = 0; i < s.dv; i += 16) {
    const __mmask16 mask = tail_mask(s.dv, i);
    __m512 top = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t t = 0; t < s.tk; ++t) {
      const __m512 x = _mm512_maskz_loadu_ps(mask, v.row(b, t) + i);
      bad |= _mm512_fpclass_ps_mask(x, kNonFinite);
      top = _mm512_max_ps(top, _mm512_abs_ps(x));
    }
    non_finite |= bad != 0;
    _mm512_mask_storeu_ps(v_scale + i, mask, _mm512_max_ps(_mm512_div_ps(top, _mm512_set1_ps(127.0f)), _mm512_set1_ps(kTiny)));
  }
  int8_t* v_tiles = out.v_tiles + b * s.vtiles * ksteps * 1024;
  std::memset(v_tiles, 0, s.vtiles * ksteps * 1024);
  for (int64_t t = 0; t < s.tk; ++t) {
    const float* x = v.row(b, t);
    int8_t* base = v_tiles + (t / 64) * 1024 + ((t % 64) / 4) * 64 + t % 4;
    for (int64_t i = 0; i < s.dv; i += 16) {
      const __mmask16 mask = tail_mask(s.dv, i);
      alignas(16) int8_t q16[16];
      _mm512_mask_cvtepi32_storeu_epi8(q16, mask,
                                       quantize16(_mm512_maskz_loadu_ps(mask, x + i), _mm512_maskz_loadu_ps(mask, v_scale + i)));
      int8_t* dst = base + (i / 16) * ksteps * 1024;
      for (int64_t j = 0; j < std::min<int64_t>(16, s.dv - i); ++j) dst[j * 4] = q16[j];
    }
  }
  return non_finite;
}

struct Inputs {
  const int8_t* q_rows;
  const int8_t* k_tiles;
  const int8_t* v_tiles;
  const float* q_scale;  // (BH, Tq)
  const float* k_scale;  // (BH, Tk)
  const float* v_scale;  // (BH, dv)
  float* out;            // (BH, Tq, dv)
};

// 1. S (32 x Tkp int32, pitch Tkp) = Q block x K^T.
QD_AMX void scores_block(const Shapes& s, const int8_t* q_rows, const int8_t* k_tiles, int32_t* scores) {
  const int64_t pitch = s.steps * s.kc, tile = s.kc * 16;
  configure_tiles(int(s.kc), int(s.kc / 4));
  if (s.steps == 1) {  // the query tiles stay loaded over all keys
    _tile_loadd(4, q_rows, pitch);
    _tile_loadd(5, q_rows + 16 * pitch, pitch);
  }
  for (int64_t kb = 0; kb < (s.tk + 31) / 32 * 2; kb += 2) {  // pairs of 16-key blocks holding a key
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t step = 0; step < s.steps; ++step) {
      if (s.steps > 1) {
        _tile_loadd(4, q_rows + step * s.kc, pitch);
        _tile_loadd(5, q_rows + 16 * pitch + step * s.kc, pitch);
      }
      _tile_loadd(6, k_tiles + (kb * s.steps + step) * tile, 64);
      _tile_loadd(7, k_tiles + ((kb + 1) * s.steps + step) * tile, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
    int32_t* c = scores + kb * 16;
    _tile_stored(0, c, s.tkp * 4);
    _tile_stored(1, c + 16, s.tkp * 4);
    _tile_stored(2, c + 16 * s.tkp, s.tkp * 4);
    _tile_stored(3, c + 16 * s.tkp + 16, s.tkp * 4);
  }
}

// 2. One row: P_q = round(65535 exp(s - max)) as its high and low bytes (0 from Tk to Tkp); returns sum P_q (each
// of the 16 lanes sums at most 65535 x 4,063 < 2^31; the total needs 64 bits). s = S x q_scale x k_scale; as
// q_scale > 0, the max is taken over S x k_scale and q_scale joins log2 e in one factor: a max pass that stores
// nothing, then one pass of exp, rounding and packing 64 keys at a time.
QD_AMX int64_t softmax_row(const int32_t* acc, float q_scale, const float* k_scale, int64_t tk, int64_t tkp,
                           uint8_t* high, uint8_t* low) {
  __m512 peak = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t k = 0; k < tk; k += 16) {
    const __mmask16 mask = tail_mask(tk, k);
    const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, acc + k)),
                                   _mm512_maskz_loadu_ps(mask, k_scale + k));
    peak = _mm512_mask_max_ps(peak, mask, peak, v);
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
  const __m512 factor = _mm512_set1_ps(q_scale * 1.4426950408889634f);
  // packus works within 128-bit lanes: after the two packs, 32-bit unit 4L + j holds keys 16j + 4L .. + 3
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i byte = _mm512_set1_epi16(255);
  __m512i total = _mm512_setzero_si512();
  for (int64_t k = 0; k < tkp; k += 64) {
    __m512i p[4];
    for (int j = 0; j < 4; ++j) {
      const __mmask16 mask = tail_mask(tk, k + 16 * j);
      const __m512 s = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, acc + k + 16 * j)),
                                       _mm512_maskz_loadu_ps(mask, k_scale + k + 16 * j), top);
      p[j] = _mm512_maskz_cvt_roundps_epi32(mask, exp2_levels_ps(_mm512_mul_ps(s, factor)),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      total = _mm512_add_epi32(total, p[j]);
    }
    const __m512i words01 = _mm512_packus_epi32(p[0], p[1]), words23 = _mm512_packus_epi32(p[2], p[3]);
    const __m512i hi = _mm512_packus_epi16(_mm512_srli_epi16(words01, 8), _mm512_srli_epi16(words23, 8));
    const __m512i lo = _mm512_packus_epi16(_mm512_and_si512(words01, byte), _mm512_and_si512(words23, byte));
    _mm512_storeu_si512(high + k, _mm512_permutexvar_epi32(order, hi));
    _mm512_storeu_si512(low + k, _mm512_permutexvar_epi32(order, lo));
  }
  return _mm512_reduce_add_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(total))) +
         _mm512_reduce_add_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(total, 1)));
}

// 3. O (32 x 16 * vtiles int32, pitch 16 * vtiles) = one uint8 digit of the P_q block x V, two value tiles at a
// time.
QD_AMX void values_block(const Shapes& s, const uint8_t* probs, const int8_t* v_tiles, int32_t* out) {
  const int64_t ksteps = s.tkp / 64, pitch = 16 * s.vtiles;
  configure_tiles(64, 16);
  for (int64_t vt = 0; vt < s.vtiles; vt += 2) {
    const bool pair = vt + 1 < s.vtiles;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t ks = 0; ks < ksteps; ++ks) {
      _tile_loadd(4, probs + ks * 64, s.tkp);
      _tile_loadd(5, probs + 16 * s.tkp + ks * 64, s.tkp);
      _tile_loadd(6, v_tiles + (vt * ksteps + ks) * 1024, 64);
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(2, 5, 6);
      if (pair) {
        _tile_loadd(7, v_tiles + ((vt + 1) * ksteps + ks) * 1024, 64);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(3, 5, 7);
      }
    }
    int32_t* c = out + vt * 16;
    _tile_stored(0, c, pitch * 4);
    _tile_stored(2, c + 16 * pitch, pitch * 4);
    if (pair) {
      _tile_stored(1, c + 16, pitch * 4);
      _tile_stored(3, c + 16 * pitch + 16, pitch * 4);
    }
  }
}

QD_AMX void attention_items(const Shapes& s, const Inputs& in, int64_t begin, int64_t end) {
  const int64_t blocks = s.tqp / kRows, pitch = s.steps * s.kc, vpitch = 16 * s.vtiles;
  int32_t* acc = reinterpret_cast<int32_t*>(tls_scores.get(kRows * s.tkp * 4 + 64));
  uint8_t* high = tls_probs.get(2 * kRows * s.tkp + 64);
  uint8_t* low = high + kRows * s.tkp;
  int32_t* out_high = reinterpret_cast<int32_t*>(tls_out.get(2 * kRows * vpitch * 4 + 64));
  int32_t* out_low = out_high + kRows * vpitch;
  int64_t totals[kRows];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / blocks, q0 = (item % blocks) * kRows;
    const int64_t rows = std::min(kRows, s.tq - q0);
    scores_block(s, in.q_rows + (b * s.tqp + q0) * pitch, in.k_tiles + b * (s.tkp / 16) * s.steps * s.kc * 16,
                 acc);
    for (int64_t r = 0; r < kRows; ++r) {
      if (r >= rows) {  // padding queries: P = 0, their output is not written
        std::memset(high + r * s.tkp, 0, s.tkp);
        std::memset(low + r * s.tkp, 0, s.tkp);
        continue;
      }
      totals[r] = softmax_row(acc + r * s.tkp, in.q_scale[b * s.tq + q0 + r], in.k_scale + b * s.tk, s.tk, s.tkp,
                              high + r * s.tkp, low + r * s.tkp);
    }
    const int8_t* v_tiles = in.v_tiles + b * s.vtiles * (s.tkp / 64) * 1024;
    values_block(s, high, v_tiles, out_high);
    values_block(s, low, v_tiles, out_low);
    const float* vs = in.v_scale + b * s.dv;
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = in.out + (b * s.tq + q0 + r) * s.dv;
      const __m512 total = _mm512_set1_ps(float(totals[r]));
      for (int64_t c = 0; c < s.dv; c += 16) {
        const __mmask16 mask = tail_mask(s.dv, c);
        const __m512 weight = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, vs + c), total);
        // 256 x high + low: exact product, one rounding of the sum (the reference's two ops give the same)
        const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(out_high + r * vpitch + c)),
                                         _mm512_set1_ps(256.0f),
                                         _mm512_cvtepi32_ps(_mm512_loadu_si512(out_low + r * vpitch + c)));
        _mm512_mask_storeu_ps(dst + c, mask, _mm512_mul_ps(v, weight));
      }
    }
  }
  _tile_release();
}

at::Tensor int8_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const at::Tensor& key_mean, double scale) {
  TORCH_CHECK(amx_status() == 0, "quantdiff int8 attention: AMX-INT8 is not usable in this process");
  for (const at::Tensor* t : {&query, &key, &value})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->stride(3) == 1 && t->device().is_cpu(),
                "int8_attention: query, key, value must be float32 (B, heads, T, d) CPU tensors, d contiguous");
  Shapes s;
  s.bh = query.size(0) * query.size(1);
  s.tq = query.size(2);
  s.tk = key.size(2);
  s.d = query.size(3);
  s.dv = value.size(3);
  TORCH_CHECK(key.size(0) == query.size(0) && key.size(1) == query.size(1) && value.sizes().slice(0, 3) == key.sizes().slice(0, 3) &&
                  key.size(3) == s.d,
              "int8_attention: query, key, value shapes do not match");
  TORCH_CHECK(s.tk > 0 && s.tk < 65000, "int8_attention: 1 to 64,999 keys (int32 PV sums)");
  TORCH_CHECK(s.d <= 1024 && s.dv <= 1024, "int8_attention: head dimensions up to 1024");
  TORCH_CHECK(key_mean.scalar_type() == at::kFloat && key_mean.is_contiguous() && key_mean.numel() == s.bh * s.d,
              "int8_attention: key_mean (B * heads, d) float32");
  s.steps = (s.d + 63) / 64;
  s.kc = ((s.d + s.steps - 1) / s.steps + 3) / 4 * 4;
  s.tkp = (s.tk + 63) / 64 * 64;
  s.tqp = (s.tq + kRows - 1) / kRows * kRows;
  s.vtiles = (s.dv + 15) / 16;
  at::Tensor out = at::empty({query.size(0), query.size(1), s.tq, s.dv}, query.options());
  if (s.tq == 0 || s.dv == 0) return out;
  const auto bytes = query.options().dtype(at::kChar);
  at::Tensor q_rows = at::empty({s.bh * s.tqp * s.steps * s.kc}, bytes);
  at::Tensor k_tiles = at::empty({s.bh * (s.tkp / 16) * s.steps * s.kc * 16}, bytes);
  at::Tensor v_tiles = at::empty({s.bh * s.vtiles * (s.tkp / 64) * 1024}, bytes);
  at::Tensor q_scale = at::empty({s.bh * s.tq}, query.options());
  at::Tensor k_scale = at::empty({s.bh * s.tk}, query.options());
  at::Tensor v_scale = at::empty({s.bh * s.dv}, query.options());
  const Packed packed{q_rows.data_ptr<int8_t>(), k_tiles.data_ptr<int8_t>(), v_tiles.data_ptr<int8_t>(),
                      q_scale.data_ptr<float>(), k_scale.data_ptr<float>(),  v_scale.data_ptr<float>()};
  const View q = view_of(query), k = view_of(key), v = view_of(value);
  const float* mean = key_mean.data_ptr<float>();
  std::atomic<bool> non_finite{false};
  at::parallel_for(0, s.bh, 1, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t b = begin; b < end; ++b) bad |= quantize_head(s, q, k, v, mean, float(scale), b, packed);
    if (bad) non_finite.store(true, std::memory_order_relaxed);
  });
  if (non_finite.load()) return out.fill_(std::numeric_limits<float>::quiet_NaN());
  const Inputs in{packed.q_rows, packed.k_tiles, packed.v_tiles, packed.q_scale, packed.k_scale, packed.v_scale,
                  out.data_ptr<float>()};
  at::parallel_for(0, s.bh * (s.tqp / kRows), 1,
                   [&](int64_t begin, int64_t end) { attention_items(s, in, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY(quantdiff_attention, m) {
  m.def("amx_status() -> int", &amx_status);
  m.def("int8_attention(Tensor query, Tensor key, Tensor value, Tensor key_mean, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantdiff_attention, CPU, m) { m.impl("int8_attention", &int8_attention); }
