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
// (NaN inputs are not part of the contract: fmaxf drops NaN, torch.amax keeps it.)
//
// Work split: one CTA per token row, one warp per 128-channel block (up to 32
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
#include <algorithm>

#include "cometq_device.cuh"
#include "cometq_kernels.h"

namespace cometq {

constexpr int kActMaxThreads = 1024;  // one warp per block up to 32 blocks (K <= 4096)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

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

__device__ __forceinline__ float warp_max(float a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) a = fmaxf(a, __shfl_xor_sync(0xFFFFFFFFu, a, off));
  return a;
}

template <typename T>
__global__ void __launch_bounds__(kActMaxThreads) act_quant_kernel(const CometqActQuantArgs p) {
  extern __shared__ __align__(16) int act_smem[];
  const int nb = p.n_blocks;
  int* s_is8 = act_smem;
  int* s_info = s_is8 + nb;
  float* s_absmax = reinterpret_cast<float*>(s_info + nb);
  float* s_scale = s_absmax + nb;

  build_block_table(p.block_bits, nb, p.n4, p.n8, s_is8, s_info);

  const int m = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_threads = blockDim.x, n_warps = blockDim.x >> 5;  // a multiple of 32 (launch_act_quant)
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

  // ---- scales
  float* srow = p.scales + static_cast<int64_t>(m) * p.ld_scales;
  if (p.scale_mode == COMETQ_SCALE_BLOCK) {
    for (int b = threadIdx.x; b < nb; b += n_threads) {
      const float s = s_is8[b] ? __fdiv_rn(s_absmax[b], 127.f) : __fdiv_rn(__fmul_rn(s_absmax[b], p.int4_clip), 7.f);
      s_scale[b] = s;
      srow[b] = s;
    }
  } else if (warp == 0) {
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
    if (lane == 0) {
      srow[0] = s4;
      srow[1] = s8;
    }
    for (int b = lane; b < nb; b += 32) s_scale[b] = s_is8[b] ? s8 : s4;
  }
  __syncthreads();

  // ---- pass 2: quantize and pack
  for (int b = warp; b < nb; b += n_warps) {
    const int info = s_info[b];
    if (!(info & kInfoValid)) continue;  // n_int8 inconsistent with block_bits: never write out of bounds
    const int slot = info & kInfoSlotMask;
    const bool is8 = (info & kInfoInt8) != 0;
    const float qmax = is8 ? 127.f : 7.f;
    const float s = s_scale[b];
    const float d = (s == 0.f) ? 1.f : s;  // all-zero block: q = 0 either way (reference _safe_div)
    float v[4];
    gather4(xrow, p.perm, p.K, b, lane, v);
    int q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) q[i] = static_cast<int>(fminf(fmaxf(rintf(__fdiv_rn(v[i], d)), -qmax), qmax));
    if (is8) {
      const uint32_t word = (static_cast<uint32_t>(q[0]) & 0xFFu) | ((static_cast<uint32_t>(q[1]) & 0xFFu) << 8) |
                            ((static_cast<uint32_t>(q[2]) & 0xFFu) << 16) | ((static_cast<uint32_t>(q[3]) & 0xFFu) << 24);
      int8_t* dst = p.q8 + static_cast<int64_t>(m) * p.ld_q8 + static_cast<int64_t>(slot) * kBlockK + lane * 4;
      *reinterpret_cast<uint32_t*>(dst) = word;
    } else {
      // even channel -> low nibble (layout.pack_int4), two's complement nibbles
      const uint32_t byte0 = (static_cast<uint32_t>(q[0]) & 0xFu) | ((static_cast<uint32_t>(q[1]) & 0xFu) << 4);
      const uint32_t byte1 = (static_cast<uint32_t>(q[2]) & 0xFu) | ((static_cast<uint32_t>(q[3]) & 0xFu) << 4);
      uint8_t* dst = p.q4 + static_cast<int64_t>(m) * p.ld_q4 + static_cast<int64_t>(slot) * (kBlockK / 2) + lane * 2;
      *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(byte0 | (byte1 << 8));
    }
  }
}

template <typename T>
static cudaError_t launch_act_quant(const CometqActQuantArgs& a, cudaStream_t stream) {
  const size_t smem = 4 * sizeof(int) * static_cast<size_t>(a.n_blocks);
  auto kernel = act_quant_kernel<T>;
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
  if (a.x == nullptr || a.perm == nullptr || a.block_bits == nullptr || a.scales == nullptr ||
      (a.n4 > 0 && a.q4 == nullptr) || (a.n8 > 0 && a.q8 == nullptr)) {
    return cudaErrorInvalidValue;
  }
  switch (a.x_dtype) {
    case COMETQ_DTYPE_F16:
      return cometq::launch_act_quant<__half>(a, stream);
    case COMETQ_DTYPE_BF16:
      return cometq::launch_act_quant<__nv_bfloat16>(a, stream);
    case COMETQ_DTYPE_F32:
      return cometq::launch_act_quant<float>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
