// torch bindings of the cometq CUDA kernels: the ONE file of csrc/ that includes torch.
//
// The public ops cometq::quantize_act / cometq::w4ax_gemm are defined in Python
// (python/cometq/ops.py, torch.library.custom_op) and dispatch to backends.
// This extension defines RAW ops in its own namespace, cometq_C, registered for
// the CUDA dispatch key only; python/cometq/_cuda_register.py wraps them as the
// "cuda" backend and registers their fake (meta) implementations.
//
//   cometq_C::quantize_act(Tensor x, Tensor perm, Tensor block_bits, int n_int8,
//                          int scale_mode, float int4_clip) -> (Tensor q4, Tensor q8, Tensor scales)
//   cometq_C::fake_quant_act(Tensor x, Tensor perm, Tensor block_bits, int n_int8, int scale_mode,
//                            float int4_clip, ScalarType out_dtype) -> Tensor out
//       (the dequantized activation [M, K_pad], half-split K order: the 16-bit routes' operand)
//   cometq_C::w4ax_gemm(Tensor q4, Tensor q8, Tensor a_scales, Tensor block_bits,
//                       Tensor qweight, Tensor w_scales, Tensor? w_offsets, int group_size,
//                       Tensor? bias, ScalarType out_dtype, int scale_mode, int split_k,
//                       int mma_path, int tile=0, Tensor(a!)? tile_counters=None) -> Tensor
//
// scale_mode: 0 = "block", 1 = "class".  group_size: -1 = per output channel.
// int4_clip: (0, 1], INT4 activation scales use absmax * int4_clip (1 = no clip).
// w_offsets: float32 [N, K_pad/G] like w_scales (asymmetric weights) or None.
// split_k: 0 = automatic, k > 0 = exactly k K-slices (clamped to the block count).
// mma_path: 0 = automatic, 1 = s4 mma (INT4 tensor cores), 2 = INT4->INT8 + s8 mma.
// tile: 0 = by M, 1 = the 64 x 64 tile with 3 stages (4 CTAs per SM; M <= 64 only).
// tile_counters: int32, all zero (left zero), >= one per output tile: a split launch reduces its
//   slabs in-kernel (the tile's last split) instead of launching the finalize kernel; same bits.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cometq_kernels.h"

namespace {

constexpr int64_t kBlockK = 128;

int dtype_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kHalf:
      return COMETQ_DTYPE_F16;
    case at::kBFloat16:
      return COMETQ_DTYPE_BF16;
    case at::kFloat:
      return COMETQ_DTYPE_F32;
    default:
      TORCH_CHECK(false, what, " must be float16, bfloat16 or float32, got ", t);
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* op, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device(), " (shape ", t.sizes(),
              ")");
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but the other inputs are on ", dev);
}

void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type(),
              " (shape ", t.sizes(), ")");
}

void check_contig(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got shape ", t.sizes(), " strides ",
              t.strides());
}

void check_aligned16(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " data must be 16-byte aligned (cp.async), got an offset view (shape ", t.sizes(), ")");
}

void check_cuda_error(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// ---------------------------------------------------------------------------
// The checks and argument struct shared by quantize_act and fake_quant_act (outputs left unset).
CometqActQuantArgs act_quant_args(const char* op, const at::Tensor& x, const at::Tensor& perm,
                                  const at::Tensor& block_bits, int64_t n_int8, int64_t scale_mode, double int4_clip) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  const at::Device dev = x.device();
  check_cuda(x, op, "x", dev);
  check_cuda(perm, op, "perm", dev);
  check_cuda(block_bits, op, "block_bits", dev);
  const int x_dtype = dtype_code(x.scalar_type(), (std::string(op) + ": x").c_str());
  check_dtype(perm, at::kLong, op, "perm");
  check_dtype(block_bits, at::kInt, op, "block_bits");
  check_contig(x, op, "x");
  check_contig(perm, op, "perm");
  check_contig(block_bits, op, "block_bits");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K >= 1, op, ": x must have at least one channel, got shape ", x.sizes());
  const int64_t nb = (K + kBlockK - 1) / kBlockK;
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == K, op, ": perm shape ", perm.sizes(), " must be (", K,
              ",) for x shape ", x.sizes());
  TORCH_CHECK(block_bits.dim() == 1 && block_bits.size(0) == nb, op, ": block_bits shape ", block_bits.sizes(),
              " must be (", nb, ",) for K=", K);
  TORCH_CHECK(n_int8 >= 0 && n_int8 <= nb, op, ": n_int8=", n_int8, " out of range [0, ", nb, "]");
  TORCH_CHECK(scale_mode == COMETQ_SCALE_BLOCK || scale_mode == COMETQ_SCALE_CLASS, op,
              ": scale_mode must be 0 (block) or 1 (class), got ", scale_mode);
  TORCH_CHECK(M <= INT32_MAX && K <= INT32_MAX, op, ": x shape ", x.sizes(), " too large");
  // (!(a > 0 && a <= 1) also rejects NaN)
  TORCH_CHECK(int4_clip > 0.0 && int4_clip <= 1.0, op, ": int4_clip must be in (0, 1], got int4_clip=", int4_clip);
  CometqActQuantArgs a{};
  a.x = x.data_ptr();
  a.ld_x = x.stride(0);
  a.x_dtype = x_dtype;
  a.perm = perm.data_ptr<int64_t>();
  a.block_bits = block_bits.data_ptr<int32_t>();
  a.M = static_cast<int>(M);
  a.K = static_cast<int>(K);
  a.n_blocks = static_cast<int>(nb);
  a.n4 = static_cast<int>(nb - n_int8);
  a.n8 = static_cast<int>(n_int8);
  a.scale_mode = static_cast<int>(scale_mode);
  // fp32 like the reference's `absmax * int4_clip` on a float32 tensor (torch rounds the scalar to float)
  a.int4_clip = static_cast<float>(int4_clip);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_cuda(const at::Tensor& x, const at::Tensor& perm,
                                                                  const at::Tensor& block_bits, int64_t n_int8,
                                                                  int64_t scale_mode, double int4_clip) {
  constexpr const char* op = "cometq_C::quantize_act";
  CometqActQuantArgs a = act_quant_args(op, x, perm, block_bits, n_int8, scale_mode, int4_clip);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = a.M, nb = a.n_blocks, n4 = a.n4;
  auto q4 = at::empty({M, n4 * kBlockK / 2}, x.options().dtype(at::kByte));
  auto q8 = at::empty({M, n_int8 * kBlockK}, x.options().dtype(at::kChar));
  auto scales = at::empty({M, scale_mode == COMETQ_SCALE_BLOCK ? nb : 2}, x.options().dtype(at::kFloat));
  if (M == 0) return {q4, q8, scales};
  a.q4 = n4 ? q4.data_ptr<uint8_t>() : nullptr;
  a.ld_q4 = n4 * kBlockK / 2;
  a.q8 = n_int8 ? q8.data_ptr<int8_t>() : nullptr;
  a.ld_q8 = n_int8 * kBlockK;
  a.scales = scales.data_ptr<float>();
  a.ld_scales = scales.size(1);
  check_cuda_error(cometq_quantize_act(&a, c10::cuda::getCurrentCUDAStream()), op);
  return {q4, q8, scales};
}

// The dequantized activation operand of the 16-bit routes: out [M, nb*128] in out_dtype, each
// block's q * scale in the half-split K order (cometq_kernels.h, CometqActQuantArgs.out).
at::Tensor fake_quant_act_cuda(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& block_bits,
                               int64_t n_int8, int64_t scale_mode, double int4_clip, at::ScalarType out_dtype) {
  constexpr const char* op = "cometq_C::fake_quant_act";
  CometqActQuantArgs a = act_quant_args(op, x, perm, block_bits, n_int8, scale_mode, int4_clip);
  a.out_dtype = dtype_code(out_dtype, "cometq_C::fake_quant_act: out_dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({static_cast<int64_t>(a.M), static_cast<int64_t>(a.n_blocks) * kBlockK},
                       x.options().dtype(out_dtype));
  if (a.M == 0) return out;
  a.out = out.data_ptr();
  a.ld_out = out.stride(0);
  check_cuda_error(cometq_quantize_act(&a, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

// qweight: the row-major format [N, K_pad/2], or the block-major view [N, NB, 64] with strides
// (64, N*64, 1) of [NB, N, 64] storage (layout.weights_block_major).  Returns whether block-major.
bool check_weight_layout(const at::Tensor& qweight, const char* op) {
  const bool block_major = qweight.dim() == 3;
  TORCH_CHECK(qweight.dim() == 2 || (block_major && qweight.size(2) == kBlockK / 2 &&
                                     qweight.stride(0) == kBlockK / 2 &&
                                     qweight.stride(1) == qweight.size(0) * (kBlockK / 2) && qweight.stride(2) == 1),
              op, ": qweight must be 2-D [N, K_pad/2] or the block-major view [N, NB, 64] with strides (64, N*64, 1), "
              "got shape ", qweight.sizes(), " strides ", qweight.strides());
  return block_major;
}

// The effective group width (K_pad for -1) under the rules of reference.check_group_size.
int64_t resolve_group(int64_t group_size, int64_t k_pad, const char* op) {
  if (group_size == -1) return k_pad;
  const bool ok_small = group_size >= 16 && kBlockK % group_size == 0 && (group_size & (group_size - 1)) == 0;
  const bool ok_large = group_size > 0 && group_size % kBlockK == 0 && k_pad % group_size == 0;
  TORCH_CHECK(ok_small || ok_large, op, ": group_size=", group_size, " is not supported for K_pad=", k_pad,
              ": use -1 (per channel), 16, 32, 64, 128, or a multiple of 128 that divides K_pad");
  return group_size;
}

// w_scales (and w_offsets when given) fp32 contiguous [N, K_pad/G]; returns the offsets' pointer or NULL.
const float* check_weight_scales(const at::Tensor& w_scales, const std::optional<at::Tensor>& w_offsets, int64_t N,
                                 int64_t k_pad, int64_t G, int64_t group_size, const char* op, const at::Device& dev) {
  TORCH_CHECK(w_scales.size(0) == N && w_scales.size(1) == k_pad / G, op, ": w_scales shape ", w_scales.sizes(),
              " != (", N, ", ", k_pad / G, ") for group_size=", group_size);
  if (!w_offsets.has_value()) return nullptr;
  const at::Tensor& wo = *w_offsets;
  check_cuda(wo, op, "w_offsets", dev);
  check_dtype(wo, at::kFloat, op, "w_offsets");
  TORCH_CHECK(wo.dim() == 2 && wo.size(0) == N && wo.size(1) == k_pad / G, op, ": w_offsets shape ", wo.sizes(),
              " != w_scales shape (", N, ", ", k_pad / G, ") for group_size=", group_size);
  check_contig(wo, op, "w_offsets");
  return wo.data_ptr<float>();
}

// bias: 1-D [N] contiguous (fp16 / bf16 / fp32); its pointer or NULL, its dtype code in *code.
const void* check_bias(const std::optional<at::Tensor>& bias, int64_t N, const char* op, const at::Device& dev,
                       int* code) {
  *code = COMETQ_DTYPE_F32;
  if (!bias.has_value()) return nullptr;
  const at::Tensor& bt = *bias;
  check_cuda(bt, op, "bias", dev);
  *code = dtype_code(bt.scalar_type(), op);
  TORCH_CHECK(bt.dim() == 1 && bt.size(0) == N, op, ": bias shape ", bt.sizes(), " != (", N, ",)");
  check_contig(bt, op, "bias");
  return bt.data_ptr();
}

// The in-kernel split-K reduction's per-tile counters (int32, all zero, left zero): checked, and
// passed on only to a split launch (NULL otherwise).
int32_t* check_counters(const std::optional<at::Tensor>& tile_counters, int split, int64_t tiles, int64_t M, int64_t N,
                        const char* op, const at::Device& dev) {
  if (!tile_counters.has_value()) return nullptr;
  const at::Tensor& tc = *tile_counters;
  check_cuda(tc, op, "tile_counters", dev);
  check_dtype(tc, at::kInt, op, "tile_counters");
  check_contig(tc, op, "tile_counters");
  TORCH_CHECK(tc.dim() == 1 && tc.size(0) >= tiles, op, ": tile_counters shape ", tc.sizes(), " needs at least ", tiles,
              " counters (output tiles of M=", M, ", N=", N, ")");
  return split > 1 ? tc.data_ptr<int32_t>() : nullptr;
}

// The weight-side, output and split-K fields both GEMMs' argument structs share.
template <class Args>
void fill_weight_side(Args& a, const at::Tensor& qweight, bool block_major, const at::Tensor& w_scales,
                      const float* off_ptr, const void* bias_ptr, int bias_code, const at::Tensor& out, int out_code,
                      const at::Tensor& ws, int32_t* counters, int64_t M, int64_t N, int64_t nb, int split) {
  a.qweight = qweight.data_ptr<uint8_t>();
  a.ld_w = block_major ? kBlockK / 2 : qweight.size(1);
  a.ld_wb = block_major ? qweight.stride(1) : kBlockK / 2;
  a.w_scales = w_scales.data_ptr<float>();
  a.ld_ws = w_scales.size(1);
  a.w_offsets = off_ptr;
  a.ld_wo = w_scales.size(1);
  a.bias = bias_ptr;
  a.bias_dtype = bias_code;
  a.out = out.data_ptr();
  a.ld_out = N;
  a.out_dtype = out_code;
  a.workspace = split > 1 ? ws.data_ptr<float>() : nullptr;
  a.tile_counters = counters;
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.n_blocks = static_cast<int>(nb);
}

// ---------------------------------------------------------------------------
at::Tensor w4ax_gemm_cuda(const at::Tensor& q4, const at::Tensor& q8, const at::Tensor& a_scales,
                          const at::Tensor& block_bits, const at::Tensor& qweight, const at::Tensor& w_scales,
                          const std::optional<at::Tensor>& w_offsets, int64_t group_size,
                          const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                          int64_t scale_mode, int64_t split_k, int64_t mma_path, int64_t tile,
                          const std::optional<at::Tensor>& tile_counters) {
  constexpr const char* op = "cometq_C::w4ax_gemm";
  const at::Device dev = qweight.device();
  check_cuda(qweight, op, "qweight", dev);
  check_cuda(q4, op, "q4", dev);
  check_cuda(q8, op, "q8", dev);
  check_cuda(a_scales, op, "a_scales", dev);
  check_cuda(block_bits, op, "block_bits", dev);
  check_cuda(w_scales, op, "w_scales", dev);
  check_dtype(q4, at::kByte, op, "q4");
  check_dtype(q8, at::kChar, op, "q8");
  check_dtype(a_scales, at::kFloat, op, "a_scales");
  check_dtype(block_bits, at::kInt, op, "block_bits");
  check_dtype(qweight, at::kByte, op, "qweight");
  check_dtype(w_scales, at::kFloat, op, "w_scales");
  const int out_code = dtype_code(out_dtype, "cometq_C::w4ax_gemm: out_dtype");
  TORCH_CHECK(q4.dim() == 2, op, ": q4 must be 2-D [M, n_int4*64], got shape ", q4.sizes());
  TORCH_CHECK(q8.dim() == 2, op, ": q8 must be 2-D [M, n_int8*128], got shape ", q8.sizes());
  TORCH_CHECK(a_scales.dim() == 2, op, ": a_scales must be 2-D, got shape ", a_scales.sizes());
  TORCH_CHECK(block_bits.dim() == 1 && block_bits.size(0) >= 1, op, ": block_bits must be 1-D and non-empty, got shape ",
              block_bits.sizes());
  const bool w_block_major = check_weight_layout(qweight, op);
  TORCH_CHECK(w_scales.dim() == 2, op, ": w_scales must be 2-D [N, K_pad/G], got shape ", w_scales.sizes());
  check_contig(q4, op, "q4");
  check_contig(q8, op, "q8");
  check_contig(a_scales, op, "a_scales");
  check_contig(block_bits, op, "block_bits");
  if (!w_block_major) check_contig(qweight, op, "qweight");
  check_contig(w_scales, op, "w_scales");
  check_aligned16(q4, op, "q4");
  check_aligned16(q8, op, "q8");
  check_aligned16(qweight, op, "qweight");

  const int64_t nb = block_bits.size(0);
  const int64_t k_pad = nb * kBlockK;
  const int64_t M = a_scales.size(0), N = qweight.size(0);
  const int64_t w_k_pad = w_block_major ? qweight.size(1) * kBlockK : qweight.size(1) * 2;
  TORCH_CHECK(w_k_pad == k_pad, op, ": qweight shape ", qweight.sizes(), " holds K_pad=", w_k_pad,
              " but block_bits has ", nb, " blocks (K_pad=", k_pad, ")");
  TORCH_CHECK(q4.size(0) == M && q8.size(0) == M, op, ": q4 ", q4.sizes(), ", q8 ", q8.sizes(), " and a_scales ",
              a_scales.sizes(), " must have the same number of rows M");
  TORCH_CHECK(q4.size(1) % (kBlockK / 2) == 0, op, ": q4 shape ", q4.sizes(), " is not a whole number of 64-byte INT4 blocks");
  TORCH_CHECK(q8.size(1) % kBlockK == 0, op, ": q8 shape ", q8.sizes(), " is not a whole number of 128-byte INT8 blocks");
  const int64_t n4 = q4.size(1) / (kBlockK / 2), n8 = q8.size(1) / kBlockK;
  TORCH_CHECK(n4 + n8 == nb, op, ": q4 ", q4.sizes(), " (", n4, " INT4 blocks) + q8 ", q8.sizes(), " (", n8,
              " INT8 blocks) do not cover the ", nb, " blocks of K_pad=", k_pad);
  TORCH_CHECK(scale_mode == COMETQ_SCALE_BLOCK || scale_mode == COMETQ_SCALE_CLASS, op,
              ": scale_mode must be 0 (block) or 1 (class), got ", scale_mode);
  const int64_t ns = scale_mode == COMETQ_SCALE_BLOCK ? nb : 2;
  TORCH_CHECK(a_scales.size(1) == ns, op, ": a_scales shape ", a_scales.sizes(), " needs ", ns, " columns in ",
              scale_mode == COMETQ_SCALE_BLOCK ? "block" : "class", " mode");
  const int64_t G = resolve_group(group_size, k_pad, op);
  const float* off_ptr = check_weight_scales(w_scales, w_offsets, N, k_pad, G, group_size, op, dev);
  int bias_code = COMETQ_DTYPE_F32;
  const void* bias_ptr = check_bias(bias, N, op, dev, &bias_code);
  TORCH_CHECK(mma_path >= 0 && mma_path <= 2, op, ": mma_path must be 0 (auto), 1 (s4) or 2 (s8), got ", mma_path);
  TORCH_CHECK(split_k >= 0, op, ": split_k must be >= 0 (0 = auto), got ", split_k);
  TORCH_CHECK(tile == 0 || tile == 1, op, ": tile must be 0 (by M) or 1 (64x64, 3 stages), got ", tile);
  TORCH_CHECK(tile == 0 || M <= 64, op, ": tile=1 (the 64x64 3-stage tile) needs M <= 64, got M=", M);
  TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && nb <= (1 << 20), op, ": problem too large (M=", M, ", N=", N,
              ", blocks=", nb, ")");

  const c10::cuda::CUDAGuard guard(dev);
  auto out = at::empty({M, N}, qweight.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;

  int cc_major = 0, sm_count = 1;
  check_cuda_error(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev.index()), op);
  check_cuda_error(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev.index()), op);
  const int path = cometq_resolve_mma_path(static_cast<int>(mma_path), cc_major);
  const int split = cometq_gemm_choose_split(static_cast<int>(M), static_cast<int>(N), static_cast<int>(nb),
                                             sm_count, static_cast<int>(split_k));
  at::Tensor ws;
  if (split > 1) ws = at::empty({split, M, N}, qweight.options().dtype(at::kFloat));  // slabs, fully written
  int32_t* counters = check_counters(tile_counters, split,
                                     cometq_gemm_num_tiles(static_cast<int>(M), static_cast<int>(N), static_cast<int>(tile)),
                                     M, N, op, dev);

  CometqGemmArgs a{};
  a.q4 = n4 ? q4.data_ptr<uint8_t>() : nullptr;
  a.ld_q4 = q4.size(1);
  a.q8 = n8 ? q8.data_ptr<int8_t>() : nullptr;
  a.ld_q8 = q8.size(1);
  a.a_scales = a_scales.data_ptr<float>();
  a.ld_as = a_scales.size(1);
  a.block_bits = block_bits.data_ptr<int32_t>();
  fill_weight_side(a, qweight, w_block_major, w_scales, off_ptr, bias_ptr, bias_code, out, out_code, ws, counters, M,
                   N, nb, split);
  a.n4 = static_cast<int>(n4);
  a.n8 = static_cast<int>(n8);
  a.group = static_cast<int>(G);
  a.scale_mode = static_cast<int>(scale_mode);
  a.split_k = split;
  a.mma_path = path;
  a.tile = static_cast<int>(tile);
  TORCH_CHECK(cometq_gemm_offsets_fit(&a), op, ": operands too large for the kernel's 32-bit row offsets (q4 ",
              q4.sizes(), ", q8 ", q8.sizes(), ", a_scales ", a_scales.sizes(), ", qweight ", qweight.sizes(),
              ", w_scales ", w_scales.sizes(), "): each must span < 2^31 bytes (scales: elements)");
  check_cuda_error(cometq_w4ax_gemm(&a, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

// ---------------------------------------------------------------------------
// y = A' @ W'^T (+ bias), the w16 route's GEMM (csrc/w16_gemm.cu)
at::Tensor w16_gemm_cuda(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& w_scales,
                         const std::optional<at::Tensor>& w_offsets, int64_t group_size,
                         const std::optional<at::Tensor>& bias, at::ScalarType out_dtype, int64_t split_k,
                         int64_t tile, const std::optional<at::Tensor>& tile_counters, bool pdl) {
  constexpr const char* op = "cometq_C::w16_gemm";
  const at::Device dev = qweight.device();
  check_cuda(a, op, "a", dev);
  check_cuda(qweight, op, "qweight", dev);
  check_cuda(w_scales, op, "w_scales", dev);
  TORCH_CHECK(a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16, op,
              ": a must be float16 or bfloat16 (the MMA operand dtype), got ", a.scalar_type());
  check_dtype(qweight, at::kByte, op, "qweight");
  check_dtype(w_scales, at::kFloat, op, "w_scales");
  const int out_code = dtype_code(out_dtype, "cometq_C::w16_gemm: out_dtype");
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D [M, K_pad], got shape ", a.sizes());
  TORCH_CHECK(a.stride(1) == 1 && a.stride(0) % 8 == 0 && a.stride(0) >= a.size(1), op,
              ": a must have unit column stride and a row stride that is a multiple of 8 elements (16-byte rows), "
              "got shape ", a.sizes(), " strides ", a.strides());
  TORCH_CHECK(a.size(1) >= kBlockK && a.size(1) % kBlockK == 0, op, ": a shape ", a.sizes(),
              " must be [M, K_pad] with K_pad a positive multiple of ", kBlockK);
  const bool w_block_major = check_weight_layout(qweight, op);
  TORCH_CHECK(w_scales.dim() == 2, op, ": w_scales must be 2-D [N, K_pad/G], got shape ", w_scales.sizes());
  if (!w_block_major) check_contig(qweight, op, "qweight");
  check_contig(w_scales, op, "w_scales");
  check_aligned16(a, op, "a");
  check_aligned16(qweight, op, "qweight");
  const int64_t M = a.size(0), N = qweight.size(0), k_pad = a.size(1), nb = k_pad / kBlockK;
  const int64_t w_k_pad = w_block_major ? qweight.size(1) * kBlockK : qweight.size(1) * 2;
  TORCH_CHECK(w_k_pad == k_pad, op, ": qweight shape ", qweight.sizes(), " holds K_pad=", w_k_pad, " but a shape ",
              a.sizes(), " has K_pad=", k_pad);
  const int64_t G = resolve_group(group_size, k_pad, op);
  const float* off_ptr = check_weight_scales(w_scales, w_offsets, N, k_pad, G, group_size, op, dev);
  int bias_code = COMETQ_DTYPE_F32;
  const void* bias_ptr = check_bias(bias, N, op, dev, &bias_code);
  TORCH_CHECK(split_k >= 0, op, ": split_k must be >= 0 (0 = auto), got ", split_k);
  TORCH_CHECK(tile >= COMETQ_W16_TILE_AUTO && tile <= COMETQ_W16_TILE_WG16, op,
              ": tile must be 0 (by M), 1 (64 x 256, 8 warps), 2 (32 x 128), 3 (16 x 128) or a wgmma tile 4 (64 x 128), "
              "5 (64 x 64), 6 (32 x 128), 7 (64 x 256), 8 (16 x 128), got ", tile);
  if (tile >= COMETQ_W16_TILE_WG64) {
    int major = 0, minor = 0;
    check_cuda_error(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev.index()), op);
    check_cuda_error(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev.index()), op);
    TORCH_CHECK(major == 9 && minor == 0, op, ": tile=", tile,
                " is a wgmma tile, which needs an sm_90 (Hopper) GPU; this device is sm_", major, minor);
    TORCH_CHECK(G >= kBlockK, op, ": tile=", tile, " (a wgmma tile) needs a weight group of at least ", kBlockK,
                " channels (one group per row and K block), got group_size=", group_size, " (G=", G, ")");
  }
  TORCH_CHECK(!pdl || tile >= COMETQ_W16_TILE_WG64, op, ": pdl=True (a programmatic dependent launch) applies to the "
              "wgmma tiles 4-8 only, got tile=", tile);
  TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && nb <= (1 << 20), op, ": problem too large (M=", M, ", N=", N,
              ", blocks=", nb, ")");

  const c10::cuda::CUDAGuard guard(dev);
  auto out = at::empty({M, N}, qweight.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  int sm_count = 1;
  check_cuda_error(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev.index()), op);
  const int split = cometq_w16_choose_split(static_cast<int>(M), static_cast<int>(N), static_cast<int>(nb), sm_count,
                                            static_cast<int>(tile), static_cast<int>(split_k));
  at::Tensor ws;
  if (split > 1) ws = at::empty({split, M, N}, qweight.options().dtype(at::kFloat));  // slabs, fully written
  int32_t* counters = check_counters(tile_counters, split,
                                     cometq_w16_num_tiles(static_cast<int>(M), static_cast<int>(N), static_cast<int>(tile)),
                                     M, N, op, dev);

  CometqW16Args p{};
  p.a = a.data_ptr();
  p.lda = a.stride(0);
  p.a_dtype = a.scalar_type() == at::kHalf ? COMETQ_DTYPE_F16 : COMETQ_DTYPE_BF16;
  fill_weight_side(p, qweight, w_block_major, w_scales, off_ptr, bias_ptr, bias_code, out, out_code, ws, counters, M,
                   N, nb, split);
  p.group = static_cast<int>(G);
  p.split_k = split;
  p.tile = static_cast<int>(tile);
  p.pdl = pdl ? 1 : 0;
  TORCH_CHECK(cometq_w16_offsets_fit(&p), op, ": operands too large for the kernel's 32-bit row offsets (a ",
              a.sizes(), ", qweight ", qweight.sizes(), ", w_scales ", w_scales.sizes(),
              "): each must span < 2^31 bytes (scales: elements)");
  check_cuda_error(cometq_w16_gemm(&p, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

// ---------------------------------------------------------------------------
at::Tensor kv4_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_packed, const at::Tensor& k_scale,
                                     const at::Tensor& k_zero, const at::Tensor& v_packed, const at::Tensor& v_scale,
                                     const at::Tensor& v_zero, const at::Tensor& tail_k, const at::Tensor& tail_v,
                                     const at::Tensor& block_tables, const at::Tensor& quant_lens,
                                     const at::Tensor& tail_lens, const at::Tensor& seq_ids, int64_t group_size,
                                     double sm_scale, int64_t num_splits, int64_t variant) {
  constexpr const char* op = "cometq_C::kv4_decode_attention";
  const at::Device dev = q.device();
  const std::pair<const at::Tensor*, const char*> all[] = {
      {&q, "q"},           {&k_packed, "k_packed"},         {&k_scale, "k_scale"},       {&k_zero, "k_zero"},
      {&v_packed, "v_packed"}, {&v_scale, "v_scale"},       {&v_zero, "v_zero"},         {&tail_k, "tail_k"},
      {&tail_v, "tail_v"}, {&block_tables, "block_tables"}, {&quant_lens, "quant_lens"}, {&tail_lens, "tail_lens"},
      {&seq_ids, "seq_ids"}};
  for (const auto& [t, name] : all) {
    check_cuda(*t, op, name, dev);
    check_contig(*t, op, name);
    // the kernel reads the int32 index tensors (block_tables .. seq_ids, the last four) one element
    // at a time: only the tensors it loads in 16-byte vectors must be 16-byte aligned (a decode batch's
    // seq_ids is an offset view of the runner's persistent slot buffer)
    if (t->scalar_type() == at::kInt) continue;
    check_aligned16(*t, op, name);
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q must be float16 or bfloat16, got ", q.scalar_type(), " (shape ", q.sizes(), ")");
  check_dtype(tail_k, q.scalar_type(), op, "tail_k");
  check_dtype(tail_v, q.scalar_type(), op, "tail_v");
  for (const auto& [t, name] : {std::make_pair(&k_packed, "k_packed"), std::make_pair(&v_packed, "v_packed")})
    check_dtype(*t, at::kByte, op, name);
  for (const auto& [t, name] : {std::make_pair(&k_scale, "k_scale"), std::make_pair(&k_zero, "k_zero"),
                                std::make_pair(&v_scale, "v_scale"), std::make_pair(&v_zero, "v_zero")})
    check_dtype(*t, at::kHalf, op, name);
  for (const auto& [t, name] : {std::make_pair(&block_tables, "block_tables"), std::make_pair(&quant_lens, "quant_lens"),
                                std::make_pair(&tail_lens, "tail_lens"), std::make_pair(&seq_ids, "seq_ids")})
    check_dtype(*t, at::kInt, op, name);
  TORCH_CHECK(q.dim() == 3, op, ": q must be [B, Hq, D], got shape ", q.sizes());
  TORCH_CHECK(k_packed.dim() == 4, op, ": k_packed must be [NB, H, BS, D/2], got shape ", k_packed.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = k_packed.size(0), H = k_packed.size(1), BS = k_packed.size(2), G = group_size;
  TORCH_CHECK(k_packed.size(3) * 2 == D, op, ": k_packed shape ", k_packed.sizes(), " does not hold head_dim ", D,
              " of q shape ", q.sizes());
  TORCH_CHECK(v_packed.sizes() == k_packed.sizes(), op, ": v_packed shape ", v_packed.sizes(),
              " != k_packed shape ", k_packed.sizes());
  TORCH_CHECK(H > 0 && Hq % H == 0, op, ": q heads ", Hq, " (q shape ", q.sizes(), ") not a multiple of kv heads ", H);
  TORCH_CHECK(G > 0 && BS % G == 0, op, ": block_size ", BS, " (k_packed shape ", k_packed.sizes(),
              ") must be a multiple of group_size=", G);
  TORCH_CHECK(cometq_kv4_attention_supported(static_cast<int>(D), static_cast<int>(G), static_cast<int>(Hq / H)), op,
              ": unsupported case head_dim=", D, ", group_size=", G, ", query heads per kv head=", Hq / H,
              " (needs head_dim 64 or 128, group_size a multiple of 16 dividing head_dim, <= 8 query heads per kv head)");
  const std::vector<int64_t> ks_shape{NB, H, BS / G, D}, vs_shape{NB, H, BS, D / G};
  TORCH_CHECK(k_scale.sizes() == ks_shape && k_zero.sizes() == ks_shape, op, ": k_scale ", k_scale.sizes(),
              " / k_zero ", k_zero.sizes(), " must be ", at::IntArrayRef(ks_shape), " (keys per channel, group_size=", G,
              ")");
  TORCH_CHECK(v_scale.sizes() == vs_shape && v_zero.sizes() == vs_shape, op, ": v_scale ", v_scale.sizes(),
              " / v_zero ", v_zero.sizes(), " must be ", at::IntArrayRef(vs_shape), " (values per token, group_size=",
              G, ")");
  TORCH_CHECK(tail_k.dim() == 4 && tail_k.size(1) == H && tail_k.size(2) == G && tail_k.size(3) == D, op,
              ": tail_k shape ", tail_k.sizes(), " must be [S, ", H, ", ", G, ", ", D, "]");
  TORCH_CHECK(tail_v.sizes() == tail_k.sizes(), op, ": tail_v shape ", tail_v.sizes(), " != tail_k shape ",
              tail_k.sizes());
  const int64_t S = tail_k.size(0);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == S, op, ": block_tables shape ", block_tables.sizes(),
              " must be [", S, ", max_blocks]");
  TORCH_CHECK(quant_lens.dim() == 1 && quant_lens.size(0) == S && tail_lens.dim() == 1 && tail_lens.size(0) == S, op,
              ": quant_lens ", quant_lens.sizes(), " and tail_lens ", tail_lens.sizes(), " must be [", S, "]");
  TORCH_CHECK(seq_ids.dim() == 1 && seq_ids.size(0) == B, op, ": seq_ids shape ", seq_ids.sizes(), " must be [", B,
              "] (q shape ", q.sizes(), ")");
  TORCH_CHECK(num_splits >= 1 && num_splits <= 1024, op, ": num_splits must be in [1, 1024], got ", num_splits);
  TORCH_CHECK(variant >= 0 && variant <= 4, op, ": variant must be in [0, 4] (0-3: bit 0 = 3 CTAs per SM, next tile "
              "prefetched; bit 1 = next key group prefetched into L2; 4: shared-memory ring), got ", variant);
  TORCH_CHECK(B <= 65535 && H <= 65535 && NB * H * BS <= (int64_t(1) << 40), op, ": problem too large (B=", B,
              ", H=", H, ", pool rows=", NB * H * BS, ")");

  const c10::cuda::CUDAGuard guard(dev);
  auto out = at::empty_like(q);
  if (B == 0) return out;
  at::Tensor part_o, part_ml;
  if (num_splits > 1) {
    part_o = at::empty({B, Hq, num_splits, D}, q.options().dtype(at::kFloat));
    part_ml = at::empty({B, Hq, num_splits, 2}, q.options().dtype(at::kFloat));
  }
  CometqKv4AttnArgs a{};
  a.q = q.data_ptr();
  a.ld_qb = q.stride(0);
  a.ld_qh = q.stride(1);
  a.k_packed = k_packed.data_ptr<uint8_t>();
  a.v_packed = v_packed.data_ptr<uint8_t>();
  a.k_scale = k_scale.data_ptr();
  a.k_zero = k_zero.data_ptr();
  a.v_scale = v_scale.data_ptr();
  a.v_zero = v_zero.data_ptr();
  a.tail_k = tail_k.data_ptr();
  a.tail_v = tail_v.data_ptr();
  a.block_tables = block_tables.data_ptr<int32_t>();
  a.ld_bt = block_tables.size(1);
  a.quant_lens = quant_lens.data_ptr<int32_t>();
  a.tail_lens = tail_lens.data_ptr<int32_t>();
  a.seq_ids = seq_ids.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.part_o = num_splits > 1 ? part_o.data_ptr<float>() : nullptr;
  a.part_ml = num_splits > 1 ? part_ml.data_ptr<float>() : nullptr;
  a.B = static_cast<int>(B);
  a.Hq = static_cast<int>(Hq);
  a.H = static_cast<int>(H);
  a.D = static_cast<int>(D);
  a.BS = static_cast<int>(BS);
  a.G = static_cast<int>(G);
  a.splits = static_cast<int>(num_splits);
  a.qk_scale = static_cast<float>(sm_scale * 1.4426950408889634);  // log2(e): the kernel's softmax is exp2
  a.io_dtype = q.scalar_type() == at::kHalf ? COMETQ_DTYPE_F16 : COMETQ_DTYPE_BF16;
  a.variant = static_cast<int>(variant);
  check_cuda_error(cometq_kv4_decode_attention(&a, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

}  // namespace

TORCH_LIBRARY(cometq_C, m) {
  m.def(
      "quantize_act(Tensor x, Tensor perm, Tensor block_bits, int n_int8, int scale_mode, float int4_clip) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "fake_quant_act(Tensor x, Tensor perm, Tensor block_bits, int n_int8, int scale_mode, float int4_clip, "
      "ScalarType out_dtype) -> Tensor");
  m.def(
      "w4ax_gemm(Tensor q4, Tensor q8, Tensor a_scales, Tensor block_bits, Tensor qweight, Tensor w_scales, "
      "Tensor? w_offsets, int group_size, Tensor? bias, ScalarType out_dtype, int scale_mode, int split_k, "
      "int mma_path, int tile=0, Tensor(a!)? tile_counters=None) -> Tensor");
  m.def(
      "w16_gemm(Tensor a, Tensor qweight, Tensor w_scales, Tensor? w_offsets, int group_size, Tensor? bias, "
      "ScalarType out_dtype, int split_k, int tile=0, Tensor(a!)? tile_counters=None, bool pdl=False) -> Tensor");
  m.def(
      "kv4_decode_attention(Tensor q, Tensor k_packed, Tensor k_scale, Tensor k_zero, Tensor v_packed, "
      "Tensor v_scale, Tensor v_zero, Tensor tail_k, Tensor tail_v, Tensor block_tables, Tensor quant_lens, "
      "Tensor tail_lens, Tensor seq_ids, int group_size, float sm_scale, int num_splits, int variant=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(cometq_C, CUDA, m) {
  m.impl("quantize_act", &quantize_act_cuda);
  m.impl("fake_quant_act", &fake_quant_act_cuda);
  m.impl("w4ax_gemm", &w4ax_gemm_cuda);
  m.impl("w16_gemm", &w16_gemm_cuda);
  m.impl("kv4_decode_attention", &kv4_decode_attention_cuda);
}

// The Python module only exists so `import cometq._C` loads the library (and
// runs the registrations above); everything is reached through torch.ops.cometq_C.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cometq CUDA kernels; ops are registered as torch.ops.cometq_C.*";
}
