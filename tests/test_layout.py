"""The format spec (cometq.layout): packing, padding, activation layouts."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cometq import layout as L


# ---------------------------------------------------------------- packing
@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    half=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_int4_pack_roundtrip_exact(rows, half, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(L.INT4_MIN, L.INT4_MAX + 1, (rows, 2 * half), generator=g, dtype=torch.int8)
    p = L.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (rows, half)
    assert torch.equal(L.unpack_int4(p), q)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=200))
def test_int4_unpack_pack_roundtrip_every_byte(data):
    p = torch.tensor(list(data), dtype=torch.uint8)
    assert torch.equal(L.pack_int4(L.unpack_int4(p)), p)


@settings(max_examples=60, deadline=None)
@given(half=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_uint4_pack_roundtrip_exact(half, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, L.UINT4_MAX + 1, (3, 2 * half), generator=g, dtype=torch.uint8)
    assert torch.equal(L.unpack_uint4(L.pack_uint4(q)), q)
    assert torch.equal(L.pack_uint4(L.unpack_uint4(L.pack_uint4(q))), L.pack_uint4(q))


def test_int4_nibble_order_and_sign_convention():
    # even index -> low nibble, two's complement: [-1, 2] -> 0x2F ; [7, -8] -> 0x87
    q = torch.tensor([[-1, 2, 7, -8]], dtype=torch.int8)
    assert L.pack_int4(q).tolist() == [[0x2F, 0x87]]
    assert L.unpack_int4(torch.tensor([0x2F, 0x87], dtype=torch.uint8)).tolist() == [-1, 2, 7, -8]


def test_uint4_nibble_order():
    assert L.pack_uint4(torch.tensor([1, 15, 0, 9])).tolist() == [0xF1, 0x90]


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (torch.tensor([0, 8], dtype=torch.int8), ValueError, r"\[-8, 7\]"),
        (torch.tensor([-9, 0], dtype=torch.int16), ValueError, r"\[-9, 0\]"),
        (torch.tensor([1, 2, 3], dtype=torch.int8), ValueError, r"even last dimension.*\(3,\)"),
        (torch.tensor([0.0, 1.0]), TypeError, "dtype"),
        ([1, 2], TypeError, "torch.Tensor"),
    ],
)
def test_pack_int4_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        L.pack_int4(bad)


def test_unpack_errors():
    with pytest.raises(TypeError, match="uint8"):
        L.unpack_int4(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        L.pack_uint4(torch.tensor([3, 16]))


# ---------------------------------------------------------------- padding
@pytest.mark.parametrize("k, kp, nb", [(1, 128, 1), (128, 128, 1), (129, 256, 2), (576, 640, 5), (4096, 4096, 32)])
def test_padded_k(k, kp, nb):
    assert L.padded_k(k) == kp and L.num_blocks(k) == nb


def test_padded_k_errors():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        L.padded_k(0)
    with pytest.raises(TypeError, match="k must be an int"):
        L.padded_k(12.0)


def test_pad_last_dim():
    x = torch.randn(3, 5)
    y = L.pad_last_dim(x, 8)
    assert y.shape == (3, 8) and torch.equal(y[:, :5], x) and not y[:, 5:].any()
    assert L.pad_last_dim(x, 5) is x
    with pytest.raises(ValueError, match=r"\(3, 5\) down to 4"):
        L.pad_last_dim(x, 4)


# ---------------------------------------------------------------- activation layout
def test_identity_layout():
    lay = L.ActivationLayout.identity(576, bits=8)
    assert lay.n_blocks == 5 and lay.n_int8 == 5 and lay.n_int4 == 0 and lay.k_pad == 640
    assert lay.is_identity_perm and lay.int8_fraction == 1.0


def test_class_slot_alternating():
    lay = L.ActivationLayout.from_block_bits(128 * 5, [8, 4, 8, 4, 4])
    assert lay.int8_blocks.tolist() == [0, 2] and lay.int4_blocks.tolist() == [1, 3, 4]
    assert lay.class_slot().tolist() == [0, 0, 1, 1, 2]


def test_permute_columns_and_inverse():
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(300, generator=g)
    lay = L.ActivationLayout(perm, torch.tensor([4, 8, 4]))
    w = torch.randn(7, 300, generator=g)
    x = torch.randn(2, 300, generator=g)
    wp = lay.permute_columns(w)
    assert torch.allclose(x[:, perm] @ wp.T, x @ w.T, atol=1e-5)
    assert torch.equal(perm[lay.inverse_perm()], torch.arange(300))
    assert not lay.is_identity_perm


@pytest.mark.parametrize(
    "perm, bits, match",
    [
        (torch.tensor([0, 0, 1]), [4], "not a permutation of range\\(3\\): channel 2 missing"),
        (torch.tensor([0, 5, 1]), [4], "perm values must lie in \\[0, 3\\)"),
        (torch.arange(3), [4, 4], "block_bits has 2 entries but K=3 needs 1 blocks"),
        (torch.arange(3), [6], "only 4 or 8, got 6 at block 0"),
        (torch.arange(0), [], "perm must not be empty"),
    ],
)
def test_layout_errors(perm, bits, match):
    with pytest.raises(ValueError, match=match):
        L.ActivationLayout(perm, torch.tensor(bits, dtype=torch.int32))


def test_layout_type_errors():
    with pytest.raises(TypeError, match="perm must have dtype"):
        L.ActivationLayout(torch.arange(3).float(), torch.tensor([4]))
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 2"):
        L.ActivationLayout.identity(10, bits=2)
    lay = L.ActivationLayout.identity(10)
    with pytest.raises(ValueError, match=r"11 input features but the layout has K=10 \(weight shape \(2, 11\)\)"):
        lay.permute_columns(torch.randn(2, 11))


def test_split_activation_rows_spec():
    """Split rows: INT8 slots first, then INT4 slots; each 128-channel slot as [even | odd]."""
    q8 = torch.arange(128, dtype=torch.int16).sub(64).to(torch.int8)[None]  # one INT8 slot: values -64..63
    vals4 = torch.tensor([(i % 16) - 8 for i in range(128)], dtype=torch.int8)[None]
    q4 = L.pack_int4(vals4)
    out = L.split_activation_rows(q4, q8)
    assert out.shape == (1, 256) and out.dtype == torch.int8
    assert torch.equal(out[0, :64], q8[0, 0::2]) and torch.equal(out[0, 64:128], q8[0, 1::2])
    assert torch.equal(out[0, 128:192], vals4[0, 0::2]) and torch.equal(out[0, 192:], vals4[0, 1::2])
    # either side may be empty (pure W4A4 / W4A8 layers)
    assert torch.equal(L.split_activation_rows(q4, q8[:, :0]), out[:, 128:])
    assert torch.equal(L.split_activation_rows(q4[:, :0], q8), out[:, :128])
    with pytest.raises(ValueError, match="are not"):
        L.split_activation_rows(q4[:, :10], q8)
    with pytest.raises(TypeError, match="q8"):
        L.split_activation_rows(q4, q8.to(torch.int16))


def test_weights_block_major():
    """Block-major storage of packed weights: same values, block b of row n at (b * N + n) * 64."""
    g = torch.Generator().manual_seed(3)
    w = torch.randint(0, 256, (5, 3 * 64), generator=g).to(torch.uint8)
    bm = L.weights_block_major(w)
    assert bm.shape == (5, 3, 64) and bm.stride() == (64, 5 * 64, 1)
    assert torch.equal(bm.reshape(5, -1), w)
    flat = torch.as_strided(bm, (3 * 5 * 64,), (1,))  # the storage, in order
    for n, b in ((0, 0), (4, 1), (2, 2)):
        assert torch.equal(flat[(b * 5 + n) * 64:(b * 5 + n + 1) * 64], w[n, b * 64:(b + 1) * 64])
    with pytest.raises(ValueError, match="multiple of 64"):
        L.weights_block_major(w[:, :100])
