"""PNG files: an encoder of grey and RGB 8-bit images (filter 0 only), on NumPy and zlib, so that
the figures need no imaging library.

plots.py draws images as uint8 arrays; write_png saves one, atomically and readable by all (the
tests read them back with tests/png_reader.py). Images are indexed [row, column] with
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
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    except OSError as e:  # name the file asked for, not the temporary one beside it
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a figure is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
