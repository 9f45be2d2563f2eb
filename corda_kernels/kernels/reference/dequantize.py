"""Reference dequantization of the two quantized weight formats (the specification of the kernels).

Both are bitsandbytes' storage formats, reproduced bit for bit (tests compare against bitsandbytes):

- ``nf4``: the ``(out, in)`` weight flattened row-major; element ``f`` is the 4-bit code in byte
  ``f // 2`` of ``packed`` (high nibble for even ``f``), in blocks of :data:`NF4_BLOCK` elements.
  With double quantization each block's absmax is itself an 8-bit code ``absmax_q[b]`` over
  blocks of :data:`NESTED_BLOCK` absmaxes::

      absmax[b] = nested_code[absmax_q[b]] · nested_absmax[b // 256] + offset        (fp32)
      W[f]      = code[nibble(f)] · absmax[f // 64]                                  (fp32, then cast)

- ``int8``: row-wise absmax (``Linear8bitLt``): ``W[i, j] = (CB[i, j] · SCB[i]) · (1/127)`` in fp32.
"""

from __future__ import annotations

import torch

NF4_BLOCK = 64
NESTED_BLOCK = 256
INT8_INV_SCALE = 7.874015718698502e-3  # bitsandbytes' 1/127, kept as its literal for bit-exactness


def nf4_absmax(absmax_q: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor, nested_code: torch.Tensor):
    """fp32 ``(n_blocks,)`` absmax of every 64-element block from its double-quantized form."""
    blocks = torch.arange(absmax_q.numel(), device=absmax_q.device) // NESTED_BLOCK
    return nested_code[absmax_q.long()] * nested_absmax[blocks] + offset


def dequantize_nf4(packed, absmax_q, nested_absmax, offset, code, nested_code, shape, dtype) -> torch.Tensor:
    """The ``shape`` weight in ``dtype`` from its NF4 storage (see the module docstring)."""
    n = shape[0] * shape[1]
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], 1)  # (256, 2): a byte's two values, high first
    codes = pairs[packed.reshape(-1).long()].reshape(-1)[:n]
    absmax = nf4_absmax(absmax_q, nested_absmax, offset, nested_code)
    if n % NF4_BLOCK == 0:
        values = codes.view(-1, NF4_BLOCK) * absmax.view(-1, 1)
    else:
        values = codes * absmax[torch.arange(n, device=codes.device) // NF4_BLOCK]
    return values.reshape(shape).to(dtype)


def dequantize_int8(CB: torch.Tensor, SCB: torch.Tensor, dtype) -> torch.Tensor:
    """The weight in ``dtype`` from its int8 row-wise storage ``CB (out, in)``, ``SCB (out,)`` fp32."""
    return (CB * SCB.view(-1, 1) * INT8_INV_SCALE).to(dtype)
