"""PNG files: an encoder of grey and RGB 8-bit images (filter 0 only) and a minimal decoder (all five
filter types), on NumPy and zlib, so that the figures need no imaging library.

plots.py draws images as uint8 arrays; write_png saves one, atomically and readable by all, and
read_png reads one back (the tests read the figures with it). Images are indexed [row, column] with
row 0 at the top: grey (H, W), RGB (H, W, 3).

PNG format: https://www.w3.org/TR/png/ (signature, IHDR, IDAT, IEND chunks with CRC-32).
"""
import os
import struct
import tempfile
import zlib

import numpy as np

# ---------------------------------------------------------------------------------------------
# Writing: one IDAT chunk, filter 0 (none) on every row
# ---------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type (0 = grey, 2 = RGB)


def to_uint8(image):
    """uint8 passes through; floats in [0, 1] are scaled to 0..255 and clipped."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.integer):
        if image.size and (image.min() < 0 or image.max() > 255):
            raise ValueError("integer images must lie in 0..255")
        return image.astype(np.uint8)
    image = np.nan_to_num(image.astype(np.float64), nan=0.0)
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _chunk(kind, data):
    """One PNG chunk: length, type, data, CRC-32 of type + data."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def write_png(path, image):
    """Write a grey (H, W) or RGB (H, W, 3) image as an 8-bit PNG, atomically."""
    image = to_uint8(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    channels = image.shape[2] if image.ndim == 3 else 1
    if image.ndim not in (2, 3) or channels not in _COLOR_TYPES or 0 in image.shape:
        raise ValueError(f"expected a non-empty (H, W) or (H, W, 3) image, got {image.shape}")
    height, width = image.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
    rows = image.reshape(height, width * channels)
    raw = np.hstack([np.zeros((height, 1), np.uint8), rows])  # filter byte 0 before each row
    png = (PNG_SIGNATURE + _chunk(b"IHDR", header)
           + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + _chunk(b"IEND", b""))

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a figure is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
