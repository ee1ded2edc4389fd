"""Image files: per-mode scaling, EXIF, unreadable files (start-up check, DataError later), upscale cap."""

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from jdiff.data import DataError, DigitsSource, ImageFolderSource, image_ops, make_source

try:
    import tensorflow_datasets  # noqa: F401
except ImportError:
    HAVE_TFDS = False
else:
    HAVE_TFDS = True
    from test_data_tfds import data_dir  # noqa: F401 - the prepared tiny TFDS datasets


def _u8(v):
    return v / 127.5 - 1


def _u16(v):
    return v / 32767.5 - 1


def _alpha(v, a):
    """Unit value of 8-bit colour ``v`` with alpha ``a``, composited on black."""
    return v * a / 255**2 * 2 - 1


def _image(mode, pixels, **info):
    """A 1-row image of ``mode`` holding ``pixels`` (one per column)."""
    img = Image.new(mode, (len(pixels), 1))
    for x, p in enumerate(pixels):
        img.putpixel((x, 0), p)
    img.info.update(info)
    return img


def _palette_image(transparent):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 0), 1)
    if transparent:
        img.info["transparency"] = 0  # palette entry 0 (red) is fully transparent
    return img


# Pillow's naive CMYK -> RGB: (255 - c) * (255 - k) / 255.
CMYK = [(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0), (100, 50, 0, 100)]
CMYK_RGB = [[255, 255, 255], [0, 0, 0], [0, 255, 255], [94, 125, 155]]
LUMA = np.array([0.299, 0.587, 0.114])
# mode -> (image, expected unit values (pixels, 3) for channels=3); channels=1 expects the luma of these.
MODES = {
    "1": (_image("1", [0, 1]), [[-1] * 3, [1] * 3]),
    "L": (_image("L", [0, 51, 255]), [[-1] * 3, [-0.6] * 3, [1] * 3]),
    "LA": (_image("LA", [(200, 255), (200, 0), (200, 128)]), [[v] * 3 for v in (_u8(200), -1, _alpha(200, 128))]),
    "L+tRNS": (_image("L", [10, 200], transparency=10), [[-1] * 3, [_u8(200)] * 3]),
    "P": (_palette_image(False), [[1, -1, -1], [-1, -1, 1]]),
    "P+tRNS": (_palette_image(True), [[-1, -1, -1], [-1, -1, 1]]),
    "RGB": (_image("RGB", [(255, 0, 51)]), [[1, -1, -0.6]]),
    "RGBA": (
        _image("RGBA", [(255, 0, 51, 255), (255, 255, 255, 0), (200, 100, 50, 128)]),
        [[1, -1, -0.6], [-1, -1, -1], [_alpha(c, 128) for c in (200, 100, 50)]],
    ),
    "CMYK": (_image("CMYK", CMYK), [[_u8(c) for c in rgb] for rgb in CMYK_RGB]),
    "I;16": (_image("I;16", [0, 1000, 32768, 65535]), [[_u16(v)] * 3 for v in (0, 1000, 32768, 65535)]),
    "I": (_image("I", [-5, 1, 1000, 65535, 70000]), [[_u16(v)] * 3 for v in (0, 1, 1000, 65535, 65535)]),
    "F": (_image("F", [-1.0, 0.0, 0.25, 1.0, 2.0]), [[v] * 3 for v in (-1, -1, -0.5, 1, 1)]),
}


def _unit(arr, channels):
    return image_ops.convert_channels(image_ops.to_unit(arr), channels)


def _expected(mode, channels):
    rgb = np.asarray(MODES[mode][1], np.float64)
    return rgb if channels == 3 else ((rgb + 1) / 2 @ LUMA * 2 - 1)[:, None]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_scales_to_unit_range(mode, channels):
    img = MODES[mode][0]
    x = _unit(image_ops.pil_to_array(img), channels)
    assert x.dtype == np.float32 and x.shape == (1, img.width, channels)
    np.testing.assert_allclose(x[0], _expected(mode, channels), atol=1e-5)


# PNG can store these modes (I;16 as a 16-bit grey PNG); CMYK goes through JPEG (lossy, so a loose tolerance).
FILE_MODES = {"1": "png", "L": "png", "LA": "png", "L+tRNS": "png", "P": "png", "P+tRNS": "png", "RGB": "png"}
FILE_MODES.update({"RGBA": "png", "I;16": "png", "CMYK": "jpg"})


@pytest.mark.parametrize("mode", list(FILE_MODES))
def test_image_files_of_every_mode(tmp_path, mode):
    img, ext = MODES[mode][0], FILE_MODES[mode]
    path, s = tmp_path / f"img.{ext}", 8 if ext == "jpg" else 1  # JPEG: one 8x8 block per pixel
    img.resize((img.width * s, s), Image.Resampling.NEAREST).save(path, **({"quality": 100} if s > 1 else {}))
    for channels in (1, 3):
        x = make_source(str(path), image_size=1, channels=channels).get(np.array([0]))["image"]
        assert x.shape == (1, 1, 1, channels)
        got = _unit(image_ops.read_image(path)[0, s // 2 :: s], channels)
        np.testing.assert_allclose(got, _expected(mode, channels), atol=0.03 if ext == "jpg" else 1e-5)


def test_16bit_png_keeps_its_range(tmp_path):
    # Regression: convert("L") clipped I;16 data, so 1000/65535 came out as +1.0.
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(tmp_path / "deep.png")
    x = make_source(str(tmp_path), image_size=4, channels=3).get(np.array([0]))["image"]
    np.testing.assert_allclose(x, 1000 / 65535 * 2 - 1, atol=1e-6)


def test_exif_orientation_applied(tmp_path):
    a = (np.arange(12).reshape(3, 4) * 20).astype(np.uint8)  # H=3, W=4
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(a, "L").save(tmp_path / "rot.png", exif=exif)
    np.testing.assert_array_equal(image_ops.read_image(tmp_path / "rot.png")[..., 0], np.rot90(a, -1))
    x = ImageFolderSource(tmp_path, 3, 1).get(np.array([0]))["image"][0, :, :, 0]
    np.testing.assert_allclose(x, _u8(np.rot90(a, -1)[:3].astype(np.float32)), atol=1e-6)  # (4, 3) -> crop rows 0..2


# ----------------------------------------------------------------------------- unreadable files


def _png_bytes(value=0, size=(4, 4)):
    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def _random_png():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_corrupt_pixels():
    """Valid signature, header and CRCs (passes the start-up check) but IDAT is not zlib data."""
    ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"not zlib data") + _chunk(b"IEND", b"")


BAD_FILES = {  # name -> content; all must be caught by the start-up check
    "garbage.png": _png_bytes()[:8] + bytes(range(256)) * 2,  # PNG signature, then garbage
    "truncated.png": _random_png()[:200],
    "zero.png": b"",
    "text.png": b"just some text\n",
    "truncated.jpg": _jpeg_bytes()[:300],
}


def _folder_with_bad_files(root, n_good=6):
    root.mkdir()
    for i in range(n_good):
        (root / f"good{i}.png").write_bytes(_png_bytes(i))
    (root / "trailing.jpg").write_bytes(_jpeg_bytes() + b"extra bytes after EOI")  # readable: kept
    for name, data in BAD_FILES.items():
        (root / name).write_bytes(data)
    return root


def test_bad_files_skipped_with_one_warning(tmp_path):
    root = _folder_with_bad_files(tmp_path / "imgs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = make_source(str(root), image_size=4, channels=1)
    assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)
    msg = str(caught[0].message)
    assert "\n" not in msg and "5 of 12 image files" in msg
    assert all(name in msg for name in BAD_FILES)
    assert sorted(p.name for p, _ in src.bad_files) == sorted(BAD_FILES)
    assert len(src) == 7 and "trailing.jpg" in {p.name for p in src.files}
    b = src.get(np.arange(len(src)))
    assert b["image"].shape == (7, 4, 4, 1) and np.isfinite(b["image"]).all()
    good = [src.files.index(root / f"good{i}.png") for i in range(6)]
    np.testing.assert_allclose(b["image"][good, 0, 0, 0], _u8(np.arange(6)), atol=1e-6)


def test_bad_files_refused_with_on_bad_image_error(tmp_path):
    root = _folder_with_bad_files(tmp_path / "imgs")
    with pytest.raises(ValueError, match="5 of 12 image files .* unreadable") as err:
        make_source(str(root), image_size=4, on_bad_image="error")
    assert "\n" not in str(err.value) and "garbage.png" in str(err.value)
    with pytest.raises(ValueError, match="on_bad_image"):
        make_source(str(root), image_size=4, on_bad_image="ignore")
    with pytest.raises(ValueError, match="on_bad_image"):
        make_source("digits", on_bad_image="warn")


def test_many_bad_files_summarised_and_all_bad_is_an_error(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(9):
        (root / f"b{i}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"9 of 9 .*b4\.png.*and 4 more.*no readable image") as err:
        ImageFolderSource(root, 4)  # the default "skip" cannot leave an empty source
    assert "b5.png" not in str(err.value)
    with pytest.raises(ValueError, match="unreadable"):
        make_source(str(root / "b0.png"), image_size=4)


def test_class_of_only_bad_files_keeps_its_index(tmp_path):
    for cls, data in (("a", _png_bytes()), ("b", b""), ("c", _png_bytes())):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.png").write_bytes(data)
    with pytest.warns(UserWarning, match="b/x.png"):
        src = ImageFolderSource(tmp_path, 4)
    assert src.class_names == ("a", "b", "c") and src.num_classes == 3 and len(src) == 2
    np.testing.assert_array_equal(src.get(np.arange(2))["label"], [0, 2])


def test_decode_failure_after_start_up_is_a_data_error(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes())
    (tmp_path / "corrupt.png").write_bytes(_png_with_corrupt_pixels())
    src = ImageFolderSource(tmp_path, 4)  # the header check cannot see corrupt pixel data
    assert len(src) == 2 and not src.bad_files
    with pytest.raises(DataError, match=r"corrupt\.png") as err:
        src.get(np.array([1]))
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert isinstance(err.value.__cause__, Exception)
    (tmp_path / "a.png").write_bytes(b"changed on disk")
    with pytest.raises(DataError, match=r"a\.png"):
        src.get(np.array([0]))
    (tmp_path / "a.png").unlink()
    with pytest.raises(DataError, match=r"a\.png.*FileNotFoundError"):
        src.get(np.array([0]))


def test_opening_a_folder_checks_headers_without_decoding(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for i in range(1000):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(tmp_path / f"{i:04d}.png")

    def no_decode(path):
        raise AssertionError("decoded at start-up")

    monkeypatch.setattr(image_ops, "read_image", no_decode)
    src = ImageFolderSource(tmp_path, 16)  # header checks only (timed in README, never asserted here)
    assert len(src) == 1000 and not src.bad_files
    with pytest.raises(AssertionError, match="start-up"):
        src.get(np.array([0]))


# ----------------------------------------------------------------------------- upscale cap


def test_absurd_upscaling_refused_at_construction(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"image_size=4096 .* more than 8x.*<= 64"):
        DigitsSource(image_size=4096)
    with pytest.raises(ValueError, match="image_size=65"):
        make_source("digits", image_size=65)
    assert time.monotonic() - t0 < 5
    assert DigitsSource("test", image_size=64).image_shape == (64, 64, 1)  # exactly 8x is allowed
    (tmp_path / "small.png").write_bytes(_png_bytes(size=(4, 6)))
    (tmp_path / "big.png").write_bytes(_png_bytes(size=(5, 5)))
    with pytest.raises(ValueError, match="image_size=41"):
        make_source(str(tmp_path), image_size=41)  # 8x the largest shorter side (5) is the limit
    assert make_source(str(tmp_path), image_size=40).image_shape == (40, 40, 3)


@pytest.mark.skipif(not HAVE_TFDS, reason="needs tensorflow_datasets")
def test_tfds_upscaling_refused(data_dir):  # noqa: F811 - fixture imported from test_data_tfds
    with pytest.raises(ValueError, match="image_size=65"):
        make_source("jdiff_tiny_gray", image_size=65, data_dir=data_dir)
    assert make_source("jdiff_tiny_gray", image_size=64, data_dir=data_dir).image_shape == (64, 64, 1)
