// Device helpers shared by the cometq kernels (no torch, plain CUDA).
//
//   * the per-CTA block table (which class buffer and slot each 128-channel
//     block lives in), built in shared memory from block_bits;
//   * cp.async wrappers (global -> shared copies that bypass registers);
//   * mma.sync wrappers for the two integer tensor-core shapes we use;
//   * the INT4 -> INT8 register conversion;
//   * dtype load/store helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "cometq_kernels.h"

namespace cometq {

constexpr int kBlockK = 128;  // channels per activation block (layout.BLOCK_K)

// ---------------------------------------------------------------------------
// Block table.  The q4 / q8 buffers hold each precision class in ascending block
// order, so block b lives at slot = #(blocks before b of the same class).  Every
// CTA rebuilds this small table in shared memory instead of taking it as an extra
// input: that keeps the op's inputs exactly those of the reference and costs no
// extra kernel launch.  One warp builds it with ballots, 32 blocks per step:
// slot = (class count of earlier chunks) + popc(ballot of the class & lanes below).
// (The first version let each thread count the earlier blocks of its class one by
// one: O(nb) dependent shared-memory reads, ~100 for a down_proj, before the CTA's
// first weight load -- microseconds at decode, where a CTA streams only a few blocks.)
//
// s_info[b] bit layout:  [19:0] slot   [20] is_int8   [21] valid
// "valid" is false when the slot does not fit the class buffer (block_bits
// inconsistent with the q4/q8 widths); such a block is skipped, never read out
// of bounds.  The bindings cannot check that without a device sync.
// ---------------------------------------------------------------------------
constexpr int kInfoSlotMask = (1 << 20) - 1;
constexpr int kInfoInt8 = 1 << 20;
constexpr int kInfoValid = 1 << 21;

// bits[i] = block_bits[c0 + 32 i + lane] for the blocks below `limit` (else 0): 8 chunks of a warp's
// block-map loads in flight at once (build_block_table, act_quant.cu block_slot).
__device__ __forceinline__ void load_block_bits8(const int32_t* __restrict__ block_bits, int c0, int limit, int lane,
                                                 int (&bits)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int b = c0 + 32 * i + lane;
    bits[i] = b < limit ? __ldg(block_bits + b) : 0;
  }
}

// The chunks' loads are issued 8 at a time before their ballots: one memory round trip for any
// layer up to 256 blocks (K = 32768), where a load-then-ballot loop waited one per 32 blocks (4 for
// a down_proj's 112) -- in front of every CTA's first copy, which at decode (a split-K CTA streams
// only a few K blocks) is a visible part of the GEMM.
__device__ __forceinline__ void build_block_table(const int32_t* __restrict__ block_bits, int nb, int n4,
                                                  int n8, int* s_is8, int* s_info) {
  if (threadIdx.x < 32) {  // every block size used is >= 32 threads
    const int lane = threadIdx.x;
    const unsigned below = (1u << lane) - 1u;
    int base8 = 0, base4 = 0;  // blocks of each class in the chunks before this one
    for (int c0 = 0; c0 < nb; c0 += 256) {
      int bits[8];
      load_block_bits8(block_bits, c0, nb, lane, bits);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int c = c0 + 32 * i;
        if (c >= nb) break;  // (warp-uniform)
        const int b = c + lane;
        const bool in = b < nb;
        const bool is8 = in && bits[i] == 8;
        const unsigned m8 = __ballot_sync(0xFFFFFFFFu, is8);
        const unsigned m4 = __ballot_sync(0xFFFFFFFFu, in && !is8);
        if (in) {
          const int slot = is8 ? base8 + __popc(m8 & below) : base4 + __popc(m4 & below);
          const bool valid = slot < (is8 ? n8 : n4);
          s_is8[b] = is8 ? 1 : 0;
          s_info[b] = (slot & kInfoSlotMask) | (is8 ? kInfoInt8 : 0) | (valid ? kInfoValid : 0);
        }
        base8 += __popc(m8);
        base4 += __popc(m4);
      }
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------
// cp.async (sm_80+): 16-byte global -> shared copy, asynchronous, L2-only (.cg:
// the tiles are reused from shared memory, caching them in L1 would only evict
// the scales).  Groups are committed per pipeline stage and waited on by count.
// ---------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem_src));
#else
  *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(gmem_src);
#endif
}

// Same, but when `valid` is false nothing is read from global memory and the 16
// shared bytes are zero-filled (src-size operand 0).  Used for tile rows past M
// or columns past N: their results are never stored, and zeros keep the shared
// memory initialized (compute-sanitizer initcheck clean) without spending
// bandwidth on duplicate rows.  gmem_src must still be a valid address.
__device__ __forceinline__ void cp_async16_zfill(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const unsigned src_size = valid ? 16u : 0u;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem_src), "r"(src_size));
#else
  *reinterpret_cast<uint4*>(smem_dst) = valid ? *reinterpret_cast<const uint4*>(gmem_src) : make_uint4(0, 0, 0, 0);
#endif
}

// Same, copying only the first `bytes` (0..16) bytes of the 16 and zero-filling the rest (src-size
// operand): a row's last chunk when its byte length is not a multiple of 16 (gmem_src 16-byte
// aligned; nothing past gmem_src + bytes is read).
__device__ __forceinline__ void cp_async16_bytes(void* smem_dst, const void* gmem_src, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem_src), "r"(bytes));
#else
  for (unsigned i = 0; i < 16; ++i)
    static_cast<unsigned char*>(smem_dst)[i] = i < bytes ? static_cast<const unsigned char*>(gmem_src)[i] : 0;
#endif
}

// 4-byte copy (.ca: the only cp.async form below 16 bytes) of one fp32 scale or offset into a
// pipeline stage's scale area (w4ax_gemm.cu, load_stage).
__device__ __forceinline__ void cp_async4(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem_src));
#else
  *reinterpret_cast<float*>(smem_dst) = *reinterpret_cast<const float*>(gmem_src);
#endif
}

// Programmatic dependent launch (sm_90+; PTX griddepcontrol, no-ops where nothing was launched that
// way): a primary kernel lets the stream's next kernel start launching (its prologue overlaps this
// kernel's tail); the dependent waits for the primary's completion and memory before reading what
// it wrote.  Elsewhere: nothing.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---------------------------------------------------------------------------
// Tile loaders shared by the GEMMs (w4ax_gemm.cu load_stage, w16_gemm.cu w16_load_stage): a tile's
// rows are copied as 16-byte chunks at a 64-bit tile base plus a 32-bit row offset (row * row
// stride + column, the row clamped to the last one; the launchers check every offset fits 32 bits).
// ---------------------------------------------------------------------------
__host__ __device__ constexpr int cdiv_c(int a, int b) { return (a + b - 1) / b; }

// log2 of the weight groups per 128-channel block: 3, 2, 1 for G = 16, 32, 64; 0 for G >= 128
// (G is validated by cometq_w4ax_gemm: 16, 32, 64 or a multiple of 128).
__host__ __device__ constexpr int groups_per_block_log2(int group) {
  return group >= kBlockK ? 0 : (group == 16 ? 3 : (group == 32 ? 2 : 1));
}

// One 16-byte chunk of rows [0, limit) (row `row`, byte column `col`, row stride `ld` bytes) from
// base + row * ld + col into dst; a row >= limit is zero-filled from the clamped row's address.
__device__ __forceinline__ void copy_row_chunk(void* dst, const void* base, int row, int limit, int ld, int col) {
  const bool ok = row < limit;
  const unsigned off = static_cast<unsigned>((ok ? row : limit - 1) * ld + col);
  cp_async16_zfill(dst, static_cast<const uint8_t*>(base) + off, ok);
}

// The calling thread's chunks of a ROWS x (CPR x 16 bytes) tile: chunk i is row row0 + i * THREADS / CPR
// (shared-memory destination dst + i * THREADS / CPR * DST_ROW), while chunk number
// threadIdx.x + i * THREADS < ROWS * CPR.
template <int ROWS, int CPR, int DST_ROW, int THREADS>
__device__ __forceinline__ void copy_rows(uint8_t* dst, const void* base, int row0, int limit, int ld, int col) {
  static_assert(THREADS % CPR == 0, "a thread's chunks must share their column");
#pragma unroll
  for (int i = 0; i < cdiv_c(ROWS * CPR, THREADS); ++i) {
    if ((ROWS * CPR) % THREADS != 0 && static_cast<int>(threadIdx.x) + i * THREADS >= ROWS * CPR) break;
    copy_row_chunk(dst + i * (THREADS / CPR) * DST_ROW, base, row0 + i * (THREADS / CPR), limit, ld, col);
  }
}

// ---------------------------------------------------------------------------
// mma.sync wrappers.  Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k32
// / m16n8k64"), with g = lane / 4 ("groupID") and t = lane % 4:
//
//   m16n8k32 .s8 (A 16x32 row-major, B 32x8 "col" = K-contiguous per column):
//     A reg0: row g,   k = 4t..4t+3        A reg1: row g+8, k = 4t..4t+3
//     A reg2: row g,   k = 16+4t..16+4t+3  A reg3: row g+8, k = 16+4t..
//     B reg0: col g,   k = 4t..4t+3        B reg1: col g,   k = 16+4t..
//   m16n8k64 .s4 (same picture with 8 nibbles per register):
//     A reg0: row g,   k = 8t..8t+7        A reg1: row g+8, k = 8t..8t+7
//     A reg2: row g,   k = 32+8t..         A reg3: row g+8, k = 32+8t..
//     B reg0: col g,   k = 8t..8t+7        B reg1: col g,   k = 32+8t..
//   C/D (both): c0,c1: row g, cols 2t, 2t+1;  c2,c3: row g+8, cols 2t, 2t+1.
//   Lower k sits in lower bits of a register (byte 0 / nibble 0 first).
//
// A dot product does not care in which order its K terms are summed, so the
// GEMM feeds the k slots of A and B with the SAME permutation of the real
// channels (see w4ax_gemm.cu, "k-slot permutation"); only the pairing matters.
// ---------------------------------------------------------------------------
__device__ __forceinline__ void mma_s8_m16n8k32(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

__device__ __forceinline__ void mma_s4_m16n8k64(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------
// INT4 -> INT8 in registers, two bit operations per 4 values.
//
// A 32-bit word w holds 8 signed nibbles v0..v7, v0 in bits [3:0] (layout: even
// index low).  Byte j of w is (v_{2j+1} << 4) | v_{2j}.
//
//   nib_lo_x16(w) = (w << 4) & 0xF0F0F0F0 : byte j = v_{2j}   << 4
//   nib_hi_x16(w) =  w       & 0xF0F0F0F0 : byte j = v_{2j+1} << 4
//
// Read as int8, (v << 4) is exactly 16 * v for a two's-complement nibble v
// (the nibble's sign bit lands on the byte's sign bit), so each result word
// holds 4 INT8 values = 16 x the even (resp. odd) INT4 values, range
// [-128, 112].  No shift back: the x16 (x256 when both operands are converted)
// is an exact power of two folded into the fp32 epilogue scale.  The int32
// accumulator stays exact: |16*8 * 16*8 * 128| = 2^21 << 2^31.
//
// The even values end up in one register and the odd in another: a
// permutation of K, which the GEMM applies identically to both operands.
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t nib_lo_x16(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t nib_hi_x16(uint32_t w) { return w & 0xF0F0F0F0u; }
// The same with a mask ANDed in, as one 3-input LOP3 (written as PTX: from `(x & c) & keep` with
// keep = cond ? ~0 : 0 the compiler makes a SEL per word on top of the LOP3).
__device__ __forceinline__ uint32_t and3_f0(uint32_t x, uint32_t keep) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, 0xF0F0F0F0, 0x80;" : "=r"(d) : "r"(x), "r"(keep));  // 0x80: a & b & c
  return d;
}
__device__ __forceinline__ uint32_t nib_lo_x16_masked(uint32_t w, uint32_t keep) { return and3_f0(w << 4, keep); }
__device__ __forceinline__ uint32_t nib_hi_x16_masked(uint32_t w, uint32_t keep) { return and3_f0(w, keep); }

// Bytes (0,2) of p and (0,2) of q -> one word (p0,p2,q0,q2);  (1,3) likewise.
// With p = bytes c0..c3 and q = c4..c7 of 8 consecutive INT8 channels this
// yields (c0,c2,c4,c6) and (c1,c3,c5,c7): the same even/odd split as above.
__device__ __forceinline__ uint32_t bytes_even(uint32_t p, uint32_t q) { return __byte_perm(p, q, 0x6420); }
__device__ __forceinline__ uint32_t bytes_odd(uint32_t p, uint32_t q) { return __byte_perm(p, q, 0x7531); }

// Host: out = sum of the fp32 slabs ws[0..splits) of [M, N] in split order (+ bias), converted to
// out_dtype (w4ax_gemm.cu; the split-K epilogue of both GEMMs).
cudaError_t launch_splitk_finalize(const float* ws, int splits, int M, int N, const void* bias, int bias_dtype,
                                   void* out, int64_t ld_out, int out_dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------
// dtype helpers
// ---------------------------------------------------------------------------
__device__ __forceinline__ float load_as_float(const void* p, int64_t i, int dtype) {
  if (dtype == COMETQ_DTYPE_F16) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == COMETQ_DTYPE_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_from_float(void* p, int64_t i, float v, int dtype) {
  if (dtype == COMETQ_DTYPE_F16) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else if (dtype == COMETQ_DTYPE_BF16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// ---------------------------------------------------------------------------
// Split-K reduction shared by the GEMMs (w4ax_gemm.cu draws the protocol): every split stores
// its fp32 slab; the tile's last split to finish sums the slabs in split order (+ bias) -- the
// finalize kernel's sequence of fp32 adds, so the same bits whichever split finishes last.
// ---------------------------------------------------------------------------
// Called by every thread after its slab stores: whether this CTA is the tile's last split
// (block-uniform; that CTA has reset the tile's counter to zero for the next GEMM).
__device__ __forceinline__ bool splitk_last_cta(int32_t* counters, int tile_id) {
  __shared__ int s_last;
  __threadfence();  // this CTA's slab stores before its count
  __syncthreads();
  if (threadIdx.x == 0) {
    const int prev = atomicAdd(counters + tile_id, 1);
    s_last = prev == static_cast<int>(gridDim.z) - 1;
    if (s_last) counters[tile_id] = 0;  // every other split of the tile has counted already
  }
  __syncthreads();
  const bool last = s_last != 0;
  if (last) __threadfence();
  return last;
}

// How many slabs' loads a thread issues before it adds them.  The first version loaded one slab,
// added it, loaded the next (`#pragma unroll 1`): in-order issue makes every load wait for the add
// before it, so a tile's reduction cost (elements per thread) x (splits) L2 round trips.  H200 run 10
// (2026-11-28): the CUDA w16 GEMM at 8B.o, M = 64 -- 64 elements per thread of a 64 x 128 tile --
// took 49.5 us however it split (the Triton w16 GEMM: 19.8 us, FP16 cuBLAS: 8.3 us).
constexpr int kSplitkLoadBatch = 4;
// Positions (vectors) a thread reduces at once in splitk_reduce_tile (its register cost: below).
constexpr int kSplitkPositions = 2;

// out[out_idx] = ((slab 0 + slab 1) + ...) + bias[n] at element `at` of the [splits][M][N] slabs,
// read from L2 (__ldcg: another SM's stores are not in this SM's L1).  The loads of
// kSplitkLoadBatch slabs are in flight together; the adds keep split order (the same bits).
__device__ __forceinline__ void splitk_sum_store(const float* ws, int splits, int64_t slab, int64_t at, int n,
                                                 const void* bias, int bias_dtype, void* out, int64_t out_idx,
                                                 int out_dtype) {
  float v = __ldcg(ws + at);
#pragma unroll 1
  for (int z = 1; z < splits; z += kSplitkLoadBatch) {
    float t[kSplitkLoadBatch];
#pragma unroll
    for (int u = 0; u < kSplitkLoadBatch; ++u) t[u] = z + u < splits ? __ldcg(ws + (z + u) * slab + at) : 0.f;
#pragma unroll
    for (int u = 0; u < kSplitkLoadBatch; ++u) {
      if (z + u < splits) v += t[u];  // (skipped, not + 0.f: -0.f + 0.f would turn the sign)
    }
  }
  if (bias != nullptr) v += load_as_float(bias, n, bias_dtype);
  store_from_float(out, out_idx, v, out_dtype);
}

// The last split's reduction of one output tile, rows [m0, m0 + rows) x columns [n0, n0 + BN)
// (columns past N skipped): out = slab sums in split order (+ bias), by all THREADS of the CTA.
// Memory-level parallelism is the point (see kSplitkLoadBatch): a thread takes U positions a step,
// VEC = 4 consecutive columns each when N % 4 == 0 (16-byte slab rows: one __ldcg.128 per slab;
// the workspace is a fresh allocation, 16-byte aligned), and issues U x kSplitkLoadBatch loads
// before the first add:
//
//     step (thread t):   positions t, t + THREADS, ..., t + (U - 1) THREADS of the tile's
//                        rows x (BN / VEC) vectors, row-major (a warp reads 32 x 16 contiguous B)
//     loads:  slab 0 of the U, then slabs z .. z + 3 of the U (4 U x 16 B in flight), add in order
//
// A 64 x 128 tile over 128 threads at U = 2: 8 steps of (1 + ceil((splits - 1) / 4)) round trips,
// where the element-by-element loop waited 64 x splits.  U = kSplitkPositions (2) keeps the
// kernels' register counts where they were (ptxas, sm_90a: at U = 4 the integer GEMM's 16-row
// FIXUP tile went from 70-102 to 191-211 registers; its callers pass U = 1).  Same adds in the
// same order as splitk_sum_store: the same bits as the finalize kernel.
template <int BN, int THREADS, int VEC, int U>
__device__ __forceinline__ void splitk_reduce_tile_v(const float* ws, int splits, int M, int N, int m0, int n0,
                                                     int rows, const void* bias, int bias_dtype, void* out,
                                                     int64_t ld_out, int out_dtype) {
  static_assert(BN % VEC == 0, "whole vectors per tile row");
  constexpr int Q = BN / VEC;  // vectors per tile row
  using V = typename std::conditional<VEC == 4, float4, float>::type;
  const int64_t slab = static_cast<int64_t>(M) * N;
  const int total = rows * Q;
  auto ld = [&](int64_t i) -> V { return __ldcg(reinterpret_cast<const V*>(ws + i)); };
  auto add = [](V& a, const V& b) {
    if constexpr (VEC == 4) {
      a.x += b.x;
      a.y += b.y;
      a.z += b.z;
      a.w += b.w;
    } else {
      a += b;
    }
  };
#pragma unroll 1
  for (int base = threadIdx.x; base < total; base += U * THREADS) {
    int64_t at[U];
    int mrow[U], ncol[U];
    bool ok[U];
    V v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = base + u * THREADS;
      const int r = idx / Q, n = n0 + (idx % Q) * VEC;
      ok[u] = idx < total && n < N;
      mrow[u] = m0 + r;
      ncol[u] = n;
      at[u] = static_cast<int64_t>(m0 + r) * N + n;
      if (ok[u]) v[u] = ld(at[u]);
    }
    // the bias of the step's columns, loaded with slab 0 (not one round trip per column at the end)
    float bv[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int c = 0; c < VEC; ++c) bv[u][c] = (ok[u] && bias != nullptr) ? load_as_float(bias, ncol[u] + c, bias_dtype) : 0.f;
#pragma unroll 1
    for (int z = 1; z < splits; z += kSplitkLoadBatch) {
      V t[kSplitkLoadBatch][U];
#pragma unroll
      for (int b = 0; b < kSplitkLoadBatch; ++b)
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (ok[u] && z + b < splits) t[b][u] = ld((z + b) * slab + at[u]);
#pragma unroll
      for (int b = 0; b < kSplitkLoadBatch; ++b)
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (ok[u] && z + b < splits) add(v[u], t[b][u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!ok[u]) continue;
      float e[VEC];
      if constexpr (VEC == 4) {
        e[0] = v[u].x;
        e[1] = v[u].y;
        e[2] = v[u].z;
        e[3] = v[u].w;
      } else {
        e[0] = v[u];
      }
      const int64_t o = static_cast<int64_t>(mrow[u]) * ld_out + ncol[u];
#pragma unroll
      for (int c = 0; c < VEC; ++c) {
        float x = e[c];
        if (bias != nullptr) x += bv[u][c];
        store_from_float(out, o + c, x, out_dtype);
      }
    }
  }
}

template <int BN, int THREADS, int U = kSplitkPositions>
__device__ __forceinline__ void splitk_reduce_tile(const float* ws, int splits, int M, int N, int m0, int n0, int rows,
                                                   const void* bias, int bias_dtype, void* out, int64_t ld_out,
                                                   int out_dtype) {
  // (BN % 4 == 0 and n0 a multiple of BN: with N % 4 == 0 a vector never straddles N)
  if (BN % 4 == 0 && (N & 3) == 0) {
    splitk_reduce_tile_v<BN, THREADS, (BN % 4 == 0 ? 4 : 1), U>(ws, splits, M, N, m0, n0, rows, bias, bias_dtype, out,
                                                              ld_out, out_dtype);
  } else {
    splitk_reduce_tile_v<BN, THREADS, 1, U>(ws, splits, M, N, m0, n0, rows, bias, bias_dtype, out, ld_out, out_dtype);
  }
}

}  // namespace cometq
