"""The int8 and NF4 formats: pure functions on tensors (no modules, no bitsandbytes).

Two formats, both for the weight ``W`` (out x in) of a frozen ``nn.Linear``:

* **int8**, per output channel (absmax): ``s_o = max_i |W[o, i]| / 127``,
  ``Q[o, i] = round(W[o, i] / s_o)`` in int8, ``Ŵ = Q · s``. Round-trip error ``|W - Ŵ| <= s_o / 2``.
* **NF4**, blockwise (Dettmers et al. 2023, "QLoRA"): each row is cut into blocks of ``block_size``
  consecutive weights; a block keeps its absmax ``c = max |w|`` and every weight the index of the
  nearest of the 16 NF4 levels ``q_j`` to ``w / c``; ``ŵ = q_j · c``. Two 4-bit indices are packed
  per byte (first weight in the high nibble), so the weight costs 4 bits plus 32 / block_size bits
  for the scale. Round-trip error ``|w - ŵ| <= c · max_j (q_{j+1} - q_j) / 2``.
  With ``double_quant`` the block scales are themselves quantized (the paper's double quantization):
  ``c' = c - mean(c)`` in groups of 256, int8 absmax per group (``|c - ĉ| <= max|c'|_group / 254``);
  the paper stores these second-level values as 8-bit floats, peftkit as linear int8.

The NF4 levels are the paper's: quantiles of N(0, 1), asymmetric so that 0 is exact (8 positive,
7 negative levels), normalized to [-1, 1] (see :func:`nf4_levels_from_definition`). The packing and
the level order are those of bitsandbytes, so its 4-bit matmul reads the same buffers
(:class:`peftkit.quant.layers.NF4Linear`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# The 16 NF4 levels as bitsandbytes stores them (float32), index 7 is exactly 0.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
DOUBLE_QUANT_GROUP = 256  # block scales per second-level group (the paper's choice)


def nf4_levels_from_definition() -> torch.Tensor:
    """The NF4 levels computed from their definition (float64).

    With ``δ = (1/30 + 1/32) / 2`` (half-steps of a 15- and a 16-point grid), the positive levels are
    the N(0,1) quantiles ``Φ⁻¹(p)`` at 8 points ``p`` evenly spaced from ``1 - δ`` to 0.5 (last
    excluded), the negative ones ``-Φ⁻¹(p)`` at 7 points from ``1 - δ`` to 0.5 (last excluded), plus
    an exact 0; all divided by the largest, so they span [-1, 1].
    """
    offset = 1 - 0.5 * (1 / 30 + 1 / 32)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return values / values.max()


_NF4 = torch.tensor(NF4_LEVELS, dtype=torch.float32)
_NF4_MIDPOINTS = (_NF4[1:] + _NF4[:-1]) / 2
# byte -> (level of the high nibble, level of the low nibble): one gather dequantizes two weights
_NF4_PAIRS = torch.stack([_NF4[torch.arange(256) >> 4], _NF4[torch.arange(256) & 15]], dim=1)
NF4_MAX_ERROR = float((_NF4[1:] - _NF4[:-1]).max() / 2)  # worst |w/c - q_j| (times the block absmax)


@functools.lru_cache(maxsize=None)
def nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(levels, pairs, midpoints)`` on ``device``, copied there once (a per-call ``.to(cuda)``
    of a CPU tensor would synchronize the stream at every matmul): the 16 levels (16,), the two levels
    of every byte (256, 2) and the 15 midpoints between consecutive levels (15,)."""
    return _NF4.to(device), _NF4_PAIRS.to(device), _NF4_MIDPOINTS.to(device)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel absmax int8: returns ``Q`` (out, in) int8 and ``s`` (out,) float32."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Ŵ = Q · s`` (per row), computed in float32 and returned in ``dtype``."""
    w = q.float().mul_(scale.float().unsqueeze(1))
    return w if dtype == torch.float32 else w.to(dtype)


def quantize_nf4(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4: returns the packed codes (out, in / 2) uint8 and the block absmax (out·in / block,) float32."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(-1, block_size)
    absmax = w.abs().amax(dim=1)
    normed = w / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.bucketize(normed, nf4_tables(w.device)[2], out_int32=True).to(torch.uint8)
    codes = codes.view(out_features, in_features)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return packed.contiguous(), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, block_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``ŵ = q[code] · c`` per block, computed in float32 and returned in ``dtype``; shape (out, in)."""
    out_features = packed.shape[0]
    pairs = F.embedding(packed.to(torch.int32), nf4_tables(packed.device)[1])  # (out, in/2, 2)
    w = pairs.view(-1, block_size).mul_(absmax.float().unsqueeze(1)).view(out_features, -1)
    return w if dtype == torch.float32 else w.to(dtype)


def quantize_scales(absmax: torch.Tensor, group: int = DOUBLE_QUANT_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of block scales: ``c - mean`` in int8 absmax per group of ``group``.

    Returns ``(codes int8 (n,), group scales float32 (ceil(n / group),), offset float32 (1,))``."""
    n = absmax.numel()
    offset = absmax.float().mean().reshape(1)
    centred = absmax.float() - offset
    pad = (-n) % group
    blocks = F.pad(centred, (0, pad)).view(-1, group)
    scale = blocks.abs().amax(dim=1) / 127
    codes = torch.round(blocks / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)).clamp_(-127, 127)
    return codes.reshape(-1)[:n].to(torch.int8).contiguous(), scale, offset


def dequantize_scales(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      group: int = DOUBLE_QUANT_GROUP) -> torch.Tensor:
    n = codes.numel()
    pad = (-n) % group
    blocks = F.pad(codes.float(), (0, pad)).view(-1, group) * scale.float().unsqueeze(1)
    return blocks.reshape(-1)[:n] + offset.float()
