"""Dense bit packing of integer codes (2..8 bits) into bytes.

Every 8 consecutive codes of a row become exactly `bits` bytes, little-endian within the
block: code i occupies bits [bits*i, bits*(i+1)) of a 64-bit word. For 4 bits this is the
familiar "two per byte, low nibble first"; for 8 bits it is the identity; 3 and 2 bits are
packed without waste (8 int3 codes -> 3 bytes). Rows are padded with zero codes to a
multiple of 8; the caller keeps the true column count.
"""

from __future__ import annotations

import torch


def packed_row_bytes(in_features: int, bits: int) -> int:
    if bits == 8:
        return in_features  # one code per byte, no block padding
    return -(-in_features // 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (rows, cols) uint8 in [0, 2**bits) -> (rows, ceil(cols/8)*bits) uint8."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack_codes expects a 2-D uint8 tensor, got {codes.dtype} with {codes.dim()} dims")
    if not 2 <= bits <= 8:
        raise ValueError(f"pack_codes supports 2..8 bits, got {bits}")
    if bits == 8:
        return codes.contiguous()
    rows, cols = codes.shape
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code does not fit in {bits} bits (max {int(codes.max())})")
    if bits == 4 and cols % 2 == 0:
        pairs = codes.view(rows, cols // 2, 2)
        packed = pairs[..., 0] | (pairs[..., 1] << 4)
        return _pad_cols(packed, packed_row_bytes(cols, 4))
    padded = _pad_cols(codes, -(-cols // 8) * 8).view(rows, -1, 8).to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (padded << shifts).sum(dim=-1)  # (rows, blocks): 8*bits <= 64 bits each
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF  # (rows, blocks, bits)
    return packed.to(torch.uint8).reshape(rows, -1)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_codes: (rows, bytes) uint8 -> (rows, cols) uint8."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_codes expects a 2-D uint8 tensor, got {packed.dtype}")
    if packed.shape[1] != packed_row_bytes(cols, bits):
        raise ValueError(
            f"packed rows hold {packed.shape[1]} bytes but {cols} codes of {bits} bits need "
            f"{packed_row_bytes(cols, bits)}"
        )
    if bits == 8:
        return packed
    rows = packed.shape[0]
    if bits == 4:
        low = packed & 0x0F
        high = packed >> 4
        return torch.stack((low, high), dim=-1).reshape(rows, -1)[:, :cols]
    blocks = packed.view(rows, -1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (blocks << byte_shifts).sum(dim=-1)  # (rows, blocks)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, blocks, 8)
    return codes.to(torch.uint8).reshape(rows, -1)[:, :cols]


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    if t.shape[1] == cols:
        return t.contiguous()
    out = torch.zeros(t.shape[0], cols, dtype=t.dtype)
    out[:, : t.shape[1]] = t
    return out
