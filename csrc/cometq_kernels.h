// cometq CUDA kernels: the host-side C interface.
//
// This header is the ONLY thing the torch bindings (csrc/torch_bindings.cpp)
// and the CMake library users see of the kernels.  It is plain C-style C++:
// POD argument structs holding raw pointers, sizes and row strides, plus launch
// functions that take a cudaStream_t and return a cudaError_t.  No torch here,
// so the kernel library builds anywhere nvcc runs (see CMakeLists.txt).
//
// Formats (owned by python/cometq/layout.py, spec in python/cometq/reference.py):
//   * BLOCK_K = 128 activation channels per block; K is padded to K_pad = nb*128.
//   * INT4 values are two's-complement nibbles, two per byte, EVEN index in the
//     LOW nibble.  Weights: qweight uint8 [N, K_pad/2] (row stride ld_w bytes).
//   * Activations: q4 uint8 [M, n4*64] holds the INT4 blocks, q8 int8 [M, n8*128]
//     the INT8 blocks, each class in ascending block order.  block_bits int32
//     [nb] says 4 or 8 per block (any value other than 8 is read as 4).
//   * Activation scales fp32: "block" mode [M, nb], "class" mode [M, 2]
//     (column 0: the INT4 class, column 1: the INT8 class).
//   * Weight scales fp32 [N, K_pad/G] (G = K_pad for per-output-channel scales).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes shared with the bindings (same numbering as cometq.ops._DTYPE_CODES)
enum { COMETQ_DTYPE_F16 = 0, COMETQ_DTYPE_BF16 = 1, COMETQ_DTYPE_F32 = 2 };
// activation scale modes
enum { COMETQ_SCALE_BLOCK = 0, COMETQ_SCALE_CLASS = 1 };
// which tensor-core path runs the INT4 x INT4 blocks
//   S4: mma.sync m16n8k64 s4.s4 (native on sm_80/86/89; EMULATED and slow on sm_90)
//   S8: INT4 -> INT8 in registers, mma.sync m16n8k32 s8.s8 (every arch >= sm_80)
// INT8 activation blocks always run on the s8 instruction.
enum { COMETQ_MMA_AUTO = 0, COMETQ_MMA_S4 = 1, COMETQ_MMA_S8 = 2 };

// Tile / pipeline variant of the GEMM (a tuning knob, like split_k):
//   AUTO: by M -- 16 x 64 (M <= 16), 64 x 64 with 4 stages, 3 CTAs per SM (M <= 64), 128 x 64.
//   MID3 (M <= 64 only): the 64 x 64 tile with 3 stages, so 4 CTAs fit an H100 SM (16 warps
//         instead of 12: more latency hiding, one block less prefetched per CTA).
enum { COMETQ_TILE_AUTO = 0, COMETQ_TILE_MID3 = 1 };

// ---------------------------------------------------------------------------
// W4Ax GEMM:
//   y[m, n] = sum_s a_scale[m, s] * (w_scale[n, s] * acc[m, n, s] + w_offset[n, s] * asum[m, s]) (+ bias[n])
// where acc[m, n, s] is the exact int32 dot product of K segment s (a segment
// is min(128, G) channels: both scales are constant over it) and asum[m, s] the
// exact sum of token m's activation integers over segment s.  The offset term
// exists only for asymmetric weights (w_offsets != NULL: w = scale * q + offset,
// q the same signed nibbles as the symmetric format).
// ---------------------------------------------------------------------------
typedef struct CometqGemmArgs {
  const uint8_t* q4;        // [M, n4*64]   row stride ld_q4 bytes   (may be NULL when n4 == 0)
  int64_t ld_q4;
  const int8_t* q8;         // [M, n8*128]  row stride ld_q8 bytes   (may be NULL when n8 == 0)
  int64_t ld_q8;
  const float* a_scales;    // [M, nb] or [M, 2]   row stride ld_as elements
  int64_t ld_as;
  const int32_t* block_bits;  // [nb]
  const uint8_t* qweight;   // [N, nb*64]   row stride ld_w bytes
  int64_t ld_w;
  // bytes between consecutive 128-channel blocks of a weight row: 64 (row-major, the format)
  // or N*64 (block-major storage, layout.weights_block_major: ld_w = 64); 0 means 64
  int64_t ld_wb;
  const float* w_scales;    // [N, K_pad/G] row stride ld_ws elements
  int64_t ld_ws;
  const float* w_offsets;   // [N, K_pad/G] row stride ld_wo elements, or NULL (symmetric weights)
  int64_t ld_wo;
  const void* bias;         // [N] or NULL
  int bias_dtype;           // COMETQ_DTYPE_*
  void* out;                // [M, N] row stride ld_out elements
  int64_t ld_out;
  int out_dtype;            // COMETQ_DTYPE_*
  float* workspace;         // fp32 [split_k, M, N] contiguous (one slab per split, fully
                            // overwritten: no zeroing needed); required iff split_k > 1
  int32_t* tile_counters;   // split_k > 1: NULL = a finalize kernel sums the slabs; else int32
                            // [>= cometq_gemm_num_tiles(M, N, tile)], all zero on entry: each
                            // tile's last split sums them in-kernel (same bits) and leaves its
                            // counter zero again
  int M, N;
  int n_blocks;             // nb = K_pad / 128
  int n4, n8;               // number of INT4 / INT8 blocks (widths of q4 / q8)
  int group;                // effective weight group width G (K_pad for per channel)
  int scale_mode;           // COMETQ_SCALE_*
  int split_k;              // >= 1; gridDim.z. Use cometq_gemm_choose_split().
  int mma_path;             // COMETQ_MMA_S4 or COMETQ_MMA_S8 (resolved, not AUTO)
  int tile;                 // COMETQ_TILE_* (MID3 requires M <= 64)
} CometqGemmArgs;

// Resolve COMETQ_MMA_AUTO for a device of compute capability cc_major.cc_minor:
// S4 on sm_8x (native INT4 tensor cores), S8 elsewhere.
int cometq_resolve_mma_path(int requested, int cc_major);

// Pick the split-K factor.  requested > 0 is honoured (clamped to [1, n_blocks]);
// otherwise small-M problems (M <= 16) are split so the grid covers ~2 waves of
// sm_count SMs, larger ones only when their output tiles cannot fill one wave
// (keeping at least 4 K blocks per split).
int cometq_gemm_choose_split(int M, int N, int n_blocks, int sm_count, int requested);

// Whether every per-row offset the GEMM forms fits 32 bits: M * ld_q4, M * ld_q8, M * ld_as,
// N * ld_w, N * ld_ws, N * ld_wo <= INT32_MAX (bytes, or elements for the fp32 scales).
// cometq_w4ax_gemm refuses (cudaErrorInvalidValue) a launch that does not.
int cometq_gemm_offsets_fit(const CometqGemmArgs* args);

// Output tiles of the launch for M x N (tile: COMETQ_TILE_*): the size tile_counters needs.
int64_t cometq_gemm_num_tiles(int M, int N, int tile);

// Launch the GEMM (and, when split_k > 1 without tile_counters, the finalize kernel that adds
// bias and converts the fp32 workspace into out).  Validates only what it must to
// stay memory safe; the bindings validate shapes and dtypes.
cudaError_t cometq_w4ax_gemm(const CometqGemmArgs* args, cudaStream_t stream);

// ---------------------------------------------------------------------------
// The w16 route's GEMM (csrc/w16_gemm.cu; same contract as cometq.kernels.w16_gemm.w16_gemm):
//   out[m, n] = sum_k A'[m, k] * W'[n, k] (+ bias[n]),  W'[n, k] = v * s (+ o) in the operand dtype
// with A' the activation operand of cometq_quantize_act's FAKE output (half-split K order) and
// v the weight nibble of the same half-split position; fp32 accumulation, one final rounding.
// Not integer-exact: within cometq.kernels.dequant_gemm.DEQUANT_GEMM_RTOL of the reference.
// ---------------------------------------------------------------------------
// Tile variant (a tuning knob): AUTO = by M (16, 32 or 64 tokens x 128 weight rows per CTA, 4
// warps); WIDE = 64 tokens x 256 weight rows, 8 warps (half the A' traffic per weight byte);
// N32 / N16 = the 32- / 16-token tile whatever M (more, lighter CTAs: each weight tile is read
// once per token tile, from L2 after the first).  WG64 / WG64_R64 / WG32 / WG64_W: the wgmma kernel
// (sm_90 devices only, else cudaErrorInvalidDeviceFunction; weight groups >= 128 channels): 64
// tokens x 128 weight rows, 64 x 64, 32 x 128, 64 x 256 (two warpgroups), and 16 x 128 (M <= 16).
enum {
  COMETQ_W16_TILE_AUTO = 0,
  COMETQ_W16_TILE_WIDE = 1,
  COMETQ_W16_TILE_N32 = 2,
  COMETQ_W16_TILE_N16 = 3,
  COMETQ_W16_TILE_WG64 = 4,
  COMETQ_W16_TILE_WG64_R64 = 5,
  COMETQ_W16_TILE_WG32 = 6,
  COMETQ_W16_TILE_WG64_W = 7,
  COMETQ_W16_TILE_WG16 = 8
};

typedef struct CometqW16Args {
  const void* a;            // [M, K_pad] fp16 or bf16 (a_dtype), row stride lda elements (a multiple
  int64_t lda;              // of 8: 16-byte rows), 16-byte aligned base
  int a_dtype;              // COMETQ_DTYPE_F16 / BF16: the operand (and MMA) dtype
  const uint8_t* qweight;   // [N, K_pad/2] nibbles, row stride ld_w bytes, 16-byte aligned rows
  int64_t ld_w;
  int64_t ld_wb;            // bytes between 128-channel blocks of a row: 64 (row-major) or N*64 (block-major)
  const float* w_scales;    // [N, K_pad/G] row stride ld_ws elements
  int64_t ld_ws;
  const float* w_offsets;   // [N, K_pad/G] row stride ld_wo, or NULL (symmetric weights)
  int64_t ld_wo;
  const void* bias;         // [N] or NULL
  int bias_dtype;
  void* out;                // [M, N] row stride ld_out elements
  int64_t ld_out;
  int out_dtype;
  float* workspace;         // fp32 [split_k, M, N] (split_k > 1)
  int32_t* tile_counters;   // split_k > 1: NULL = the finalize kernel sums the slabs; else int32
                            // [>= cometq_w16_num_tiles(M, N, tile)], all zero on entry (left zero):
                            // each tile's last split sums them in-kernel (same bits)
  int M, N, n_blocks;       // n_blocks = K_pad / 128
  int group;                // effective weight group width G: 16, 32, 64 or a multiple of 128
  int split_k;              // >= 1 (cometq_w16_choose_split)
  int tile;                 // COMETQ_W16_TILE_*
  int pdl;                  // wgmma tiles: launch as a programmatic dependent of the stream's previous
                            // kernel (cudaLaunchAttributeProgrammaticStreamSerialization): the CTAs
                            // start while it finishes and prefetch their first weight stages, then
                            // wait for it (griddepcontrol.wait) before touching A' or any output
} CometqW16Args;

// Output tiles of an M x N launch (tile: COMETQ_W16_TILE_*).
int64_t cometq_w16_num_tiles(int M, int N, int tile);
// Split-K factor: requested > 0 honoured (clamped to n_blocks); else ~2 CTAs per SM at M <= 16, and
// for larger M only as many splits as it takes the tiles to cover the SMs once; >= 4 blocks per split.
int cometq_w16_choose_split(int M, int N, int n_blocks, int sm_count, int tile, int requested);
// Whether M * lda * 2, N * ld_w, N * ld_ws, N * ld_wo fit 32 bits (the loader's row offsets).
int cometq_w16_offsets_fit(const CometqW16Args* args);
cudaError_t cometq_w16_gemm(const CometqW16Args* args, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Activation quantization (bit-identical to reference.quantize_activation):
// permute, zero-pad to K_pad, per-token per-block absmax, scale = absmax/qmax
// (IEEE division; INT4 blocks: (absmax * int4_clip) / 7, the product rounded to
// fp32 first), q = clamp(rint(x / scale), -qmax, qmax), pack.
// ---------------------------------------------------------------------------
typedef struct CometqActQuantArgs {
  const void* x;            // [M, K] fp16/bf16/fp32, row stride ld_x elements
  int64_t ld_x;
  int x_dtype;              // COMETQ_DTYPE_*
  const int64_t* perm;      // [K]: x_perm[:, j] = x[:, perm[j]]
  const int32_t* block_bits;  // [nb]
  int M, K, n_blocks, n4, n8;
  int scale_mode;           // COMETQ_SCALE_*
  float int4_clip;          // (0, 1]: INT4 scales use absmax * int4_clip (1 = plain absmax); INT8 never clipped
  uint8_t* q4;              // [M, n4*64]
  int64_t ld_q4;
  int8_t* q8;               // [M, n8*128]
  int64_t ld_q8;
  float* scales;            // [M, nb] or [M, 2]
  int64_t ld_scales;
  // FAKE output (out != NULL): the dequantized values instead of q4 / q8 / scales (which are then
  // not written and may be NULL) -- the 16-bit routes' activation operand
  // (cometq.kernels.dequant_gemm, cometq.layout.half_split_blocks):
  //     out[m, b*128 + j]      = fp32(q[m, b*128 + 2j])     * scale[m, b]    j < 64 (even channels)
  //     out[m, b*128 + 64 + j] = fp32(q[m, b*128 + 2j + 1]) * scale[m, b]           (odd channels)
  // the product rounded once to out_dtype.  [M, nb*128], row stride ld_out elements (even).
  void* out;
  int64_t ld_out;
  int out_dtype;            // COMETQ_DTYPE_*
} CometqActQuantArgs;

// Packed (out == NULL) or FAKE (out != NULL) activation quantization.
cudaError_t cometq_quantize_act(const CometqActQuantArgs* args, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Paged KV4 decode attention (cometq.paged.kv4_decode_attention_reference) for the serving
// pool's default format: keys per channel (scales [NB, H, BS/G, D]), values per token (scales
// [NB, H, BS, D/G]), a tail of < G tokens per sequence; query, output and tail in io_dtype (fp16
// or bf16), scales / zeros fp16.  Every
// tensor contiguous and 16-byte aligned; lengths, block tables and slots are trusted (device
// data; the pool keeps them consistent).  quant_lens[s] need not be a multiple of G.
// ---------------------------------------------------------------------------
typedef struct CometqKv4AttnArgs {
  const void* q;              // io_dtype [B, Hq, D], element strides ld_qb (batch), ld_qh (head)
  int64_t ld_qb, ld_qh;
  const uint8_t* k_packed;    // [NB, H, BS, D/2] (channel 2j: low nibble, 2j+1: high)
  const uint8_t* v_packed;    // [NB, H, BS, D/2]
  const void* k_scale;        // fp16 [NB, H, BS/G, D]
  const void* k_zero;         // fp16 [NB, H, BS/G, D]
  const void* v_scale;        // fp16 [NB, H, BS, D/G]
  const void* v_zero;         // fp16 [NB, H, BS, D/G]
  const void* tail_k;         // io_dtype [S, H, G, D]
  const void* tail_v;         // io_dtype [S, H, G, D]
  const int32_t* block_tables;  // [S, MB], row stride ld_bt
  int64_t ld_bt;
  const int32_t* quant_lens;  // [S]
  const int32_t* tail_lens;   // [S]
  const int32_t* seq_ids;     // [B]
  void* out;                  // io_dtype [B, Hq, D] contiguous
  float* part_o;              // fp32 [B, Hq, splits, D]  (splits > 1)
  float* part_ml;             // fp32 [B, Hq, splits, 2]  (splits > 1: running max (log2), sum)
  int B, Hq, H, D, BS, G;
  int splits;                 // >= 1: CTAs per (batch row, KV head), each a range of key groups
  float qk_scale;             // sm_scale * log2(e)
  int io_dtype;               // COMETQ_DTYPE_F16 or COMETQ_DTYPE_BF16 (q, out, tails)
  int variant;                // a tuning knob, 0..4: for 0..3, bit 0 = 3 CTAs per SM, the next tile loaded
                              // while this one computes (else 4 CTAs per SM, each tile loaded when it
                              // starts); bit 1 = each warp's next key group prefetched into L2;
                              // 4 = each warp's tiles streamed through a shared-memory ring (cp.async)
} CometqKv4AttnArgs;

// 1 if the kernel handles head_dim / group_size / query heads per KV head (D 64 or 128,
// G a multiple of 16 dividing D, 1 <= qpk <= 8), else 0.
int cometq_kv4_attention_supported(int head_dim, int group_size, int qpk);

cudaError_t cometq_kv4_decode_attention(const CometqKv4AttnArgs* args, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
