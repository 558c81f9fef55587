// What quantdiff's AMX extensions share (packed_amx.cpp, attention_amx.cpp): the capability check, the
// per-thread scratch buffers and the tile configuration. Each extension is built on its own (so a
// change to one leaves the other's cached build valid); the Python loaders hash this header into the build
// flags, so editing it rebuilds both.
#pragma once

#include <ATen/ATen.h>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#define QD_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")))

namespace quantdiff_amx {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask the kernel for the AMX tile state
constexpr long kXfeatureXtiledata = 18;

// 0: AMX-INT8 usable; 1: the CPU lacks AMX-TILE / AMX-INT8 / AVX-512BW; 2: the OS refused the tile state.
inline int64_t amx_status() {
  static const int64_t state = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return int64_t(1);
    const bool avx512f = ebx & (1u << 16), avx512bw = ebx & (1u << 30);
    const bool amx_tile = edx & (1u << 24), amx_int8 = edx & (1u << 25);
    if (!(avx512f && avx512bw && amx_tile && amx_int8)) return int64_t(1);
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return int64_t(2);
    return int64_t(0);
  }();
  return state;
}

// A grow-only, 64-byte aligned scratch buffer. Thread-local instances hold what one thread works on (quantized
// inputs, unpacked weight panels, score rows): no allocation (and no page faults) per call.
struct Scratch {
  uint8_t* data = nullptr;
  size_t size = 0;
  ~Scratch() { std::free(data); }
  uint8_t* get(size_t bytes) {
    if (bytes > size) {
      std::free(data);
      size = (bytes + 4095) / 4096 * 4096;
      data = static_cast<uint8_t*>(std::aligned_alloc(64, size));
      TORCH_CHECK(data != nullptr, "quantdiff AMX kernels: out of memory for a ", size, "-byte scratch buffer");
    }
    return data;
  }
};

// The 64-byte operand of _tile_loadconfig (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Loads a palette-1 configuration of 8 tiles of 16 rows x 64 bytes, except tiles 4 and 5 (A operands) of
// a_bytes per row and tiles 6 and 7 (B operands) of b_rows rows: 0-3 hold int32 accumulators (16 x 16).
QD_AMX inline void configure_tiles(int a_bytes = 64, int b_rows = 16) {
  TileConfig config;
  std::memset(&config, 0, sizeof(config));
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  config.colsb[4] = config.colsb[5] = uint16_t(a_bytes);
  config.rows[6] = config.rows[7] = uint8_t(b_rows);
  _tile_loadconfig(&config);
}

}  // namespace quantdiff_amx
