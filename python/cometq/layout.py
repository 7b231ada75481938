"""The cometq number formats: the one module that owns packing and permutations.

Everything that reads or writes a quantized tensor (the reference ops, the Triton
and CUDA kernels, checkpoint conversion, tests) goes through the constants and
functions here.  ``docs/FORMAT.md`` is the prose version of this module; when
the two disagree, this module is right and the doc is a bug.

Summary (see docs/FORMAT.md for drawings):

* INT4 values are two's-complement signed nibbles in [-8, 7].  Two values pack
  into one ``uint8`` byte, the **even** index in the **low** nibble::

      byte[i] = (q[2i] & 0xF) | ((q[2i+1] & 0xF) << 4)

  Unsigned 4-bit (KV4) uses the same byte order with values in [0, 15].
* The activation K axis is cut into blocks of ``BLOCK_K = 128`` channels.  K that
  is not a multiple of 128 is zero-padded at the end to ``K_pad``; weights get
  the same zero columns, so padding never changes a dot product.
* An FMPQ layer owns an :class:`ActivationLayout`: a channel permutation ``perm``
  (``x_perm[:, j] = x[:, perm[j]]``) and a per-block precision map
  ``block_bits`` (4 or 8 per block of the *permuted, padded* K axis).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

__all__ = [
    "BLOCK_K",
    "INT4_MIN",
    "INT4_MAX",
    "INT4_QMAX",
    "INT8_QMAX",
    "UINT4_MAX",
    "SCALE_MODES",
    "padded_k",
    "num_blocks",
    "pad_last_dim",
    "pack_int4",
    "unpack_int4",
    "pack_uint4",
    "unpack_uint4",
    "split_activation_rows",
    "half_split_blocks",
    "weights_block_major",
    "FP8_INT_MIN",
    "FP8_INT_MAX",
    "fp8_e4m3_int_codes",
    "fp8_block_sources",
    "ActivationLayout",
    "check_tensor",
]

#: Channels per activation block.  One block is quantized with one precision
#: (INT4 or INT8) and, in "block" scale mode, one scale per token.
BLOCK_K = 128
#: Range of a stored signed INT4 value (two's complement nibble).
INT4_MIN, INT4_MAX = -8, 7
#: Largest magnitude the symmetric quantizers produce.  -8 is never produced so
#: the grid is symmetric; kernels must still accept -8 in weights (other
#: producers, e.g. checkpoint converters, may use it).
INT4_QMAX = 7
INT8_QMAX = 127
#: Largest unsigned 4-bit value (KV4).
UINT4_MAX = 15

#: Activation scale granularities: one scale per token per 128-channel block,
#: or one scale per token per precision class (all INT4 blocks share one, all
#: INT8 blocks another).
SCALE_MODES = ("block", "class")


# --------------------------------------------------------------------------
# validation helpers (shared by every public function of the package)
# --------------------------------------------------------------------------
def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d) for d in dtypes)


def canonical_device(device) -> torch.device:
    """``torch.device(device)`` with the CUDA index filled in (``"cuda"`` -> ``cuda:<current>``),
    so a pool built with ``device="cuda"`` compares equal to the ``cuda:0`` of its tensors."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    ndim: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Validate a tensor argument; raise TypeError/ValueError naming it.

    ``assert`` is not input validation: every public op calls this.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(
            f"{name} must have dtype in ({_fmt_dtypes(dtypes)}), got {t.dtype} "
            f"(shape {tuple(t.shape)})"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and canonical_device(t.device) != canonical_device(device):
        raise ValueError(
            f"{name} is on {t.device} but must be on {device} (shape {tuple(t.shape)})"
        )
    return t


def _check_int(name: str, v, *, minimum: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


# --------------------------------------------------------------------------
# K padding
# --------------------------------------------------------------------------
def padded_k(k: int, block: int = BLOCK_K) -> int:
    """K rounded up to a multiple of ``block`` (the stored width of every row)."""
    _check_int("k", k, minimum=1)
    _check_int("block", block, minimum=1)
    return ((k + block - 1) // block) * block


def num_blocks(k: int, block: int = BLOCK_K) -> int:
    """Number of ``block``-channel blocks covering ``k`` channels."""
    return padded_k(k, block) // block


def pad_last_dim(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x`` to ``size`` (no copy if already that size)."""
    check_tensor("x", x)
    k = x.shape[-1]
    if size < k:
        raise ValueError(f"cannot pad last dim of shape {tuple(x.shape)} down to {size}")
    if size == k:
        return x
    return torch.nn.functional.pad(x, (0, size - k))


# --------------------------------------------------------------------------
# 4-bit packing
# --------------------------------------------------------------------------
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed INT4 values ``[..., K]`` (K even, values in [-8, 7]) into ``uint8 [..., K/2]``.

    Even index -> low nibble, odd index -> high nibble; nibbles are two's complement.
    """
    check_tensor("q", q, dtypes=_INT_DTYPES)
    if q.dim() == 0 or q.shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(
            f"pack_int4 values must lie in [{INT4_MIN}, {INT4_MAX}], got range "
            f"[{int(q.min())}, {int(q.max())}] (shape {tuple(q.shape)})"
        )
    n = q.to(torch.int16) & 0xF
    lo, hi = n[..., 0::2], n[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [..., K/2]`` -> ``int8 [..., K]`` in [-8, 7]."""
    check_tensor("packed", p, dtypes=(torch.uint8,))
    if p.dim() == 0:
        raise ValueError("unpack_int4 needs at least 1-D input, got a scalar")
    b = p.to(torch.int16)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    # sign-extend a nibble: values >= 8 are negative
    lo = lo - ((lo & 0x8) << 1)
    hi = hi - ((hi & 0x8) << 1)
    out = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return out.to(torch.int8)


def pack_uint4(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values ``[..., K]`` (K even, values in [0, 15]) into ``uint8 [..., K/2]``."""
    check_tensor("q", q, dtypes=_INT_DTYPES)
    if q.dim() == 0 or q.shape[-1] % 2 != 0:
        raise ValueError(f"pack_uint4 needs an even last dimension, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > UINT4_MAX):
        raise ValueError(
            f"pack_uint4 values must lie in [0, {UINT4_MAX}], got range "
            f"[{int(q.min())}, {int(q.max())}] (shape {tuple(q.shape)})"
        )
    n = q.to(torch.int16)
    return (n[..., 0::2] | (n[..., 1::2] << 4)).to(torch.uint8)


def unpack_uint4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_uint4`: ``uint8 [..., K/2]`` -> ``uint8 [..., K]`` in [0, 15]."""
    check_tensor("packed", p, dtypes=(torch.uint8,))
    if p.dim() == 0:
        raise ValueError("unpack_uint4 needs at least 1-D input, got a scalar")
    lo = p & 0xF
    hi = p >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def weights_block_major(qweight: torch.Tensor) -> torch.Tensor:
    """Packed INT4 weights ``uint8 [N, K_pad/2]`` re-stored **block-major** (an alternative
    *storage* of the same values, for the Triton kernels; experimental until measured):

        storage [NB, N, 64]: block b of weight row n at byte (b * N + n) * 64

    returned as the ``[N, NB, 64]`` view of that storage (strides ``(64, N*64, 1)``), so
    ``view[n, b, j] == qweight[n, b*64 + j]``.  Why: a GEMM tile of ``BN`` rows reads, per
    128-channel block, ``BN`` 64-byte pieces 2*K apart in the row-major format (scattered DRAM
    bursts), one contiguous ``BN * 64``-byte run in this one.  ``w4ax_gemm_triton`` accepts
    either form."""
    check_tensor("qweight", qweight, dtypes=(torch.uint8,), ndim=2)
    n, half = qweight.shape
    if half % (BLOCK_K // 2):
        raise ValueError(f"qweight shape {tuple(qweight.shape)}: K_pad/2 must be a multiple of {BLOCK_K // 2}")
    return qweight.reshape(n, half // (BLOCK_K // 2), BLOCK_K // 2).transpose(0, 1).contiguous().transpose(0, 1)


def split_activation_rows(q4: torch.Tensor, q8: torch.Tensor) -> torch.Tensor:
    """The *split-row* form of a quantized activation (the Hopper TMA GEMM's operand, derived
    from ``q4``/``q8`` per call; never stored)::

        out[m, i*128 : i*128 + 64]       = even channels of list position i   (int8 values)
        out[m, i*128 + 64 : (i+1)*128]   = odd channels of list position i

    List positions put the INT8 blocks first: position ``i < n8`` is q8 slot ``i``, position
    ``n8 + j`` is q4 slot ``j`` (unpacked to int8, values in [-8, 7]).  Even / odd halves are
    exactly the low / high nibbles of a packed INT4 byte row (and of the packed weights), so
    the GEMM multiplies ``w_lo . a_even + w_hi . a_odd`` with both activation halves straight
    from the copy engine: no unpacking in the GEMM loop, which runs it once per weight-row
    tile (N / BLOCK_N times per token tile) -- the repack runs it once.

    ``q4`` uint8 ``[M, n4 * 64]``, ``q8`` int8 ``[M, n8 * 128]`` -> int8 ``[M, (n8 + n4) * 128]``."""
    check_tensor("q4", q4, dtypes=(torch.uint8,), ndim=2)
    check_tensor("q8", q8, dtypes=(torch.int8,), ndim=2)
    if q4.shape[0] != q8.shape[0] or q4.shape[1] % (BLOCK_K // 2) or q8.shape[1] % BLOCK_K:
        raise ValueError(f"q4 {tuple(q4.shape)} / q8 {tuple(q8.shape)} are not [M, n4*64] / [M, n8*128] "
                         "of one activation")
    m = q4.shape[0]
    parts = []
    for vals in (q8, unpack_int4(q4)):
        if vals.shape[1]:
            v = vals.reshape(m, -1, BLOCK_K)
            parts.append(torch.cat([v[..., 0::2], v[..., 1::2]], dim=-1).reshape(m, -1))
    if not parts:
        return torch.empty(m, 0, dtype=torch.int8, device=q4.device)
    return torch.cat(parts, dim=1).contiguous()


def half_split_blocks(v: torch.Tensor) -> torch.Tensor:
    """The K order of the 16-bit routes' operands (the dequant and w16 GEMMs,
    ``cometq.kernels.dequant_gemm``): within every 128-channel block the 64 even channels
    first, then the 64 odd ones -- the order the packed nibbles give for free (low nibble =
    even channel), applied alike to both operands of the product, so it changes no dot
    product::

        out[..., b*128 + j]      = v[..., b*128 + 2j]         j < 64
        out[..., b*128 + 64 + j] = v[..., b*128 + 2j + 1]

    ``v [..., K_pad]`` (K_pad a multiple of 128) -> a new tensor of the same shape and dtype."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() < 1 or v.shape[-1] % BLOCK_K:
        raise ValueError(f"v must have a last dim that is a multiple of {BLOCK_K}, got shape {tuple(v.shape)}")
    lead = v.shape[:-1]
    nb = v.shape[-1] // BLOCK_K
    return v.reshape(*lead, nb, BLOCK_K // 2, 2).transpose(-1, -2).reshape(v.shape).contiguous()


# --------------------------------------------------------------------------
# the FP8 block form: W4Ax integers as e4m3 operands of a 1x128 block-scaled GEMM
# --------------------------------------------------------------------------
#: Integers the FP8 block form stores: every integer in this range is exact in e4m3 (3 mantissa
#: bits hold 8..15 exactly; 16 is a power of two).
FP8_INT_MIN, FP8_INT_MAX = -8, 16


def fp8_e4m3_int_codes(device=None) -> torch.Tensor:
    """uint8 ``[25]``: the ``torch.float8_e4m3fn`` byte of every integer ``v`` in
    ``[FP8_INT_MIN, FP8_INT_MAX]`` at index ``v - FP8_INT_MIN`` (the kernels' lookup table)."""
    v = torch.arange(FP8_INT_MIN, FP8_INT_MAX + 1, dtype=torch.float32)
    return v.to(torch.float8_e4m3fn).view(torch.uint8).to(device)


def fp8_block_sources(block_bits: torch.Tensor) -> torch.Tensor:
    """int32 ``[nb + n8]``: which 128-channel block of the permuted K axis each block of the
    **FP8 block form** holds -- the operands of the large-M FP8 route (``cometq.kernels.fp8_gemm``):
    the INT4 / INT8 integers of both W4Ax operands written as e4m3 values, multiplied by a GEMM
    that scales every (token, block) and (row, block) pair itself (1x128 x 1x128 block scaling:
    ``y = sum_j sa[m, j] * sb[n, j] * (A8[m, block j] . W8[n, block j])``).  Every product and
    every block sum of those integers is exact in FP8 tensor-core arithmetic, so the result is
    the W4Ax reference's up to the fp32 rounding of the scaled sums.

    INT4 values (-8..7) are e4m3 as they are; an INT8 value ``q`` (-127..127) is not, so its
    block is stored twice, as the two exact digits ``q = 16 * hi + lo``::

        FP8 block j < nb:        block j:  INT4 q  (scale sa)      | INT8 hi = q >> 4 (-8..7, scale 16 sa)
        FP8 block nb + i:        INT8 block int8_blocks[i]: lo = q & 15 (0..15, scale sa)
        weights:                 FP8 block j holds weight block sources[j] (INT8 blocks twice)

    (within a block, the half-split order of :func:`half_split_blocks` in both operands).  The
    cost: K grows by the INT8 blocks' share (12.5 % INT8 -> 1.125 K)."""
    check_tensor("block_bits", block_bits, dtypes=_INT_DTYPES, ndim=1)
    nb = block_bits.numel()
    idx = torch.arange(nb, dtype=torch.int32, device=block_bits.device)
    return torch.cat([idx, idx[block_bits == 8]])


# --------------------------------------------------------------------------
# FMPQ activation layout
# --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ActivationLayout:
    """Channel permutation + block precision map of one FMPQ layer.

    ``perm`` (int64 ``[K]``) is a permutation of ``range(K)``: the quantizer reads
    ``x_perm[:, j] = x[:, perm[j]]``, zero-pads to ``K_pad`` and cuts 128-channel
    blocks.  ``block_bits`` (int32 ``[K_pad/128]``) holds 4 or 8 per block.

    Calibration puts INT8 blocks first (largest channels first), but the format
    allows any pattern; kernels must handle all of them.

    ``int4_clip`` (a float in (0, 1], default 1.0, rounded to float32) shrinks the scale of
    every INT4 block: ``scale = (absmax * int4_clip) / 7`` (fp32 multiply, then an
    IEEE division), values beyond the clipped range saturate at +-7.  INT8 blocks
    are never clipped (they hold the outliers).  Calibration picks it per layer
    (``cometq.calibrate.search_act_clip``); 1.0 reproduces plain absmax scaling
    bit for bit.
    """

    perm: torch.Tensor
    block_bits: torch.Tensor
    int4_clip: float = 1.0

    def __post_init__(self):
        check_tensor("perm", self.perm, dtypes=(torch.int64, torch.int32), ndim=1)
        check_tensor("block_bits", self.block_bits, dtypes=_INT_DTYPES, ndim=1)
        k = self.perm.numel()
        if k == 0:
            raise ValueError("perm must not be empty")
        nb = num_blocks(k)
        if self.block_bits.numel() != nb:
            raise ValueError(
                f"block_bits has {self.block_bits.numel()} entries but K={k} needs "
                f"{nb} blocks of {BLOCK_K} (shape {tuple(self.block_bits.shape)})"
            )
        bad = ~((self.block_bits == 4) | (self.block_bits == 8))
        if bool(bad.any()):
            idx = int(bad.nonzero()[0])
            raise ValueError(
                f"block_bits must hold only 4 or 8, got {int(self.block_bits[idx])} at block {idx}"
            )
        seen = torch.zeros(k, dtype=torch.bool, device=self.perm.device)
        p = self.perm.long()
        if int(p.min()) < 0 or int(p.max()) >= k:
            raise ValueError(f"perm values must lie in [0, {k}), got range [{int(p.min())}, {int(p.max())}]")
        seen[p] = True
        if not bool(seen.all()):
            raise ValueError(f"perm is not a permutation of range({k}): channel {int((~seen).nonzero()[0])} missing")
        if isinstance(self.int4_clip, bool) or not isinstance(self.int4_clip, (int, float)):
            raise TypeError(f"int4_clip must be a float, got {self.int4_clip!r}")
        if not (0.0 < float(self.int4_clip) <= 1.0):
            raise ValueError(f"int4_clip must be in (0, 1], got {self.int4_clip!r}")
        # rounded to float32 once: kernels take it as an fp32 argument and W4AxLinear
        # stores it in a float32 buffer, so every path multiplies by the same number
        object.__setattr__(self, "int4_clip", float(torch.tensor(float(self.int4_clip), dtype=torch.float32)))
        object.__setattr__(self, "perm", p)
        object.__setattr__(self, "block_bits", self.block_bits.to(torch.int32))
        # Python ints cached once: kernels' launch grids and fake (meta) shapes
        # need them without reading tensor data (torch.compile cannot).
        object.__setattr__(self, "_n_int8", int((self.block_bits == 8).sum()))
        object.__setattr__(self, "_identity", bool(torch.equal(p, torch.arange(k, device=p.device))))

    # --- constructors ----------------------------------------------------
    @classmethod
    def identity(cls, k: int, bits: int = 4, device=None) -> "ActivationLayout":
        """No permutation; every block at ``bits`` (4: pure W4A4, 8: pure W4A8)."""
        _check_int("k", k, minimum=1)
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        return cls(
            torch.arange(k, device=device),
            torch.full((num_blocks(k),), bits, dtype=torch.int32, device=device),
        )

    @classmethod
    def from_block_bits(cls, k: int, bits: Sequence[int], perm: Optional[torch.Tensor] = None, device=None):
        """A layout with the given per-block precisions (identity permutation unless given)."""
        p = torch.arange(k, device=device) if perm is None else perm
        return cls(p, torch.as_tensor(list(bits), dtype=torch.int32, device=p.device))

    # --- derived quantities --------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.perm.numel()

    @property
    def k_pad(self) -> int:
        return padded_k(self.in_features)

    @property
    def n_blocks(self) -> int:
        return self.block_bits.numel()

    @property
    def int8_blocks(self) -> torch.Tensor:
        """Indices (int64) of INT8 blocks, ascending: their order in the ``q8`` buffer."""
        return (self.block_bits == 8).nonzero().flatten()

    @property
    def int4_blocks(self) -> torch.Tensor:
        """Indices (int64) of INT4 blocks, ascending: their order in the ``q4`` buffer."""
        return (self.block_bits == 4).nonzero().flatten()

    @property
    def n_int8(self) -> int:
        return self._n_int8

    @property
    def n_int4(self) -> int:
        return self.n_blocks - self.n_int8

    @property
    def int8_fraction(self) -> float:
        return self.n_int8 / self.n_blocks

    def class_slot(self) -> torch.Tensor:
        """int32 ``[n_blocks]``: position of each block inside its class buffer.

        Block ``b`` lives at ``q8[:, slot[b]*128 : (slot[b]+1)*128]`` if INT8, else at
        ``q4[:, slot[b]*64 : (slot[b]+1)*64]``.  This is the table kernels index with.
        """
        is8 = (self.block_bits == 8).to(torch.int32)
        c8 = torch.cumsum(is8, 0) - is8
        c4 = torch.cumsum(1 - is8, 0) - (1 - is8)
        return torch.where(is8.bool(), c8, c4).to(torch.int32)

    @property
    def is_identity_perm(self) -> bool:
        return self._identity

    def inverse_perm(self) -> torch.Tensor:
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.in_features, device=self.perm.device)
        return inv

    def to(self, device) -> "ActivationLayout":
        return ActivationLayout(self.perm.to(device), self.block_bits.to(device), self.int4_clip)

    def with_clip(self, int4_clip: float) -> "ActivationLayout":
        """The same permutation and block map with another INT4 clip ratio."""
        return ActivationLayout(self.perm, self.block_bits, int4_clip)

    def permute_columns(self, w: torch.Tensor) -> torch.Tensor:
        """Fold the permutation into a weight ``[N, K]``: column j of the result is column perm[j]."""
        check_tensor("weight", w, ndim=2)
        if w.shape[1] != self.in_features:
            raise ValueError(
                f"weight has {w.shape[1]} input features but the layout has K={self.in_features} "
                f"(weight shape {tuple(w.shape)})"
            )
        return w[:, self.perm.to(w.device)]

    def __repr__(self) -> str:
        bits = "".join("8" if b == 8 else "4" for b in self.block_bits.tolist())
        return (
            f"ActivationLayout(K={self.in_features}, K_pad={self.k_pad}, blocks={bits}, "
            f"int8={self.n_int8}/{self.n_blocks}, identity_perm={self.is_identity_perm}, int4_clip={self.int4_clip:g})"
        )
