"""KV4 quantization: reference round trip, error bounds, and the Triton quantize-and-append kernel."""
import pytest
import torch

from cometq import ops
from cometq.paged import kv4_quantize_append_reference, pool_scale_shape
from cometq.reference import KV4Tensor, dequantize_kv4, quantize_kv4
from cometq.testing import KV4_FP16_SLACK


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x += 3.0 * torch.randn(shape[-1], generator=g)  # per-channel offsets, like real keys
    return x.to(dtype)


def _group_view(x, g, axis):
    *lead, t, d = x.shape
    if axis == "token":
        return x.reshape(*lead, t, d // g, g), -1
    return x.reshape(*lead, t // g, g, d), -2


@pytest.mark.parametrize("axis,g,dtype", [(a, g, torch.float32) for a in ("token", "channel") for g in (16, 32, 64)]
                         + [(a, 32, dt) for a in ("token", "channel") for dt in (torch.float16, torch.bfloat16)])
def test_roundtrip_error_within_half_step(axis, g, dtype):
    x = _rand(2, 3, 128, 64, seed=g, dtype=dtype)
    kv = quantize_kv4(x, g, axis)
    assert kv.shape == tuple(x.shape)
    assert kv.packed.shape == (2, 3, 128, 32) and kv.packed.dtype == torch.uint8
    want = (2, 3, 128, 64 // g) if axis == "token" else (2, 3, 128 // g, 64)
    assert tuple(kv.scale.shape) == want and tuple(kv.zero.shape) == want
    y = dequantize_kv4(kv, torch.float32)
    assert y.shape == x.shape
    xv, red = _group_view(x.float(), g, axis)
    err, _ = _group_view((y - x.float()).abs(), g, axis)
    step = kv.scale.float().unsqueeze(red)
    mag = torch.maximum(xv.amin(red, keepdim=True).abs(), xv.amax(red, keepdim=True).abs())
    bound = 0.5 * step + KV4_FP16_SLACK * mag
    assert bool((err <= bound).all()), float((err - bound).max())
    # every level is used at the ends of each group: min -> 0, max -> 15 (asymmetric)
    from cometq.layout import unpack_uint4

    q, _ = _group_view(unpack_uint4(kv.packed).float(), g, axis)
    assert int(q.amin(red).max()) == 0 and int(q.amax(red).min()) == 15


def test_dequantize_dtype_and_constant_group():
    x = torch.full((1, 32, 64), 0.75)
    x[:, :, 32:] = _rand(1, 32, 32)
    kv = quantize_kv4(x, 32, "token")
    y = dequantize_kv4(kv, torch.float16)
    assert y.dtype == torch.float16
    # a constant group has scale 0 and reproduces its value exactly
    assert torch.equal(kv.scale[..., 0], torch.zeros_like(kv.scale[..., 0]))
    assert torch.equal(y[..., :32].float(), x[..., :32])


def test_quantize_errors():
    x = _rand(4, 64)
    with pytest.raises(ValueError, match="axis"):
        quantize_kv4(x, 32, "head")
    with pytest.raises(ValueError, match="group_size"):
        quantize_kv4(x, 1, "token")
    with pytest.raises(ValueError, match="head_dim=64 is not a multiple"):
        quantize_kv4(x, 48, "token")
    with pytest.raises(ValueError, match="token count=4 is not a multiple"):
        quantize_kv4(x, 32, "channel")
    with pytest.raises(ValueError, match="even"):
        quantize_kv4(_rand(4, 63), 3, "channel")
    with pytest.raises(ValueError, match="at least 2-D"):
        quantize_kv4(torch.randn(64), 32)
    with pytest.raises(TypeError):
        quantize_kv4(torch.ones(4, 64, dtype=torch.int32), 32)
    with pytest.raises(ValueError, match="overflow"):
        quantize_kv4(torch.tensor([[-7e4, 7e4] * 16]), 32)
    with pytest.raises(TypeError, match="KV4Tensor"):
        dequantize_kv4(x)
    kv = quantize_kv4(x, 32, "token")
    with pytest.raises(ValueError, match="scale shape"):
        KV4Tensor(kv.packed, kv.scale[..., :1], kv.zero[..., :1], "token", 32)


# --------------------------------------------------------------------------
# fused quantize-and-append (reference scatter vs Triton kernel, bit-exact)
# --------------------------------------------------------------------------
def _pool(axis, nb=5, h=3, bs=64, d=64, g=16):
    packed = torch.randint(0, 256, (nb, h, bs, d // 2), dtype=torch.uint8)  # garbage: must be overwritten
    scale = torch.randn(pool_scale_shape(axis, nb, h, bs, d, g)).half()
    return packed, scale, scale.clone()


@pytest.mark.parametrize("axis,g", [("token", 16), ("token", 64), ("channel", 16), ("channel", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_append_triton_matches_reference(axis, g, dtype):
    t = g if axis == "channel" else 1
    n = 3
    x = _rand(n, 3, t, 64, seed=7, dtype=dtype)
    blocks = torch.tensor([4, 0, 2], dtype=torch.int32)
    offs = torch.tensor([0, 64 - t, 17], dtype=torch.int32) if axis == "token" else torch.tensor([0, 64 - g, g], dtype=torch.int32)
    ref = _pool(axis, g=g)
    tri = tuple(z.clone() for z in ref)
    ops.kv4_quantize_append(x, *ref, blocks, offs, g, axis, backend="reference")
    ops.kv4_quantize_append(x, *tri, blocks, offs, g, axis, backend="triton")
    for a, b in zip(ref, tri):
        assert torch.equal(a, b)
    # and the written rows are quantize_kv4 of the inputs
    for i in range(n):
        kv = quantize_kv4(x[i], g, axis)
        b_, o = int(blocks[i]), int(offs[i])
        assert torch.equal(ref[0][b_, :, o : o + t], kv.packed)
        if axis == "token":
            assert torch.equal(ref[1][b_, :, o : o + t], kv.scale)
        else:
            assert torch.equal(ref[2][b_, :, o // g], kv.zero[:, 0])


def test_append_op_errors():
    packed, scale, zero = _pool("token")
    x = _rand(2, 3, 1, 64)
    ids = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_ids must be int32"):
        ops.kv4_quantize_append(x, packed, scale, zero, ids.long(), ids, 16, "token")
    with pytest.raises(ValueError, match="does not match pool heads"):
        ops.kv4_quantize_append(_rand(2, 2, 1, 64), packed, scale, zero, ids, ids, 16, "token")
    with pytest.raises(ValueError, match="float16"):
        ops.kv4_quantize_append(x, packed, scale.float(), zero, ids, ids, 16, "token")
    cp, cs, cz = _pool("channel")
    with pytest.raises(ValueError, match="whole groups"):
        ops.kv4_quantize_append(x, cp, cs, cz, ids, ids, 16, "channel")
    with pytest.raises(ValueError, match="outside pool"):
        kv4_quantize_append_reference(x, packed, scale, zero, torch.tensor([0, 9], dtype=torch.int32), ids, 16, "token")
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        kv4_quantize_append_reference(_rand(1, 3, 16, 64), cp, cs, cz, ids[:1], torch.tensor([8], dtype=torch.int32), 16, "channel")
