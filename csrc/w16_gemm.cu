// The w16 route's GEMM in CUDA: y = A' @ W'^T (+ bias) with the INT4 weights dequantized to
// fp16 / bf16 in registers and 16-bit tensor-core MMAs (mma.sync m16n8k16, fp32 accumulate).
// Plain CUDA (no torch).
//
// Semantics: cometq.kernels.w16_gemm.w16_gemm (the Triton kernel of the same route), within
// cometq.kernels.dequant_gemm.DEQUANT_GEMM_RTOL of the integer-exact reference:
//   A'[m, k]  the activation operand (cometq::fake_quant_act: q * scale rounded to the 16-bit
//             dtype), half-split K order (layout.half_split_blocks: per 128-channel block the 64
//             even channels, then the 64 odd ones -- what the packed nibbles give);
//   W'[n, k]  = v * s (+ o) for the nibble v of qweight, the group's scale s and offset o, both
//             rounded to the operand dtype, one rounding (HFMA2) -- the Triton kernel's fp16 numerics;
//   y         = sum_k A' W' in fp32 (+ bias), rounded once to the output dtype.
//
// ============================================================================
// Why (H100 run 7, Llama-3-8B geometry, batch-64 decode): the integer W4Ax kernels are bound by
// instruction issue, not weight bytes.  Per 128-channel block they convert their INT32
// accumulators to fp32 and rescale them by the token's block scale and the weight's group scale --
// per output element, every block: at a 64 x 64 tile that flush is ~160 of ~630 SASS
// instructions per warp and block, for 1 KB of weights per warp (~1.6 B per instruction; at 4
// instructions per clock per SM that is ~1.5 TB/s at best -- run 7 measured ~0.9).  Here the
// activation scale is already inside A' and the weight scale is folded into the dequantized
// weight, so the K loop has no epilogue at all and every MMA accumulates straight through:
//
//     per K block and warp (32 weight rows x BM tokens):  4 LDS.128 of weights, 16 words ->
//     64 fp16 pairs (2 PRMT + 4 LOP3 + 4 HSUB2 + 4 HFMA2 per word: 224 instructions),
//     BM/2 LDS.128 of A', 16 * BM/8 MMAs  -->  ~520 instructions at BM = 64 for 2 KB of weights
//     (~3.9 B per instruction; the Triton w16 kernel's 64 x 64 tile: ~388 for 1 KB).
//
// The product is computed transposed -- out^T = W' A'^T -- so the weights are the MMA's A operand
// (m16: 16 weight rows) and the tokens its n8 side: at decode the token count is small (8-64)
// and the n8 side pads the least (M = 1: 7 of 8 columns wasted instead of 15 of 16 rows).
//
// ============================================================================
// Fragments (mma.m16n8k16, g = lane / 4, t = lane % 4):
//     A (weights) a0: row g,   k slots 2t, 2t+1      a1: row g+8, slots 2t, 2t+1
//                 a2: row g,   slots 2t+8, 2t+9      a3: row g+8, slots 2t+8, 2t+9
//     B (A'^T)    b0: token g, slots 2t, 2t+1        b1: token g, slots 2t+8, 2t+9
//     C           c0, c1: row g, tokens 2t, 2t+1;    c2, c3: row g+8, tokens 2t, 2t+1
// k-slot -> half-split position (any bijection works if A and B use the same one): thread t owns
// bytes 16t .. 16t+15 of each weight row's 64-byte block, i.e. 4 words; word s' (bytes
// j0 = 16t + 4s' .. j0+3) holds positions j0..j0+3 in its low nibbles and 64+j0.. in its high ones:
//     k step (s', lo):  slots 2t, 2t+1 <- positions j0, j0+1;   slots 2t+8, 2t+9 <- j0+2, j0+3
//     k step (s', hi):  the same + 64
// so one weight word gives 4 A registers of 2 k steps (bytes {0,1} and {2,3} by PRMT, low / high
// nibbles by the LOP3 mask), and the B registers of a token for steps s' = 2q, 2q+1 are the 16
// bytes of A' at positions 16t + 8q .. +7: one LDS.128 (16-byte chunk 2t + q, + 8 for hi).
//
// Nibble -> 16-bit value without a conversion instruction (the magic-exponent trick; the stored
// nibble u is v in two's complement, u ^ 8 = v + 8 in 0..15):
//     fp16 lo:  (x & 0x000F000F) ^ 0x64086408  = bits 0x6400 | (v + 8)       = 1032 + v
//     fp16 hi:  (x & 0x00F000F0) ^ 0x54805480  = bits 0x5400 | (v + 8) << 4  = 72 + v    (ulp 1/16)
//     bf16:     (x [>> 4] & 0x000F000F) ^ 0x43084308 = 136 + v  (bf16 has 7 mantissa bits: the high
//               nibble would touch the exponent, so it is shifted down first)
// one LOP3 each (lut 0x6A = (a & b) ^ c); subtracting the same bits (HSUB2) leaves v exactly, and
// HFMA2 gives v * s + o with one rounding.
//
// ============================================================================
// Shared memory, one K block per pipeline stage (cp.async, STAGES deep):
//     W tile  [BN rows][64 B]      row r at r * 64: a quarter-warp's LDS.128 (rows g, g+1 x 16t)
//                                  reads 128 contiguous bytes: no bank conflict
//     A' tile [BM tokens][256 B]   16-byte chunk c of token r at chunk c ^ (r & 1): a quarter-warp
//                                  reads chunks 2t + q of tokens g, g+1 -> 8 distinct chunks mod 8
//     scales  [GPB][BN] fp32 (+ offsets [GPB][BN]): the block's weight groups (GPB = 128 / G, or 1)
// Warp w owns weight rows 32w .. 32w + 31 of the CTA's BN = 32 * WARPS and every token of its BM.
// After the K loop the fp32 tile goes through shared memory ([BM][BN + 4]: the fragment writes
// hit 32 distinct banks) so the global stores are row-contiguous.  Split-K: grid z takes a
// contiguous run of K blocks and writes an fp32 slab; splitk_finalize_kernel (w4ax_gemm.cu)
// sums the slabs in split order and adds the bias -- or, with tile counters, the tile's last
// split does (FIXUP: same adds, same bits, one launch less).
// ============================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "cometq_device.cuh"
#include "cometq_kernels.h"

namespace cometq {
namespace {

template <int BM_, int WARPS_, int STAGES_, int MIN_CTAS_>
struct W16Cfg {
  static constexpr int BM = BM_;              // tokens per CTA (n8 tiles: BM / 8)
  static constexpr int WARPS = WARPS_;
  static constexpr int STAGES = STAGES_;
  static constexpr int MIN_CTAS = MIN_CTAS_;  // __launch_bounds__ minBlocks
  static constexpr int THREADS = WARPS * 32;
  static constexpr int BN = WARPS * 32;       // weight rows per CTA: 32 per warp
  static constexpr int NT = BM / 8;
  static constexpr int W_BYTES = BN * 64;
  static constexpr int A_ROW = 256;           // 128 16-bit values
  static constexpr int A_BYTES = BM * A_ROW;
  static constexpr int TILE_BYTES = W_BYTES + A_BYTES;
  static constexpr int C_LD = BN + 4;         // fp32 row stride of the epilogue tile
  __host__ __device__ static constexpr int stage_bytes(int gpb, bool off) {
    return TILE_BYTES + (((off ? 2 : 1) * BN * gpb * 4 + 15) / 16) * 16;
  }
  static_assert(BM % 8 == 0 && BM >= 8, "tokens come in n8 tiles");
  static_assert(THREADS % 16 == 0 && (THREADS / 16) % 2 == 0, "A' swizzle: a thread's chunks keep their row parity");
};

// COMETQ_W16_TILE_*: M <= 16, M <= 32, else 64 tokens per CTA with 4 warps (128 weight rows), and
// the wide variant (8 warps, 256 weight rows: half the A' traffic per weight byte, for large N).
using W16T16 = W16Cfg<16, 4, 4, 4>;
using W16T32 = W16Cfg<32, 4, 4, 3>;
using W16T64 = W16Cfg<64, 4, 3, 2>;
using W16Wide = W16Cfg<64, 8, 3, 1>;

__device__ __forceinline__ uint32_t lop3_and_xor(uint32_t x, uint32_t mask, uint32_t bits) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;" : "=r"(d) : "r"(x), "r"(mask), "r"(bits));  // (a & b) ^ c
  return d;
}

// Per operand dtype: the nibble -> value trick (header), scale packing and the MMA.
template <typename T>
struct W16Op;
template <>
struct W16Op<__half> {
  using V2 = __half2;
  static constexpr uint32_t kLoMagic = 0x64086408u;  // 1032 + v
  static constexpr uint32_t kHiMagic = 0x54805480u;  // 72 + v (the high nibble in place: ulp 1/16)
  static constexpr bool kHiShift = false;
  __device__ static __forceinline__ V2 splat(float v) { return __float2half2_rn(v); }
};
template <>
struct W16Op<__nv_bfloat16> {
  using V2 = __nv_bfloat162;
  static constexpr uint32_t kLoMagic = 0x43084308u;  // 136 + v
  static constexpr uint32_t kHiMagic = 0x43084308u;  // the high nibble shifted down first
  static constexpr bool kHiShift = true;
  __device__ static __forceinline__ V2 splat(float v) { return __float2bfloat162_rn(v); }
};

template <typename V, typename U>
__device__ __forceinline__ V bits_as(U u) {
  static_assert(sizeof(U) == sizeof(V), "same size");
  return *reinterpret_cast<const V*>(&u);
}

// fp32 scale -> the 16-bit pair {s, s} as register bits
template <typename T>
__device__ __forceinline__ uint32_t pack2(float v) {
  return bits_as<uint32_t>(W16Op<T>::splat(v));
}

// Byte pair word (bytes in the low halves of the two 16-bit lanes) -> the two weights v * s (+ o)
// of its low (HI = false) or high nibbles, as a 16-bit pair.
template <typename T, bool HI, bool OFF>
__device__ __forceinline__ uint32_t dequant(uint32_t pair, uint32_t s2, uint32_t o2) {
  using Op = W16Op<T>;
  using V2 = typename Op::V2;
  constexpr uint32_t kMagic = HI ? Op::kHiMagic : Op::kLoMagic;
  constexpr bool kShift = HI && Op::kHiShift;
  const uint32_t m = lop3_and_xor(kShift ? (pair >> 4) : pair, (HI && !kShift) ? 0x00F000F0u : 0x000F000Fu, kMagic);
  const V2 v = __hsub2(bits_as<V2>(m), bits_as<V2>(kMagic));  // exact: v
  if constexpr (OFF) {
    return bits_as<uint32_t>(__hfma2(v, bits_as<V2>(s2), bits_as<V2>(o2)));  // one rounding
  } else {
    return bits_as<uint32_t>(__hmul2(v, bits_as<V2>(s2)));
  }
}

// C += A B, mma.sync m16n8k16, fp32 accumulation, fp16 or bf16 operands.
#define COMETQ_W16_MMA(TY)                                                                                   \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "   \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                                   \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                              \
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    COMETQ_W16_MMA("f16");
  } else {
    COMETQ_W16_MMA("bf16");
  }
#else
  __trap();
#endif
}
#undef COMETQ_W16_MMA

// A stage's scale area: sS[gi * BN + r] = w_scales[n0 + r, grp0 + gi] for the block's GPB groups, the
// offsets after GPB * BN of them; thread r < BN copies row r.  Rows past N repeat the last one (never
// stored).
template <int BN, bool HAS_OFF>
__device__ __forceinline__ void w16_copy_scales(const CometqW16Args& p, float* sS, int n0, int gpb, int grp0) {
  const int r = threadIdx.x;
  if (r >= BN) return;
  const int wr = min(n0 + r, p.N - 1);
  const float* ws_row = p.w_scales + static_cast<unsigned>(wr * static_cast<int>(p.ld_ws) + grp0);
#pragma unroll 1
  for (int gi = 0; gi < gpb; ++gi) {
    cp_async4(sS + gi * BN + r, ws_row + gi);
    if (HAS_OFF) {
      cp_async4(sS + (gpb + gi) * BN + r,
                p.w_offsets + static_cast<unsigned>(wr * static_cast<int>(p.ld_wo) + grp0 + gi));
    }
  }
}

// K block b -> one pipeline stage: the W tile, the A' tile and the block's weight scales / offsets.
template <class Cfg, bool HAS_OFF>
__device__ __forceinline__ void w16_load_stage(const CometqW16Args& p, uint8_t* stage, int b, int m0, int n0,
                                               int gpb, int grp0) {
  const int tid = threadIdx.x;
  uint8_t* sW = stage;
  uint8_t* sA = stage + Cfg::W_BYTES;
  // weights: BN rows x 4 chunks, row n0 + r of block b at qweight + b * ld_wb + r * ld_w (row-major:
  // ld_wb = 64; block-major: ld_w = 64, ld_wb = N * 64, so the tile is one contiguous run)
  copy_rows<Cfg::BN, 4, 64, Cfg::THREADS>(sW + (tid >> 2) * 64 + (tid & 3) * 16,
                                          p.qweight + static_cast<int64_t>(b) * p.ld_wb, n0 + (tid >> 2), p.N,
                                          static_cast<int>(p.ld_w), (tid & 3) * 16);
  // A': BM rows x 16 chunks (256 bytes of block b), chunk c of row r stored at chunk c ^ (r & 1)
  const int ra = tid >> 4, ca = tid & 15;
  copy_rows<Cfg::BM, 16, Cfg::A_ROW, Cfg::THREADS>(
      sA + ra * Cfg::A_ROW + ((ca ^ (ra & 1)) << 4),
      static_cast<const uint8_t*>(p.a) + static_cast<int64_t>(b) * Cfg::A_ROW, m0 + ra, p.M,
      static_cast<int>(p.lda * 2), ca * 16);
  w16_copy_scales<Cfg::BN, HAS_OFF>(p, reinterpret_cast<float*>(stage + Cfg::TILE_BYTES), n0, gpb, grp0);
}

// The epilogue of both w16 kernels: the CTA's fp32 tile sC[token][weight row] (row stride C_LD, filled
// and synchronized by the caller) -> out (+ bias), or this split's slab of the workspace; with
// FIXUP the tile's last split then sums the slabs (splitk_reduce_tile: the finalize kernel's adds).
template <int BM, int BN, int C_LD, int THREADS, bool FIXUP>
__device__ __forceinline__ void w16_store_tile(const CometqW16Args& p, const float* sC, int m0, int n0) {
  const bool split = gridDim.z > 1;
  const int rows = min(BM, p.M - m0);
  if (split && (p.N & 3) == 0) {
    // this split's own slab, 16 bytes a store (sC rows: C_LD = BN + 4 floats, 16-byte aligned; slab
    // rows of N % 4 == 0 floats in a fresh allocation: 16-byte aligned too)
    constexpr int Q = BN / 4;
#pragma unroll 1
    for (int idx = threadIdx.x; idx < rows * Q; idx += THREADS) {
      const int r = idx / Q, c = (idx % Q) * 4;
      const int n = n0 + c;
      if (n >= p.N) continue;
      *reinterpret_cast<float4*>(p.workspace + (static_cast<int64_t>(blockIdx.z) * p.M + m0 + r) * p.N + n) =
          *reinterpret_cast<const float4*>(sC + r * C_LD + c);
    }
  } else {
#pragma unroll 1
    for (int idx = threadIdx.x; idx < rows * BN; idx += THREADS) {
      const int r = idx / BN, c = idx % BN;
      const int m = m0 + r, n = n0 + c;
      if (n >= p.N) continue;
      const float v = sC[r * C_LD + c];
      if (split) {
        // this split's own slab (every (z, m, n) written by exactly one CTA: a split with no blocks
        // writes zeros), summed in split order by the finalize kernel
        p.workspace[(static_cast<int64_t>(blockIdx.z) * p.M + m) * p.N + n] = v;
      } else {
        store_from_float(p.out, static_cast<int64_t>(m) * p.ld_out + n,
                         p.bias != nullptr ? v + load_as_float(p.bias, n, p.bias_dtype) : v, p.out_dtype);
      }
    }
  }
  if constexpr (FIXUP) {
    if (!split) return;
    if (!splitk_last_cta(p.tile_counters, blockIdx.y * gridDim.x + blockIdx.x)) return;
    splitk_reduce_tile<BN, THREADS>(p.workspace, gridDim.z, p.M, p.N, m0, n0, rows, p.bias, p.bias_dtype, p.out,
                                    p.ld_out, p.out_dtype);
  }
}

// FIXUP: a split launch sums its slabs in-kernel (p.tile_counters: each tile's last split to finish
// adds them in split order + bias, the finalize kernel's sequence of fp32 adds -- the same bits --
// and resets its counter), so no finalize kernel runs.  The integer GEMM's reduction
// (w4ax_gemm.cu, the threadfence pattern drawn there).
template <class Cfg, typename T, bool HAS_OFF, bool FIXUP>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_CTAS) w16_gemm_kernel(const CometqW16Args p) {
  constexpr int NT = Cfg::NT;
  extern __shared__ __align__(16) uint8_t smem[];
  const int gpb_log2 = groups_per_block_log2(p.group);
  const int gpb = 1 << gpb_log2;
  const int stage_b = Cfg::stage_bytes(gpb, HAS_OFF);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * Cfg::BN, m0 = blockIdx.y * Cfg::BM;
  const int wr0 = warp * 32;  // the warp's first weight row in the tile

  // this split's K blocks: a contiguous run (every block costs the same here)
  const int per = (p.n_blocks + gridDim.z - 1) / gridDim.z;
  const int kb_begin = min(p.n_blocks, static_cast<int>(blockIdx.z) * per);
  const int nblk = min(p.n_blocks, kb_begin + per) - kb_begin;
  // the group of block b (G >= 128) or of its first channel (G < 128: GPB groups per block); a shift
  // for power-of-two G (an integer division is ~20 instructions per prefetched block)
  const bool g_pow2 = (p.group & (p.group - 1)) == 0;
  const int g_log2 = __ffs(p.group) - 1;
  auto first_group = [&](int b) {
    return gpb_log2 > 0 ? (b << gpb_log2) : (g_pow2 ? (b * kBlockK) >> g_log2 : (b * kBlockK) / p.group);
  };
  // group within the block of this thread's channels 32t + 16q .. +15 (k steps of word pair q):
  // one group for G >= 32, two (q = 0, 1) for G = 16
  const int gsh = p.group >= kBlockK ? 31 : g_log2;

  float acc[2][NT][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < nblk) {
      w16_load_stage<Cfg, HAS_OFF>(p, smem + s * stage_b, kb_begin + s, m0, n0, gpb, first_group(kb_begin + s));
    }
    cp_async_commit();
  }

  for (int it = 0; it < nblk; ++it) {
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();  // block `it` landed for everyone; everyone is done with the stage refilled below
    {
      const int pf = it + Cfg::STAGES - 1;
      if (pf < nblk) {
        w16_load_stage<Cfg, HAS_OFF>(p, smem + (pf % Cfg::STAGES) * stage_b, kb_begin + pf, m0, n0, gpb,
                                     first_group(kb_begin + pf));
      }
      cp_async_commit();
    }
    const uint8_t* sW = smem + (it % Cfg::STAGES) * stage_b;
    const uint8_t* sA = sW + Cfg::W_BYTES;
    const float* sS = reinterpret_cast<const float*>(sW + Cfg::TILE_BYTES);

    // the thread's 16 weight bytes of rows wr0 + g + 8 r (r = 0..3: m tile r / 2, half r % 2)
    uint4 wv[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) wv[r] = *reinterpret_cast<const uint4*>(sW + (wr0 + g + 8 * r) * 64 + t * 16);

    uint32_t s2[4], o2[4];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (q == 0 || gsh == 4) {  // (G = 16: word pair q = 1 is the next group)
        const int gi = (32 * t + 16 * q) >> gsh;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          s2[r] = pack2<T>(sS[gi * Cfg::BN + wr0 + g + 8 * r]);
          o2[r] = HAS_OFF ? pack2<T>(sS[(gpb + gi) * Cfg::BN + wr0 + g + 8 * r]) : 0u;
        }
      }
      // bytes {0, 1} / {2, 3} of words 2q, 2q + 1 of each row, one per 16-bit lane
      uint32_t pr[4][2][2];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const uint32_t w0 = q == 0 ? wv[r].x : wv[r].z;
        const uint32_t w1 = q == 0 ? wv[r].y : wv[r].w;
        pr[r][0][0] = __byte_perm(w0, 0u, 0x4140);
        pr[r][0][1] = __byte_perm(w0, 0u, 0x4342);
        pr[r][1][0] = __byte_perm(w1, 0u, 0x4140);
        pr[r][1][1] = __byte_perm(w1, 0u, 0x4342);
      }
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        // A registers of k steps (2q + ss, hi) for m tiles i = 0, 1
        uint32_t af[2][2][4];
#pragma unroll
        for (int ss = 0; ss < 2; ++ss)
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int reg = 0; reg < 4; ++reg) {
              const int r = 2 * i + (reg & 1);  // a0 / a2: row g, a1 / a3: row g + 8
              const uint32_t pair = pr[r][ss][reg >> 1];
              af[ss][i][reg] = hi ? dequant<T, true, HAS_OFF>(pair, s2[r], o2[r])
                                  : dequant<T, false, HAS_OFF>(pair, s2[r], o2[r]);
            }
        const int chunk = hi * 8 + 2 * t + q;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          // token 8j + g (row parity = g's): B registers of both k steps
          const uint4 bv = *reinterpret_cast<const uint4*>(sA + (8 * j + g) * Cfg::A_ROW + ((chunk ^ (g & 1)) << 4));
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            mma16816<T>(acc[i][j], af[0][i][0], af[0][i][1], af[0][i][2], af[0][i][3], bv.x, bv.y);
            mma16816<T>(acc[i][j], af[1][i][0], af[1][i][1], af[1][i][2], af[1][i][3], bv.z, bv.w);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages are free: the epilogue tile reuses them

  // ---- epilogue: fragments -> sC[token][n] (fp32) -> row-contiguous global stores
  float* sC = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = wr0 + 16 * i + g + 8 * (e >> 1);
        const int m = 8 * j + 2 * t + (e & 1);
        sC[m * Cfg::C_LD + n] = acc[i][j][e];
      }
  __syncthreads();
  w16_store_tile<Cfg::BM, Cfg::BN, Cfg::C_LD, Cfg::THREADS, FIXUP>(p, sC, m0, n0);
}

// ============================================================================
// The wgmma variant (sm_90a only; COMETQ_W16_TILE_WG*).  H200 run 10: the mma.sync kernel above and
// the Triton w16 kernel ran the M = 64 decode GEMMs at ~200-210 TFLOP/s, a third of the f16
// mma.sync peak; Hopper's full f16 rate is only reachable through wgmma (the warpgroup MMA), and
// with wgmma the activation operand is read by the tensor cores from shared memory -- no LDS.128 of
// A' per MMA, and a quarter of the MMA instructions (one m64nBMk16 per warpgroup instead of
// 4 warps x BM/8 m16n8k16).  Triton issues wgmma for its w16 kernel too, but waits for each one
// (`wgmma.wait_group 0`) before dequantizing the next weights: no overlap.
//
// One or two warpgroups (4 warps each) per CTA compute out^T = W' A'^T for BN = 64 * MT * WG weight rows
// x BM tokens (warpgroup wg: rows wg * 64 MT .., all of them sharing the CTA's A' tile).
// Per K block and m64 weight tile: 8 wgmma.m64nBMk16, A (the weights) from registers, B (A'^T) from
// shared memory through a matrix descriptor.  k-step c (c = 0..7) pairs two 8-position chunks of the
// half-split A' block: chunk c (positions 8c .. 8c+7, the LOW nibbles of weight bytes 8c .. 8c+7) and
// chunk c + 8 (positions 64 + 8c .., the HIGH nibbles of the same bytes):
//     B k slots 0..7   <- A' chunk c       (the core matrix at the descriptor's start address)
//     B k slots 8..15  <- A' chunk c + 8   (the next core matrix along K: LBO bytes further)
// A fragment (PTX ISA, wgmma .m64nNk16 register fragment A: per warp the mma.m16n8k16 A layout, warp w
// holding rows 16w .. 16w+15 of the m64 tile), thread (g = lane / 4, t = lane % 4):
//     a0: row g,   slots 2t, 2t+1     = positions 8c+2t, 8c+2t+1       the low nibbles of bytes 8c+2t, 8c+2t+1
//     a1: row g+8, the same
//     a2: row g,   slots 8+2t, 9+2t   = positions 64+8c+2t, 64+8c+2t+1  the HIGH nibbles of the same bytes
//     a3: row g+8, the same
// so one 16-bit half-word per row and k-step -- half-word 4c + t of the row's 64 bytes: word 2c + t/2,
// half t % 2 -- gives two A registers: one PRMT puts its two bytes under the two 16-bit lanes, then the
// magic-exponent dequantization of the low and of the high nibbles (dequant above; same numerics).
// D fragment: acc[r] (r = 0 .. BM/2-1) is row g + 8 * ((r >> 1) & 1), token 8 * (r >> 2) + 2t + (r & 1).
//
// Shared memory, one K block per stage:
//   W tile   [BN rows][64 B]; 16-byte chunk j of row r at chunk j ^ ((r >> 1) & 3): a warp's LDS.32 of
//            word 2c + t/2 from rows g = 0..7 hits 16 distinct banks (rows 2 apart would share them)
//   A' tile  wgmma's K-major layout without swizzle: core matrices of 8 tokens x 16 bytes (8 positions),
//            chunk c of token r at (r / 8) * SBO + c * 128 + (r % 8) * 16, so
//                LBO (the next core matrix along K: chunk c -> c + 8) = 8 * 128 = 1024 B,
//                SBO (the next 8 tokens)                             = 16 * 128 = 2048 B,
//            and k-step c starts at byte 128 c.  cp.async: a warp's 32 chunks are 8 tokens x 4
//            chunks, 128 contiguous bytes per chunk column: no bank conflict.
//   scales   as the mma.sync kernel's.
//
// Pipeline.  cp.async stages as above, but the block prefetched at iteration `it` goes to the stage
// block it - 2 used (AHEAD = STAGES - 2 blocks ahead): the wgmmas of block it - 1 may still be
// reading theirs.  cp.async writes through the generic proxy and wgmma reads through the async
// proxy, so each thread fences (fence.proxy.async) its landed copies before the CTA barrier.
// Registers: k-step c dequantizes into set c % RING of a register ring after wgmma.wait_group
// (RING - 1) -- the wgmmas of k-step c - RING, the last readers of that set, are done -- so the
// tensor cores work on RING - 1 k-steps while the next weights are dequantized.
// ============================================================================
template <int BM_, int MT_, int WG_, int STAGES_, int RING_, int MIN_CTAS_>
struct W16WgCfg {
  static constexpr int BM = BM_;  // tokens per CTA: the wgmma n
  static constexpr int MT = MT_;  // m64 weight tiles per warpgroup
  static constexpr int WG = WG_;  // warpgroups per CTA (each its own MT x 64 weight rows, one shared A' tile)
  static constexpr int STAGES = STAGES_;
  static constexpr int AHEAD = STAGES_ - 2;
  static constexpr int RING = RING_;
  static constexpr int MIN_CTAS = MIN_CTAS_;
  static constexpr int THREADS = 128 * WG;
  static constexpr int BN = 64 * MT * WG;
  static constexpr int NACC = BM / 2;  // fp32 accumulators per m64 tile and thread
  static constexpr int W_BYTES = BN * 64;
  static constexpr int A_BYTES = BM * 256;
  static constexpr int TILE_BYTES = W_BYTES + A_BYTES;
  static constexpr int C_LD = BN + 4;
  static constexpr int LBO = 8 * 128;
  static constexpr int SBO = 16 * 128;
  __host__ __device__ static constexpr int stage_bytes(int gpb, bool off) {
    // 128-byte aligned stages: the A' core matrices of every stage 128-byte aligned
    return ((TILE_BYTES + (off ? 2 : 1) * BN * gpb * 4 + 127) / 128) * 128;
  }
  static_assert(BM == 16 || BM == 32 || BM == 64, "the wgmma wrappers below: n = 16, 32 or 64 tokens");
  static_assert(STAGES >= 3 && RING >= 2 && 8 % RING == 0, "one stage of slack; the ring wraps at a block");
  static_assert(BN <= THREADS, "one scale row per thread");
};

// 64 tokens x 128 weight rows (2 CTAs per SM: 4 stages of 25 KB); x 64 rows (twice the CTAs); 32 tokens;
// 64 x 256 with two warpgroups (1 CTA per SM, 4 stages of 33 KB): every CTA reads the whole A' block
// per K block -- 16 KB at 64 tokens, twice the 128-row tile's weight bytes -- from L2, so the wide
// tile halves that traffic (gate_up at M = 64: ~115 MB of A' reads beside 59 MB of weights).
using W16Wg64 = W16WgCfg<64, 2, 1, 4, 4, 2>;
using W16Wg64R64 = W16WgCfg<64, 1, 1, 4, 4, 2>;
using W16Wg32 = W16WgCfg<32, 2, 1, 4, 4, 3>;
using W16Wg64W = W16WgCfg<64, 2, 2, 4, 4, 1>;
// M <= 16: weight-bandwidth-bound; 16 tokens x 128 rows, 5 stages of 13 KB (3 blocks in flight, 3 CTAs
// per SM): per k-step the same ~36 instructions per warp dequantize 1 KB of weights (the 16-token
// mma.sync tile: ~4.4 B per instruction, ~1.6x more instructions per weight byte)
using W16Wg16 = W16WgCfg<16, 2, 1, 5, 4, 3>;

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define COMETQ_HAS_WGMMA 1
#else
#define COMETQ_HAS_WGMMA 0
#endif

#if COMETQ_HAS_WGMMA  // (the device pass for sm_90a only: elsewhere nothing calls these)
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// wgmma matrix descriptor, no swizzle: start address, LBO and SBO in 16-byte units (PTX ISA,
// "Matrix Descriptor Format": bits 0-13, 16-29, 32-45; base offset 0; swizzle mode 0 in bits 62-63).
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t saddr, int lbo, int sbo) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}

// The compiler must not move register accesses across the asynchronous MMAs: an empty asm that
// "modifies" the register pins it between the volatile wgmma / fence / wait statements.
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void pin(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// this thread's completed cp.async writes (generic proxy) -> visible to wgmma's reads (async proxy)
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#endif

// d += A B (wgmma.m64n{BM}k16, fp32 accumulate): A = the 4 registers of the fragment above, B through
// desc; scale-d 1 (accumulate), scale-a / scale-b 1 (no negation), B not transposed (K-major).
#define COMETQ_WGMMA_N64(TY)        \
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "  \
               "{%0, %1, %2, %3, %4, %5, %6, %7, "  \
               "%8, %9, %10, %11, %12, %13, %14, %15, "  \
               "%16, %17, %18, %19, %20, %21, %22, %23, "  \
               "%24, %25, %26, %27, %28, %29, %30, %31}, "  \
               "{%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"  \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),  \
                 "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),  \
                 "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),  \
                 "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),  \
                 "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))

#define COMETQ_WGMMA_N16(TY)        \
  asm volatile("wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " "  \
               "{%0, %1, %2, %3, %4, %5, %6, %7}, "  \
               "{%8, %9, %10, %11}, %12, 1, 1, 1, 0;\n"  \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),  \
                 "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))

#define COMETQ_WGMMA_N32(TY)        \
  asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "  \
               "{%0, %1, %2, %3, %4, %5, %6, %7, "  \
               "%8, %9, %10, %11, %12, %13, %14, %15}, "  \
               "{%16, %17, %18, %19}, %20, 1, 1, 1, 0;\n"  \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),  \
                 "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),  \
                 "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))

template <typename T, int BM>
__device__ __forceinline__ void wgmma_rs(float (&d)[BM / 2], const uint32_t (&a)[4], uint64_t desc) {
#if COMETQ_HAS_WGMMA
  if constexpr (BM == 64) {
    if constexpr (std::is_same<T, __half>::value) {
      COMETQ_WGMMA_N64("f16");
    } else {
      COMETQ_WGMMA_N64("bf16");
    }
  } else if constexpr (BM == 32) {
    if constexpr (std::is_same<T, __half>::value) {
      COMETQ_WGMMA_N32("f16");
    } else {
      COMETQ_WGMMA_N32("bf16");
    }
  } else {
    if constexpr (std::is_same<T, __half>::value) {
      COMETQ_WGMMA_N16("f16");
    } else {
      COMETQ_WGMMA_N16("bf16");
    }
  }
#else
  __trap();
#endif
}
#undef COMETQ_WGMMA_N64
#undef COMETQ_WGMMA_N32
#undef COMETQ_WGMMA_N16

// K block b -> one stage of the wgmma kernel (layouts in the header above), in two halves: the weight
// side (W tile and scales: constant data) and the activation side (A', the previous kernel's output).
template <class Cfg, bool HAS_OFF>
__device__ __forceinline__ void w16wg_load_weights(const CometqW16Args& p, uint8_t* stage, int b, int n0, int gpb,
                                                   int grp0) {
  const int tid = threadIdx.x;
  const uint8_t* wbase = p.qweight + static_cast<int64_t>(b) * p.ld_wb;
#pragma unroll
  for (int i = 0; i < Cfg::BN * 4 / Cfg::THREADS; ++i) {
    const int id = tid + i * Cfg::THREADS;
    const int r = id >> 2, j = id & 3;
    copy_row_chunk(stage + r * 64 + ((j ^ ((r >> 1) & 3)) << 4), wbase, n0 + r, p.N, static_cast<int>(p.ld_w),
                   j * 16);
  }
  w16_copy_scales<Cfg::BN, HAS_OFF>(p, reinterpret_cast<float*>(stage + Cfg::TILE_BYTES), n0, gpb, grp0);
}

template <class Cfg>
__device__ __forceinline__ void w16wg_load_act(const CometqW16Args& p, uint8_t* stage, int b, int m0) {
  const int tid = threadIdx.x;
  uint8_t* sA = stage + Cfg::W_BYTES;
  const uint8_t* abase = static_cast<const uint8_t*>(p.a) + static_cast<int64_t>(b) * 256;
#pragma unroll
  for (int i = 0; i < Cfg::BM * 16 / Cfg::THREADS; ++i) {
    const int id = tid + i * Cfg::THREADS;
    const int r = (id & 7) + ((id >> 7) << 3), c = (id >> 3) & 15;  // 8 tokens x 4 chunks per warp
    copy_row_chunk(sA + (r >> 3) * Cfg::SBO + c * 128 + (r & 7) * 16, abase, m0 + r, p.M,
                   static_cast<int>(p.lda * 2), c * 16);
  }
}

template <class Cfg, typename T, bool HAS_OFF, bool FIXUP>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_CTAS) w16_wgmma_kernel(const CometqW16Args p) {
#if COMETQ_HAS_WGMMA
  constexpr int MT = Cfg::MT;
  extern __shared__ __align__(128) uint8_t smem_wg[];  // (the stages' A' core matrices: 128-byte aligned)
  uint8_t* smem = smem_wg;
  constexpr int gpb = 1;  // G >= 128 (the launcher refuses smaller groups)
  const int stage_b = Cfg::stage_bytes(gpb, HAS_OFF);

  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3, wg = threadIdx.x >> 7;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * Cfg::BN, m0 = blockIdx.y * Cfg::BM;
  // the thread's first weight row in the tile: warpgroup wg owns rows wg * 64 MT .. + 64 MT - 1
  const int wrow0 = wg * 64 * MT + 16 * warp + g;

  const int per = (p.n_blocks + gridDim.z - 1) / gridDim.z;
  const int kb_begin = min(p.n_blocks, static_cast<int>(blockIdx.z) * per);
  const int nblk = min(p.n_blocks, kb_begin + per) - kb_begin;
  const bool g_pow2 = (p.group & (p.group - 1)) == 0;
  const int g_log2 = __ffs(p.group) - 1;
  auto first_group = [&](int b) { return g_pow2 ? (b * kBlockK) >> g_log2 : (b * kBlockK) / p.group; };

  // The thread's weight rows: wrow0 + 64 i + 8 h (m64 tile i, h = 0 / 1 for a0-a2 / a1-a3); the
  // word of k-step c: chunk (c >> 1) ^ key (key = (g >> 1) & 3 = (row >> 1) & 3 for all of them),
  // word 2 (c & 1) + t / 2 within it.
  const int key = (g >> 1) & 3;
  const int row_off = wrow0 * 64 + ((t >> 1) << 2);
  int chunk_off[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) chunk_off[j] = (j ^ key) << 4;
  const uint32_t sel = (t & 1) ? 0x4342u : 0x4140u;  // half-word t % 2 -> the two 16-bit lanes

  float acc[MT][Cfg::NACC];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < Cfg::NACC; ++r) acc[i][r] = 0.f;
  uint32_t af[Cfg::RING][MT][4];
  uint32_t s2[MT][2], o2[MT][2];

  // Prologue: the weight side of the first AHEAD blocks (one cp.async group), then -- under a
  // programmatic dependent launch, once the previous kernel (A's producer) has completed -- their
  // A' tiles, one group each.  Groups [W 0..AHEAD-1][A' 0]..[A' AHEAD-1], then one per prefetched
  // block: the loop's wait_group(AHEAD - 1) still means "block `it` landed".  Nothing is written
  // to global memory before pdl_wait_primary (an output buffer may be one the previous kernel
  // still reads).
#pragma unroll
  for (int s = 0; s < Cfg::AHEAD; ++s) {
    if (s < nblk) {
      w16wg_load_weights<Cfg, HAS_OFF>(p, smem + s * stage_b, kb_begin + s, n0, gpb, first_group(kb_begin + s));
    }
  }
  cp_async_commit();
  pdl_wait_primary();
#pragma unroll
  for (int s = 0; s < Cfg::AHEAD; ++s) {
    if (s < nblk) w16wg_load_act<Cfg>(p, smem + s * stage_b, kb_begin + s, m0);
    cp_async_commit();
  }
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < Cfg::NACC; ++r) pin(acc[i][r]);

  for (int it = 0; it < nblk; ++it) {
    cp_async_wait<Cfg::AHEAD - 1>();
    fence_proxy_async_smem();  // this thread's landed copies -> visible to the async proxy (wgmma)
    __syncthreads();           // block `it` landed for everyone; every wgmma of block it - 2 is done
    {
      const int pf = it + Cfg::AHEAD;
      if (pf < nblk) {
        uint8_t* stage = smem + (pf % Cfg::STAGES) * stage_b;
        w16wg_load_weights<Cfg, HAS_OFF>(p, stage, kb_begin + pf, n0, gpb, first_group(kb_begin + pf));
        w16wg_load_act<Cfg>(p, stage, kb_begin + pf, m0);
      }
      cp_async_commit();
    }
    const uint8_t* sW = smem + (it % Cfg::STAGES) * stage_b;
    const float* sS = reinterpret_cast<const float*>(sW + Cfg::TILE_BYTES);
    const uint64_t desc0 = wgmma_desc(smem_u32(sW + Cfg::W_BYTES), Cfg::LBO, Cfg::SBO);
    const uint8_t* wrow = sW + row_off;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      if (c == 0) {
        // G >= 128 only: one group per row and block.  (A reload at a group edge inside the block --
        // a branch between the wgmmas -- made ptxas serialize every wgmma, C7513; G < 128 runs the
        // mma.sync kernel.)
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = wrow0 + 64 * i + 8 * h;
            s2[i][h] = pack2<T>(sS[r]);
            o2[i][h] = HAS_OFF ? pack2<T>(sS[Cfg::BN + r]) : 0u;
          }
      }
      const int set = c % Cfg::RING;
      wgmma_wait<Cfg::RING - 1>();  // k-step c - RING (the last reader of set `set`) is done
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t w = *reinterpret_cast<const uint32_t*>(wrow + (64 * i + 8 * h) * 64 + chunk_off[c >> 1] +
                                                                8 * (c & 1));
          const uint32_t pair = __byte_perm(w, 0u, sel);
          af[set][i][h] = dequant<T, false, HAS_OFF>(pair, s2[i][h], o2[i][h]);
          af[set][i][2 + h] = dequant<T, true, HAS_OFF>(pair, s2[i][h], o2[i][h]);
        }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) pin(af[set][i][e]);
      wgmma_fence();
#pragma unroll
      for (int i = 0; i < MT; ++i) wgmma_rs<T, Cfg::BM>(acc[i], af[set][i], desc0 + static_cast<uint64_t>(8 * c));
      wgmma_commit();
    }
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < Cfg::NACC; ++r) pin(acc[i][r]);
  cp_async_wait<0>();
  __syncthreads();  // the stages are free: the epilogue tile reuses them

  float* sC = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < Cfg::NACC; ++r) {
      const int n = wrow0 + 64 * i + 8 * ((r >> 1) & 1);
      const int m = 8 * (r >> 2) + 2 * t + (r & 1);
      sC[m * Cfg::C_LD + n] = acc[i][r];
    }
  __syncthreads();
  w16_store_tile<Cfg::BM, Cfg::BN, Cfg::C_LD, Cfg::THREADS, FIXUP>(p, sC, m0, n0);
#else
  static_assert(Cfg::AHEAD >= 1 && Cfg::NACC > 0 && Cfg::LBO > 0 && Cfg::SBO > 0, "(referenced on every arch)");
  __trap();  // wgmma needs sm_90a (the launcher refuses other devices)
#endif
}

template <class Cfg>
constexpr size_t w16_smem_bytes(int gpb, bool off) {
  const size_t stages = static_cast<size_t>(Cfg::STAGES) * Cfg::stage_bytes(gpb, off);
  const size_t ctile = static_cast<size_t>(Cfg::BM) * Cfg::C_LD * 4;
  return stages > ctile ? stages : ctile;
}

// WG: the wgmma kernel (Cfg a W16WgCfg), sm_90 devices only (its sm_90a code is the only one with
// wgmma; on another device it returns cudaErrorInvalidDeviceFunction without launching).
template <class Cfg, typename T, bool HAS_OFF, bool FIXUP, bool WG>
cudaError_t w16_launch(const CometqW16Args& a, cudaStream_t stream) {
  void (*kernel)(const CometqW16Args);
  if constexpr (WG) {
    kernel = w16_wgmma_kernel<Cfg, T, HAS_OFF, FIXUP>;
  } else {
    kernel = w16_gemm_kernel<Cfg, T, HAS_OFF, FIXUP>;
  }
  const size_t smem = w16_smem_bytes<Cfg>(1 << groups_per_block_log2(a.group), HAS_OFF);
  int dev = 0, max_optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (WG) {
    int major = 0, minor = 0;
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (err != cudaSuccess) return err;
    if (major != 9 || minor != 0) return cudaErrorInvalidDeviceFunction;
    if (a.group < kBlockK) return cudaErrorInvalidValue;  // one weight group per row and K block
  }
  err = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(max_optin)) return cudaErrorInvalidValue;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const unsigned gx = static_cast<unsigned>((a.N + Cfg::BN - 1) / Cfg::BN);
  const unsigned gy = static_cast<unsigned>((a.M + Cfg::BM - 1) / Cfg::BM);
  if (gy > 65535u || a.split_k > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(gx, gy, static_cast<unsigned>(a.split_k));
  if (WG && a.pdl) {
    // a programmatic dependent of the stream's previous kernel (the wgmma kernel waits for it after
    // its weight prefetch: griddepcontrol.wait); captured into CUDA graphs as a programmatic edge
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(Cfg::THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    err = cudaLaunchKernelEx(&cfg, kernel, a);
    if (err != cudaSuccess) return err;
    return cudaGetLastError();
  }
  kernel<<<grid, Cfg::THREADS, smem, stream>>>(a);
  return cudaGetLastError();
}

template <class Cfg, bool FIXUP, bool WG>
cudaError_t w16_launch_cfg(const CometqW16Args& a, cudaStream_t stream) {
  const bool off = a.w_offsets != nullptr;
  if (a.a_dtype == COMETQ_DTYPE_F16) {
    return off ? w16_launch<Cfg, __half, true, FIXUP, WG>(a, stream)
               : w16_launch<Cfg, __half, false, FIXUP, WG>(a, stream);
  }
  return off ? w16_launch<Cfg, __nv_bfloat16, true, FIXUP, WG>(a, stream)
             : w16_launch<Cfg, __nv_bfloat16, false, FIXUP, WG>(a, stream);
}

template <class Cfg, bool WG = false>
cudaError_t w16_launch_fix(const CometqW16Args& a, cudaStream_t stream) {
  return (a.tile_counters != nullptr && a.split_k > 1) ? w16_launch_cfg<Cfg, true, WG>(a, stream)
                                                       : w16_launch_cfg<Cfg, false, WG>(a, stream);
}

// tile by M (COMETQ_W16_TILE_AUTO), the wide 8-warp tile, a narrow token tile whatever M, or a wgmma tile
void w16_tile_dims(int M, int tile, int* bm, int* bn) {
  if (tile == COMETQ_W16_TILE_WG64) {
    *bm = W16Wg64::BM;
    *bn = W16Wg64::BN;
  } else if (tile == COMETQ_W16_TILE_WG64_W) {
    *bm = W16Wg64W::BM;
    *bn = W16Wg64W::BN;
  } else if (tile == COMETQ_W16_TILE_WG16) {
    *bm = W16Wg16::BM;
    *bn = W16Wg16::BN;
  } else if (tile == COMETQ_W16_TILE_WG64_R64) {
    *bm = W16Wg64R64::BM;
    *bn = W16Wg64R64::BN;
  } else if (tile == COMETQ_W16_TILE_WG32) {
    *bm = W16Wg32::BM;
    *bn = W16Wg32::BN;
  } else if (tile == COMETQ_W16_TILE_WIDE) {
    *bm = W16Wide::BM;
    *bn = W16Wide::BN;
  } else if (M <= 16 || tile == COMETQ_W16_TILE_N16) {
    *bm = W16T16::BM;
    *bn = W16T16::BN;
  } else if (M <= 32 || tile == COMETQ_W16_TILE_N32) {
    *bm = W16T32::BM;
    *bn = W16T32::BN;
  } else {
    *bm = W16T64::BM;
    *bn = W16T64::BN;
  }
}

}  // namespace
}  // namespace cometq

extern "C" int64_t cometq_w16_num_tiles(int M, int N, int tile) {
  int bm = 0, bn = 0;
  cometq::w16_tile_dims(M, tile, &bm, &bn);
  return static_cast<int64_t>((N + bn - 1) / bn) * ((M + bm - 1) / bm);
}

extern "C" int cometq_w16_choose_split(int M, int N, int n_blocks, int sm_count, int tile, int requested) {
  if (n_blocks < 1) return 1;
  if (requested > 0) return std::min(requested, n_blocks);
  // M <= 16 (the 16-token tile, 4 CTAs per SM): ~2 CTAs per SM, the weight stream is everything and
  // the slabs are small; larger M: split only until the tiles cover the SMs once -- each split
  // writes and reads back an fp32 [M, N] slab (at M = 64, N = 28672 two splits would move 15 MB
  // of slabs beside 33 MB of weights).  At least 4 K blocks per split either way.
  const int64_t tiles = cometq_w16_num_tiles(M, N, tile);
  const int64_t sms = std::max(sm_count, 1);
  if (M > 16 && tiles >= sms) return 1;
  const int64_t want = M <= 16 ? (2 * sms + tiles - 1) / tiles : (sms + tiles - 1) / tiles;
  const int cap = std::max(1, n_blocks / 4);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, cap)));
}

extern "C" int cometq_w16_offsets_fit(const CometqW16Args* args) {
  // w16_load_stage addresses a row of A' / qweight / the scales by a 32-bit offset from a 64-bit base
  const CometqW16Args& a = *args;
  const int64_t lim = INT32_MAX;
  const int64_t M = a.M, N = a.N;
  return M * a.lda * 2 <= lim && N * a.ld_w <= lim && N * a.ld_ws <= lim && N * a.ld_wo <= lim;
}

extern "C" cudaError_t cometq_w16_gemm(const CometqW16Args* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const CometqW16Args& a = *args;
  if (a.M < 0 || a.N < 0 || a.n_blocks < 1) return cudaErrorInvalidValue;
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.group < 16 || (a.group < cometq::kBlockK && cometq::kBlockK % a.group != 0) ||
      (a.group >= cometq::kBlockK && a.group % cometq::kBlockK != 0)) {
    return cudaErrorInvalidValue;
  }
  if (a.a_dtype != COMETQ_DTYPE_F16 && a.a_dtype != COMETQ_DTYPE_BF16) return cudaErrorInvalidValue;
  if (a.a == nullptr || a.qweight == nullptr || a.w_scales == nullptr || a.out == nullptr) return cudaErrorInvalidValue;
  if (a.ld_wb < 64 || a.ld_w < 64 || a.lda < a.n_blocks * cometq::kBlockK || a.lda % 8 != 0) {
    return cudaErrorInvalidValue;  // (16-byte aligned A' rows: cp.async)
  }
  if (a.split_k < 1 || (a.split_k > 1 && a.workspace == nullptr)) return cudaErrorInvalidValue;
  if (a.tile < COMETQ_W16_TILE_AUTO || a.tile > COMETQ_W16_TILE_WG16) return cudaErrorInvalidValue;
  if (a.pdl != 0 && a.tile < COMETQ_W16_TILE_WG64) return cudaErrorInvalidValue;  // (only the wgmma kernel waits)
  if (!cometq_w16_offsets_fit(&a)) return cudaErrorInvalidValue;
  cudaError_t err;
  if (a.tile == COMETQ_W16_TILE_WG64) {
    err = cometq::w16_launch_fix<cometq::W16Wg64, true>(a, stream);
  } else if (a.tile == COMETQ_W16_TILE_WG64_R64) {
    err = cometq::w16_launch_fix<cometq::W16Wg64R64, true>(a, stream);
  } else if (a.tile == COMETQ_W16_TILE_WG32) {
    err = cometq::w16_launch_fix<cometq::W16Wg32, true>(a, stream);
  } else if (a.tile == COMETQ_W16_TILE_WG64_W) {
    err = cometq::w16_launch_fix<cometq::W16Wg64W, true>(a, stream);
  } else if (a.tile == COMETQ_W16_TILE_WG16) {
    err = cometq::w16_launch_fix<cometq::W16Wg16, true>(a, stream);
  } else if (a.tile == COMETQ_W16_TILE_WIDE) {
    err = cometq::w16_launch_fix<cometq::W16Wide>(a, stream);
  } else if (a.M <= 16 || a.tile == COMETQ_W16_TILE_N16) {
    err = cometq::w16_launch_fix<cometq::W16T16>(a, stream);
  } else if (a.M <= 32 || a.tile == COMETQ_W16_TILE_N32) {
    err = cometq::w16_launch_fix<cometq::W16T32>(a, stream);
  } else {
    err = cometq::w16_launch_fix<cometq::W16T64>(a, stream);
  }
  if (err != cudaSuccess || a.split_k == 1 || a.tile_counters != nullptr) return err;
  return cometq::launch_splitk_finalize(a.workspace, a.split_k, a.M, a.N, a.bias, a.bias_dtype, a.out, a.ld_out,
                                        a.out_dtype, stream);
}
