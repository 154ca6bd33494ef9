"""Plots drawn with NumPy as image arrays, saved as PNG files by png.py (no matplotlib).

draw.py draws the analogues of the paper's figures with these functions: image grids of samples
and analogies (Fig. 3), scatter plots of the half-moons with decision regions and of a PCA of the
auxiliary variable a (Fig. 2c,d, 4b), density heat maps and 2-D histograms of q(z) (Fig. 2a,b),
a learning curve (Fig. 5) and per-unit KL bars (Fig. 4a). Every function takes host NumPy arrays
and returns an RGB (H, W, 3) uint8 image (grey (H, W) for image_grid of grey tiles);
png.write_png saves one.

Conventions: images are indexed [row, column] with row 0 at the top. Fields on a 2-D grid (the
scatter background, `density`, what `histogram2d` returns) are laid out as they are drawn: row 0
holds the largest y, column 0 the smallest x, i.e. np.meshgrid(xs, ys[::-1]) with xs and ys
increasing. Plots draw y pointing up. A `title=` adds a strip on top.
"""
import numpy as np

from figures.png import to_uint8

# ---------------------------------------------------------------------------------------------
# A 3x5 bitmap font: each glyph is five rows of three bits; lower case is drawn as upper case.
# ---------------------------------------------------------------------------------------------

_FONT = {
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111",
    "3": "111 001 011 001 111", "4": "101 101 111 001 001", "5": "111 100 111 001 111",
    "6": "111 100 111 101 111", "7": "111 001 001 010 010", "8": "111 101 111 101 111",
    "9": "111 101 111 001 111", ".": "000 000 000 000 010", "-": "000 000 111 000 000",
    "+": "000 010 111 010 000", "%": "100 001 010 100 001", ":": "000 010 000 010 000",
    "/": "001 001 010 100 100", "(": "010 100 100 100 010", ")": "010 001 001 001 010",
    "_": "000 000 000 000 111", "=": "000 111 000 111 000", ",": "000 000 000 010 100",
    "|": "010 010 010 010 010", ">": "100 010 001 010 100", "<": "001 010 100 010 001",
    "A": "010 101 111 101 101", "B": "110 101 110 101 110", "C": "011 100 100 100 011",
    "D": "110 101 101 101 110", "E": "111 100 110 100 111", "F": "111 100 110 100 100",
    "G": "011 100 101 101 011", "H": "101 101 111 101 101", "I": "111 010 010 010 111",
    "J": "001 001 001 101 010", "K": "101 101 110 101 101", "L": "100 100 100 100 111",
    "M": "101 111 111 101 101", "N": "110 101 101 101 101", "O": "010 101 101 101 010",
    "P": "110 101 110 100 100", "Q": "010 101 101 110 011", "R": "110 101 110 101 101",
    "S": "011 100 010 001 110", "T": "111 010 010 010 010", "U": "101 101 101 101 111",
    "V": "101 101 101 101 010", "W": "101 101 111 111 101", "X": "101 101 010 101 101",
    "Y": "101 101 010 010 010", "Z": "111 001 010 100 111",
}
_GLYPHS = {ch: np.array([[b == "1" for b in row] for row in bits.split()])  # (5, 3) bool
           for ch, bits in _FONT.items()}


def text_width(text, scale=1):
    """Width in pixels of `text` drawn by draw_text (4 columns per character, less the last gap)."""
    return max(4 * len(text) - 1, 0) * scale


def draw_text(img, x, y, text, color, scale=1):
    """Draw `text` with its top-left corner at (column x, row y), clipped; unknown chars blank."""
    for i, ch in enumerate(text.upper()):
        glyph = _GLYPHS.get(ch)
        if glyph is None:
            continue
        rows, cols = np.nonzero(np.kron(glyph, np.ones((scale, scale), bool)))
        rows, cols = rows + y, cols + x + 4 * scale * i
        inside = (rows >= 0) & (rows < img.shape[0]) & (cols >= 0) & (cols < img.shape[1])
        img[rows[inside], cols[inside]] = color
    return img


# ---------------------------------------------------------------------------------------------
# Colours and drawing helpers.
# ---------------------------------------------------------------------------------------------

# Ten "tab10" colours and two more; class k gets PALETTE[k % 12].
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                    [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
                    [188, 189, 34], [23, 190, 207], [31, 31, 120], [0, 128, 96]], np.uint8)
BLACK, GRID, FRAME = (0, 0, 0), (225, 225, 225), (160, 160, 160)
_TITLE_SCALE = 2


def _rgb(image):
    """Any image accepted by png.write_png as an RGB uint8 array."""
    image = to_uint8(image)
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def _titled(img, title):
    """Add a white strip with `title` above the image (nothing when title is None)."""
    if not title:
        return img
    strip = np.full((5 * _TITLE_SCALE + 8, img.shape[1], 3), 255, np.uint8)
    draw_text(strip, 4, 4, title, BLACK, scale=_TITLE_SCALE)
    return np.concatenate([strip, img], axis=0)


def _captioned(img, text, above=False):
    """Add a white strip with one line of small text below the image (above=True: above it, at
    the left, as a y axis's label); nothing when text is None."""
    if not text:
        return img
    strip = np.full((12, img.shape[1], 3), 255, np.uint8)
    x = 4 if above else max(4, (img.shape[1] - text_width(text)) // 2)
    draw_text(strip, x, 4 if above else 3, text, BLACK)
    return np.concatenate([strip, img] if above else [img, strip], axis=0)


def _stamp(img, rows, cols, offsets, colors):
    """Paint pixel (row + dr, col + dc) for every point and every offset, clipped to the image."""
    rows, cols = np.rint(rows).astype(int), np.rint(cols).astype(int)
    colors = np.broadcast_to(np.asarray(colors, np.uint8), (len(rows), 3))
    for dr, dc in offsets:
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < img.shape[0]) & (c >= 0) & (c < img.shape[1])
        img[r[inside], c[inside]] = colors[inside]


def _disk(radius):
    """Offsets of the pixels in a filled disk."""
    k = int(np.ceil(radius))
    return [(dr, dc) for dr in range(-k, k + 1) for dc in range(-k, k + 1)
            if dr * dr + dc * dc <= radius * radius]


def _resize_nearest(field, height, width):
    """Nearest-neighbour resampling of the first two axes to (height, width)."""
    rows = (np.arange(height) * field.shape[0]) // height
    cols = (np.arange(width) * field.shape[1]) // width
    return field[rows][:, cols]


def _scale(v, lo, hi, a, b):
    """Map v linearly from [lo, hi] onto pixel coordinates [a, b]."""
    return a + (np.asarray(v, np.float64) - lo) / (hi - lo) * (b - a)


def _widen(lo, hi):
    """An interval that is never empty, so _scale never divides by zero."""
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo, hi)


# ---------------------------------------------------------------------------------------------
# Image grids and layout (Fig. 3a analogies, Fig. 3b samples per class; combining panels).
# ---------------------------------------------------------------------------------------------

def image_grid(images, rows, cols, pad=1, pad_value=0.5):
    """Tile images (N, h, w) or (N, h, w, 3) in [0, 1] row by row into a rows x cols grid."""
    tiles = to_uint8(images)
    n, h, w = tiles.shape[:3]
    if n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows} x {cols} grid")
    shape = (rows * (h + pad) + pad, cols * (w + pad) + pad) + tiles.shape[3:]
    grid = np.full(shape, to_uint8(np.float64(pad_value)), np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = tiles[k]
    return grid


def _join(images, pad, axis):
    """Concatenate RGB images along axis (0 = down, 1 = across), white-padded to a common size."""
    images = [_rgb(im) for im in images]
    extent = max(im.shape[1 - axis] for im in images)
    parts = []
    for i, im in enumerate(images):
        if i and pad:
            gap = (pad, extent, 3) if axis == 0 else (extent, pad, 3)
            parts.append(np.full(gap, 255, np.uint8))
        fill = [(0, 0), (0, 0), (0, 0)]
        fill[1 - axis] = (0, extent - im.shape[1 - axis])
        parts.append(np.pad(im, fill, constant_values=255))
    return np.concatenate(parts, axis=axis)


def side_by_side(images, pad=4):
    """Put images next to each other, left to right."""
    return _join(images, pad, axis=1)


def stack_vertical(images, pad=4):
    """Put images below each other, top to bottom."""
    return _join(images, pad, axis=0)


# ---------------------------------------------------------------------------------------------
# Scatter plots (Fig. 2c half-moons with decision regions; Fig. 2d, 4b PCA of a).
# ---------------------------------------------------------------------------------------------

def _background_colors(background):
    """RGB of a class map (H, W) ints, P(class 1) (H, W) floats or probabilities (H, W, K)."""
    background = np.asarray(background)
    if np.issubdtype(background.dtype, np.integer):
        colors = PALETTE[background % len(PALETTE)].astype(np.float64)
    else:
        probs = background if background.ndim == 3 else np.stack([1 - background, background], -1)
        colors = probs @ PALETTE[np.arange(probs.shape[-1]) % len(PALETTE)].astype(np.float64)
    return 255.0 - 0.3 * (255.0 - colors)  # faint: 30% colour over white


def scatter(points, labels, size=400, background=None, extent=None, marked=None, title=None, caption=None):
    """Points (N, 2) coloured by integer class; `marked` points (indices or a boolean mask)
    drawn big with a black outline; extent = (xmin, xmax, ymin, ymax), default the data range;
    `caption` a line under the plot that says what colour, markers and axes mean.
    `background`, stretched over the extent and laid out as drawn (see the module docstring), is
    a class map (H, W) of ints, P(class 1) (H, W) as floats, or class probabilities (H, W, K)."""
    points, labels = np.asarray(points, np.float64), np.asarray(labels, int)
    if extent is None and len(points) == 0:
        extent = (0.0, 1.0, 0.0, 1.0)
    elif extent is None:
        (xmin, ymin), (xmax, ymax) = points.min(axis=0), points.max(axis=0)
        mx, my = 0.05 * (xmax - xmin), 0.05 * (ymax - ymin)
        extent = (xmin - mx, xmax + mx, ymin - my, ymax + my)
    (xmin, xmax), (ymin, ymax) = _widen(*extent[:2]), _widen(*extent[2:])
    img = np.full((size, size, 3), 255, np.uint8)
    if background is not None:
        faint = _background_colors(background)  # row 0 holds the largest y, as drawn
        img[:] = np.rint(_resize_nearest(faint, size, size)).astype(np.uint8)
    img[[0, -1]], img[:, [0, -1]] = FRAME, FRAME
    cols = _scale(points[:, 0], xmin, xmax, 0, size - 1)
    rows = _scale(points[:, 1], ymin, ymax, size - 1, 0)  # y points up
    colors = PALETTE[labels % len(PALETTE)]
    _stamp(img, rows, cols, _disk(1.5), colors)
    if marked is not None:
        marked = np.asarray(marked)
        marked = np.flatnonzero(marked) if marked.dtype == bool else marked.astype(int)  # indices
        _stamp(img, rows[marked], cols[marked], _disk(6), BLACK)
        _stamp(img, rows[marked], cols[marked], _disk(4.5), colors[marked])
    return _titled(_captioned(img, caption), title)


# ---------------------------------------------------------------------------------------------
# Densities (Fig. 2a true potential, Fig. 2b histogram of samples from q(z)).
# ---------------------------------------------------------------------------------------------

# Anchors of a dark-to-bright ramp (close to matplotlib's "inferno").
_RAMP_AT = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RAMP_RGB = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]])


def density(values, size=None, title=None, top=None):
    """Heat map of non-negative values (H, W), scaled so `top` (by default the maximum) is brightest."""
    values = np.nan_to_num(np.asarray(values, np.float64))
    top = values.max() if top is None else top
    t = np.clip(values / top, 0.0, 1.0) if top > 0 else np.zeros_like(values)
    img = np.stack([np.interp(t, _RAMP_AT, _RAMP_RGB[:, k]) for k in range(3)], axis=-1)
    img = np.rint(img).astype(np.uint8)  # row 0 holds the largest y, as drawn
    if size is not None:
        img = _resize_nearest(img, size, size)
    return _titled(img, title)


def histogram2d(points, extent, bins):
    """Counts of points (N, 2) in cells over extent: (bins_y, bins_x), row 0 = the largest y."""
    bx, by = (bins, bins) if np.isscalar(bins) else bins
    xmin, xmax, ymin, ymax = extent
    points = np.asarray(points, np.float64)
    ix = np.floor((points[:, 0] - xmin) / (xmax - xmin) * bx).astype(int)
    iy = np.floor((points[:, 1] - ymin) / (ymax - ymin) * by).astype(int)
    ix[points[:, 0] == xmax] = bx - 1  # the right and top edges belong to the last bin
    iy[points[:, 1] == ymax] = by - 1
    inside = (ix >= 0) & (ix < bx) & (iy >= 0) & (iy < by)
    counts = np.bincount(iy[inside] * bx + ix[inside], minlength=bx * by)
    return counts.reshape(by, bx)[::-1].astype(np.float64)  # (by, bx), top row = highest y


# ---------------------------------------------------------------------------------------------
# Line and bar plots with axes (Fig. 5 learning curve, Fig. 4a per-unit KL).
# ---------------------------------------------------------------------------------------------

def _nice_ticks(lo, hi, count=5):
    """About `count` round tick values (steps of 1, 2 or 5 times a power of ten) in [lo, hi]."""
    raw = (hi - lo) / count
    mag = 10.0 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * 0.999)
    ticks = np.arange(np.ceil(lo / step - 1e-9), np.floor(hi / step + 1e-9) + 1) * step
    return [0.0 if abs(t) < step * 1e-9 else float(t) for t in ticks]


def _log_ticks(lo, hi):
    """Tick values between 10**lo and 10**hi: powers of ten, or 1-2-5 steps in a short range."""
    decades = range(int(np.floor(lo)), int(np.ceil(hi)) + 1)
    for mults in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** e for e in decades for m in mults
                 if lo <= np.log10(m) + e <= hi + 1e-9]
        if len(ticks) >= 3:
            return ticks
    return _nice_ticks(10.0 ** lo, 10.0 ** hi)  # less than a factor of ~1.3: plain ticks


def _axes(size, xlim, ylim, xticks, yticks, logy=False):
    """A white canvas with grid lines, tick labels and axes; returns it and the plot box."""
    height, width = size
    ypos = np.log10(yticks) if logy else np.asarray(yticks, np.float64)
    ylabels = [f"{v:.4g}" for v in yticks]
    left = max([text_width(s) for s in ylabels] + [0]) + 8
    top, bottom, right = 8, height - (14 if xticks else 6), width - 10
    img = np.full((height, width, 3), 255, np.uint8)
    for pos, text in zip(ypos, ylabels):
        r = int(round(float(_scale(pos, *ylim, bottom, top))))
        img[r, left:right + 1] = GRID
        draw_text(img, left - 4 - text_width(text), r - 2, text, BLACK)
    for value in xticks:
        c = int(round(float(_scale(value, *xlim, left, right))))
        img[top:bottom + 1, c] = GRID
        text = f"{value:.4g}"
        draw_text(img, c - text_width(text) // 2, bottom + 5, text, BLACK)
    img[top:bottom + 1, left] = BLACK
    img[bottom, left:right + 1] = BLACK
    return img, (top, bottom, left, right)


def _polyline(xs, ys):
    """Pixel positions along the segments between consecutive finite points (a rasteriser)."""
    rows, cols = [ys[:1]], [xs[:1]]
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        if np.isfinite([x0, y0, x1, y1]).all():
            t = np.linspace(0.0, 1.0, int(max(abs(x1 - x0), abs(y1 - y0))) + 2)
            rows.append(y0 + t * (y1 - y0))
            cols.append(x0 + t * (x1 - x0))
    return np.concatenate(rows), np.concatenate(cols)


def line_plot(series, size=(300, 500), ylim=None, logy=False, width=2, title=None, points=None, xlabel=None,
              ylabel=None):
    """Curves from series = {name: (x, y)} with axes, grid, tick labels, a legend and the axes'
    labels (xlabel under the x axis, ylabel above the y axis); `points`, {name: (x, y)} too, are
    drawn as unconnected square markers (e.g. someone else's numbers)."""
    points = points or {}
    data = {}
    for name, (x, y) in list(series.items()) + list(points.items()):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if logy:
            y = np.where(y > 0, y, np.nan)
        data[name] = (x, np.log10(y) if logy else y)
    xs = np.concatenate([x for x, _ in data.values()] + [np.zeros(0)])
    ys = np.concatenate([y for _, y in data.values()] + [np.zeros(0)])
    xs, ys = xs[np.isfinite(xs)], ys[np.isfinite(ys)]
    xlim = _widen(xs.min(), xs.max()) if xs.size else (0.0, 1.0)
    if ylim is not None:
        ylim = _widen(*(np.log10(ylim) if logy else ylim))
    else:
        ylim = _widen(ys.min(), ys.max()) if ys.size else (0.0, 1.0)
        ylim = (ylim[0] - 0.05 * (ylim[1] - ylim[0]), ylim[1] + 0.05 * (ylim[1] - ylim[0]))
    yticks = _log_ticks(*ylim) if logy else _nice_ticks(*ylim)
    img, (top, bottom, left, right) = _axes(size, xlim, ylim, _nice_ticks(*xlim), yticks, logy)
    square = [(dr, dc) for dr in range(width) for dc in range(width)]
    marker = [(dr, dc) for dr in range(-2, 3) for dc in range(-2, 3)]
    for k, (name, (x, y)) in enumerate(data.items()):
        color = PALETTE[k % len(PALETTE)]
        if name in points:
            finite = np.isfinite(x) & np.isfinite(y)
            rows, cols = _scale(y[finite], *ylim, bottom, top), _scale(x[finite], *xlim, left, right)
            spots = marker
        else:
            rows, cols = _polyline(_scale(x, *xlim, left, right), _scale(y, *ylim, bottom, top))
            spots = square
        keep = (rows >= top) & (rows <= bottom) & (cols >= left) & (cols <= right)
        _stamp(img, rows[keep], cols[keep], spots, color)
        legend_y = top + 4 + 9 * k  # legend: a swatch and the name, top right
        legend_x = right - text_width(name) - 18
        r0, r1, c0, c1 = (0, 5, 3, 8) if name in points else (1, 4, 0, 10)  # a marker or a line
        img[legend_y + r0:legend_y + r1, legend_x + c0:legend_x + c1] = color
        draw_text(img, legend_x + 14, legend_y, name, BLACK)
    return _titled(_captioned(_captioned(img, ylabel, above=True), xlabel), title)


def bar_plot(values, size=(200, 500), color=None, sort=False, title=None):
    """One bar per value (e.g. the KL of each unit of a or z), optionally sorted descending."""
    values = np.nan_to_num(np.asarray(values, np.float64).ravel())
    if sort:
        values = np.sort(values)[::-1]
    color = PALETTE[0] if color is None else (PALETTE[color] if np.isscalar(color) else color)
    lo, hi = min(0.0, values.min()), max(0.0, values.max())
    margin = 0.05 * (hi - lo)  # room above the tallest bar (and below the lowest, if negative)
    ylim = _widen(lo - margin if lo < 0 else lo, hi + margin)
    img, (top, bottom, left, right) = _axes(size, (0, len(values)), ylim, [], _nice_ticks(*ylim))
    edges = np.rint(np.linspace(left + 1, right + 1, len(values) + 1)).astype(int)
    base = int(round(float(_scale(0.0, *ylim, bottom, top))))
    for v, c0, c1 in zip(values, edges[:-1], edges[1:]):
        r = int(round(float(_scale(v, *ylim, bottom, top))))
        gap = 1 if c1 - c0 >= 3 else 0
        rows = slice(r, base) if r < base else slice(base + 1, r + 1)  # the axis line stays
        img[rows, c0:max(c1 - gap, c0 + 1)] = color
    return _titled(img, title)
