"""A minimal PNG decoder for the tests (8-bit grey or RGB, non-interlaced, all five filter types),
written from the specification (https://www.w3.org/TR/png/) and sharing no code with the encoder
in figures/png.py, so that a figure the program wrote can be read back and checked."""
import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Reading: 8-bit grey or RGB, non-interlaced; each row's filter undone from the row above
# ---------------------------------------------------------------------------------------------

def _paeth(a, b, c):
    """The Paeth predictor: whichever of left, up, upper-left is closest to a + b - c."""
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _unfilter_row(ftype, line, prev, bpp):
    """Undo one row's filter; line and prev are lists of ints, prev the row above (decoded)."""
    if ftype == 0:
        return line
    if ftype == 2:
        return [(x + b) % 256 for x, b in zip(line, prev)]
    if ftype not in (1, 3, 4):
        raise ValueError(f"bad PNG filter type {ftype}")
    out = []
    for i, x in enumerate(line):
        a = out[i - bpp] if i >= bpp else 0   # left
        c = prev[i - bpp] if i >= bpp else 0  # upper left
        if ftype == 1:
            pred = a                          # Sub
        elif ftype == 3:
            pred = (a + prev[i]) // 2         # Average
        else:
            pred = _paeth(a, prev[i], c)      # Paeth
        out.append((x + pred) % 256)
    return out


def read_png(path):
    """Decode an 8-bit grey or RGB, non-interlaced PNG (any filter types) into a uint8 array."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:8] != PNG_SIGNATURE:
        raise ValueError(f"{path}: not a PNG file (bad signature)")
    pos, header, idat = 8, None, b""
    while pos < len(blob):
        length = int.from_bytes(blob[pos:pos + 4], "big")
        if pos + 12 + length > len(blob):
            raise ValueError(f"{path}: truncated chunk")
        kind, data = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", blob[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + data) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: CRC mismatch in chunk {kind!r}")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError(f"{path}: no IHDR chunk")
    width, height, depth, ctype, _, _, interlace = header
    if depth != 8 or ctype not in (0, 2) or interlace != 0:
        raise ValueError(f"{path}: only 8-bit grey/RGB non-interlaced PNGs are supported")
    bpp = 1 if ctype == 0 else 3
    stride = width * bpp
    raw = zlib.decompress(idat)
    if len(raw) != height * (stride + 1):
        raise ValueError(f"{path}: image data has the wrong length")
    rows, prev = [], [0] * stride
    for r in range(height):
        start = r * (stride + 1)
        prev = _unfilter_row(raw[start], list(raw[start + 1:start + 1 + stride]), prev, bpp)
        rows.append(prev)
    image = np.array(rows, np.uint8)  # (H, W * bpp)
    return image if bpp == 1 else image.reshape(height, width, 3)
