// Paged KV4 decode attention on fp16 tensor cores (mma.sync m16n8k16), plain CUDA (no torch).
//
// Semantics: exactly cometq.paged.kv4_decode_attention_reference for the serving pool's default
// format (cometq.paged: keys 4-bit per channel in groups of G tokens, values 4-bit per token in
// groups of G channels, the < G newest tokens of each sequence in a full-precision tail), fp16 or
// bf16 query / output / tail:
//     out[b, h] = softmax_t(sm_scale * q[b, h] . k_t) . v_t   over the sequence's quantized
//     tokens t < quant_lens[s] (s = seq_ids[b]) and then its tail_lens[s] tail tokens.
// x = n * scale + zero for a nibble n in 0..15 (reference.quantize_kv4).
//
// ============================================================================
// Why a CUDA kernel beside the Triton one (kernels/kv4_attention.py)
// ============================================================================
// A Triton dot needs 16 rows, so a GQA-4 program pads its 4 query heads to 16: 3/4 of the
// softmax, of the [16, D] accumulator and of its rescales is padding, and the dequantized K/V
// tiles reach the MMA operand layout through shared memory.  Its 1-warp config runs ~1240
// SASS instructions per 32 tokens (sm_90a; 254 registers: 8 warps per SM).  Here the roles
// are swapped so the heads are the narrow side of the MMA:
//
//     S^T [16 tokens x 8 heads] = K [16 tokens x D] . Q'^T [D x 8 heads]     (n8: GQA <= 8)
//     O^T [D x 8 heads]        += V^T [D x 16 tokens] . P^T [16 tokens x 8 heads]
//
// and every operand is built in registers straight from the packed bytes (no K/V in shared
// memory, no barrier in the loop).  Per 16 tokens and warp (sm_90a SASS, D = 128): 8 + 8 HMMA, ~96
// instructions of K nibble conversion, ~112 of V conversion + dequantization, ~40 of online
// softmax, ~460 executed in all (the Triton kernel's best config: ~620), at 128 registers.
//
// * Keys per channel: the scale / zero of a channel are constant over a key group (G tokens),
//   so they fold into the query once per group instead of into every key element:
//       q . (n * sc + z) = (q * sc) . n + q . z
//   and the nibbles go into the MMA as integers: a byte b (channels 2j low, 2j+1 high nibble)
//   becomes the fp16 pair {lo, hi} in three instructions,
//       prmt  b -> bytes {b, x, b, x};   lop3  & 0x00F0000F | 0x54006400;   HSUB2 {1024, 64}
//   (0x6400 | n is 1024 + n; 0x5400 | (n << 4) is 64 + n: the high nibble needs no shift).
//   The zero term q . z is one bias per head and group (fp32, on the MMA: an A operand whose
//   rows are all equal gives it in every row of the S^T fragment; it is the C input of every
//   tile of the group).  (Folding the 1024 / 64 offsets into that bias as well saves the HSUB2
//   but leaves the fp32 accumulator holding ~1024 * sum|q'| next to a logit of ~sum|q' n|: the
//   tensor cores' truncating fp32 adds then cost up to ~1e-2 in the logit for outlier channels.)
// * Values per token (groups along D): V^T's k index is the token, so a register pair holds
//   one channel of two tokens: prmt of the two token rows' bytes + lop3 as above, then
//   (m - off) * s + z with the token pair's scales (HSUB2 exact + HFMA2, one rounding: the
//   Triton kernel's numerics).
// * P: the S^T accumulator fragment (thread holds tokens g, g+8 x heads 2t, 2t+1) is the
//   transpose of the B fragment P^T needs (tokens 2t, 2t+1 x head g): movmatrix.trans per
//   8 x 8 half block, 2 per 16 tokens.  Heads 2t, 2t+1 are also the columns the thread owns in
//   the O^T fragment, so the online softmax's max / rescale never crosses lanes except for the
//   max over the 8 token rows (3 shuffles per head).
//
// Channel assignment (d = head_dim channel; the MMA k order is free as long as both operands
// use the same one; t = lane % 4, g = lane / 4):
//   QK: thread t reads bytes [t*D/8, (t+1)*D/8) of its key rows g, g+8 (one 16-byte load each
//       at D = 128); k-chunk c, register p (0: k slots 2t,2t+1; 1: slots 2t+8,2t+9) holds byte
//       t*D/8 + 2c + p = channels (d, d+1), d = t*D/4 + 4c + 2p.  The query / its scales are read
//       with the same map (contiguous D/4 halves per thread).
//   PV: thread g reads bytes [g*D/16, (g+1)*D/16) of token rows 2t, 2t+1, 2t+8, 2t+9; d-tile i's
//       row g is the low nibble of byte g*D/16 + i (d = g*D/8 + 2i), row g+8 its high nibble
//       (d + 1).  All of a thread's channels lie in one value group when G % (D/8) == 0.
//
// Work split: grid (batch, kv head, split); a split owns a contiguous range of key groups;
// warp w of the CTA takes groups w, w + WARPS, ... (each group: G/16 token tiles; launch
// variants 1 / 3 load the next tile's bytes while one computes, 2 / 3 the warp's next group into
// L2 at the start of each group, 4 streams the warp's tiles through a shared-memory ring:
// kv4_attn_ring_kernel), the last split also the tail.  The warps'
// (max, sum, O) merge through shared memory at the end; one split writes the output, more
// write fp32 partials that kv4_attn_reduce_kernel combines (flash-decoding).
// ============================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "cometq_device.cuh"  // cp.async wrappers
#include "cometq_kernels.h"

namespace cometq {
namespace {

constexpr int kWarps = 4;           // warps per CTA
constexpr int kHeads = 8;           // MMA n: query heads per KV head, padded
constexpr float kNegInf = -INFINITY;
// The online softmax keeps a reference max per head and moves it only when a tile's max
// exceeds it by more than this (log2 units): P <= 2^8 fits fp16, and most tiles skip the
// O rescale (same rule as the Triton kernel's LAZY_RESCALE).
constexpr float kLazy = 8.f;

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t x, uint32_t mask, uint32_t bits) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "r"(mask), "r"(bits));  // (a & b) | c
  return d;
}

// fp16 pair {low nibble, high nibble} of byte `sel` (0..3) of w: {1024 + lo, 64 + hi} by the
// magic exponents, then the offsets subtracted (exact).
__device__ __forceinline__ uint32_t key_pair(uint32_t w, int sel) {
  const __half2 m = u2h(lop3_and_or(__byte_perm(w, 0u, sel * 0x1111), 0x00F0000Fu, 0x54006400u));
  return h2u(__hsub2(m, __floats2half2_rn(1024.f, 64.f)));
}

__device__ __forceinline__ void mma_f16_m16n8k16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(x));
  return d;
}

// The query / output / fp16-tail dtype (IO): fp16 or bf16.  Everything inside runs in fp16 either
// way (a bf16 query is rounded to fp16 once, after the sm_scale: Llama-scale queries and keys are
// far inside fp16's range, and fp16 keeps 3 more bits of P and of the dequantized values).
template <typename IO>
struct Io;
template <>
struct Io<__half> {
  __device__ __forceinline__ static float2 pair(uint32_t w) { return __half22float2(u2h(w)); }
  __device__ __forceinline__ static uint32_t to_h2(uint32_t w) { return w; }
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Io<__nv_bfloat16> {
  __device__ __forceinline__ static float2 pair(uint32_t w) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&w));
  }
  __device__ __forceinline__ static uint32_t to_h2(uint32_t w) { return h2u(__float22half2_rn(pair(w))); }
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <int N>
struct Bytes;  // N bytes of a row, loaded with one vector load
template <>
struct Bytes<16> {
  uint4 v;
  __device__ __forceinline__ uint32_t word(int i) const { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
  __device__ __forceinline__ void load(const uint8_t* p) { v = __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ __forceinline__ void load_shared(const uint8_t* p) { v = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void zero() { v = make_uint4(0, 0, 0, 0); }
};
template <>
struct Bytes<8> {
  uint2 v;
  __device__ __forceinline__ uint32_t word(int i) const { return i == 0 ? v.x : v.y; }
  __device__ __forceinline__ void load(const uint8_t* p) { v = __ldg(reinterpret_cast<const uint2*>(p)); }
  __device__ __forceinline__ void load_shared(const uint8_t* p) { v = *reinterpret_cast<const uint2*>(p); }
  __device__ __forceinline__ void zero() { v = make_uint2(0, 0); }
};
template <>
struct Bytes<4> {
  uint32_t v;
  __device__ __forceinline__ uint32_t word(int) const { return v; }
  __device__ __forceinline__ void load(const uint8_t* p) { v = __ldg(reinterpret_cast<const uint32_t*>(p)); }
  __device__ __forceinline__ void load_shared(const uint8_t* p) { v = *reinterpret_cast<const uint32_t*>(p); }
  __device__ __forceinline__ void zero() { v = 0; }
};

// One 16-token tile's raw bytes (what the thread loads of it).
template <int D>
struct TileRaw {
  Bytes<D / 8> k[2];    // key rows g, g + 8
  Bytes<D / 16> v[4];   // value rows 2t, 2t+1, 2t+8, 2t+9
  __half2 vs[2], vz[2];  // their scale / zero (the thread's value group): {2t, 2t+1}, {2t+8, 2t+9}
};

struct Softmax {
  float m[2];  // reference max of heads 2t, 2t+1 (log2 units)
  float l[2];  // this lane's part of the sum of P (rows g, g+8)
};

template <int D>
__device__ __forceinline__ void load_tile(const CometqKv4AttnArgs& p, TileRaw<D>& r, int64_t row0, int n_valid,
                                          int vgrp) {
  // row0: pool row ((block * H + head) * BS + token) of the tile's first token -- the row of D/2
  // packed bytes and of D/G value scales; n_valid: tokens of the tile to read (the rest are zeros)
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int vpg = D / p.G;  // value groups per token
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int tok = g + 8 * h;
    if (tok < n_valid)
      r.k[h].load(p.k_packed + (row0 + tok) * (D / 2) + t * (D / 8));
    else
      r.k[h].zero();
  }
  __half sc[4], zr[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int tok = 2 * t + (j & 1) + 8 * (j >> 1);
    if (tok < n_valid) {
      r.v[j].load(p.v_packed + (row0 + tok) * (D / 2) + g * (D / 16));
      sc[j] = reinterpret_cast<const __half*>(p.v_scale)[(row0 + tok) * vpg + vgrp];
      zr[j] = reinterpret_cast<const __half*>(p.v_zero)[(row0 + tok) * vpg + vgrp];
    } else {
      // zero bytes and scales: a masked token's value is exactly 0 (its P is 0 too; no NaN from
      // whatever the pool holds past the sequence)
      r.v[j].zero();
      sc[j] = zr[j] = __float2half(0.f);
    }
  }
  r.vs[0] = __halves2half2(sc[0], sc[1]);
  r.vs[1] = __halves2half2(sc[2], sc[3]);
  r.vz[0] = __halves2half2(zr[0], zr[1]);
  r.vz[1] = __halves2half2(zr[2], zr[3]);
}

// Online softmax of one S^T tile (c[e]: e = 0 (token g, head 2t), 1 (g, 2t+1), 2 (g+8, 2t),
// 3 (g+8, 2t+1)); masked tokens must already be -inf.  Rescales o when the reference max moves
// and returns the P^T B fragment {tokens 2t,2t+1 | 2t+8,2t+9 of head g}.
template <int D>
__device__ __forceinline__ void softmax_tile(float (&c)[4], Softmax& sm, float (&o)[D / 16][4], uint32_t& pb0,
                                             uint32_t& pb1) {
  float mx[2] = {fmaxf(c[0], c[2]), fmaxf(c[1], c[3])};
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xFFFFFFFFu, mx[h], off));
  bool move[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) move[h] = mx[h] > sm.m[h] + kLazy;  // false while both are -inf
  if (__any_sync(0xFFFFFFFFu, move[0] || move[1])) {
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      alpha[h] = move[h] ? exp2f(sm.m[h] - mx[h]) : 1.f;  // exp2(-inf) = 0 on the first tile
      if (move[h]) sm.m[h] = mx[h];
      sm.l[h] *= alpha[h];
    }
#pragma unroll
    for (int i = 0; i < D / 16; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[i][e] *= alpha[e & 1];
  }
  float pr[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float m = sm.m[e & 1] == kNegInf ? 0.f : sm.m[e & 1];  // nothing seen yet: c is -inf, p = 0
    pr[e] = exp2f(c[e] - m);
    sm.l[e & 1] += pr[e];
  }
  pb0 = movmatrix_trans(h2u(__floats2half2_rn(pr[0], pr[1])));  // tokens 0..7 of the tile
  pb1 = movmatrix_trans(h2u(__floats2half2_rn(pr[2], pr[3])));  // tokens 8..15
}

// O^T += V^T . P^T for one tile of 4-bit values.
template <int D>
__device__ __forceinline__ void pv_tile(const TileRaw<D>& r, float (&o)[D / 16][4], uint32_t pb0, uint32_t pb1) {
  const __half2 s01 = r.vs[0], z01 = r.vz[0], s89 = r.vs[1], z89 = r.vz[1];
  const __half2 off_lo = __floats2half2_rn(1024.f, 1024.f), off_hi = __floats2half2_rn(64.f, 64.f);
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    // byte i of the thread's D/16 bytes of each row: bytes {row 2t, -, row 2t+1, -}
    const int w = i / 4, sel = i % 4;
    const uint32_t sel2 = sel * 0x0011 + (sel + 4) * 0x1100;
    const uint32_t x01 = __byte_perm(r.v[0].word(w), r.v[1].word(w), sel2);
    const uint32_t x89 = __byte_perm(r.v[2].word(w), r.v[3].word(w), sel2);
    const __half2 a0 = __hfma2(__hsub2(u2h(lop3_and_or(x01, 0x000F000Fu, 0x64006400u)), off_lo), s01, z01);
    const __half2 a1 = __hfma2(__hsub2(u2h(lop3_and_or(x01, 0x00F000F0u, 0x54005400u)), off_hi), s01, z01);
    const __half2 a2 = __hfma2(__hsub2(u2h(lop3_and_or(x89, 0x000F000Fu, 0x64006400u)), off_lo), s89, z89);
    const __half2 a3 = __hfma2(__hsub2(u2h(lop3_and_or(x89, 0x00F000F0u, 0x54005400u)), off_hi), s89, z89);
    mma_f16_m16n8k16(o[i], h2u(a0), h2u(a1), h2u(a2), h2u(a3), pb0, pb1);
  }
}

// L2PF (launch variants 2, 3): at the start of each key group the warp asks L2 for the bytes of
// its NEXT group (gi + kWarps): the group's G rows of K and of V nibbles and its four scale / zero
// rows, 6 contiguous ranges of the pool (9 KB at G = 64, D = 128).  Why: the loop's own loads are
// issued at most one tile ahead (variant 1) or at the tile (variant 0), so a warp has ~2 KB of HBM
// reads in flight and each group start waits a full HBM round trip for its scales before the first
// MMA; with the next group on its way to L2 while this one computes (~4 tiles of work), those
// loads become L2 hits and ~9 KB per warp stay in flight without a register.  Nothing is read
// twice from HBM and the results cannot change (a prefetch writes no register).  sm_90: one
// cp.async.bulk.prefetch.L2 per range (TMA unit, one lane); earlier GPUs: prefetch.global.L2 per
// 128-byte line across the warp.  Every range lies in allocated pool memory (the group's block is
// in the block table: its tokens are < quant_lens).
__device__ __forceinline__ void prefetch_l2(const void* ptr, uint32_t bytes, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (lane == 0)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(ptr), "r"(bytes) : "memory");
#else
  for (uint32_t off = static_cast<uint32_t>(lane) * 128u; off < bytes; off += 32u * 128u)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(static_cast<const char*>(ptr) + off));
#endif
}

template <int D>
__device__ __forceinline__ void prefetch_group_l2(const CometqKv4AttnArgs& p, const int* bt, int kvh, int gi,
                                                  int lane) {
  const int G = p.G, tok0 = gi * G, phys = bt[tok0 / p.BS], in_blk = tok0 % p.BS;
  const int64_t row0 = (static_cast<int64_t>(phys) * p.H + kvh) * p.BS + in_blk;  // as the group's own loads
  const int64_t ks_off = ((static_cast<int64_t>(phys) * p.H + kvh) * (p.BS / G) + in_blk / G) * D;
  const uint32_t nib = static_cast<uint32_t>(G) * (D / 2), sc = 2u * D;  // G rows of D/2 bytes; D halves
  prefetch_l2(p.k_packed + row0 * (D / 2), nib, lane);
  prefetch_l2(p.v_packed + row0 * (D / 2), nib, lane);
  prefetch_l2(reinterpret_cast<const __half*>(p.k_scale) + ks_off, sc, lane);
  prefetch_l2(reinterpret_cast<const __half*>(p.k_zero) + ks_off, sc, lane);
  prefetch_l2(reinterpret_cast<const __half*>(p.v_scale) + row0 * (D / G), sc, lane);  // G rows x D/G halves
  prefetch_l2(reinterpret_cast<const __half*>(p.v_zero) + row0 * (D / G), sc, lane);
}

// The CTA's share of its (batch row, KV head): key groups [g_begin, g_end) of the sequence (split
// `split` of `nsplit`, contiguous ranges), and the full-precision tail when this is the last split
// (n_items = its groups + the tail).
struct CtaWork {
  int slot, lq, lt, g_begin, g_end, n_items;
  bool tail;
  __device__ __forceinline__ CtaWork(const CometqKv4AttnArgs& p, int b, int split, int nsplit) {
    slot = p.seq_ids[b];
    lq = p.quant_lens[slot];
    lt = p.tail_lens[slot];
    const int ng = (lq + p.G - 1) / p.G, per = (ng + nsplit - 1) / nsplit;
    g_begin = min(split * per, ng);
    g_end = min(g_begin + per, ng);
    tail = split == nsplit - 1 && lt > 0;
    n_items = g_end - g_begin + (tail ? 1 : 0);
  }
};

template <int QW>
__device__ __forceinline__ void load_query(const uint4 (*s_q)[32], int lane, uint32_t (&qs)[QW]) {
#pragma unroll
  for (int j = 0; j < QW; j += 4) {
    const uint4 w = s_q[j / 4][lane];
    qs[j] = w.x, qs[j + 1] = w.y, qs[j + 2] = w.z, qs[j + 3] = w.w;
  }
}

// The query of head g (this lane's B column), scaled by sm_scale * log2(e), channels t*D/4 ..,
// into shared memory by warp 0 (read back once per key group) -- in registers it pushed the
// 128-thread CTA over the 128 registers that 4 CTAs per SM allow (spills at D = 128).
template <int D, typename IO>
__device__ __forceinline__ void stage_query(const CometqKv4AttnArgs& p, uint4 (*s_q)[32], int b, int kvh, int qpk) {
  constexpr int QW = D / 8;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if (threadIdx.x >= 32) return;
  const IO* qrow = reinterpret_cast<const IO*>(p.q) + b * p.ld_qb + (kvh * qpk + g) * p.ld_qh + t * (D / 4);
#pragma unroll
  for (int j = 0; j < QW; j += 4) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = g < qpk ? Io<IO>::pair(reinterpret_cast<const uint32_t*>(qrow)[j + k]) : make_float2(0.f, 0.f);
      w[k] = h2u(__floats2half2_rn(f.x * p.qk_scale, f.y * p.qk_scale));
    }
    s_q[j / 4][lane] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// A key group's channel scales folded into the query: q' = qs * sc (the group's B operand) and
// bias = qs . z in every row (the C input of the group's tiles).  ksc / kz: the thread's D/4
// scale / zero halves (channels t*D/4 ..), as half2 words.
template <int D>
__device__ __forceinline__ void fold_group(const uint4 (*s_q)[32], int lane, const uint32_t (&ksc)[D / 8],
                                           const uint32_t (&kz)[D / 8], uint32_t (&qp)[D / 8], float (&bias)[4]) {
  constexpr int QW = D / 8;
  uint32_t qs[QW];
  load_query<QW>(s_q, lane, qs);
#pragma unroll
  for (int j = 0; j < QW; ++j) qp[j] = h2u(__hmul2(u2h(qs[j]), u2h(ksc[j])));
  bias[0] = bias[1] = bias[2] = bias[3] = 0.f;
#pragma unroll
  for (int c = 0; c < D / 16; ++c)
    mma_f16_m16n8k16(bias, kz[2 * c], kz[2 * c], kz[2 * c + 1], kz[2 * c + 1], qs[2 * c], qs[2 * c + 1]);
}

// One 16-token tile of a key group: S^T = K . q'^T (+ bias), the sequence-end mask, the online
// softmax and O^T += V^T . P^T.  ttok: sequence index of the tile's token 0.
template <int D>
__device__ __forceinline__ void attend_tile(const TileRaw<D>& cur, const uint32_t (&qp)[D / 8], const float (&bias)[4],
                                            int ttok, int lq, Softmax& sm, float (&o)[D / 16][4]) {
  // S^T over KC k-chunks in two accumulators (even / odd chunks), added at the end: two chains
  // of KC / 2 dependent MMAs instead of one of KC (D = 128: 4 x ~33 cycles of MMA latency
  // instead of 8 before the softmax can start; 4 more registers, 4 FADDs)
  float s[4] = {bias[0], bias[1], bias[2], bias[3]};
  float s_odd[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
    const int w = (2 * c) / 4, sel = (2 * c) % 4;  // bytes 2c (p = 0) and 2c + 1 (p = 1)
    mma_f16_m16n8k16((c & 1) ? s_odd : s, key_pair(cur.k[0].word(w), sel), key_pair(cur.k[1].word(w), sel),
                     key_pair(cur.k[0].word(w), sel + 1), key_pair(cur.k[1].word(w), sel + 1), qp[2 * c],
                     qp[2 * c + 1]);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) s[e] += s_odd[e];
  if (ttok + 16 > lq) {  // the sequence ends inside this tile
    const int g = (threadIdx.x & 31) >> 2;
    if (ttok + g >= lq) s[0] = s[1] = kNegInf;
    if (ttok + g + 8 >= lq) s[2] = s[3] = kNegInf;
  }
  uint32_t pb0, pb1;
  softmax_tile<D>(s, sm, o, pb0, pb1);
  pv_tile<D>(cur, o, pb0, pb1);
}

// The full-precision tail (< G tokens, IO dtype): same MMAs, operands from the values.
template <int D, typename IO>
__device__ __forceinline__ void attend_tail(const CometqKv4AttnArgs& p, const uint4 (*s_q)[32], int slot, int kvh,
                                            int lt, Softmax& sm, float (&o)[D / 16][4]) {
  constexpr int KC = D / 16, QW = D / 8;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int G = p.G;
  const IO* tk = reinterpret_cast<const IO*>(p.tail_k) + (static_cast<int64_t>(slot) * p.H + kvh) * G * D;
  const IO* tv = reinterpret_cast<const IO*>(p.tail_v) + (static_cast<int64_t>(slot) * p.H + kvh) * G * D;
  uint32_t qs[QW];
  load_query<QW>(s_q, lane, qs);
  for (int u = 0; u * 16 < lt; ++u) {
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    uint32_t kr[2][QW];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int tok = 16 * u + g + 8 * h;
#pragma unroll
      for (int j = 0; j < QW; ++j)
        kr[h][j] = tok < lt
                       ? Io<IO>::to_h2(reinterpret_cast<const uint32_t*>(tk + static_cast<int64_t>(tok) * D + t * (D / 4))[j])
                       : 0u;
    }
#pragma unroll
    for (int c = 0; c < KC; ++c)
      mma_f16_m16n8k16(s, kr[0][2 * c], kr[1][2 * c], kr[0][2 * c + 1], kr[1][2 * c + 1], qs[2 * c], qs[2 * c + 1]);
    if (16 * u + g >= lt) s[0] = s[1] = kNegInf;
    if (16 * u + g + 8 >= lt) s[2] = s[3] = kNegInf;
    uint32_t pb0, pb1;
    softmax_tile<D>(s, sm, o, pb0, pb1);
    // V^T fragment: channel pair rows (g: d = g*D/8 + 2i, g+8: d + 1) of tokens {2t, 2t+1}, {2t+8, 2t+9}
    const int tk0 = 16 * u + 2 * t;
#pragma unroll
    for (int i = 0; i < KC; ++i) {
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int tok = tk0 + (j & 1) + 8 * (j >> 1);
        w[j] = tok < lt ? reinterpret_cast<const uint32_t*>(tv + static_cast<int64_t>(tok) * D + g * (D / 8))[i] : 0u;
      }
      // (16-bit lanes move as they are; a bf16 pair is converted to fp16 after)
      mma_f16_m16n8k16(o[i], Io<IO>::to_h2(__byte_perm(w[0], w[1], 0x5410)),
                       Io<IO>::to_h2(__byte_perm(w[0], w[1], 0x7632)), Io<IO>::to_h2(__byte_perm(w[2], w[3], 0x5410)),
                       Io<IO>::to_h2(__byte_perm(w[2], w[3], 0x7632)), pb0, pb1);
    }
  }
}

// Merge the CTA's warps: full sums of P per head, then (max, sum, O) through shared memory; one
// split writes the output, more write fp32 partials.  s_o: warp w's [kHeads][D] floats at
// s_o + w * warp_stride (the ring kernel lays them over each warp's own ring).  The caller makes
// every warp's s_o area free for it first.
template <int D, typename IO>
__device__ __forceinline__ void merge_store(const CometqKv4AttnArgs& p, float* s_o, int warp_stride,
                                            float (*s_ml)[kHeads][2], Softmax& sm, const float (&o)[D / 16][4], int b,
                                            int kvh, int split, int nsplit, int qpk) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) sm.l[h] += __shfl_xor_sync(0xFFFFFFFFu, sm.l[h], off);
  if (g == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      s_ml[warp][2 * t + h][0] = sm.m[h];
      s_ml[warp][2 * t + h][1] = sm.l[h];
    }
  }
  float* mine = s_o + warp * warp_stride;
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    const int d = g * (D / 8) + 2 * i;
    mine[(2 * t) * D + d] = o[i][0];
    mine[(2 * t + 1) * D + d] = o[i][1];
    mine[(2 * t) * D + d + 1] = o[i][2];
    mine[(2 * t + 1) * D + d + 1] = o[i][3];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < qpk * D; e += kWarps * 32) {
    const int h = e / D, d = e % D;
    float mw = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mw = fmaxf(mw, s_ml[w][h][0]);
    float l = 0.f, acc = 0.f;
    if (mw != kNegInf) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(s_ml[w][h][0] - mw);  // 0 for a warp that saw nothing
        l += f * s_ml[w][h][1];
        acc += f * s_o[w * warp_stride + h * D + d];
      }
    }
    const int head = kvh * qpk + h;
    if (nsplit == 1) {
      reinterpret_cast<IO*>(p.out)[(static_cast<int64_t>(b) * p.Hq + head) * D + d] =
          Io<IO>::from(l > 0.f ? acc / l : 0.f);
    } else {
      const int64_t po = (static_cast<int64_t>(b) * p.Hq + head) * nsplit + split;
      p.part_o[po * D + d] = acc;
      if (d == 0) {
        p.part_ml[po * 2] = mw;
        p.part_ml[po * 2 + 1] = l;
      }
    }
  }
}

// PF (launch variants 1, 3): the next tile's bytes are loaded into registers while this one computes
// (20 more registers: 3 CTAs = 12 warps per SM at <= 168); variants 0, 2 load each tile when it
// starts and leave latency hiding to 4 CTAs = 16 warps per SM (<= 128 registers; with the
// prefetch at that bound it spilled).  L2PF (variants 2, 3): the next key group prefetched into L2
// (prefetch_group_l2).  Variant 4 is the shared-memory ring (kv4_attn_ring_kernel).  Which wins is
// a measurement: the "auto" mode times them all.
template <int D, typename IO, bool PF, bool L2PF>
__global__ void __launch_bounds__(kWarps * 32, PF ? 3 : 4) kv4_attn_kernel(const CometqKv4AttnArgs p) {
  constexpr int KC = D / 16;  // k-chunks of QK (and d-tiles of PV)
  constexpr int QW = D / 8;   // query / key-scale half2 per thread (channels t*D/4 ..)
  __shared__ float s_o[kWarps][kHeads][D];
  __shared__ float s_ml[kWarps][kHeads][2];
  __shared__ uint4 s_q[QW / 4][32];

  const int b = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int qpk = p.Hq / p.H, G = p.G;
  const CtaWork cw(p, b, split, nsplit);
  const int slot = cw.slot, lq = cw.lq, lt = cw.lt, g_begin = cw.g_begin, g_end = cw.g_end, n_items = cw.n_items;

  stage_query<D, IO>(p, s_q, b, kvh, qpk);
  __syncthreads();

  Softmax sm;
  sm.m[0] = sm.m[1] = kNegInf;
  sm.l[0] = sm.l[1] = 0.f;
  float o[KC][4];
#pragma unroll
  for (int i = 0; i < KC; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  const int* bt = p.block_tables + static_cast<int64_t>(slot) * p.ld_bt;
  const int vgrp = g * (D / 8) / G;  // the thread's value group (all its channels lie in it)
  for (int it = warp; it < n_items; it += kWarps) {
    const int gi = g_begin + it;
    if (gi < g_end) {
      // ---- a key group of G quantized tokens: fold its channel scales into the query
      if constexpr (L2PF) {
        if (gi + kWarps < g_end) prefetch_group_l2<D>(p, bt, kvh, gi + kWarps, lane);
      }
      const int tok0 = gi * G;
      const int phys = bt[tok0 / p.BS];
      const int in_blk = tok0 % p.BS;
      const int64_t head_row = (static_cast<int64_t>(phys) * p.H + kvh) * p.BS;  // pool row of token 0 of the block
      const int64_t ks_off = ((static_cast<int64_t>(phys) * p.H + kvh) * (p.BS / G) + in_blk / G) * D + t * (D / 4);
      uint32_t ksc[QW], kz[QW];
#pragma unroll
      for (int j = 0; j < QW; j += 4) {
        const uint4 s4 = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const __half*>(p.k_scale) + ks_off) + j / 4);
        const uint4 z4 = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const __half*>(p.k_zero) + ks_off) + j / 4);
        ksc[j] = s4.x, ksc[j + 1] = s4.y, ksc[j + 2] = s4.z, ksc[j + 3] = s4.w;
        kz[j] = z4.x, kz[j + 1] = z4.y, kz[j + 2] = z4.z, kz[j + 3] = z4.w;
      }
      const int ntile = min(G, lq - tok0 + 15) / 16;  // tiles with a valid token (lq - tok0 >= 1)
      TileRaw<D> cur, nxt;
      if constexpr (PF) load_tile<D>(p, cur, head_row + in_blk, min(16, lq - tok0), vgrp);  // under q' / bias
      uint32_t qp[QW];
      float bias[4];
      fold_group<D>(s_q, lane, ksc, kz, qp, bias);
      for (int u = 0; u < ntile; ++u) {
        const int ttok = tok0 + 16 * u;  // sequence index of the tile's token 0
        if constexpr (PF) {
          if (u + 1 < ntile) load_tile<D>(p, nxt, head_row + in_blk + 16 * (u + 1), min(16, lq - ttok - 16), vgrp);
        } else {
          load_tile<D>(p, cur, head_row + in_blk + 16 * u, min(16, lq - ttok), vgrp);
        }
        attend_tile<D>(cur, qp, bias, ttok, lq, sm, o);
        if constexpr (PF) cur = nxt;
      }
    } else {
      attend_tail<D, IO>(p, s_q, slot, kvh, lt, sm, o);
    }
  }
  merge_store<D, IO>(p, &s_o[0][0][0], kHeads * D, s_ml, sm, o, b, kvh, split, nsplit, qpk);
}

// ============================================================================
// Launch variant 4: each warp streams its tiles through a ring of RING_STAGES shared-memory slots
// ============================================================================
// Why: variants 0-3 hold at most the next tile (~2 KB) of HBM reads in flight per warp, and a warp
// waits a full round trip at the start of every key group (its key scales) and of every tile
// (variants 0, 2).  Run 10 (H200, batch 16, context 4096, G 32): 0.057 ms, ~1.5 TB/s, against
// ~0.02 ms of issue time for the same instructions (~460 per 16 tokens and warp, 16 warps per SM).
// Here each warp keeps RING_STAGES - 1 tiles (with the key scales of a group's first tile) in
// flight with cp.async (16-byte, L2-only) while it computes one: ~6 KB per warp, ~100 KB per SM
// at 4 CTAs, past the ~30 KB that Little's law asks of an H200 SM (4.8 TB/s / 132 SMs x ~0.8 us).
//
// One slot = one 16-token tile (D = 128: 3328 bytes; 4 x 4 x 3328 = 52 KB per CTA, 4 CTAs per SM
// on sm_90's 227 KB):
//
//   +0      K nibbles   16 rows x D/2 bytes (the pool's rows are contiguous: a straight copy)
//   +kV     V nibbles   16 rows x (D/2 + 16) bytes: rows padded by 16 so that the PV reads
//                       (thread g: D/16 bytes of rows 2t, 2t+1, 2t+8, 2t+9) hit 32 distinct banks
//                       (unpadded, rows 0, 2, 4, 6 all start at bank 0: 4-way conflicts)
//   +kVs    V scales    16 rows x vpg halves (vpg = D / G; area sized for G = 16)
//   +kVz    V zeros     same
//   +kKs    key scales  D halves of the tile's key group (copied with its first tile only)
//   +kKz    key zeros   D halves
//
// Each copy is one 16-byte chunk; chunks of rows past the sequence's end (a tile's n_valid) are
// zero-filled (cp.async src-size 0, or the valid prefix of a scale chunk) rather than read, so the
// compute reads exactly the zeros that load_tile writes for them (same operands, same bits as
// variant 0).  A slot is written by all 32 lanes and read by all 32, so every hand-over is a warp
// barrier: cp.async.wait_group(STAGES - 1) + __syncwarp before reading tile j, and a __syncwarp
// before reissuing the slot tile j - 1 was read from.  No CTA barrier in the loop.  The block
// table entries the issue side needs run ahead in a register per lane (one per key group of the
// warp, 32 groups per refill), so an issue never waits on a dependent global load.
constexpr int kRingStages = 4;

template <int D>
struct RingSlot {
  static constexpr int kVStride = D / 2 + 16;
  static constexpr int kV = 16 * (D / 2);
  static constexpr int kVs = kV + 16 * kVStride;
  static constexpr int kVsBytes = 16 * (D / 16) * 2;  // vpg <= D / 16 (G >= 16)
  static constexpr int kVz = kVs + kVsBytes;
  static constexpr int kKs = kVz + kVsBytes;
  static constexpr int kKz = kKs + 2 * D;
  static constexpr int kSize = kKz + 2 * D;
  static constexpr int kWarpBytes = kRingStages * kSize;
  static constexpr int kCtaBytes = kWarps * kWarpBytes;
  static_assert(kSize % 16 == 0 && kVStride % 16 == 0, "16-byte cp.async destinations");
  static_assert(kWarpBytes >= kHeads * D * 4, "a warp's merge area (s_o) lies in its own ring");
};

// Issue the cp.async copies of one tile into slot `dst`: its 16 pool rows from row0 (n_valid of
// them before the sequence's end), and with a group's first tile (ks >= 0) the group's key scales /
// zeros from half offset ks.
template <int D>
__device__ __forceinline__ void ring_issue(const CometqKv4AttnArgs& p, int64_t row0, int n_valid, int64_t ks,
                                           uint8_t* dst, int lane) {
  using L = RingSlot<D>;
  constexpr int CPR = D / 32;       // 16-byte chunks per K / V row (D/2 bytes)
  constexpr int NKV = 16 * CPR;     // chunks per tile of K (and of V)
  const int vpg = D / p.G;
  const uint8_t* kb = p.k_packed + row0 * (D / 2);
  const uint8_t* vb = p.v_packed + row0 * (D / 2);
  static_assert(NKV % 32 == 0, "whole chunks per lane");
#pragma unroll
  for (int i = 0; i < NKV / 32; ++i) {
    const int c = lane + 32 * i, r = c / CPR, pc = c % CPR;
    cp_async16_zfill(dst + 16 * c, kb + 16 * c, r < n_valid);
    cp_async16_zfill(dst + L::kV + r * L::kVStride + 16 * pc, vb + 16 * c, r < n_valid);
  }
  // value scales / zeros: 16 rows x vpg halves each = 2 vpg chunks of 8 / vpg rows
  const int nvs = 2 * vpg;
  if (lane < 2 * nvs) {
    const bool zero = lane >= nvs;
    const int c = zero ? lane - nvs : lane;
    const int valid_bytes = min(16, max(0, (n_valid * vpg - 8 * c) * 2));
    const uint8_t* src = reinterpret_cast<const uint8_t*>(zero ? p.v_zero : p.v_scale) + row0 * vpg * 2 + 16 * c;
    cp_async16_bytes(dst + (zero ? L::kVz : L::kVs) + 16 * c, src, static_cast<unsigned>(valid_bytes));
  }
  if (ks >= 0) {  // the group's key scales / zeros: D/8 chunks each (2 x D/8 <= 32 lanes)
    constexpr int NS = D / 8;
    if (lane < 2 * NS) {
      const bool zero = lane >= NS;
      const int c = zero ? lane - NS : lane;
      cp_async16(dst + (zero ? L::kKz : L::kKs) + 16 * c,
                 reinterpret_cast<const uint8_t*>(zero ? p.k_zero : p.k_scale) + ks * 2 + 16 * c);
    }
  }
}

// The thread's operands of a tile from its slot: what load_tile reads from the pool (rows past the
// sequence's end are zeros in the slot, as load_tile makes them).
template <int D>
__device__ __forceinline__ void ring_read_tile(const uint8_t* slot, TileRaw<D>& r, int vgrp, int vpg) {
  using L = RingSlot<D>;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) r.k[h].load_shared(slot + (g + 8 * h) * (D / 2) + t * (D / 8));
  const __half* vs = reinterpret_cast<const __half*>(slot + L::kVs);
  const __half* vz = reinterpret_cast<const __half*>(slot + L::kVz);
  __half sc[4], zr[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int tok = 2 * t + (j & 1) + 8 * (j >> 1);
    r.v[j].load_shared(slot + L::kV + tok * L::kVStride + g * (D / 16));
    sc[j] = vs[tok * vpg + vgrp];
    zr[j] = vz[tok * vpg + vgrp];
  }
  r.vs[0] = __halves2half2(sc[0], sc[1]);
  r.vs[1] = __halves2half2(sc[2], sc[3]);
  r.vz[0] = __halves2half2(zr[0], zr[1]);
  r.vz[1] = __halves2half2(zr[2], zr[3]);
}

// The warp's issue cursor: tile u of its key group gi = g_first + kWarps * k (ntile tiles; pool
// row of its token 0, half offset of its key scales, sequence index of its token 0: computed once
// per group), and the pool block of groups k0 .. k0 + 31 (k0 = k & ~31) in lane k - k0's register.
struct RingCursor {
  int k, u, ntile, tok0;
  int64_t row0, ks;
  int phys_lane;
};

__device__ __forceinline__ int ring_group_block(const CometqKv4AttnArgs& p, const int* bt, int g_first, int g_end,
                                                int k0, int lane) {
  const int gi = g_first + kWarps * (k0 + lane);
  return gi < g_end ? bt[gi * p.G / p.BS] : 0;
}

// (warp-uniform) Point the cursor at tile 0 of its group k (gi < g_end).
template <int D>
__device__ __forceinline__ void ring_enter_group(const CometqKv4AttnArgs& p, RingCursor& c, int g_first, int kvh,
                                                 int lq) {
  const int gi = g_first + kWarps * c.k, G = p.G;
  const int phys = __shfl_sync(0xFFFFFFFFu, c.phys_lane, c.k & 31);
  const int in_blk = (gi * G) % p.BS;
  c.u = 0;
  c.tok0 = gi * G;
  c.ntile = min(G, lq - c.tok0 + 15) / 16;
  c.row0 = (static_cast<int64_t>(phys) * p.H + kvh) * p.BS + in_blk;
  c.ks = ((static_cast<int64_t>(phys) * p.H + kvh) * (p.BS / G) + in_blk / G) * D;
}

template <int D, typename IO>
__global__ void __launch_bounds__(kWarps * 32, 4) kv4_attn_ring_kernel(const CometqKv4AttnArgs p) {
  constexpr int KC = D / 16, QW = D / 8, S = kRingStages;
  using L = RingSlot<D>;
  extern __shared__ __align__(16) uint8_t ring_smem[];
  __shared__ float s_ml[kWarps][kHeads][2];
  __shared__ uint4 s_q[QW / 4][32];

  const int b = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
  const int qpk = p.Hq / p.H, G = p.G, vpg = D / G;
  const CtaWork cw(p, b, split, nsplit);
  const int slot = cw.slot, lq = cw.lq, lt = cw.lt, g_end = cw.g_end;
  const int g_first = cw.g_begin + warp;  // the warp's groups: g_first + kWarps * k < g_end
  const int* bt = p.block_tables + static_cast<int64_t>(slot) * p.ld_bt;
  uint8_t* ring = ring_smem + warp * L::kWarpBytes;

  // block-table entries of the warp's first 32 groups (loads in flight under the query staging)
  RingCursor ic;
  ic.k = 0;
  ic.phys_lane = ring_group_block(p, bt, g_first, g_end, 0, lane);
  stage_query<D, IO>(p, s_q, b, kvh, qpk);
  bool issuing = g_first < g_end;
  if (issuing) ring_enter_group<D>(p, ic, g_first, kvh, lq);

  auto issue_next = [&](int j_slot) {  // (warp-uniform) the next tile of the cursor, if any, into slot j_slot
    if (!issuing) return;
    ring_issue<D>(p, ic.row0 + 16 * ic.u, min(16, lq - ic.tok0 - 16 * ic.u), ic.u == 0 ? ic.ks : -1,
                  ring + j_slot * L::kSize, lane);
    if (++ic.u == ic.ntile) {  // the group's tiles are issued: next group
      if ((++ic.k & 31) == 0) ic.phys_lane = ring_group_block(p, bt, g_first, g_end, ic.k, lane);
      issuing = g_first + kWarps * ic.k < g_end;
      if (issuing) ring_enter_group<D>(p, ic, g_first, kvh, lq);
    }
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    issue_next(s);
    cp_async_commit();
  }
  __syncthreads();  // s_q

  Softmax sm;
  sm.m[0] = sm.m[1] = kNegInf;
  sm.l[0] = sm.l[1] = 0.f;
  float o[KC][4];
#pragma unroll
  for (int i = 0; i < KC; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  const int vgrp = g * (D / 8) / G;
  int j = 0;  // tiles consumed by the warp
  for (int gi = g_first; gi < g_end; gi += kWarps) {
    const int tok0 = gi * G;
    const int ntile = min(G, lq - tok0 + 15) / 16;
    uint32_t qp[QW];
    float bias[4];
    for (int u = 0; u < ntile; ++u, ++j) {
      __syncwarp();  // every lane is done with slot (j - 1) % S: it takes tile j + S - 1
      issue_next((j + S - 1) % S);
      cp_async_commit();  // (an empty group once the cursor is done: the count stays uniform)
      cp_async_wait<S - 1>();
      __syncwarp();  // tile j's chunks, copied by all lanes, are visible to all
      const uint8_t* cur_slot = ring + (j % S) * L::kSize;
      if (u == 0) {
        uint32_t ksc[QW], kz[QW];
        const uint4* ks4 = reinterpret_cast<const uint4*>(cur_slot + L::kKs) + (threadIdx.x & 3) * (D / 32);
        const uint4* kz4 = reinterpret_cast<const uint4*>(cur_slot + L::kKz) + (threadIdx.x & 3) * (D / 32);
#pragma unroll
        for (int w = 0; w < QW; w += 4) {
          const uint4 s4 = ks4[w / 4], z4 = kz4[w / 4];
          ksc[w] = s4.x, ksc[w + 1] = s4.y, ksc[w + 2] = s4.z, ksc[w + 3] = s4.w;
          kz[w] = z4.x, kz[w + 1] = z4.y, kz[w + 2] = z4.z, kz[w + 3] = z4.w;
        }
        fold_group<D>(s_q, lane, ksc, kz, qp, bias);
      }
      TileRaw<D> cur;
      ring_read_tile<D>(cur_slot, cur, vgrp, vpg);
      attend_tile<D>(cur, qp, bias, tok0 + 16 * u, lq, sm, o);
    }
  }
  cp_async_wait<0>();
  __syncwarp();  // the ring is idle: the warp's merge area (inside its ring) is free
  if (cw.tail && (cw.n_items - 1) % kWarps == warp) attend_tail<D, IO>(p, s_q, slot, kvh, lt, sm, o);
  merge_store<D, IO>(p, reinterpret_cast<float*>(ring_smem), L::kWarpBytes / 4, s_ml, sm, o, b, kvh, split, nsplit,
                     qpk);
}

// out[b, h] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s   (M = max_s m_s)
template <typename IO>
__global__ void kv4_attn_reduce_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                       int nsplit, int D, IO* __restrict__ out) {
  const int64_t bh = blockIdx.x;  // b * Hq + h
  const float* ml = part_ml + bh * nsplit * 2;
  float mw = kNegInf;
  for (int s = 0; s < nsplit; ++s) mw = fmaxf(mw, ml[2 * s]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float l = 0.f, acc = 0.f;
    if (mw != kNegInf) {
      for (int s = 0; s < nsplit; ++s) {
        const float f = exp2f(ml[2 * s] - mw);
        l += f * ml[2 * s + 1];
        acc += f * part_o[(bh * nsplit + s) * D + d];
      }
    }
    out[bh * D + d] = Io<IO>::from(l > 0.f ? acc / l : 0.f);
  }
}

template <int D, typename IO>
cudaError_t launch(const CometqKv4AttnArgs& a, cudaStream_t stream) {
  const dim3 grid(a.B, a.H, a.splits);
  switch (a.variant) {  // 0-3: bit 0 next tile in registers (PF), bit 1 next key group into L2 (L2PF); 4: ring
    case 0: kv4_attn_kernel<D, IO, false, false><<<grid, kWarps * 32, 0, stream>>>(a); break;
    case 1: kv4_attn_kernel<D, IO, true, false><<<grid, kWarps * 32, 0, stream>>>(a); break;
    case 2: kv4_attn_kernel<D, IO, false, true><<<grid, kWarps * 32, 0, stream>>>(a); break;
    case 3: kv4_attn_kernel<D, IO, true, true><<<grid, kWarps * 32, 0, stream>>>(a); break;
    default: {  // 4: the shared-memory ring (dynamic shared memory past the 48 KB default at D = 128)
      auto kernel = kv4_attn_ring_kernel<D, IO>;
      constexpr int smem = RingSlot<D>::kCtaBytes;
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      // (all shared memory, no L1 preference: the kernel reads nothing twice through L1)
      if (err == cudaSuccess)
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                   static_cast<int>(cudaSharedmemCarveoutMaxShared));
      if (err != cudaSuccess) return err;
      kernel<<<grid, kWarps * 32, smem, stream>>>(a);
    }
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.splits == 1) return err;
  kv4_attn_reduce_kernel<IO><<<a.B * a.Hq, D, 0, stream>>>(a.part_o, a.part_ml, a.splits, D,
                                                           reinterpret_cast<IO*>(a.out));
  return cudaGetLastError();
}

}  // namespace
}  // namespace cometq

extern "C" int cometq_kv4_attention_supported(int head_dim, int group_size, int qpk) {
  // D = 64 or 128; key groups whole 16-token tiles; a thread's D/8 value channels in one group
  return (head_dim == 64 || head_dim == 128) && group_size >= 16 && group_size % 16 == 0 &&
         head_dim % group_size == 0 && qpk >= 1 && qpk <= cometq::kHeads;
}

extern "C" cudaError_t cometq_kv4_decode_attention(const CometqKv4AttnArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const CometqKv4AttnArgs& a = *args;
  if (a.B == 0) return cudaSuccess;  // nothing to attend
  if (!a.q || !a.k_packed || !a.v_packed || !a.k_scale || !a.k_zero || !a.v_scale || !a.v_zero || !a.tail_k ||
      !a.tail_v || !a.block_tables || !a.quant_lens || !a.tail_lens || !a.seq_ids || !a.out)
    return cudaErrorInvalidValue;
  if (a.B < 0 || a.B > 65535 || a.H > 65535 || a.H <= 0 || a.Hq % a.H != 0 || a.splits < 1 || a.BS % a.G != 0 ||
      !cometq_kv4_attention_supported(a.D, a.G, a.Hq / a.H) || (a.splits > 1 && (!a.part_o || !a.part_ml)) ||
      (a.io_dtype != COMETQ_DTYPE_F16 && a.io_dtype != COMETQ_DTYPE_BF16) || a.variant < 0 || a.variant > 4)
    return cudaErrorInvalidValue;
  if (a.io_dtype == COMETQ_DTYPE_F16)
    return a.D == 64 ? cometq::launch<64, __half>(a, stream) : cometq::launch<128, __half>(a, stream);
  if (a.io_dtype == COMETQ_DTYPE_BF16)
    return a.D == 64 ? cometq::launch<64, __nv_bfloat16>(a, stream) : cometq::launch<128, __nv_bfloat16>(a, stream);
  return cudaErrorInvalidValue;
}
