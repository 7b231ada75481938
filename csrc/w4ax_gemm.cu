// W4Ax GEMM on integer tensor cores (mma.sync), plain CUDA (no torch).
//
// Semantics: exactly cometq.reference.w4ax_gemm (see cometq_kernels.h):
//   y[m, n] = sum_s a_scale[m, s] * (w_scale[n, s] * acc[m, n, s] + w_offset[n, s] * asum[m, s])  (+ bias[n])
// acc[m, n, s] is the exact int32 dot product over K segment s of width
// SEG = min(128, G); the epilogue is fp32 (the reference's is float64).  The
// offset term (asymmetric weights, w_offsets != NULL) needs asum[m, s], the
// exact sum of token m's activation integers over segment s.
//
// ============================================================================
// Design (docs/CUDA.md has the drawings)
// ============================================================================
// * One CTA computes a BM x BN output tile and walks the K blocks (128 channels
//   each) of its split-K range in order.  All CTAs see the same block sequence,
//   so INT4 and INT8 work is balanced across output tiles by construction; with
//   split-K the K ranges are cut by cost (INT8 block = 2 INT4 blocks on the s4
//   path, see split_range()).
// * Pipeline: STAGES shared-memory stages, one K block per stage, filled with
//   cp.async 16-byte copies (and the block's activation / weight scales, 4-byte
//   copies into the stage's scale area: load_stage); STAGES-1 blocks are in
//   flight while one computes.
// * Per K block: the A tile is the block's INT4 bytes (BM x 64 from q4) or INT8
//   bytes (BM x 128 from q8), the B tile the block's weight nibbles (BN x 64).
//   A block is two "k-steps" of 64 channels.
// * Warp tile WM x WN = MT m16 tiles x NT n8 tiles.  Per k-step every thread
//   reads, per row it owns (A rows g and g+8 of each m tile, B column g of each
//   n tile), the 16 channels 16t..16t+15 of the k-step (t = lane % 4):
//       INT4 data: one 8-byte load (uint2), INT8 data: one 16-byte load (uint4).
// * k-slot permutation: those 16 channels fill the thread's k slots as follows
//   (same assignment for A and B, so the dot product is unchanged):
//     s4 path (m16n8k64, INT4 x INT4):
//        reg0/"k 8t..8t+7"   <- channels 16t + 0..7   (low word of the uint2)
//        reg1|2/"k 32+8t.."  <- channels 16t + 8..15  (high word)
//     s8 path (m16n8k32, two mma per k-step, half h = 0, 1):
//        "k 4t+j"     <- channel 16t + 8h + 2j      (even channels)
//        "k 16+4t+j"  <- channel 16t + 8h + 2j + 1  (odd channels)
//     The even/odd split is what the 2-op INT4->INT8 conversion produces
//     (cometq_device.cuh: nib_lo_x16 / nib_hi_x16); INT8 activations are split
//     the same way with two byte permutes.
// * Segments narrower than a k-step (G = 16, 32): thread t's 16 channels lie
//   in sub-segment (16t)/SEG; the k-step runs one masked mma per sub-segment
//   (B registers of the other threads zeroed), each flushed to fp32 with its
//   own weight scale.  Costs 2x/4x the mma for these rare group sizes, keeps
//   one code path.
// * Asymmetric weights (offset term): the weight integers stay the signed
//   nibbles of the symmetric format and run through the same mma (on sm_8x the
//   s4 path is untouched), so the offset is the only addition.  Its activation
//   sums run on the tensor cores: one more n8 tile per m tile whose B operand is
//   all ones (masked like the weights for sub-segments) -- every column of its
//   C fragment is the row sum, and a C fragment's rows (g, g+8) are exactly the
//   rows of the thread's accumulators.  No shared memory, no shuffle, no barrier:
//   2 MMAs (s8) or 1 (s4) per k-step and m tile.  (The first version summed the
//   A words with dp4a and combined the quad with two xor shuffles per flush:
//   1108 -> 1011 SASS instructions per K block on the 64 x 64 sm_90a tile.)  HAS_OFF is a template
//   parameter: the symmetric instantiations compile to the same code as before
//   the offsets existed (a run-time branch cost the symmetric s4 path 30-40
//   registers on sm_80).
// * Shared memory layout (bank conflicts):
//     INT4 A rows and weight rows: 64 data bytes padded to ROW4 = 96 bytes.
//       An 8-byte load by a half-warp touches rows g = 0..3 (or 4..7) at words
//       24*g + 2t (+0/1) mod 32 = {0,24,16,8} + 0..7: all 32 banks, once.
//     INT8 A rows: 128 bytes, no padding, 16-byte chunk c of row r stored at
//       chunk (c ^ ((r & 1) << 2)).  A 16-byte load by a quarter-warp touches
//       rows g, g+1 (one even, one odd) chunks 4ks + t: the XOR puts the odd
//       row in the other half of the 128-byte line: 8 distinct chunks.
// ============================================================================
#include <algorithm>

#include "cometq_device.cuh"
#include "cometq_kernels.h"

namespace cometq {

constexpr int kRow4 = 96;   // smem bytes per INT4 A row / weight row (64 data + 32 pad)
constexpr int kRow8 = 128;  // smem bytes per INT8 A row (swizzled, no pad)

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_CTAS_ = 1>
struct GemmCfg {
  // MIN_CTAS: CTAs per SM the register allocation must allow (__launch_bounds__ minBlocks).
  // Without it ptxas gave the 8-warp large tile 148 registers -> one CTA per SM, whose
  // per-block scale flush and smem fragment loads then leave the tensor cores idle; with two
  // CTAs resident one's MMAs overlap the other's flush.
  static constexpr int MIN_CTAS = MIN_CTAS_;
  static constexpr int BM = BM_;
  static constexpr int BN = BN_;
  static constexpr int WARPS_M = WARPS_M_;
  static constexpr int WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M;  // warp tile rows
  static constexpr int WN = BN / WARPS_N;  // warp tile cols
  static constexpr int MT = WM / 16;       // m16 tiles per warp
  static constexpr int NT = WN / 8;        // n8 tiles per warp
  // A stage is sized for the larger (INT8) block; INT4 blocks use the first BM*kRow4 bytes.
  static constexpr int A_BYTES = BM * kRow8;
  static constexpr int B_BYTES = BN * kRow4;
  static constexpr int TILE_BYTES = A_BYTES + B_BYTES;
  // A stage = A tile | B tile | scale area (fp32; see load_stage):
  //     [ a_scale: BM | w_scale: GPB x BN | w_offset: GPB x BN (asymmetric weights only) ]
  // GPB = 1 << gpb_log2 = weight groups per 128-channel block (a run-time value: 128 / G for
  // G < 128, else 1), so the stage size is a run-time value too (16-byte multiple).
  __host__ __device__ static constexpr int stage_bytes(int gpb_log2, bool off) {
    return TILE_BYTES + ((BM + (off ? 2 : 1) * (BN << gpb_log2)) * 4 + 15) / 16 * 16;
  }
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be whole m16 x n8 tiles");
  static_assert(STAGES >= 2, "need at least double buffering");
  static_assert(A_BYTES % 16 == 0 && B_BYTES % 16 == 0, "stages must stay 16-byte aligned");
  static_assert(BM % 2 == 0 && WN % 2 == 0 && (BN & (BN - 1)) == 0,
                "scale area: 8-byte aligned column pairs, power-of-two BN");
};

// M > 64: 128 x 64 tiles, 8 warps (4 x 2), warp tile 32 x 32; two CTAs per SM (<= 128 registers,
// 2 x 90 KB of pipeline smem).
using CfgLarge = GemmCfg<128, 64, 4, 2, 4, 2>;
// 16 < M <= 64: 64 x 64 tiles, 4 warps (2 x 2), warp tile 32 x 32.  Three CTAs per SM: shared
// memory allows no more on an H100 (4 stages x 15.1 KB + block tables = ~61 KB per CTA, 228 KB per
// SM), so the register bound is 3 (<= 168 per thread).  (It was 4 -- 128 registers, never
// reachable -- which spilled the asymmetric tile once its row sums moved onto the tensor cores.)
using CfgMid = GemmCfg<64, 64, 2, 2, 4, 3>;
// The same tile with 3 stages (~46 KB), so shared memory fits 4 CTAs per SM and registers are
// bounded for 4 (<= 128): COMETQ_TILE_MID3, a variant the ops layer's tuner times against CfgMid
// (which occupancy wins at M <= 64 is a measurement, not a static count: same K loop).
using CfgMid3 = GemmCfg<64, 64, 2, 2, 3, 4>;
// M <= 16 (decode): 16 x 64 tiles, 4 warps (1 x 4), warp tile 16 x 16, deeper
// pipeline (the weight stream is the whole cost), split-K over the grid's z.
using CfgSmall = GemmCfg<16, 64, 1, 4, 6>;

// ---------------------------------------------------------------------------
// split-K: z-slice `z` of `splits` owns the blocks whose cost prefix p (cost of
// all blocks before it) satisfies floor(p * splits / total) == z.  The owner is
// monotone in b, so each slice is one contiguous range, every block has exactly
// one owner, and the slices carry (nearly) equal cost.
// ---------------------------------------------------------------------------
__device__ __forceinline__ void split_range(const int* s_info, int nb, int z, int splits, int cost8, int* s_range,
                                            int& begin, int& end) {
  if (splits <= 1) {
    begin = 0;
    end = nb;
    return;
  }
  // One warp: a shuffle scan of the block costs, 32 blocks per step, and a ballot of the
  // blocks this slice owns (the first version had every thread walk all nb blocks twice).
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int total = 0;
    for (int c = 0; c < nb; c += 32) {
      const int b = c + lane;
      int w = b < nb ? ((s_info[b] & kInfoInt8) ? cost8 : 1) : 0;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) w += __shfl_xor_sync(0xFFFFFFFFu, w, off);
      total += w;
    }
    long long prefix = 0;  // cost of the chunks before this one
    int first = -1, last = -1;
    for (int c = 0; c < nb; c += 32) {
      const int b = c + lane;
      const int w = b < nb ? ((s_info[b] & kInfoInt8) ? cost8 : 1) : 0;
      int incl = w;  // inclusive scan of the chunk's costs
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int n = __shfl_up_sync(0xFFFFFFFFu, incl, off);
        if (lane >= off) incl += n;
      }
      const long long before = prefix + incl - w;  // cost of every block before b
      const unsigned mine = __ballot_sync(0xFFFFFFFFu, b < nb && (before * splits) / total == z);
      if (mine != 0u) {
        if (first < 0) first = c + __ffs(mine) - 1;
        last = c + 31 - __clz(mine);
      }
      prefix += __shfl_sync(0xFFFFFFFFu, incl, 31);
    }
    if (lane == 0) {
      s_range[0] = first < 0 ? 0 : first;
      s_range[1] = first < 0 ? 0 : last + 1;
    }
  }
  __syncthreads();
  begin = s_range[0];
  end = s_range[1];
}


// ---------------------------------------------------------------------------
// Stage loader: K block b -> shared stage (A tile + B tile + the block's scales), all cp.async.
//
// Thread tid copies chunks c = tid + i * THREADS (i = 0, 1, ...: compile-time trip counts) of
//     INT4 A rows / weight rows: row c / 4, 16-byte column c % 4   (64 bytes per row)
//     INT8 A rows:               row c / 8, 16-byte column c % 8   (128 bytes per row, swizzled)
// so chunk i's row is chunk 0's + i * THREADS / 4 (/ 8) and its column is chunk 0's.  The address
// of a chunk is the block's base (q4 / q8 slot, weight block: uniform across the CTA, 64-bit) plus
// a 32-bit row offset -- row * row stride + column, with the row clamped to the last one.  Why
// 32-bit: with 64-bit row products, clamps and sign extensions per chunk, the sm_90a SASS spent
// ~180 instructions per warp and K block on issuing its 4-8 copies, more than the block's 40 MMAs
// and their operand conversion together (the 64 x 64 asymmetric tile: ~630 per block in all);
// now ~147 (static counts, INT4-block path).  (The first version looped with `c += THREADS`, ~60
// instructions per copy; then compile-time trip counts; keeping the offsets in registers across
// the K loop instead made ptxas spill the 128-register tiles.)  Every row offset is below its
// tensor's extent, which cometq_w4ax_gemm checks against INT32_MAX (cometq_gemm_offsets_fit).
// Rows past M / columns past N are zero-filled without a global read (the source is the clamped
// row, a valid address); their results are never stored.
// ---------------------------------------------------------------------------

template <class Cfg, bool HAS_OFF>
__device__ __forceinline__ void load_stage(const CometqGemmArgs& p, const int* s_info, uint8_t* stage, int b,
                                           int m0, int n0, int gpb_log2) {
  static_assert((Cfg::THREADS / 8) % 2 == 0, "the INT8 swizzle (row parity) must be the same for a thread's chunks");
  static_assert(Cfg::THREADS % Cfg::BN == 0, "a thread's weight-scale column must be the same for every group");
  static_assert(Cfg::BM <= Cfg::THREADS, "one activation scale per thread");
  const int tid = threadIdx.x;
  uint8_t* sA = stage;
  uint8_t* sB = stage + Cfg::A_BYTES;
  const int info = s_info[b];
  const int slot = info & kInfoSlotMask;
  const int r4 = tid >> 2, c4 = tid & 3;
  if (info & kInfoValid) {
    if (info & kInfoInt8) {
      // BM rows x 8 chunks of 16 bytes; chunk ch of row r -> swizzled chunk ch ^ ((r & 1) << 2)
      const int r8 = tid >> 3, c8 = tid & 7;
      copy_rows<Cfg::BM, 8, kRow8, Cfg::THREADS>(sA + r8 * kRow8 + ((c8 ^ ((r8 & 1) << 2)) << 4),
                                                 p.q8 + static_cast<int64_t>(slot) * kBlockK, m0 + r8, p.M,
                                                 static_cast<int>(p.ld_q8), c8 * 16);
    } else {
      // BM rows x 4 chunks of 16 bytes (64 bytes = 128 nibbles), row stride kRow4
      copy_rows<Cfg::BM, 4, kRow4, Cfg::THREADS>(sA + r4 * kRow4 + c4 * 16,
                                                 p.q4 + static_cast<int64_t>(slot) * (kBlockK / 2), m0 + r4, p.M,
                                                 static_cast<int>(p.ld_q4), c4 * 16);
    }
  }
  // weights: BN rows x 4 chunks of 16 bytes: qweight[n, b*64 : b*64+64] (row-major: rows ld_w apart,
  // blocks 64 bytes apart; block-major storage: ld_w = 64, blocks ld_wb = N*64 apart, so a tile's
  // block is one contiguous BN x 64-byte run)
  copy_rows<Cfg::BN, 4, kRow4, Cfg::THREADS>(sB + r4 * kRow4 + c4 * 16,
                                             p.qweight + static_cast<int64_t>(b) * (p.ld_wb ? p.ld_wb : kBlockK / 2),
                                             n0 + r4, p.N, static_cast<int>(p.ld_w), c4 * 16);
  // The block's scales into the stage's scale area, in the same commit group as its tiles (so
  // they land STAGES-1 blocks ahead of the flush that reads them):
  //     sS[r]                             a_scale[m0 + r, a_col]           r < BM
  //     sS[BM + gi * BN + r]              w_scale[n0 + r, grp0 + gi]       r < BN, gi < GPB = 1 << L
  //     sS[BM + (GPB + gi) * BN + r]      w_offset[n0 + r, grp0 + gi]      (HAS_OFF)
  // with L = gpb_log2 and grp0 = the block's first weight group.  Group-major, so the two
  // adjacent columns 2t, 2t+1 a thread's accumulators own are one 8-byte shared load at a
  // compile-time offset per n8 tile (column-major cost ~80 address instructions per flush:
  // the run-time L in every index).  Rows past M / columns past N
  // repeat the last one (their results are never stored).  Why: the first version __ldg'd these
  // in the flush, right before the FFMAs that use them -- an exposed L2 round trip per K block
  // plus 64-bit address math per value (SASS of the 64 x 64 asymmetric sm_90a tile: 20 LDG and
  // ~100 address instructions per block, of ~1340 per block in all).
  float* sS = reinterpret_cast<float*>(stage + Cfg::TILE_BYTES);
  const int a_col = (p.scale_mode == COMETQ_SCALE_BLOCK) ? b : ((info & kInfoInt8) ? 1 : 0);
  if (Cfg::BM == Cfg::THREADS || tid < Cfg::BM)
    cp_async4(sS + tid, p.a_scales + static_cast<unsigned>(min(m0 + tid, p.M - 1) * static_cast<int>(p.ld_as) + a_col));
  const int grp0 = gpb_log2 > 0 ? (b << gpb_log2)
                                : ((p.group & (p.group - 1)) == 0 ? (b * kBlockK) >> (__ffs(p.group) - 1)
                                                                  : (b * kBlockK) / p.group);
  const int n_w = Cfg::BN << gpb_log2;
  float* sW = sS + Cfg::BM;
  const int wr = min(n0 + tid % Cfg::BN, p.N - 1);
  const float* ws_row = p.w_scales + static_cast<unsigned>(wr * static_cast<int>(p.ld_ws) + grp0);
  const float* wo_row = HAS_OFF ? p.w_offsets + static_cast<unsigned>(wr * static_cast<int>(p.ld_wo) + grp0) : nullptr;
  // (kept rolled: unrolled for the 8-groups worst case it cost the sm_80 asymmetric tiles 24 B of
  // spills; one or two trips for G >= 128).  c = tid + i * THREADS: column c % BN = tid % BN (the
  // thread's ws_row), group c / BN
#pragma unroll 1
  for (int i = 0; i < cdiv_c(Cfg::BN * 8, Cfg::THREADS); ++i) {  // (GPB <= 8: G >= 16)
    const int c = tid + i * Cfg::THREADS;
    if (c >= n_w) break;
    const int gi = c / Cfg::BN;  // (BN a power of two: a shift)
    cp_async4(sW + c, ws_row + gi);
    if (HAS_OFF) cp_async4(sW + n_w + c, wo_row + gi);
  }
}

// ---------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------
// FIXUP: a split launch reduces its slabs in-kernel (p.tile_counters; see the epilogue).  Its own
// instantiation (M <= 64 tiles only): the reduction's code in every kernel made the 128-register
// s8 tiles spill in the K loop (sm_90a: 2 LDL per K block in the 3-stage 64 x 64 tile, 8 in the
// 128 x 64 one); the instantiations without it are unchanged.
template <class Cfg, bool USE_S4, bool HAS_OFF, bool FIXUP = false>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_CTAS) w4ax_gemm_kernel(const CometqGemmArgs p) {
  constexpr int MT = Cfg::MT, NT = Cfg::NT;
  extern __shared__ __align__(16) uint8_t smem[];
  const int gpb_log2 = groups_per_block_log2(p.group);
  const int stage_b = Cfg::stage_bytes(gpb_log2, HAS_OFF);
  int* s_is8 = reinterpret_cast<int*>(smem + Cfg::STAGES * stage_b);
  int* s_info = s_is8 + p.n_blocks;
  int* s_range = s_info + p.n_blocks;  // this CTA's split-K block range (split_range)

  const int nb = p.n_blocks;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // "groupID": row (A, C) / column (B) within the 8-row group
  const int t = lane & 3;   // "threadID_in_group": which 16 channels of a k-step
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;
  const int m0 = blockIdx.y * Cfg::BM, n0 = blockIdx.x * Cfg::BN;
  const int wm0 = warp_m * Cfg::WM, wn0 = warp_n * Cfg::WN;  // warp tile origin inside the CTA tile

  build_block_table(p.block_bits, nb, p.n4, p.n8, s_is8, s_info);

  int kb_begin, kb_end;
  split_range(s_info, nb, blockIdx.z, gridDim.z, USE_S4 ? 2 : 1, s_range, kb_begin, kb_end);
  const int nblk = kb_end - kb_begin;

  const int seg = p.group < kBlockK ? p.group : kBlockK;  // segment width: 16, 32, 64 or 128
  const int segs_per_step = seg >= 64 ? 1 : 64 / seg;      // sub-segments per 64-channel k-step
  const int my_subseg = (16 * t) / seg;                    // (only used when segs_per_step > 1)

  // Offset term (asymmetric weights, p.w_offsets != NULL): compile-time, so the
  // shuffles below are executed by full warps or not at all.
  constexpr bool has_off = HAS_OFF;
  // isum[i]: the C fragment of an extra n8 tile whose B operand is all ones, so its every
  // column is the activation row sum over the current segment: c0 = row g, c2 = row g + 8 of
  // m tile i -- exactly the rows this thread's accumulators own (x16 for INT4 blocks on the
  // s8 path, whose A operand is the x16 widening).
  int isum[MT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) isum[i][0] = isum[i][1] = isum[i][2] = isum[i][3] = 0;

  float acc[MT][NT][4];
  int iacc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[i][j][e] = 0.f;
        iacc[i][j][e] = 0;
      }

  // ---- prologue: fill STAGES-1 stages (always commit, so group counting is uniform)
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < nblk) load_stage<Cfg, HAS_OFF>(p, s_info, smem + s * stage_b, kb_begin + s, m0, n0, gpb_log2);
    cp_async_commit();
  }

  for (int it = 0; it < nblk; ++it) {
    // Committed so far: STAGES-1 + it groups; allowing STAGES-2 in flight means
    // group `it` (this block) has landed.  The barrier publishes it to all
    // threads AND guarantees everybody finished computing block it-1, whose
    // stage the prefetch below overwrites.
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();
    {
      const int pf = it + Cfg::STAGES - 1;
      if (pf < nblk)
        load_stage<Cfg, HAS_OFF>(p, s_info, smem + (pf % Cfg::STAGES) * stage_b, kb_begin + pf, m0, n0, gpb_log2);
      cp_async_commit();
    }

    const int b = kb_begin + it;
    const int info = s_info[b];
    if (!(info & kInfoValid)) continue;  // uniform across the CTA (see build_block_table)
    const bool is8 = (info & kInfoInt8) != 0;
    const uint8_t* sA = smem + (it % Cfg::STAGES) * stage_b;
    const uint8_t* sB = sA + Cfg::A_BYTES;
    const float* sS = reinterpret_cast<const float*>(sA + Cfg::TILE_BYTES);  // the block's scales (load_stage)

    // Activation scale of each row this thread accumulates (rows g and g+8 of each m tile).
    float a_sc[MT][2];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) a_sc[i][h] = sS[wm0 + i * 16 + g + 8 * h];
    // Exact power-of-two factor the INT4->INT8 conversion introduced (x16 per converted operand).
    const float conv = is8 ? (1.f / 16.f) : (USE_S4 ? 1.f : (1.f / 256.f));

#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      // ---- fragments of this k-step: 16 channels (64ks + 16t ..) per owned row / column
      uint2 braw[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int r = wn0 + j * 8 + g;
        braw[j] = *reinterpret_cast<const uint2*>(sB + r * kRow4 + ks * 32 + t * 8);
      }
      // A operand registers, built once per k-step and reused by every n tile.
      //   afr[i][h][0..3] = mma A regs {row g, row g+8, row g, row g+8} of m tile i
      //   s4 path (is8 == false && USE_S4): h = 0 only, one m16n8k64
      //     {lo word g, lo word g+8, hi word g, hi word g+8} (channels 16t+0..7 | 16t+8..15)
      //   s8 path: h = half (channels 16t + 8h .. 16t + 8h + 7), one m16n8k32 each
      //     {even ch of row g, even ch of row g+8, odd ch of row g, odd ch of row g+8}
      uint32_t afr[MT][2][4];
      if (is8) {
        // INT8 activations: 16 bytes per row = channels 16t .. 16t+15 (natural order)
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          uint4 v[2];
#pragma unroll
          for (int rh = 0; rh < 2; ++rh) {
            const int r = wm0 + i * 16 + g + 8 * rh;
            const int ch = ks * 4 + t;  // 16-byte chunk holding channels 64ks + 16t ..
            v[rh] = *reinterpret_cast<const uint4*>(sA + r * kRow8 + ((ch ^ ((r & 1) << 2)) << 4));
          }
          afr[i][0][0] = bytes_even(v[0].x, v[0].y);
          afr[i][0][1] = bytes_even(v[1].x, v[1].y);
          afr[i][0][2] = bytes_odd(v[0].x, v[0].y);
          afr[i][0][3] = bytes_odd(v[1].x, v[1].y);
          afr[i][1][0] = bytes_even(v[0].z, v[0].w);
          afr[i][1][1] = bytes_even(v[1].z, v[1].w);
          afr[i][1][2] = bytes_odd(v[0].z, v[0].w);
          afr[i][1][3] = bytes_odd(v[1].z, v[1].w);
        }
      } else {
        // INT4 activations: 8 bytes per row = 16 nibbles, channels 16t .. 16t+15
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          uint2 v[2];
#pragma unroll
          for (int rh = 0; rh < 2; ++rh) {
            const int r = wm0 + i * 16 + g + 8 * rh;
            v[rh] = *reinterpret_cast<const uint2*>(sA + r * kRow4 + ks * 32 + t * 8);
          }
          if (USE_S4) {
            afr[i][0][0] = v[0].x;
            afr[i][0][1] = v[1].x;
            afr[i][0][2] = v[0].y;
            afr[i][0][3] = v[1].y;
          } else {
            afr[i][0][0] = nib_lo_x16(v[0].x);
            afr[i][0][1] = nib_lo_x16(v[1].x);
            afr[i][0][2] = nib_hi_x16(v[0].x);
            afr[i][0][3] = nib_hi_x16(v[1].x);
            afr[i][1][0] = nib_lo_x16(v[0].y);
            afr[i][1][1] = nib_lo_x16(v[1].y);
            afr[i][1][2] = nib_hi_x16(v[0].y);
            afr[i][1][3] = nib_hi_x16(v[1].y);
          }
        }
      }
      const bool s4_mma = USE_S4 && !is8;

      for (int sub = 0; sub < segs_per_step; ++sub) {
        // Mask: with sub-segments, only the threads whose channels belong to
        // sub-segment `sub` contribute (zero B nibbles give zero products).
        const uint32_t keep = (segs_per_step == 1 || my_subseg == sub) ? 0xFFFFFFFFu : 0u;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t w0 = braw[j].x;  // weight nibbles, channels 16t + 0..7
          const uint32_t w1 = braw[j].y;  // weight nibbles, channels 16t + 8..15
          if (s4_mma) {
            // INT4 x INT4 native: one m16n8k64 per tile
            const uint32_t k0 = w0 & keep, k1 = w1 & keep;
#pragma unroll
            for (int i = 0; i < MT; ++i)
              mma_s4_m16n8k64(iacc[i][j], afr[i][0][0], afr[i][0][1], afr[i][0][2], afr[i][0][3], k0, k1);
          } else {
            // s8: B = weights INT4 -> INT8 x16, {even, odd} channels of each half.  On sm_90 (every
            // block here) the mask is the third input of the conversion's LOP3 (no select per word:
            // 12-19 fewer instructions per K block); the sm_8x instantiations (INT8 blocks only)
            // keep the plain form, which their register allocation prefers (24 B of spills else).
            uint32_t b00, b01, b10, b11;
            if constexpr (USE_S4) {
              const uint32_t k0 = w0 & keep, k1 = w1 & keep;
              b00 = nib_lo_x16(k0), b01 = nib_hi_x16(k0), b10 = nib_lo_x16(k1), b11 = nib_hi_x16(k1);
            } else {
              b00 = nib_lo_x16_masked(w0, keep), b01 = nib_hi_x16_masked(w0, keep);
              b10 = nib_lo_x16_masked(w1, keep), b11 = nib_hi_x16_masked(w1, keep);
            }
#pragma unroll
            for (int i = 0; i < MT; ++i) {
              mma_s8_m16n8k32(iacc[i][j], afr[i][0][0], afr[i][0][1], afr[i][0][2], afr[i][0][3], b00, b01);
              mma_s8_m16n8k32(iacc[i][j], afr[i][1][0], afr[i][1][1], afr[i][1][2], afr[i][1][3], b10, b11);
            }
          }
        }
        if (has_off) {
          // The activation row sums on the tensor cores: one more n8 tile against B = ones
          // (masked like the weights, so a sub-segment sums only its own channels).  Per K block
          // and m tile that is 2 MMAs (s8) or 1 (s4), in place of the per-thread dp4a sums over the
          // A words (4-8 IDP + 4 LOP per k-step and row) and the two quad shuffles of each flush.
          const uint32_t ones = keep & (s4_mma ? 0x11111111u : 0x01010101u);
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            if (s4_mma) {
              mma_s4_m16n8k64(isum[i], afr[i][0][0], afr[i][0][1], afr[i][0][2], afr[i][0][3], ones, ones);
            } else {
              mma_s8_m16n8k32(isum[i], afr[i][0][0], afr[i][0][1], afr[i][0][2], afr[i][0][3], ones, ones);
              mma_s8_m16n8k32(isum[i], afr[i][1][0], afr[i][1][1], afr[i][1][2], afr[i][1][3], ones, ones);
            }
          }
        }

        // ---- flush the finished segment into fp32:
        //   acc += a_scale * w_scale * conv * iacc  (+ a_scale * asum * w_offset)
        if (seg <= 64 || ks == 1) {
          // the segment's weight group within the block (its scales: the stage's scale area)
          const int gi = seg == kBlockK ? 0 : ks * segs_per_step + sub;
          // a_off[i][rh] = a_scale * asum of the segment for owned row g + 8 rh of m tile i
          float a_off[MT][2];
          if (has_off) {
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
              for (int rh = 0; rh < 2; ++rh) {
                // INT4 blocks on the s8 path summed x16 operands (each term a multiple of 16): exact shift
                const int sm = (is8 || USE_S4) ? isum[i][2 * rh] : (isum[i][2 * rh] >> 4);
                a_off[i][rh] = a_sc[i][rh] * static_cast<float>(sm);  // |sm| <= 128 * 128: exact in fp32
              }
#pragma unroll
            for (int i = 0; i < MT; ++i) isum[i][0] = isum[i][1] = isum[i][2] = isum[i][3] = 0;
          }
          // this segment's weight scales / offsets of the CTA tile's columns (group-major rows)
          const float* ws_row = sS + Cfg::BM + gi * Cfg::BN + wn0 + 2 * t;
          const float* wo_row = ws_row + (Cfg::BN << gpb_log2);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            // columns wn0 + 8j + 2t and + 1 (8-byte aligned: even column, 16-byte aligned rows)
            const float2 ws2 = *reinterpret_cast<const float2*>(ws_row + j * 8);
            const float2 wo2 = has_off ? *reinterpret_cast<const float2*>(wo_row + j * 8) : make_float2(0.f, 0.f);
            const float w_sc[2] = {ws2.x * conv, ws2.y * conv};
            const float w_of[2] = {wo2.x, wo2.y};
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                // e: 0 -> (row g, col 2t), 1 -> (g, 2t+1), 2 -> (g+8, 2t), 3 -> (g+8, 2t+1)
                acc[i][j][e] += static_cast<float>(iacc[i][j][e]) * (a_sc[i][e >> 1] * w_sc[e & 1]);
                if (has_off) acc[i][j][e] += a_off[i][e >> 1] * w_of[e & 1];
                iacc[i][j][e] = 0;
              }
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // nothing left in flight at exit

  // ---- epilogue
  const bool split = gridDim.z > 1;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + wm0 + i * 16 + g + 8 * (e >> 1);
        const int n = n0 + wn0 + j * 8 + 2 * t + (e & 1);
        if (m >= p.M || n >= p.N) continue;
        if (split) {
          // this split's own slab: every (z, m, n) is written by exactly one CTA (a split with an
          // empty block range writes zeros), so the workspace needs no zeroing and the finalize
          // kernel sums the slabs in a fixed order (deterministic; no atomics)
          p.workspace[(static_cast<int64_t>(blockIdx.z) * p.M + m) * p.N + n] = acc[i][j][e];
        } else {
          float v = acc[i][j][e];
          if (p.bias != nullptr) v += load_as_float(p.bias, n, p.bias_dtype);
          store_from_float(p.out, static_cast<int64_t>(m) * p.ld_out + n, v, p.out_dtype);
        }
      }
  if constexpr (FIXUP) {
  if (!split) return;

  // ---- in-kernel split-K reduction (tile_counters set): the tile's last split to finish sums
  // the slabs, so no finalize kernel runs (H100 run 7: 96 finalize launches per batch-64 decode
  // step, 0.30 ms of its 8.43 ms of kernels).  The classic threadfence reduction:
  //
  //   every CTA:  store slab -> __threadfence -> barrier -> thread 0: old = atomicAdd(counter, 1)
  //   last (old == splits - 1): barrier -> __threadfence -> read all slabs (L2, __ldcg: another
  //                SM's stores are not in this SM's L1) -> out
  //
  // The sum runs z = 0, 1, ..., splits - 1 from 0 + slab 0, then + bias: the finalize kernel's
  // order of fp32 adds, so the output is bit-identical to it whichever split finishes last.
  // The last CTA resets its counter: zero between GEMMs, one buffer for every GEMM in stream
  // order (CUDA graphs included).
  if (!splitk_last_cta(p.tile_counters, blockIdx.y * gridDim.x + blockIdx.x)) return;
  // (the accumulators are dead here: a plain row-major walk of the tile, coalesced, adds no
  // register pressure -- the fragment-order walk made the 128-register s8 tiles spill in the K loop)
  // (splitk_reduce_tile: 16-byte loads, 4 slabs x U positions in flight per thread; U = 1 on the
  // 16-row tile, whose FIXUP build otherwise needs ~30 more registers, and on the 4-CTA tile capped
  // at 128 registers, which spilled 24 bytes at U = 2)
  constexpr int kU = (Cfg::BM <= 16 || Cfg::MIN_CTAS >= 4) ? 1 : kSplitkPositions;
  splitk_reduce_tile<Cfg::BN, Cfg::THREADS, kU>(p.workspace, gridDim.z, p.M, p.N, m0, n0, min(Cfg::BM, p.M - m0),
                                                p.bias, p.bias_dtype, p.out, p.ld_out, p.out_dtype);
  }  // FIXUP
}

// split-K: out = sum of the splits' slabs, in split order (+ bias), converted to the output dtype.
// (Run 4 had the splits atomicAdd into one zeroed [M, N] buffer: a fill kernel per GEMM -- 96
// launches per batch-64 decode step of an 8B model -- and run-to-run rounding differences.)
__global__ void splitk_finalize_kernel(const float* __restrict__ ws, int splits, int M, int N, const void* bias,
                                       int bias_dtype, void* out, int64_t ld_out, int out_dtype) {
  const int64_t total = static_cast<int64_t>(M) * N;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int m = static_cast<int>(idx / N), n = static_cast<int>(idx % N);
    splitk_sum_store(ws, splits, total, idx, n, bias, bias_dtype, out, static_cast<int64_t>(m) * ld_out + n, out_dtype);
  }
}

// ---------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------
cudaError_t launch_splitk_finalize(const float* ws, int splits, int M, int N, const void* bias, int bias_dtype,
                                   void* out, int64_t ld_out, int out_dtype, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(M) * N;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 4096));
  splitk_finalize_kernel<<<blocks, threads, 0, stream>>>(ws, splits, M, N, bias, bias_dtype, out, ld_out, out_dtype);
  return cudaGetLastError();
}

template <class Cfg, bool USE_S4, bool HAS_OFF, bool FIXUP = false>
static cudaError_t launch_cfg(const CometqGemmArgs& a, cudaStream_t stream) {
  auto kernel = w4ax_gemm_kernel<Cfg, USE_S4, HAS_OFF, FIXUP>;
  const size_t smem = static_cast<size_t>(Cfg::STAGES) * Cfg::stage_bytes(groups_per_block_log2(a.group), HAS_OFF) +
                      sizeof(int) * (2 * static_cast<size_t>(a.n_blocks) + 2);
  int dev = 0, max_optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(max_optin)) return cudaErrorInvalidValue;  // K far beyond any real layer
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const unsigned gx = static_cast<unsigned>((a.N + Cfg::BN - 1) / Cfg::BN);
  const unsigned gy = static_cast<unsigned>((a.M + Cfg::BM - 1) / Cfg::BM);
  if (gy > 65535u || a.split_k > 65535) return cudaErrorInvalidConfiguration;
  dim3 grid(gx, gy, static_cast<unsigned>(a.split_k));
  kernel<<<grid, Cfg::THREADS, smem, stream>>>(a);
  return cudaGetLastError();
}

template <bool USE_S4, bool HAS_OFF, bool FIXUP>
static cudaError_t launch_cfg_m(const CometqGemmArgs& a, cudaStream_t stream) {
  if (a.M <= 16) return launch_cfg<CfgSmall, USE_S4, HAS_OFF, FIXUP>(a, stream);
  if (a.tile == COMETQ_TILE_MID3) return launch_cfg<CfgMid3, USE_S4, HAS_OFF, FIXUP>(a, stream);  // (M <= 64: checked)
  if (a.M <= 64) return launch_cfg<CfgMid, USE_S4, HAS_OFF, FIXUP>(a, stream);
  return launch_cfg<CfgLarge, USE_S4, HAS_OFF>(a, stream);  // (no FIXUP instantiation: see uses_fixup)
}

template <bool USE_S4>
static cudaError_t launch_path(const CometqGemmArgs& a, bool fixup, cudaStream_t stream) {
  if (a.w_offsets != nullptr) {
    return fixup ? launch_cfg_m<USE_S4, true, true>(a, stream) : launch_cfg_m<USE_S4, true, false>(a, stream);
  }
  return fixup ? launch_cfg_m<USE_S4, false, true>(a, stream) : launch_cfg_m<USE_S4, false, false>(a, stream);
}

// The launch reduces split-K in-kernel: counters given, K split, and an M <= 64 tile (the decode
// GEMMs; the 128-row tile splits only when its tiles cannot fill the GPU, and has no FIXUP build).
static bool uses_fixup(const CometqGemmArgs& a) { return a.tile_counters != nullptr && a.split_k > 1 && a.M <= 64; }

}  // namespace cometq

extern "C" int cometq_resolve_mma_path(int requested, int cc_major) {
  if (requested == COMETQ_MMA_S4 || requested == COMETQ_MMA_S8) return requested;
  // INT4 tensor cores exist natively on sm_80/86/89 only; Hopper emulates s4 mma (~25x slower than s8).
  return cc_major == 8 ? COMETQ_MMA_S4 : COMETQ_MMA_S8;
}

extern "C" int cometq_gemm_choose_split(int M, int N, int n_blocks, int sm_count, int requested) {
  if (n_blocks < 1) return 1;
  if (requested > 0) return std::min(requested, n_blocks);
  sm_count = std::max(sm_count, 1);
  if (M <= 16) {
    // decode: aim for ~2 waves of CTAs, at least 2 K blocks per split so the pipeline fills
    const int tiles = (N + cometq::CfgSmall::BN - 1) / cometq::CfgSmall::BN;
    const int want = (2 * sm_count + tiles - 1) / tiles;
    const int cap = std::max(1, std::min(n_blocks / 2, 32));
    return std::max(1, std::min(want, cap));
  }
  // larger M: split only when the output tiles cannot fill one wave, keeping >= 4 K blocks per split
  const int bm = M <= 64 ? cometq::CfgMid::BM : cometq::CfgLarge::BM;
  const int bn = M <= 64 ? cometq::CfgMid::BN : cometq::CfgLarge::BN;
  const long long tiles = static_cast<long long>((N + bn - 1) / bn) * ((M + bm - 1) / bm);
  if (tiles >= sm_count) return 1;
  const int want = static_cast<int>((sm_count + tiles - 1) / tiles);
  const int cap = std::max(1, std::min(n_blocks / 4, 16));
  return std::max(1, std::min(want, cap));
}

extern "C" int64_t cometq_gemm_num_tiles(int M, int N, int tile) {
  int bm = cometq::CfgLarge::BM, bn = cometq::CfgLarge::BN;  // the launch's choice (launch_cfg_m)
  if (M <= 16) {
    bm = cometq::CfgSmall::BM;
    bn = cometq::CfgSmall::BN;
  } else if (tile == COMETQ_TILE_MID3) {
    bm = cometq::CfgMid3::BM;
    bn = cometq::CfgMid3::BN;
  } else if (M <= 64) {
    bm = cometq::CfgMid::BM;
    bn = cometq::CfgMid::BN;
  }
  return static_cast<int64_t>((N + bn - 1) / bn) * ((M + bm - 1) / bm);
}

extern "C" int cometq_gemm_offsets_fit(const CometqGemmArgs* args) {
  // load_stage addresses a row of q4 / q8 / qweight / a_scales / w_scales / w_offsets by a 32-bit
  // offset (row * row stride + column) from the block's 64-bit base: each tensor's extent over its
  // rows must stay below INT32_MAX bytes (elements for the fp32 scales)
  const CometqGemmArgs& a = *args;
  const int64_t lim = INT32_MAX;
  const int64_t M = a.M, N = a.N;
  return M * a.ld_q4 <= lim && M * a.ld_q8 <= lim && M * a.ld_as <= lim && N * a.ld_w <= lim &&
         N * a.ld_ws <= lim && N * a.ld_wo <= lim;
}

extern "C" cudaError_t cometq_w4ax_gemm(const CometqGemmArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const CometqGemmArgs& a = *args;
  if (a.M < 0 || a.N < 0 || a.n_blocks < 1 || a.n4 < 0 || a.n8 < 0 || a.n4 + a.n8 != a.n_blocks) {
    return cudaErrorInvalidValue;
  }
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.group < 16 || (a.group < cometq::kBlockK && cometq::kBlockK % a.group != 0) ||
      (a.group >= cometq::kBlockK && a.group % cometq::kBlockK != 0)) {
    return cudaErrorInvalidValue;
  }
  if (a.split_k < 1 || (a.split_k > 1 && a.workspace == nullptr)) return cudaErrorInvalidValue;
  if (a.tile != COMETQ_TILE_AUTO && !(a.tile == COMETQ_TILE_MID3 && a.M <= 64)) return cudaErrorInvalidValue;
  if (a.qweight == nullptr || a.a_scales == nullptr || a.w_scales == nullptr || a.out == nullptr ||
      a.block_bits == nullptr || (a.n4 > 0 && a.q4 == nullptr) || (a.n8 > 0 && a.q8 == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (!cometq_gemm_offsets_fit(&a)) return cudaErrorInvalidValue;  // (32-bit row offsets: load_stage)
  cudaError_t err;
  const bool fixup = cometq::uses_fixup(a);
  if (a.mma_path == COMETQ_MMA_S4) {
    err = cometq::launch_path<true>(a, fixup, stream);
  } else if (a.mma_path == COMETQ_MMA_S8) {
    err = cometq::launch_path<false>(a, fixup, stream);
  } else {
    return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || a.split_k == 1 || fixup) return err;
  return cometq::launch_splitk_finalize(a.workspace, a.split_k, a.M, a.N, a.bias, a.bias_dtype, a.out, a.ld_out,
                                        a.out_dtype, stream);
}
