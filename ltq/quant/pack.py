"""Bit packing of integer codes and model-size accounting.

Packing (:func:`pack_bits` / :func:`unpack_bits`)
-------------------------------------------------
Codes of ``bits ∈ {8, 4, 2, 1}`` are stored ``8 / bits`` per byte, little-endian inside the byte
(element ``i`` of a group occupies bits ``i·b .. i·b + b − 1``). The flat tensor is zero-padded
to a whole number of bytes; :func:`unpack_bits` needs ``numel`` to drop the padding.

* signed codes of 2, 4, 8 bits use two's complement, range ``[−2^(b−1), 2^(b−1) − 1]``
  (ternary {−1, 0, +1} fits in 2 bits);
* unsigned codes use ``[0, 2^b − 1]``;
* 1-bit signed codes are the binary values ``{−1, +1}`` (bit 0 → −1, bit 1 → +1); 1-bit unsigned
  codes are ``{0, 1}``.

Size accounting (:func:`size_report`)
-------------------------------------
**Quantizer convention: every weight quantizer exposes ``bits`` (int, the storage width of one
weight code; ternary quantizers report 2) and optionally ``num_scales`` (int, number of fp32
values stored next to the codes: scales, zero points, TTQ's w_p/w_n; default 1).** A quantized
layer (any module with a ``weight_quantizer`` that is not None) then costs
``ceil(n_weight · bits / 8) + 4 · (num_scales + n_bias)`` bytes, where ``bits`` is counted densely
(a 3-bit code costs 3 bits). Every other parameter costs 4 bytes. Parameters that live *inside* a
quantizer (learned scales) are covered by ``num_scales`` and not counted again. Buffers (BN running
statistics, observer state) are not counted: at deployment BN folds into the conv bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ltq.errors import ConfigError

__all__ = ["PACK_BITS", "pack_bits", "unpack_bits", "size_report"]

PACK_BITS = (8, 4, 2, 1)


def _check_pack_bits(bits) -> None:
    if bits not in PACK_BITS:
        raise ConfigError(f"bits={bits!r} cannot be packed; allowed: {', '.join(map(str, PACK_BITS))}")


def pack_bits(q: Tensor, bits: int, signed: bool | None = None) -> Tensor:
    """Pack integer codes ``q`` (any shape) into a flat uint8 tensor (see module docstring).

    ``signed`` defaults to "``q`` has a negative value". Raises :class:`ConfigError` if a value
    does not fit. Meant for export (reads the value range back to the host once).
    """
    _check_pack_bits(bits)
    if q.is_floating_point() or q.is_complex():
        raise ConfigError(f"pack_bits expects an integer tensor; got dtype {q.dtype} (round and cast first)")
    flat = q.reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8, device=q.device)
    lo, hi = int(flat.min()), int(flat.max())
    if signed is None:
        signed = lo < 0
    if bits == 1 and signed:
        if not set(torch.unique(flat).tolist()) <= {-1, 1}:
            raise ConfigError("pack_bits(bits=1, signed=True) expects values in {-1, +1}")
        u = (flat > 0).to(torch.int64)
    else:
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        if lo < qmin or hi > qmax:
            raise ConfigError(
                f"pack_bits: values in [{lo}, {hi}] do not fit {bits}-bit {'signed' if signed else 'unsigned'} "
                f"codes; allowed range: [{qmin}, {qmax}]"
            )
        u = flat & (2**bits - 1)  # two's complement for negative values
    per_byte = 8 // bits
    pad = (-u.numel()) % per_byte
    if pad:
        u = torch.cat([u, u.new_zeros(pad)])
    shifts = torch.arange(per_byte, device=u.device, dtype=torch.int64) * bits
    packed = (u.reshape(-1, per_byte) << shifts).sum(dim=1)
    return packed.to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as a flat int8 tensor.

    (8-bit unsigned codes above 127 do not fit int8: they are returned as int16.)
    """
    _check_pack_bits(bits)
    if packed.dtype != torch.uint8:
        raise ConfigError(f"unpack_bits expects a uint8 tensor; got dtype {packed.dtype}")
    per_byte = 8 // bits
    if numel > packed.numel() * per_byte:
        raise ConfigError(f"unpack_bits: numel={numel} exceeds the {packed.numel() * per_byte} packed codes")
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int64) * bits
    u = ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]
    if signed:
        if bits == 1:
            v = u * 2 - 1
        else:
            v = torch.where(u >= 2 ** (bits - 1), u - 2**bits, u)
        return v.to(torch.int8)
    return u.to(torch.int16 if bits == 8 else torch.int8)


def _quantizer_bits(q: nn.Module) -> int:
    bits = getattr(q, "bits", None)
    if bits is None:
        raise ConfigError(
            f"size_report: quantizer {type(q).__name__} has no `bits` attribute; every quantizer must expose `.bits`"
        )
    return int(bits)


def size_report(model: nn.Module) -> tuple[list[dict], dict]:
    """Per-module storage of ``model`` and the total (see module docstring for the accounting).

    Returns ``(rows, total)``; each row (and ``total``, whose ``layer`` is ``"total"``) is
    ``{"layer", "params", "bits", "bytes", "fp32_bytes", "ratio"}``: ``bits`` is the weight
    code width of a quantized layer or 32 (for the total: average bits per parameter), ``ratio``
    is ``fp32_bytes / bytes``.
    """
    rows: list[dict] = []
    skipped: list[str] = []  # subtrees already accounted for (quantizers, simulated-fold BN)
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in skipped):
            continue
        prefix = f"{name}." if name else ""
        for child in ("weight_quantizer", "act_quantizer"):
            if isinstance(getattr(module, child, None), nn.Module):
                skipped.append(prefix + child)
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(wq, nn.Module) and isinstance(getattr(module, "weight", None), Tensor):
            # quantized layer: weight codes at `bits`, bias (or the folded BN shift) and scales in fp32
            bits = _quantizer_bits(wq)
            n_w = module.weight.numel()
            n_b = module.bias.numel() if getattr(module, "bias", None) is not None else 0
            if isinstance(getattr(module, "bn", None), nn.Module):  # QuantConvBn2d: BN folds into the bias
                skipped.append(prefix + "bn")
                n_b = module.weight.shape[0]
            n_s = int(getattr(wq, "num_scales", 1))
            nbytes = math.ceil(n_w * bits / 8) + 4 * (n_b + n_s)
            rows.append(_row(name, n_w + n_b, bits, nbytes))
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        if params:
            rows.append(_row(name, params, 32, 4 * params))
    params = sum(r["params"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    total = {
        "layer": "total",
        "params": params,
        "bits": 8.0 * nbytes / params if params else 0.0,
        "bytes": nbytes,
        "fp32_bytes": 4 * params,
        "ratio": 4 * params / nbytes if nbytes else 1.0,
    }
    return rows, total


def _row(name: str, params: int, bits: int, nbytes: int) -> dict:
    return {
        "layer": name,
        "params": params,
        "bits": bits,
        "bytes": nbytes,
        "fp32_bytes": 4 * params,
        "ratio": 4 * params / nbytes if nbytes else 1.0,
    }
