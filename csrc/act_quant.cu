// FMPQ activation quantization: permute + per-token per-block quantize + pack.
// Plain CUDA (no torch).  Bit-identical to cometq.reference.quantize_activation:
//
//   xp[m, j]  = float(x[m, perm[j]])  for j < K,  0 for K <= j < K_pad
//   absmax    = max |xp| over each 128-channel block (per token)
//   "block":  scale[m, b] = absmax[m, b] / 127                 (INT8 block)
//             scale[m, b] = (absmax[m, b] * clip) / 7          (INT4 block)
//   "class":  scale[m, 0] = (max(absmax of INT4 blocks) * clip) / 7  (0 if none)
//             scale[m, 1] = max(absmax of INT8 blocks) / 127          (0 if none)
//   q         = clamp(rint(xp / (scale == 0 ? 1 : scale)), -qmax, qmax)
//
// clip = int4_clip in (0, 1] (ActivationLayout.int4_clip): INT4 values beyond
// the clipped range saturate at +-7; INT8 blocks hold the outliers and are never
// clipped.  The product is rounded to fp32 (__fmul_rn: never fused into the
// division) before the division, exactly like the reference's two torch ops;
// clip = 1 multiplies exactly, so it reproduces the unclipped scales bit for bit.
// Every division is an IEEE round-to-nearest division (__fdiv_rn: immune to
// --use_fast_math), rint rounds half to even like torch.round, and max is
// order-independent, so the result does not depend on the reduction order.
// (NaN inputs are not part of the contract: the kernels' max may drop or keep them, torch.amax keeps them.)
//
// Work split ("class" scale mode, act_quant_kernel): one CTA per token row, one warp per 128-channel block (up to 32
// warps; beyond 32 blocks a warp takes every 32nd block); each lane handles 4
// consecutive channels (lane*4 .. lane*4+3), which is exactly 2 packed INT4 bytes
// or 4 INT8 bytes: one 16-bit / 32-bit store per lane, a warp writes the block's
// 64 / 128 bytes contiguously.
// Two passes over the row (absmax, then quantize) re-gather x from global
// memory (L1/L2 hits) instead of staging K floats in shared memory, so any K works.
// Why a warp per block: each block costs two dependent round trips to memory per
// pass (perm[j], then x[perm[j]]), and nothing else hides them.  With 4 warps per
// row (the first version) a K = 4096 row took 8 blocks x 2 passes of those in series:
// 14 us per call at 64 rows on the H100 (run 4, 2026-11-27: 1.8 ms of a batch-64
// decode step), for 0.5 MB of input.  The thread count is chosen at launch
// (launch_act_quant); the loops below stride by the launched warp count.
//
// "block" scale mode (the default) needs no row-wide reduction at all: every block's
// scale is its own absmax.  So it runs act_quant_block_kernel instead: one warp per
// (row, block) in 4-warp CTAs, grid (M, ceil(n_blocks / 4)), each warp doing the whole
// job for its block -- gather once, warp-max, scale, quantize the values still in
// registers, store -- with no CTA barrier and no second gather.  The row kernel above
// ran a K = 14336 row (down_proj) as 112 blocks on 32 warps: 4 rounds of the two
// dependent round trips per pass, two passes, 64 CTAs for a batch of 64 rows (half the
// SMs idle); the block kernel runs 112 x 64 independent warps in 1792 CTAs.  A warp
// finds its block's slot itself (block_slot: ballots over the earlier blocks' bits).
//
// Large M ("block" mode, M >= kActRowsMinM: prefill), act_quant_rows_kernel: why another kernel.
// The layout's permutation sorts channels by magnitude, so a 128-channel block gathers from all
// over the row: each 2-byte x load of a warp hits its own 32-byte sector, and a block costs ~16x
// its bytes in sector traffic.  The block kernel's CTAs each take 4 blocks of one row, so every
// row's sectors travel L2 -> SM ~8 times (K = 4096).  Run 6's prefill profile (H100, 8 x 1024 tokens):
// 30.0 ms for the step's 128 calls (K = 4096 and 14336; 234 us on average, ~0.6 TB/s over the ~18 GB
// they read and write, ~20 % of copy bandwidth) -- the gather is the likely cause, not timed alone
// (down_proj's folded identity permutation gathers contiguously).  The rows kernel stages what it gathers from in
// shared memory instead: a CTA (8 warps, persistent over rows) converts the permutation to 16-bit
// indices once, then per row copies x in with 16-byte cp.async chunks (two row buffers: the next
// row streams in while this one is quantized; see kRowsAsync2) and gathers from shared memory
// (bank conflicts instead of sector waste):
//
//     smem:  | is8 / slot table [2 x nb] | perm16 [nb x 128] | x row buffer 0 [K] | x row buffer 1 [K] |
//                                                             (each rounded up to 16 bytes)
//
// Same values, same scale and rounding code as the block kernel: the same bits.  K <= 32767
// (16-bit indices); COMETQ_ACT_QUANT_ROWS=0 turns it off, =1 uses it at any M (tests).
//
// FAKE (CometqActQuantArgs.out set): every kernel writes the dequantized values q * scale in the
// 16-bit routes' half-split K order instead of the packed blocks and scales (fake_store_lane):
// the large-M dequant route's and the small-M w16 route's activation operand in one pass, where
// quantize + dequantize cost a second kernel and a round trip of the packed bytes (H100 run 7,
// 8 x 1024-token prefill step: dequant_act 14.2 ms beside the rows kernel's 20.1).
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cometq_device.cuh"
#include "cometq_kernels.h"

namespace cometq {

constexpr int kActMaxThreads = 1024;  // one warp per block up to 32 blocks (K <= 4096)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
// zero of each input type: torch's build defines __CUDA_NO_HALF_CONVERSIONS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so `T(0.f)` does not compile for the 16-bit types there
template <typename T> __device__ __forceinline__ T zero_of();
template <> __device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <> __device__ __forceinline__ __half zero_of<__half>() { return __float2half_rn(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16_rn(0.f); }

// The 4 permuted, zero-padded channels b*128 + lane*4 + (0..3) of one row.
template <typename T>
__device__ __forceinline__ void gather4(const T* __restrict__ xrow, const int64_t* __restrict__ perm, int K, int b,
                                        int lane, float (&v)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int j = b * kBlockK + lane * 4 + i;
    v[i] = (j < K) ? to_float(xrow[perm[j]]) : 0.f;
  }
}

// FAKE output: the lane's 4 values q * s (fp32 product, rounded once to out_dtype: what
// cometq.kernels.dequant_gemm's dequant_act_kernel makes of the packed block) in the half-split K
// order of the 16-bit routes (cometq_kernels.h):
//
//     lane l holds channels 4l, 4l+1, 4l+2, 4l+3 of block b
//     out row:  | b*128 + 2l, 2l+1  <- channels 4l, 4l+2 (even) | b*128 + 64 + 2l, 2l+1 <- 4l+1, 4l+3 (odd) |
//
// Two 4-byte stores per lane (8-byte for fp32): a warp writes each half of the block as one
// contiguous 128-byte (256-byte) run.  Element offsets are even (ld_out even), so the pairs are aligned.
__device__ __forceinline__ void fake_store_lane(const CometqActQuantArgs& p, int m, int b, int lane, const int (&q)[4],
                                                float s) {
  const float v0 = __fmul_rn(static_cast<float>(q[0]), s), v1 = __fmul_rn(static_cast<float>(q[1]), s);
  const float v2 = __fmul_rn(static_cast<float>(q[2]), s), v3 = __fmul_rn(static_cast<float>(q[3]), s);
  const int64_t at = static_cast<int64_t>(m) * p.ld_out + static_cast<int64_t>(b) * kBlockK + 2 * lane;
  if (p.out_dtype == COMETQ_DTYPE_F16) {
    __half2* o = reinterpret_cast<__half2*>(static_cast<__half*>(p.out) + at);
    o[0] = __floats2half2_rn(v0, v2);   // (low half = lower address = first argument)
    o[32] = __floats2half2_rn(v1, v3);  // + 64 elements
  } else if (p.out_dtype == COMETQ_DTYPE_BF16) {
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.out) + at);
    o[0] = __floats2bfloat162_rn(v0, v2);
    o[32] = __floats2bfloat162_rn(v1, v3);
  } else {
    float2* o = reinterpret_cast<float2*>(static_cast<float*>(p.out) + at);
    o[0] = make_float2(v0, v2);
    o[32] = make_float2(v1, v3);
  }
}

// q[i] = clamp(rint(v[i] / d), -qmax, qmax), the quotient bit for bit __fdiv_rn(v[i], d).
// Why not __fdiv_rn itself: nvcc emits it per value as MUFU.RCP, two FFMAs refining the
// reciprocal, three FFMAs for the quotient and its correction, and an FCHK with a branch to a
// slow path (~13 instructions with the branch bookkeeping); four of them were a third of the rows
// kernel's ~160 instructions per warp and block (SASS, sm_90a), and at prefill sizes its
// instructions cost about as much time as its bytes (8192 x 4096: ~45 us at the full issue rate of
// 528 schedulers vs ~30 us of copy bandwidth; run 7 measured 157 us per call on average).
// Here the reciprocal is refined once per block (d is the block's scale, the same for the whole
// warp) and each value costs the three FFMAs of the same fast path:
//
//     r0 = rcp.approx(d);  r = fma(r0, fma(-d, r0, 1), r0)              once
//     y = v * r;  e = fma(-d, y, v);  quotient = fma(r, e, y)           per value
//
// That sequence is the correctly rounded quotient whenever no intermediate is subnormal or
// overflows (what FCHK guards), which the range test on d ensures for every |v / d| >= 2^-2 of a
// block (|v| >= 2^-62 then); below that the quotient rounds to 0 whatever its last bit.  (A CPU
// check with exact rational arithmetic: every r0 within 2 ulp of 1/d, 60000 quotients, many
// within 2^-30 of a half-integer -- all correctly rounded.)  Outside the range (an all-tiny or
// huge block) the values take __fdiv_rn.  rint + clamp + convert is one F2I.RN and two integer
// clamps (round half to even, like torch.round).
__device__ __forceinline__ void quantize4(const float (&v)[4], float d, int qmax, int (&q)[4]) {
  float y[4];
  if (d >= 0x1p-60f && d <= 0x1p60f) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
    r = __fmaf_rn(r, __fmaf_rn(-d, r, 1.f), r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float t = __fmul_rn(v[i], r);
      y[i] = __fmaf_rn(r, __fmaf_rn(-d, t, v[i]), t);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) y[i] = __fdiv_rn(v[i], d);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) q[i] = min(max(__float2int_rn(y[i]), -qmax), qmax);
}

// Lane `lane`'s 4 channels v of block b (slot `slot` of its class buffer, row m), quantized with
// scale s and stored: 4 INT8 bytes, or 2 bytes of nibbles (even channel -> low nibble,
// layout.pack_int4; two's complement) -- or, FAKE, the dequantized values (fake_store_lane).
// q = clamp(rint(v / s), -qmax, qmax), s == 0 dividing by 1 (an all-zero block: q = 0 either
// way, the reference's _safe_div).
template <bool FAKE>
__device__ __forceinline__ void quantize_store_lane(const CometqActQuantArgs& p, int m, int b, int slot, bool is8,
                                                    int lane, const float (&v)[4], float s) {
  int q[4];
  quantize4(v, (s == 0.f) ? 1.f : s, is8 ? 127 : 7, q);
  if constexpr (FAKE) {
    fake_store_lane(p, m, b, lane, q, s);
    return;
  }
  if (is8) {
    const uint32_t word = (static_cast<uint32_t>(q[0]) & 0xFFu) | ((static_cast<uint32_t>(q[1]) & 0xFFu) << 8) |
                          ((static_cast<uint32_t>(q[2]) & 0xFFu) << 16) | ((static_cast<uint32_t>(q[3]) & 0xFFu) << 24);
    int8_t* dst = p.q8 + static_cast<int64_t>(m) * p.ld_q8 + static_cast<int64_t>(slot) * kBlockK + lane * 4;
    *reinterpret_cast<uint32_t*>(dst) = word;
  } else {
    const uint32_t byte0 = (static_cast<uint32_t>(q[0]) & 0xFu) | ((static_cast<uint32_t>(q[1]) & 0xFu) << 4);
    const uint32_t byte1 = (static_cast<uint32_t>(q[2]) & 0xFu) | ((static_cast<uint32_t>(q[3]) & 0xFu) << 4);
    uint8_t* dst = p.q4 + static_cast<int64_t>(m) * p.ld_q4 + static_cast<int64_t>(slot) * (kBlockK / 2) + lane * 2;
    *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(byte0 | (byte1 << 8));
  }
}

// Max over the warp of a non-negative float (absolute values): a non-negative float's bits order
// like the float, so it is one integer max reduction (REDUX, sm_80+) instead of five shuffle + max
// rounds.  (Every caller passes fabsf values or maxima of them; NaN is not part of the contract.)
__device__ __forceinline__ float warp_max(float a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __uint_as_float(__reduce_max_sync(0xFFFFFFFFu, __float_as_uint(a)));
#else
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) a = fmaxf(a, __shfl_xor_sync(0xFFFFFFFFu, a, off));
  return a;
#endif
}

template <typename T, bool FAKE>
__global__ void __launch_bounds__(kActMaxThreads) act_quant_kernel(const CometqActQuantArgs p) {
  pdl_launch_dependents();  // (the GEMM after it may start its weight prefetch: it waits for this grid)
  extern __shared__ __align__(16) int act_smem[];
  const int nb = p.n_blocks;
  int* s_is8 = act_smem;
  int* s_info = s_is8 + nb;
  float* s_absmax = reinterpret_cast<float*>(s_info + nb);
  float* s_scale = s_absmax + nb;

  build_block_table(p.block_bits, nb, p.n4, p.n8, s_is8, s_info);

  const int m = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;  // blockDim.x is a multiple of 32 (launch_act_quant)
  const T* xrow = static_cast<const T*>(p.x) + static_cast<int64_t>(m) * p.ld_x;

  // ---- pass 1: per-block absmax
  for (int b = warp; b < nb; b += n_warps) {
    float v[4];
    gather4(xrow, p.perm, p.K, b, lane, v);
    float a = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
    a = warp_max(a);
    if (lane == 0) s_absmax[b] = a;
  }
  __syncthreads();

  // ---- scales (class mode: "block" mode runs act_quant_block_kernel)
  float* srow = FAKE ? nullptr : p.scales + static_cast<int64_t>(m) * p.ld_scales;
  if (warp == 0) {
    float a4 = 0.f, a8 = 0.f;
    for (int b = lane; b < nb; b += 32) {
      if (s_is8[b]) {
        a8 = fmaxf(a8, s_absmax[b]);
      } else {
        a4 = fmaxf(a4, s_absmax[b]);
      }
    }
    a4 = __fmul_rn(warp_max(a4), p.int4_clip);  // the INT4 class is clipped after the max, like the reference
    a8 = warp_max(a8);
    const float s4 = __fdiv_rn(a4, 7.f), s8 = __fdiv_rn(a8, 127.f);
    if (!FAKE && lane == 0) {
      srow[0] = s4;
      srow[1] = s8;
    }
    for (int b = lane; b < nb; b += 32) s_scale[b] = s_is8[b] ? s8 : s4;
  }
  __syncthreads();

  // ---- pass 2: quantize and pack
  for (int b = warp; b < nb; b += n_warps) {
    const int info = s_info[b];
    // n_int8 inconsistent with block_bits: never write out of bounds (FAKE writes no class buffer)
    if (!FAKE && !(info & kInfoValid)) continue;
    float v[4];
    gather4(xrow, p.perm, p.K, b, lane, v);
    quantize_store_lane<FAKE>(p, m, b, info & kInfoSlotMask, (info & kInfoInt8) != 0, lane, v, s_scale[b]);
  }
}

// Block b's slot in its class buffer and validity (the same rule as build_block_table, for
// one block, by one warp): slot = #(blocks before b of the same class).
// The bits of every block before b are loaded 8 chunks of 32 at a time, all 8 loads issued before
// the first ballot: one memory round trip for any layer up to 256 blocks (K = 32768).  The first
// version ballotted chunk by chunk, a dependent round trip per 32 blocks (4 for a down_proj's
// 112) in front of the quantization -- the decode act-quant (M = 64) is a few such round trips
// long: H100 run 7 timed its 128 calls per batch-64 decode step at 0.44 ms, ~3.4 us each.
__device__ __forceinline__ int block_slot(const int32_t* __restrict__ block_bits, int b, int n4, int n8, int lane,
                                          bool& is8, bool& valid) {
  is8 = __ldg(block_bits + b) == 8;
  int n8_before = 0;
  for (int c0 = 0; c0 < b; c0 += 256) {  // warp-uniform trip count (one for K <= 32768)
    int bits[8];
    load_block_bits8(block_bits, c0, b, lane, bits);
#pragma unroll
    for (int i = 0; i < 8; ++i) n8_before += __popc(__ballot_sync(0xFFFFFFFFu, bits[i] == 8));
  }
  const int slot = is8 ? n8_before : b - n8_before;
  valid = slot < (is8 ? n8 : n4);
  return slot;
}

constexpr int kActBlockWarps = 4;  // warps (= blocks) per CTA of act_quant_block_kernel

template <typename T, bool FAKE>
__global__ void __launch_bounds__(32 * kActBlockWarps) act_quant_block_kernel(const CometqActQuantArgs p) {
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  // rows on x (up to 2^31 - 1), block groups on y (n_blocks / 4 << 65535): neighbouring CTAs
  // are the same blocks of neighbouring rows, so they share the perm reads in L1 / L2
  const int b = blockIdx.y * kActBlockWarps + (threadIdx.x >> 5);
  if (b >= p.n_blocks) return;  // (whole warps: no barrier below)
  const int m = blockIdx.x;
  // the gather's two dependent loads (perm, then x) first: the slot's load overlaps them
  const T* xrow = static_cast<const T*>(p.x) + static_cast<int64_t>(m) * p.ld_x;
  float v[4];
  gather4(xrow, p.perm, p.K, b, lane, v);
  bool is8, valid;
  const int slot = block_slot(p.block_bits, b, p.n4, p.n8, lane, is8, valid);
  const float a = warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3]))));
  const float s = is8 ? __fdiv_rn(a, 127.f) : __fdiv_rn(__fmul_rn(a, p.int4_clip), 7.f);
  if (!FAKE && lane == 0) p.scales[static_cast<int64_t>(m) * p.ld_scales + b] = s;
  if (!FAKE && !valid) return;  // n_int8 inconsistent with block_bits: never write out of bounds
  quantize_store_lane<FAKE>(p, m, b, slot, is8, lane, v, s);
}

constexpr int kActRowsWarps = 8;
constexpr int kActRowsMinM = 256;
constexpr int kActRowsMaxK = 32767;

// Shared memory of the rows kernel: | is8 / info table [2 x nb] int | perm16 [nb x 128] | x row buffers |
// (each buffer K + 1 elements rounded up to 16 bytes, 16-byte aligned; element K is a zero that
// the padding channels j >= K of the last block gather: no per-value bounds test).
__host__ __device__ inline size_t rows_x_offset(int nb) {
  return (2 * sizeof(int) * nb + sizeof(uint16_t) * nb * kBlockK + 15) & ~size_t(15);
}
template <typename T>
__host__ __device__ inline int rows_x_stride(int K) {  // elements per row buffer
  return static_cast<int>(((static_cast<size_t>(K + 1) * sizeof(T) + 15) & ~size_t(15)) / sizeof(T));
}

// Row loading modes of the rows kernel (chosen at launch):
//   kRowsSync:   plain loads through registers into one buffer, row by row (rows not 16-byte aligned);
//   kRowsAsync1: cp.async, one buffer: every 16-byte chunk of the row in flight at once;
//   kRowsAsync2: cp.async, two buffers: row i+1 streams in while row i is quantized.
// Why: the first version copied each row with register loads and then computed, with a barrier
// in between, so a CTA's copies were a few dependent round trips per row with nothing to
// overlap them but the other CTAs on the SM -- at K = 14336 only 3-4 fit (56 KB of shared
// memory each).  H100 run 7: 20.1 ms for a prefill step's 128 calls, ~0.7 TB/s of x reads,
// against issue #3's 70 % of copy bandwidth.
enum { kRowsSync = 0, kRowsAsync1 = 1, kRowsAsync2 = 2 };

template <typename T, bool FAKE>
__global__ void __launch_bounds__(32 * kActRowsWarps) act_quant_rows_kernel(const CometqActQuantArgs p, int mode) {
  pdl_launch_dependents();
  extern __shared__ __align__(16) unsigned char rows_smem[];
  const int nb = p.n_blocks, K = p.K;
  int* s_is8 = reinterpret_cast<int*>(rows_smem);
  int* s_info = s_is8 + nb;
  uint16_t* s_perm = reinterpret_cast<uint16_t*>(s_info + nb);  // (8-byte aligned: offset 8 nb)
  T* s_x0 = reinterpret_cast<T*>(rows_smem + rows_x_offset(nb));
  const int x_stride = rows_x_stride<T>(K);

  build_block_table(p.block_bits, nb, p.n4, p.n8, s_is8, s_info);  // (ends with a barrier)
  // The permutation as 16-bit indices, clamped (an index outside the row -- never made by
  // ActivationLayout -- stays inside shared memory); the padding channels j >= K read the zero at
  // element K.  kPermBatch loads in flight per thread before the stores: a loop of one load and one
  // store per trip waited a memory round trip per trip -- 16 of them in a row at K = 4096, 56 at
  // K = 14336, in every CTA before its first row (SASS: one LDG.64 -> STS.U16 per trip); now 2 / 7.
  // (8, not 16: 16 took the kernel from 32 to 61 registers, 8 CTAs per SM to 4.)
  // (Only each index's low 32-bit word is read: a valid index is < K <= 32767, and any other value
  // still lands inside the row after the clamp -- the memory-safety contract for bad input.)
  constexpr int kPermBatch = 8;
  const int total = nb * kBlockK;
  const int* perm_lo = reinterpret_cast<const int*>(p.perm);  // (little-endian: word 2j is perm[j]'s low half)
  for (int j0 = threadIdx.x; j0 < total; j0 += kPermBatch * static_cast<int>(blockDim.x)) {
    int c[kPermBatch];
#pragma unroll
    for (int u = 0; u < kPermBatch; ++u) {
      const int j = j0 + u * static_cast<int>(blockDim.x);
      c[u] = j < K ? __ldg(perm_lo + 2 * j) : 0;
    }
#pragma unroll
    for (int u = 0; u < kPermBatch; ++u) {
      const int j = j0 + u * static_cast<int>(blockDim.x);
      if (j < total) s_perm[j] = static_cast<uint16_t>(j >= K ? K : (c[u] < 0 ? 0 : (c[u] >= K ? K - 1 : c[u])));
    }
  }
  // element K of each buffer: zero, and never written by a row copy (the register copy stops at
  // K - 1; a cp.async chunk that covers it zero-fills everything past the row's bytes)
  if (threadIdx.x < (mode == kRowsAsync2 ? 2 : 1)) s_x0[threadIdx.x * x_stride + K] = zero_of<T>();
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row_bytes = K * static_cast<int>(sizeof(T));
  const int n_chunks = (row_bytes + 15) >> 4;
  // every 16-byte chunk of row m into dst, asynchronously (the last one partial); one commit group
  auto issue_row = [&](int m, T* dst) {
    const unsigned char* src =
        reinterpret_cast<const unsigned char*>(static_cast<const T*>(p.x) + static_cast<int64_t>(m) * p.ld_x);
    unsigned char* d = reinterpret_cast<unsigned char*>(dst);
    for (int i = threadIdx.x; i < n_chunks; i += blockDim.x)
      cp_async16_bytes(d + 16 * i, src + 16 * i, static_cast<unsigned>(min(16, row_bytes - 16 * i)));
    cp_async_commit();
  };
  if (mode == kRowsAsync2 && blockIdx.x < p.M) issue_row(blockIdx.x, s_x0);

  int it = 0;
  for (int m = blockIdx.x; m < p.M; m += gridDim.x, ++it) {
    T* s_x = s_x0 + (mode == kRowsAsync2 ? (it & 1) * x_stride : 0);
    if (mode == kRowsAsync2) {
      // the other buffer was last read in the previous iteration, which ended with a barrier
      if (m + static_cast<int>(gridDim.x) < p.M) {
        issue_row(m + gridDim.x, s_x0 + ((it + 1) & 1) * x_stride);
        cp_async_wait<1>();  // this row's group has landed (the next row's may still be in flight)
      } else {
        cp_async_wait<0>();
      }
    } else if (mode == kRowsAsync1) {
      issue_row(m, s_x);
      cp_async_wait<0>();
    } else {
      const T* xrow = static_cast<const T*>(p.x) + static_cast<int64_t>(m) * p.ld_x;
      for (int j = threadIdx.x; j < K; j += blockDim.x) s_x[j] = xrow[j];
    }
    __syncthreads();
    for (int b = warp; b < nb; b += kActRowsWarps) {
      // the lane's 4 permutation entries in one 8-byte shared load
      const uint2 pp = *reinterpret_cast<const uint2*>(s_perm + b * kBlockK + lane * 4);
      const int idx[4] = {static_cast<int>(pp.x & 0xFFFFu), static_cast<int>(pp.x >> 16),
                          static_cast<int>(pp.y & 0xFFFFu), static_cast<int>(pp.y >> 16)};
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = to_float(s_x[idx[i]]);  // (padding channels: the zero at K)
      const int info = s_info[b];
      const bool is8 = (info & kInfoInt8) != 0;
      const float a = warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3]))));
      const float sc = is8 ? __fdiv_rn(a, 127.f) : __fdiv_rn(__fmul_rn(a, p.int4_clip), 7.f);
      if (!FAKE && lane == 0) p.scales[static_cast<int64_t>(m) * p.ld_scales + b] = sc;
      if (FAKE || (info & kInfoValid)) quantize_store_lane<FAKE>(p, m, b, info & kInfoSlotMask, is8, lane, v, sc);
    }
    __syncthreads();  // every warp is done with s_x before it is refilled
  }
  cp_async_wait<0>();  // (nothing is left in flight: the last row waited for its group)
}

// COMETQ_ACT_QUANT_ROWS: "0" never the rows kernel, "1" whenever it applies (K <= 32767),
// unset / anything else: from kActRowsMinM rows on
static int act_rows_mode() {
  const char* v = std::getenv("COMETQ_ACT_QUANT_ROWS");
  if (v != nullptr && std::strcmp(v, "0") == 0) return 0;
  if (v != nullptr && std::strcmp(v, "1") == 0) return 1;
  return -1;
}

// COMETQ_ACT_QUANT_ROWS_LOAD: the rows kernel's row loading -- "sync", "async1", "async2" (forced
// where the rows are 16-byte aligned and two buffers fit); unset or anything else: "async2" where
// it also keeps enough CTAs resident (launch_act_quant_rows), else the next one down
static int act_rows_load_cap(bool& forced) {
  const char* v = std::getenv("COMETQ_ACT_QUANT_ROWS_LOAD");
  forced = v != nullptr &&
           (std::strcmp(v, "sync") == 0 || std::strcmp(v, "async1") == 0 || std::strcmp(v, "async2") == 0);
  if (v != nullptr && std::strcmp(v, "sync") == 0) return kRowsSync;
  if (v != nullptr && std::strcmp(v, "async1") == 0) return kRowsAsync1;
  return kRowsAsync2;
}

template <typename T, bool FAKE>
static cudaError_t launch_act_quant_rows(const CometqActQuantArgs& a, cudaStream_t stream) {
  const size_t buf = sizeof(T) * static_cast<size_t>(rows_x_stride<T>(a.K));
  const size_t base = rows_x_offset(a.n_blocks);
  auto kernel = act_quant_rows_kernel<T, FAKE>;
  int dev = 0, sms = 132, per_sm = 1, smem_max = 48 * 1024;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  // cp.async reads 16-byte aligned chunks: the row starts must be (the base and the row stride)
  const bool aligned = (reinterpret_cast<uintptr_t>(a.x) & 15) == 0 &&
                       (a.M == 1 || (a.ld_x * static_cast<int64_t>(sizeof(T))) % 16 == 0);
  bool forced = false;
  int mode = aligned ? act_rows_load_cap(forced) : kRowsSync;
  if (mode == kRowsAsync2 && base + 2 * buf > static_cast<size_t>(smem_max)) mode = kRowsAsync1;
  if (base + buf > static_cast<size_t>(smem_max)) return cudaErrorNotSupported;  // (the caller runs the block kernel)
  // (the attribute allows the largest size this launch may take, so both occupancies below are real)
  const size_t smem_cap = base + (mode == kRowsAsync2 ? 2 : 1) * buf;
  if (smem_cap > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_cap));
    if (err != cudaSuccess) return err;
  }
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 32 * kActRowsWarps, smem_cap);
  if (err != cudaSuccess) return err;
  if (mode == kRowsAsync2 && !forced) {
    // The second buffer costs resident CTAs where rows are long (fp16, K = 14336: 2 CTAs per SM
    // instead of 3), and the kernel is issue-bound as much as copy-bound: keep it only where at
    // least min(4, the one-buffer count) CTAs still fit; else one buffer (whose copies the
    // other resident CTAs' quantization overlaps).  A guess to settle on the GPU (bench_gemm
    // --what act_quant times the loaders side by side).
    int per_sm1 = 1;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm1, kernel, 32 * kActRowsWarps, base + buf);
    if (err != cudaSuccess) return err;
    if (per_sm < std::min(4, per_sm1)) {
      mode = kRowsAsync1;
      per_sm = per_sm1;
    }
  }
  const size_t smem = base + (mode == kRowsAsync2 ? 2 : 1) * buf;
  // persistent over rows: the permutation is staged once per CTA, not once per row
  const int grid = std::max(1, std::min(a.M, sms * std::max(1, per_sm)));
  kernel<<<grid, 32 * kActRowsWarps, smem, stream>>>(a, mode);
  return cudaGetLastError();
}

template <typename T, bool FAKE>
static cudaError_t launch_act_quant(const CometqActQuantArgs& a, cudaStream_t stream) {
  if (a.scale_mode == COMETQ_SCALE_BLOCK) {
    const int rows = act_rows_mode();
    if (a.K <= kActRowsMaxK && (rows == 1 || (rows == -1 && a.M >= kActRowsMinM))) {
      const cudaError_t err = launch_act_quant_rows<T, FAKE>(a, stream);
      if (err != cudaErrorNotSupported) return err;  // else: too much shared memory here, the block kernel
    }
    const dim3 grid(a.M, (a.n_blocks + kActBlockWarps - 1) / kActBlockWarps);
    act_quant_block_kernel<T, FAKE><<<grid, 32 * kActBlockWarps, 0, stream>>>(a);
    return cudaGetLastError();
  }
  const size_t smem = 4 * sizeof(int) * static_cast<size_t>(a.n_blocks);
  auto kernel = act_quant_kernel<T, FAKE>;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  // one warp per block, at least 4 warps (the scale step and the block table use warp 0),
  // at most kActMaxThreads
  const int threads = std::min(kActMaxThreads, std::max(128, 32 * a.n_blocks));
  kernel<<<a.M, threads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
static cudaError_t launch_act_quant_any(const CometqActQuantArgs& a, cudaStream_t stream) {
  return a.out != nullptr ? launch_act_quant<T, true>(a, stream) : launch_act_quant<T, false>(a, stream);
}

}  // namespace cometq

extern "C" cudaError_t cometq_quantize_act(const CometqActQuantArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const CometqActQuantArgs& a = *args;
  if (a.M < 0 || a.K < 1 || a.n_blocks != (a.K + cometq::kBlockK - 1) / cometq::kBlockK || a.n4 < 0 || a.n8 < 0 ||
      a.n4 + a.n8 != a.n_blocks) {
    return cudaErrorInvalidValue;
  }
  if (!(a.int4_clip > 0.f && a.int4_clip <= 1.f)) return cudaErrorInvalidValue;  // also rejects NaN
  if (a.M == 0) return cudaSuccess;
  if (a.x == nullptr || a.perm == nullptr || a.block_bits == nullptr) return cudaErrorInvalidValue;
  if (a.out != nullptr) {  // FAKE: the dequantized values only (q4 / q8 / scales unused)
    if (a.out_dtype != COMETQ_DTYPE_F16 && a.out_dtype != COMETQ_DTYPE_BF16 && a.out_dtype != COMETQ_DTYPE_F32) {
      return cudaErrorInvalidValue;
    }
    if (a.ld_out < static_cast<int64_t>(a.n_blocks) * cometq::kBlockK || (a.ld_out & 1) ||
        (reinterpret_cast<uintptr_t>(a.out) & 7)) {
      return cudaErrorInvalidValue;  // the pair stores need even offsets from an 8-byte aligned base
    }
  } else if (a.scales == nullptr || (a.n4 > 0 && a.q4 == nullptr) || (a.n8 > 0 && a.q8 == nullptr)) {
    return cudaErrorInvalidValue;
  }
  switch (a.x_dtype) {
    case COMETQ_DTYPE_F16:
      return cometq::launch_act_quant_any<__half>(a, stream);
    case COMETQ_DTYPE_BF16:
      return cometq::launch_act_quant_any<__nv_bfloat16>(a, stream);
    case COMETQ_DTYPE_F32:
      return cometq::launch_act_quant_any<float>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
