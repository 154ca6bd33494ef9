"""Tests of figures/: the PNG encoder (and tests/png_reader.py, the decoder), checked against
independent parsers; the placement of pixels in grids, scatter plots, line and bar plots; Fig. 5 and the
numbers of learning curves from run folders. (A run's own figures are drawn in tests/test_train.py.)"""
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from figures import draw
from figures import plots
from figures import png
import png_reader

# ---------------------------------------------------------------------------------------------
# Independent PNG helpers (written from the specification, sharing no code with figures/png.py).
# ---------------------------------------------------------------------------------------------


def chunks_of(blob):
    """[(type, data, stored_crc)] of a PNG byte string."""
    out, pos = [], 8
    while pos < len(blob):
        length = int.from_bytes(blob[pos:pos + 4], "big")
        kind, data = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + length]
        out.append((kind, data, int.from_bytes(blob[pos + 8 + length:pos + 12 + length], "big")))
        pos += 12 + length
    return out


def decode_filter0(blob):
    """Decode a PNG whose rows all use filter 0, with nothing but zlib and reshape."""
    chunks = chunks_of(blob)
    width, height, _, ctype = struct.unpack(">IIBB", chunks[0][1][:10])
    channels = {0: 1, 2: 3}[ctype]
    raw = zlib.decompress(b"".join(d for k, d, _ in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all(), "every row should use filter type 0"
    return rows[:, 1:].reshape((height, width) if channels == 1 else (height, width, 3))


def filter_row(ftype, row, prev, bpp):
    """Encode one row (int arrays) with PNG filter `ftype`; vectorised from the raw values."""
    left = np.concatenate([np.zeros(bpp, int), row[:-bpp]])
    upleft = np.concatenate([np.zeros(bpp, int), prev[:-bpp]])
    p = left + prev - upleft
    pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
    pred = {0: 0, 1: left, 2: prev, 3: (left + prev) // 2, 4: paeth}[ftype]
    return (row - pred) % 256


def png_with_filters(image, ftypes):
    """A PNG of an RGB image whose row r uses filter ftypes[r % len(ftypes)]."""
    h, w, _ = image.shape
    rows, prev = [], np.zeros(w * 3, int)
    for r in range(h):
        row = image[r].reshape(-1).astype(int)
        ftype = ftypes[r % len(ftypes)]
        rows.append(bytes([ftype]) + filter_row(ftype, row, prev, 3).astype(np.uint8).tobytes())
        prev = row

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------
# PNG files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, ctype", [((7, 11), 0), ((7, 11, 3), 2)])
def test_signature_and_ihdr(tmp_path, shape, ctype):
    path = tmp_path / "a.png"
    png.write_png(path, np.zeros(shape, np.uint8))
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    kind, data, _ = chunks_of(blob)[0]
    assert kind == b"IHDR" and len(data) == 13
    assert struct.unpack(">IIBBBBB", data) == (11, 7, 8, ctype, 0, 0, 0)


@pytest.mark.parametrize("shape", [(1, 1), (13, 17), (5, 9, 3), (64, 33, 3)])
def test_round_trip(tmp_path, shape):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    png.write_png(tmp_path / "r.png", image)
    back = png_reader.read_png(tmp_path / "r.png")
    assert back.dtype == np.uint8 and back.shape == image.shape
    np.testing.assert_array_equal(back, image)


def test_float_images_are_scaled_and_clipped(tmp_path):
    png.write_png(tmp_path / "f.png", np.array([[-0.5, 0.0, 0.5, 1.0, 2.0, np.nan]]))
    np.testing.assert_array_equal(png_reader.read_png(tmp_path / "f.png"), [[0, 0, 128, 255, 255, 0]])


def test_chunks_and_crcs_check_independently(tmp_path):
    png.write_png(tmp_path / "c.png", np.arange(60, dtype=np.uint8).reshape(4, 5, 3))
    chunks = chunks_of((tmp_path / "c.png").read_bytes())
    assert [k for k, _, _ in chunks][0] == b"IHDR" and chunks[-1][:2] == (b"IEND", b"")
    assert all(k == b"IDAT" for k, _, _ in chunks[1:-1]) and len(chunks) >= 3
    for kind, data, crc in chunks:
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF


@pytest.mark.parametrize("shape", [(9, 4), (6, 10, 3)])
def test_independent_decoder_reads_our_files(tmp_path, shape):
    image = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    png.write_png(tmp_path / "i.png", image)
    np.testing.assert_array_equal(decode_filter0((tmp_path / "i.png").read_bytes()), image)


@pytest.mark.parametrize("ftypes", [[0], [1], [2], [3], [4], [0, 1, 2, 3, 4]])
@pytest.mark.parametrize("high", [256, 4])  # few distinct values give ties in the Paeth predictor
def test_read_png_undoes_every_filter_type(tmp_path, ftypes, high):
    image = np.random.default_rng(3).integers(0, high, (10, 7, 3), dtype=np.uint8)
    (tmp_path / "f.png").write_bytes(png_with_filters(image, ftypes))
    np.testing.assert_array_equal(png_reader.read_png(tmp_path / "f.png"), image)


def test_read_png_rejects_bad_signature_and_crc(tmp_path):
    path = tmp_path / "b.png"
    png.write_png(path, np.full((4, 4), 7, np.uint8))
    blob = bytearray(path.read_bytes())
    blob[0] = 0
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="signature"):
        png_reader.read_png(path)
    blob[0] = 0x89
    blob[8 + 8 + 13 + 4 + 8 + 2] ^= 0xFF  # a byte inside the IDAT data
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="CRC"):
        png_reader.read_png(path)


def test_write_is_atomic_and_creates_folders(tmp_path):
    path = tmp_path / "deep" / "er" / "p.png"
    png.write_png(path, np.zeros((3, 3), np.uint8))
    png.write_png(path, np.ones((2, 5, 3)))  # overwrite in place
    assert os.listdir(path.parent) == ["p.png"]
    assert png_reader.read_png(path).shape == (2, 5, 3)
    assert path.stat().st_mode & 0o044 == 0o044  # readable by others, unlike a mkstemp file
    with pytest.raises(ValueError):
        png.write_png(path, np.zeros((2, 2, 4)))
    assert os.listdir(path.parent) == ["p.png"]
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=f"^cannot write {tmp_path}/file/p.png: "):  # the file asked for
        png.write_png(tmp_path / "file" / "p.png", np.zeros((3, 3), np.uint8))


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def test_image_grid_shape_and_placement():
    images = np.zeros((5, 3, 4))
    images[4, 1, 2] = 1.0  # image 4 sits in row 1, column 1 of a 2 x 3 grid
    grid = plots.image_grid(images, rows=2, cols=3, pad=1)
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 1) and grid.dtype == np.uint8
    assert grid[1 + 1 * 4 + 1, 1 + 1 * 5 + 2] == 255
    assert (grid == 255).sum() == 1
    assert grid[0, 0] == 128 and grid[1, 1] == 0  # a pad pixel, a tile pixel
    assert plots.image_grid(np.zeros((2, 3, 4, 3)), 1, 2, pad=2).shape == (7, 14, 3)
    with pytest.raises(ValueError):
        plots.image_grid(np.zeros((7, 3, 4)), rows=2, cols=3)


def test_scatter_colours_points_and_leaves_far_corner_blank():
    img = plots.scatter([[0.0, 0.0], [1.0, 1.0]], [0, 3], size=101, extent=(-1, 1, -1, 1))
    assert img.shape == (101, 101, 3)
    np.testing.assert_array_equal(img[50, 50], plots.PALETTE[0])    # (0, 0): the centre
    np.testing.assert_array_equal(img[0, 100], plots.PALETTE[3])    # (1, 1): top right
    np.testing.assert_array_equal(img[98, 2], [255, 255, 255])        # bottom left: empty
    marked = plots.scatter([[0.0, 0.0]], [2], size=101, extent=(-1, 1, -1, 1), marked=[0])
    np.testing.assert_array_equal(marked[50, 50], plots.PALETTE[2])
    np.testing.assert_array_equal(marked[50, 56], [0, 0, 0])          # the black outline
    as_mask = plots.scatter([[0.0, 0.0], [0.5, 0.5]], [2, 2], size=101, extent=(-1, 1, -1, 1),
                              marked=np.array([True, False]))
    np.testing.assert_array_equal(as_mask[50, 56], [0, 0, 0])
    np.testing.assert_array_equal(as_mask[25, 75], plots.PALETTE[2])  # unmarked: no outline
    assert (as_mask[25, 63:88] == 0).all(-1).sum() == 0


def test_scatter_background_is_faint_and_laid_out_as_drawn():
    field = np.zeros((4, 4), int)
    field[:2] = 1  # the first rows of a field hold the larger y: the upper half is class 1
    img = plots.scatter(np.zeros((0, 2)), np.zeros(0, int), size=40, background=field,
                          extent=(0, 1, 0, 1))
    top, bottom = img[2, 2].astype(int), img[37, 37].astype(int)
    for pixel, k in [(top, 1), (bottom, 0)]:
        faint = 255 - 0.3 * (255 - plots.PALETTE[k].astype(int))
        np.testing.assert_allclose(pixel, faint, atol=1)


def test_line_plot_draws_series_in_their_colours():
    x = np.arange(10.0)
    img = plots.line_plot({"up": (x, x), "flat": (x, np.full(10, 4.0))}, size=(120, 200))
    assert img.shape == (120, 200, 3)
    for k in (0, 1):
        assert (img == plots.PALETTE[k]).all(-1).sum() > 50
    rows, cols = np.nonzero((img == plots.PALETTE[0]).all(-1)[:, :150])  # left of the legend
    assert rows[cols < 60].mean() > rows[cols > 120].mean()  # a rising line: higher on the right


def test_line_plot_draws_points_as_unconnected_markers():
    x = np.arange(10.0)
    img = plots.line_plot({"line": (x, x)}, size=(120, 200), points={"theirs": ([2.0, 7.0], [7.0, 2.0])})
    marked = (img == plots.PALETTE[1]).all(-1)
    marked[:28, 140:] = False                              # leave out the legend, top right
    rows, cols = np.nonzero(marked)
    assert 2 * 25 >= len(rows) >= 2 * 20                   # two 5×5 markers, nothing between them
    assert len(np.unique(cols)) <= 10 and rows[cols < cols.mean()].mean() < rows[cols > cols.mean()].mean()


def test_figure5_from_run_folders_with_the_authors_numbers(tmp_path, capsys):
    for name, errors in (("a", [30.0, 20.0, 10.0]), ("b", [50.0, 40.0, 30.0])):
        (tmp_path / name).mkdir()
        rows = "".join(f"{i + 1},{e},1.0\n" for i, e in enumerate(errors))
        (tmp_path / name / "metrics.csv").write_text("epoch,test_error_pct,seconds\n" + rows)
    epochs, percent = draw.read_test_error(str(tmp_path / "a"))
    np.testing.assert_array_equal(epochs, [1, 2, 3])
    np.testing.assert_allclose(percent, [30, 20, 10])
    (tmp_path / "c").mkdir()  # an epoch without a test evaluation is left out
    (tmp_path / "c" / "metrics.csv").write_text("epoch,test_error_pct\n1,30.0\n2,\n3,10.0\n")
    epochs, percent = draw.read_test_error(str(tmp_path / "c"))
    np.testing.assert_array_equal(epochs, [1, 3])
    np.testing.assert_allclose(percent, [30, 10])
    out = tmp_path / "fig5.png"
    assert draw.main(["fig5", str(out), f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"                # says what it wrote
    img = png_reader.read_png(out)
    for k in range(2 + len(draw.AUTHORS_FIG5)):         # two curves, then the authors' series
        assert (img == plots.PALETTE[k]).all(-1).sum() > 10, k
    assert draw.main(["fig5", str(out), f"A={tmp_path / 'missing'}"]) == 2 and "error" in capsys.readouterr().err


def test_the_table_of_a_learning_curve(tmp_path, capsys):
    """python3 -m figures table: the numbers quoted from a curve, from a run folder or its metrics.csv,
    at README's epochs or at those given after the runs."""
    errors = [30.0, 18.0, 16.0, 9.0, 4.0, 6.0]                     # epochs 1-6, 120 s each
    rows = "".join(f"{i + 1},120,{e},{e + 1}\n" for i, e in enumerate(errors))
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "metrics.csv").write_text("epoch,seconds,test_error_pct,test_error_bayes_pct\n" + rows)
    row = draw.curve_summary("m", str(tmp_path / "new"), at=(2, 5, 10), below=(20, 10, 1))
    assert row == "| m | 6 | 18.0 / 4.0 / – / 6.0% | 4.0% (epoch 5) | 7.0% | 2 (4) / 4 (8) / – |"
    (tmp_path / "file.csv").write_text("epoch,seconds,test_error_pct,test_error_bayes_pct\n1,60,30,50\n2,60,5,20\n")
    assert draw.curve_summary("o", str(tmp_path / "file.csv"), at=(1,), below=(10,)) == \
        "| o | 2 | 30.0 / 5.0% | 5.0% (epoch 2) | 20.0% | 2 (2) |"
    (tmp_path / "level.csv").write_text("epoch,seconds,test_error_pct,test_error_bayes_pct\n1,60,20,20\n"
                                        "2,60,19.99,20\n")
    level = draw.curve_summary("l", str(tmp_path / "level.csv"), at=(), below=(20,))
    assert level.endswith("| 2 (2) |")  # below 20 %, not at it
    draw.main(["table", f"m={tmp_path / 'new'}"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | epochs | test error at epoch 10 / 20 / 50 / 100 / 200 / last | best |")
    assert out[2] == "| m | 6 | – / – / – / – / – / 6.0% | 4.0% (epoch 5) | 7.0% | 2 (4) / 4 (8) / 4 (8) / 5 (10) |"
    draw.main(["table", f"m={tmp_path / 'new'}", "2", "4", "8"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | epochs | test error at epoch 2 / 4 / 8 / last | best |")
    assert out[2] == "| m | 6 | 18.0 / 9.0 / – / 6.0% | 4.0% (epoch 5) | 7.0% | 2 (4) / 4 (8) / 4 (8) / 5 (10) |"
    for argv, says in ((["table"], "no NAME=RUN_DIR; usage: python3 -m figures table NAME=RUN_DIR"),
                       (["table", "m"], "give the runs first"), (["tables", "m=x"], "no command 'tables': one of fig5,"),
                       (["fig5", "out.png"], "no NAME=RUN_DIR"), (["table", "m=x", "ten"], "'ten' is not NAME=RUN_DIR"),
                       (["table", "m=x", "0"], "'0' is not"), (["table", "2", "m=x"], "give the runs first"),
                       (["table", "m=x", "2", "n=y"], "'n=y' comes after '2'"),
                       (["fig5", "out.png", "m=x", "5"], "'5' is not NAME=RUN_DIR;"),
                       (["fig5", "out.txt", "m=x"], "'out.txt': the figure is written as a PNG file")):
        refused(argv, says, capsys)


def refused(argv, says, capsys):
    """python3 -m figures ARGV exits 2 with one line, 'error: ...', that says what is wrong, and writes nothing."""
    assert draw.main(argv) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and out.err.count("\n") == 1 and says in out.err, out.err


def test_the_gap_between_two_learning_curves(tmp_path, capsys):
    """python3 -m figures gap: counts and means over the epochs both curves logged, in the chosen range."""
    for name, errors in (("a", [30.0, 20.0, 10.0, 8.0, 7.0]), ("b", [31.0, 19.0, 10.0, 9.5])):
        rows = "".join(f"{i + 1},60,{e},{e}\n" for i, e in enumerate(errors))
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text("epoch,seconds,test_error_pct,test_error_bayes_pct\n" + rows)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")      # b - a: +1, -1, 0, +1.5 at epochs 1-4
    assert draw.curve_gap("A", a, "B", b) == (
        "A against B, epochs 1-4 (4 epochs): A lower at 2, level at 1, higher at 1; "
        "mean B - A 0.38 points, mean |difference| 0.88, at most 1.50")
    draw.main(["gap", f"A={a}", f"B={b}", "2", "3"])
    assert capsys.readouterr().out.startswith("A against B, epochs 2-3 (2 epochs): A lower at 0, level at 1, higher at 1")
    assert draw.main(["gap", f"A={a}", f"B={b}", "6", "9"]) == 2 and "no epoch in common" in capsys.readouterr().err
    for argv, says in ((["gap", f"A={a}"], "not 1 and 0"), (["gap", f"A={a}", f"B={b}", "2"], "not 2 and 1"),
                       (["gap", f"A={a}", f"B={b}", "x", "y"], "'x' is not NAME=RUN_DIR nor an epoch")):
        refused(argv, says, capsys)


def test_curves_kl_units_and_the_screen_table(tmp_path, capsys):
    """python3 -m figures curves draws chosen columns per epoch; kl-units a heat map of the KL of each unit
    of a, units sorted by their last KL, units in use bright; screen the table of a screen's CSV."""
    (tmp_path / "r").mkdir()
    kl = [[2.0, 0.0, 0.5], [1.5, 0.0, 0.2]]                        # epochs 1-2, units 1-3
    rows = "".join(f"{e + 1},{30 - e},{20 - e},{','.join(map(str, k))}\n" for e, k in enumerate(kl))
    (tmp_path / "r" / "metrics.csv").write_text("epoch,test_error_pct,train_error_pct,kl_a_1,kl_a_2,kl_a_3\n" + rows)
    draw.main(["curves", str(tmp_path / "c.png"), "test_error_pct,train_error_pct", f"R={tmp_path / 'r'}"])
    img = png_reader.read_png(tmp_path / "c.png")
    assert all((img == plots.PALETTE[k]).all(-1).sum() > 10 for k in range(2))
    draw.main(["kl-units", str(tmp_path / "k.png"), f"R={tmp_path / 'r'}"])
    heat = draw.kl_units({"R": str(tmp_path / "r")})
    body = heat[-9:]                                                # 3 units × 3 rows each, sorted
    brightness = body.astype(int).sum(-1)
    assert brightness[0:3].mean() > brightness[3:6].mean() > brightness[6:9].mean()  # unit 1, 3, 2
    (tmp_path / "collapsed").mkdir()                                # every unit near 0: dark, not rescaled
    (tmp_path / "collapsed" / "metrics.csv").write_text("epoch,kl_a_1,kl_a_2\n1,0.01,0.001\n2,0.005,0.002\n")
    dark = draw.kl_units({"C": str(tmp_path / "collapsed")})[-6:].astype(int).sum(-1)
    assert dark.max() < body.astype(int).sum(-1).max() / 4
    assert draw.main(["curves", str(tmp_path / "c.png"), "test_bound", f"R={tmp_path / 'r'}"]) == 2 and "no column test_bound" in capsys.readouterr().err
    csv_path = tmp_path / "screen.csv"
    csv_path.write_text("run,command,epoch,seconds,test_error_pct,kl_a,kl_z,entropy_qy\n"
                        "a,python3 train.py,1,60,30,2,10,0.5\na,python3 train.py,2,80,25,1,11,0.25\n")
    draw.main(["screen", str(csv_path)])
    out = capsys.readouterr().out.splitlines()
    cells = lambda line: len(line.replace("\\|", "").split("|")) - 2  # noqa: E731 (Markdown's cells)
    assert cells(out[0]) == cells(out[1]) == cells(out[2]) == 7  # a | inside a cell escaped
    assert out[2] == "| a (stopped at epoch 2) | `python3 train.py` | 25.0 (25.0) | 2.00 → 1.00 | 11.0 | 0.250 | 70 |"
    assert draw.screen_table(csv_path, at=1).splitlines()[2].startswith("| a | `python3 train.py` | 30.0 (30.0) |")
    for argv, says in ((["curves", "o.png", "x"], "no NAME=RUN_DIR"), (["curves", "o.png", "R=r"], "no COLUMN"),
                       (["curves", "o.png", "c", "R=r", "--from"], "--from EPOCH comes last"),
                       (["kl-units", "o.png"], "no NAME=RUN_DIR"), (["kl-units"], "no OUT.png"),
                       (["kl-units", "o.png", "R=r", "S"], "'S' is not NAME=RUN_DIR;"), (["screen"], "one SCREEN.csv")):
        refused(argv, says, capsys)
    refused(["table", f"R={tmp_path / 'none'}"], f"{tmp_path / 'none'}: No such file or directory", capsys)
    refused(["curves", str(tmp_path / "o.png"), "test_error_pct", f"R={tmp_path / 'r'}", "--from", "3"],
            f"{tmp_path / 'r'} has no test_error_pct from epoch 3 on (its last is 2)", capsys)
    refused(["fig5", str(tmp_path / "o.png"), f"R={tmp_path / 'r'}", f"C={tmp_path / 'collapsed'}"],
            f"{tmp_path / 'collapsed'}: no epoch with a test error", capsys)  # an unsupervised run, say
    assert not (tmp_path / "o.png").exists()
    assert draw.main(["screen", str(tmp_path / "r" / "metrics.csv")]) == 2  # a run's metrics.csv is no screen
    assert capsys.readouterr().err == (f"error: {tmp_path}/r/metrics.csv is not a screen's CSV: it has no column run, "
                                       "command, kl_a, kl_z, entropy_qy, seconds\n")


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    """python3 -m figures ... | head -1: the rest of the output is dropped without a word, exit 0."""
    (tmp_path / "r").mkdir()
    rows = "".join(f"{e},{e},{50 - e / 10},{50 - e / 10}\n" for e in range(1, 201))
    (tmp_path / "r" / "metrics.csv").write_text("epoch,seconds,test_error_pct,test_error_bayes_pct\n" + rows)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = " ".join(f"R{i}=r" for i in range(1000))                           # ~100 kB of rows: more than a pipe holds
    done = subprocess.run(f"{sys.executable} -m figures table {args} | head -1", shell=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("| run | epochs |") and done.stderr == "", done.stderr


def waits_on_the_pipe(pid):
    """Whether the process sleeps in the kernel on opening or reading a pipe (Linux's /proc)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return any(word in f.read() for word in ("partner", "fifo", "pipe"))
    except OSError:
        return False


def test_ctrl_c_is_one_line(tmp_path):
    """python3 -m figures stopped by Ctrl-C (here while it waits to read a metrics.csv that is a
    pipe nothing writes to): one line, exit 130, no traceback, no figure or temporary file."""
    (tmp_path / "r").mkdir()
    os.mkfifo(tmp_path / "r" / "metrics.csv")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "-m", "figures", "fig5", "f.png", "R=r"], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": root}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline and not waits_on_the_pipe(process.pid):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130 and err == "interrupted (SIGINT); each figure is written whole or not at all\n", err
    assert sorted(os.listdir(tmp_path)) == ["r"]


def test_curves_from_an_epoch_leaves_the_earlier_ones_out(tmp_path, monkeypatch, capsys):
    """curves ... --from N: an early value far off (a bound at temperature 0) does not set the scale."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.csv").write_text("epoch,test_bound\n1,-700\n2,-100\n3,-95\n")
    seen = {}
    monkeypatch.setattr(plots, "line_plot", lambda series, **kw: seen.update(series) or np.zeros((2, 2, 3), np.uint8))
    draw.main(["curves", str(tmp_path / "c.png"), "test_bound", f"R={tmp_path / 'r'}", "--from", "2"])
    assert [(list(x), list(y)) for x, y in seen.values()] == [([2, 3], [-100.0, -95.0])]


def test_line_plot_log_scale_ignores_non_positive_values():
    img = plots.line_plot({"err": ([0, 1, 2, 3], [0.5, 0.1, 0.0, 0.01])}, logy=True)
    assert (img == plots.PALETTE[0]).all(-1).sum() > 50


def test_bar_plot_sorts_descending():
    img = plots.bar_plot([1.0, 3.0, 2.0, 0.0], size=(100, 120), sort=True)
    counts = (img == plots.PALETTE[0]).all(-1).sum(axis=0)
    heights = [c for c in counts if c > 0]
    assert heights and heights == sorted(heights, reverse=True) and heights[0] > heights[-1]


def test_histogram2d_matches_numpy():
    points = np.random.default_rng(4).normal(size=(1000, 2))
    extent = (-2.0, 2.5, -1.5, 2.0)
    ours = plots.histogram2d(points, extent, 7)
    ref, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=7, range=[extent[2:], extent[:2]])
    np.testing.assert_array_equal(ours, ref[::-1])  # our row 0 is the highest y


def test_density_is_dark_to_bright_as_laid_out():
    values = np.zeros((2, 3))
    values[0, 2] = 4.0  # the top right cell is the brightest
    values[1, 0] = 2.0
    img = plots.density(values).astype(int)
    assert img.shape == (2, 3, 3)
    assert img[0, 2].sum() > 600 and img[0, 0].sum() < 20 and 150 < img[1, 0].sum() < 600


def test_draw_text_paints_the_glyph():
    img = np.zeros((7, 9, 3), np.uint8)
    plots.draw_text(img, 1, 1, "1a", (255, 0, 0))
    np.testing.assert_array_equal(img[1:6, 1:4, 0] > 0, plots._GLYPHS["1"])
    np.testing.assert_array_equal(img[1:6, 5:8, 0] > 0, plots._GLYPHS["A"])
    assert img[:, :, 1].max() == 0 and img[0].max() == 0


def test_panels_combine():
    a, b = np.zeros((10, 20, 3), np.uint8), np.zeros((6, 8))
    assert plots.side_by_side([a, b], pad=4).shape == (10, 32, 3)
    assert plots.stack_vertical([a, b], pad=4).shape == (20, 20, 3)
    assert plots.scatter([[0, 0], [1, 1]], [0, 1], size=50, title="Moons").shape == (68, 50, 3)


def test_help_goes_to_stdout_and_a_figure_is_titled_by_its_runs(tmp_path, capsys):
    """python3 -m figures --help: usage on stdout, exit 0 (so `| less` shows it); no command at
    all is a mistake (exit 2). A figure's title names the runs' data set and labels, from their
    config.json, and nothing it cannot know."""
    assert draw.main(["--help"]) == 0
    out = capsys.readouterr()
    assert "usage: python3 -m figures fig5" in out.out and out.err == ""
    assert draw.main([]) == 2
    for name, dataset, labels in (("a", "moons", 6), ("b", "moons", 6), ("c", "mnist", 100)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(f'{{"dataset": "{dataset}", "labels": {labels}}}')
    assert draw.runs_title({"A": str(tmp_path / "a"), "B": str(tmp_path / "b")}, "X") == "MOONS, 6 LABELS: X"
    assert draw.runs_title({"A": str(tmp_path / "a"), "C": str(tmp_path / "c")}, "X") == "X"   # two setups
    assert draw.runs_title({"A": str(tmp_path / "missing")}, "X") == "X"


def test_metrics_out_of_order_or_repeated_are_read_in_epoch_order(tmp_path):
    """An epoch logged twice (a resumed run) counts once, its last row; rows come out by epoch."""
    (tmp_path / "m.csv").write_text("epoch,test_error_pct\n2,20\n1,30\n2,25\n3,10\n")
    epochs, percent = draw.read_test_error(str(tmp_path / "m.csv"))
    assert epochs.tolist() == [1, 2, 3] and percent.tolist() == [30.0, 25.0, 10.0]


def test_a_last_line_cut_short_is_left_out_and_a_screen_run_past_its_epoch_too(tmp_path, capsys):
    """A copy of metrics.csv taken while it was written ends in a line without its line end: that
    line is left out (here "1" of epoch 12 would stand for epoch 1, "3,2.5e" is no number). A
    screen's run with no epoch up to `at` leaves no row and no traceback."""
    for cut in ("1", "3,2.5e"):
        (tmp_path / "m.csv").write_text("epoch,test_error_pct\n1,30\n2,20\n" + cut)
        epochs, percent = draw.read_test_error(str(tmp_path / "m.csv"))
        assert epochs.tolist() == [1, 2] and percent.tolist() == [30.0, 20.0]
    (tmp_path / "screen.csv").write_text("run,command,epoch,seconds,test_error_pct,kl_a,kl_z,entropy_qy\n"
                                         "late,python3 train.py,11,60,30,2,10,0.5\n")
    assert draw.main(["screen", str(tmp_path / "screen.csv")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_two_settings_compared_draw_by_draw(tmp_path, capsys):
    """python3 -m figures draws: each draw's errors and difference, mean ± sd over the draws, and
    whether the difference has one sign on every draw and exceeds its own spread."""
    errors = {"a0": [30, 20], "a1": [40, 24], "a2": [35, 22], "b0": [29, 21], "b1": [38, 25], "b2": [33, 23]}
    for name, (e1, e2) in errors.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text(f"epoch,test_error_pct\n1,{e1}\n2,{e2}\n")
        (tmp_path / name / "config.json").write_text(f'{{"seed": {name[1]}}}')
    runs = lambda p: ",".join(str(tmp_path / f"{p}{i}") for i in range(3))  # noqa: E731
    assert draw.main(["draws", f"A={runs('a')}", f"B={runs('b')}", "1", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| epoch | seed 0: A / B / B − A | seed 1:")
    assert lines[2] == ("| 1 | 30.00 / 29.00 / -1.00 | 40.00 / 38.00 / -2.00 | 35.00 / 33.00 / -2.00 | 35.00 ± 5.00 | "
                        "33.33 ± 4.51 | -1.67 ± 0.58 | B lower on every draw, by more than the spread |")
    assert lines[3].endswith("| 1.00 ± 0.00 | A lower on every draw, by more than the spread |")
    assert draw.main(["draws", f"A={runs('a')}", f"B={tmp_path / 'b0'}"]) == 2       # one run per draw each
    assert capsys.readouterr().err == "error: A has 3 runs and B 1: give one per draw, in the same order\n"
    assert draw.main(["draws", f"A={tmp_path / 'a0'}", f"B={runs('b')}"]) == 2
    assert capsys.readouterr().err == "error: A has 1 run and B 3: give one per draw, in the same order\n"
    tilde = lambda p: ",".join(f"~/{p}{i}" for i in range(3))  # noqa: E731  NAME=~/x: the shell leaves ~ as it is
    with pytest.MonkeyPatch.context() as home:
        home.setenv("HOME", str(tmp_path))
        assert draw.main(["draws", f"A={tilde('a')}", f"B={tilde('b')}", "1", "2"]) == 0
        assert capsys.readouterr().out.splitlines()[2] == lines[2]
    swapped = ",".join(str(tmp_path / f"b{i}") for i in (1, 0, 2))
    assert draw.main(["draws", f"A={runs('a')}", f"B={swapped}"]) == 2             # the draws in another order
    assert capsys.readouterr().err == (f"error: draw 1 pairs {tmp_path}/a0 (seed 0) with {tmp_path}/b1 (seed 1): "
                                       "give the runs of each draw in the same order\n")
    for name in ("a2", "b2", "b1"):                                                 # a draw's seeds unknown
        (tmp_path / name / "config.json").unlink()
    assert draw.main(["draws", f"A={runs('a')}", f"B={runs('b')}", "1"]) == 0
    assert capsys.readouterr().out.startswith("| epoch | seed 0: A / B / B − A | seed 1: A / B / B − A | draw 3: A")


def test_the_difference_of_two_settings_is_drawn_per_draw_at_equal_epochs(tmp_path, capsys, monkeypatch):
    """python3 -m figures draws OUT.png ...: B − A per epoch, one line per draw named by its seed,
    and the level line, over the epochs every run has (a run cut short cuts every draw)."""
    errors = {"a0": [30, 20, 10], "a1": [40, 24, 12], "b0": [29, 21, 11], "b1": [38, 25]}
    for name, values in errors.items():
        (tmp_path / name).mkdir()
        rows = "".join(f"{e + 1},{v}\n" for e, v in enumerate(values))
        (tmp_path / name / "metrics.csv").write_text("epoch,test_error_pct\n" + rows)
        (tmp_path / name / "config.json").write_text(f'{{"seed": {name[1]}}}')
    drawn = {}
    line_plot = plots.line_plot
    monkeypatch.setattr(plots, "line_plot", lambda series, **kw: drawn.update(series) or line_plot(series, **kw))
    runs = lambda p: ",".join(str(tmp_path / f"{p}{i}") for i in range(2))  # noqa: E731
    out = tmp_path / "d.png"
    assert draw.main(["draws", str(out), f"A={runs('a')}", f"B={runs('b')}", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}"
    assert list(drawn) == ["SEED 0", "SEED 1", "LEVEL"]
    assert drawn["SEED 0"][0].tolist() == [1, 2] and drawn["SEED 0"][1].tolist() == [-1, 1]
    assert drawn["SEED 1"][1].tolist() == [-2, 1] and list(drawn["LEVEL"]) == [[1, 2], [0, 0]]
    img = png_reader.read_png(str(out))
    for k in range(3):
        assert (img == plots.PALETTE[k]).all(-1).sum() > 10, k
    refused(["draws", str(out), f"A={runs('a')}"], "two settings, A=RUN,RUN,... and B=RUN,RUN,..., not 1", capsys)
    refused(["draws", str(tmp_path / "d.txt"), f"A={runs('a')}", f"B={runs('b')}"], "written as a PNG file", capsys)
