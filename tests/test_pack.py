"""Bit packing round trips, known byte layouts, and model size accounting."""

import pytest
import torch
from torch import nn

from ltq.errors import ConfigError
from ltq.nn import QuantConv2d, QuantLinear
from ltq.quant import UniformQuantizer, pack_bits, size_report, unpack_bits


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("numel", [1, 7, 13, 64])
def test_roundtrip_signed_all_values(bits, numel):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    values = torch.arange(lo, hi + 1)
    q = values.repeat(numel // values.numel() + 1)[:numel].flip(0).to(torch.int8)
    q[0] = lo  # make sure negatives are present
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-numel * bits // 8)
    out = unpack_bits(packed, bits, numel, signed=True)
    assert out.dtype == torch.int8 and torch.equal(out, q)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_roundtrip_unsigned(bits):
    q = torch.arange(2**bits).repeat(3)[:-1]  # odd-ish numel
    out = unpack_bits(pack_bits(q, bits, signed=False), bits, q.numel(), signed=False)
    assert torch.equal(out.long(), q)


def test_roundtrip_all_int8_and_full_uint8():
    q = torch.arange(-128, 128, dtype=torch.int8)
    assert torch.equal(unpack_bits(pack_bits(q, 8), 8, 256), q)
    u = torch.arange(256)
    out = unpack_bits(pack_bits(u, 8, signed=False), 8, 256, signed=False)
    assert out.dtype == torch.int16 and torch.equal(out.long(), u)


def test_binary_and_ternary():
    b = torch.tensor([1, -1, -1, 1, 1, 1, -1, 1, -1, 1, 1])  # 11 values, ±1
    packed = pack_bits(b, 1)
    assert packed.numel() == 2
    assert packed[0].item() == 0b10111001
    assert torch.equal(unpack_bits(packed, 1, 11).long(), b)
    t = torch.tensor([1, -1, 0, 1, 0])  # ternary in 2 bits
    packed = pack_bits(t, 2)
    assert packed.tolist() == [1 | (3 << 2) | (0 << 4) | (1 << 6), 0]
    assert torch.equal(unpack_bits(packed, 2, 5).long(), t)


def test_known_nibbles_and_shapes():
    q = torch.tensor([[1, -1], [7, -8]])
    packed = pack_bits(q, 4)
    assert packed.tolist() == [0xF1, 0x87]
    assert torch.equal(unpack_bits(packed, 4, 4).reshape(2, 2).long(), q)


def test_pack_errors():
    with pytest.raises(ConfigError, match="allowed: 8, 4, 2, 1"):
        pack_bits(torch.tensor([1]), 3)
    with pytest.raises(ConfigError, match="do not fit"):
        pack_bits(torch.tensor([8, -1]), 4)
    with pytest.raises(ConfigError, match=r"\{-1, \+1\}"):
        pack_bits(torch.tensor([-1, 0, 1]), 1)
    with pytest.raises(ConfigError, match="integer"):
        pack_bits(torch.tensor([0.5]), 8)
    with pytest.raises(ConfigError, match="numel"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)


def test_size_report():
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, bias=False), UniformQuantizer(2, per_channel=True), None)
    conv(torch.randn(1, 8, 5, 5))  # observer sees the weight: 16 per-channel scales
    lin = QuantLinear.from_float(nn.Linear(16, 4), UniformQuantizer(8), UniformQuantizer(8, symmetric=False))
    model = nn.Sequential(nn.Conv2d(3, 8, 1), conv, nn.BatchNorm2d(16), nn.Flatten(), lin)
    rows, total = size_report(model)
    by = {r["layer"]: r for r in rows}
    assert list(by) == ["0", "1", "2", "4"]  # quantizer internals are not separate rows
    assert by["0"] == {"layer": "0", "params": 32, "bits": 32, "bytes": 128, "fp32_bytes": 128, "ratio": 1.0}
    assert by["1"]["params"] == 1152 and by["1"]["bits"] == 2
    assert by["1"]["bytes"] == 1152 * 2 // 8 + 16 * 4  # codes + per-channel fp32 scales
    assert by["1"]["ratio"] == pytest.approx(4608 / 352)
    assert by["4"]["bytes"] == 64 + 4 * (4 + 1)  # int8 weights, fp32 bias, one scale
    assert by["2"]["bits"] == 32 and by["2"]["params"] == 32
    assert total["params"] == 32 + 1152 + 32 + 68
    assert total["bytes"] == sum(r["bytes"] for r in rows)
    assert total["ratio"] == pytest.approx(total["fp32_bytes"] / total["bytes"])
    assert total["layer"] == "total"
