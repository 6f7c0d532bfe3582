"""imgclf.data.images on real files: CIFAR-10 and COCO JPEGs from the shared tarballs, re-encoded in tmp_path."""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from imgclf.data.images import (
    IMAGE_EXTENSIONS,
    RESIZE_POLICIES,
    BadImage,
    load_resized,
    load_rgb,
    resize_rgb,
)

DATA = Path(os.environ.get("IMGCLF_TEST_DATA", "/nonexistent"))  # set by conftest.py
CIFAR = sorted((DATA / "train").glob("*/*.jpg"))
COCO = sorted((DATA / "coco128" / "images").glob("*.jpg"))

pytestmark = pytest.mark.skipif(not CIFAR, reason=f"no CIFAR JPEGs under {DATA}")

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_path(tmp_path_factory) -> Path:
    """A real 640x480 (landscape) COCO photo; without the shared COCO set, a 640x480 JPEG
    mosaic of 20x15 real CIFAR-10 photos (what the tests need is a large landscape photo)."""
    for p in COCO:
        with Image.open(p) as im:
            if im.size == (640, 480) and im.mode == "RGB":
                return p
    mosaic = Image.new("RGB", (640, 480))
    for i, p in enumerate(CIFAR[: 20 * 15]):
        with Image.open(p) as im:
            mosaic.paste(im.convert("RGB").resize((32, 32)), ((i % 20) * 32, (i // 20) * 32))
    out = tmp_path_factory.mktemp("photo") / "mosaic.jpg"
    mosaic.save(out, quality=90)
    return out


@pytest.fixture(scope="module")
def cifar_path() -> Path:
    return CIFAR[0]


@pytest.fixture(scope="module")
def photo(coco_path: Path) -> np.ndarray:
    """A real photo, shrunk so per-mode tests stay fast: 96 wide x 72 high, RGB uint8."""
    with Image.open(coco_path) as im:
        return np.asarray(im.convert("RGB").resize((96, 72), Image.Resampling.BICUBIC)).copy()


@pytest.fixture(scope="module")
def grey(photo: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).convert("L")).copy()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A minimal valid PNG (PIL cannot write 48-bit RGB, and bombs need a lying header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw_rows))
        + _png_chunk(b"IEND", b"")
    )


def _rgb16_png(arr: np.ndarray) -> bytes:
    h, w, planes = arr.shape
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return _png(w, h, 16, {3: 2, 4: 6}[planes], rows)


def _lzw(data: bytes) -> bytes:
    """TIFF LZW that does not compress: a 9-bit code per byte, most significant bit first, and a
    Clear code every 200 bytes, before the decoder's table would need 10-bit codes."""
    codes = [c for i in range(0, len(data), 200) for c in (256, *data[i:i + 200])] + [257]
    bits = "".join(f"{c:09b}" for c in codes)
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def _packbits(data: bytes) -> bytes:
    """PackBits that does not compress: runs of up to 128 literal bytes."""
    return b"".join(bytes([len(data[i:i + 128]) - 1]) + data[i:i + 128] for i in range(0, len(data), 128))


# TIFF compression -> encoder: none, LZW, deflate (Adobe's code), PackBits, deflate (old code)
_TIFF_ENCODE = {1: bytes, 5: _lzw, 8: zlib.compress, 32773: _packbits, 32946: zlib.compress}


def _rgb16_tiff(arr: np.ndarray, strip_rows: int, order: str = "<", compression: int = 1, predictor: int = 1,
                tile: int = 0, ifd_first: bool = False) -> bytes:
    """A 16-bit RGB(A) TIFF in strips of ``strip_rows`` rows, or in square tiles ``tile`` pixels a
    side (PIL writes 16-bit grey TIFF only). ``compression`` is a key of _TIFF_ENCODE; predictor 2
    stores horizontal differences; ``ifd_first`` puts the directory before the pixels (as tifffile
    does), so that a cut-off file still has it."""
    h, w, planes = arr.shape
    arr = arr.astype(np.uint16)
    if tile:
        padded = np.zeros((-(-h // tile) * tile, -(-w // tile) * tile, planes), np.uint16)
        padded[:h, :w] = arr
        chunks = [padded[y:y + tile, x:x + tile] for y in range(0, h, tile) for x in range(0, w, tile)]
    else:
        chunks = [arr[y:y + strip_rows] for y in range(0, h, strip_rows)]
    if predictor == 2:  # each sample less its left neighbour's, modulo 2**16, within each strip or tile
        chunks = [np.concatenate([c[:, :1], c[:, 1:] - c[:, :-1]], axis=1) for c in chunks]
    blobs = [_TIFF_ENCODE[compression](c.astype(order + "u2").tobytes()) for c in chunks]
    data = b"".join(blobs)
    data += b"\0" * (len(data) % 2)  # the directory starts on a word boundary
    short, long = 3, 4
    tags = {256: (short, [w]), 257: (short, [h]), 258: (short, [16] * planes), 259: (short, [compression]),
            262: (short, [2]), 277: (short, [planes]), 284: (short, [1])}
    tags.update({317: (short, [predictor])} if predictor != 1 else {})
    tags.update({338: (short, [2])} if planes == 4 else {})  # unassociated alpha
    sizes = [len(b) for b in blobs]
    if tile:
        tags.update({322: (short, [tile]), 323: (short, [tile]), 325: (long, sizes)})
    else:
        tags.update({278: (short, [strip_rows]), 279: (long, sizes)})

    def directory(at: int, data_at: int) -> bytes:
        tags[324 if tile else 273] = (long, [data_at + sum(sizes[:i]) for i in range(len(sizes))])
        extra_at = at + 2 + 12 * len(tags) + 4  # values too long for their entry follow the directory
        ifd, extra = struct.pack(f"{order}H", len(tags)), b""
        for tag, (kind, values) in sorted(tags.items()):
            packed = struct.pack(f"{order}{len(values)}{'H' if kind == short else 'I'}", *values)
            if len(packed) > 4:
                packed, extra = struct.pack(f"{order}I", extra_at + len(extra)), extra + packed
            ifd += struct.pack(f"{order}HHI", tag, kind, len(values)) + packed.ljust(4, b"\0")
        return ifd + struct.pack(f"{order}I", 0) + extra

    head = b"II*\x00" if order == "<" else b"MM\x00*"
    if ifd_first:
        return head + struct.pack(f"{order}I", 8) + directory(8, 8 + len(directory(8, 8))) + data
    return head + struct.pack(f"{order}I", 8 + len(data)) + data + directory(8 + len(data), 8)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def _palette_rgb(p_img: Image.Image) -> np.ndarray:
    pal = np.array(p_img.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    return pal[np.asarray(p_img)]


def _assert_rgb(arr: np.ndarray, shape: tuple[int, int]) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8
    assert arr.shape == (*shape, 3)
    assert arr.flags.c_contiguous


# --- sources and plain RGB --------------------------------------------------------------------


def test_image_extensions() -> None:
    from imgclf.data import images

    assert IMAGE_EXTENSIONS == frozenset(
        {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
        | ({".avif"} if images.AVIF_READABLE else set())
        | ({".heic", ".heif"} if images.HEIF_READABLE else set())
    )
    # every picture format is either read or named with what to do about it
    for ext in (".avif", ".heic", ".heif"):
        assert (ext in IMAGE_EXTENSIONS) != (ext in images.UNREADABLE_IMAGE_EXTENSIONS)
    assert RESIZE_POLICIES == ("stretch", "crop", "letterbox")


def test_jpeg_from_str_path_and_bytes_agree(cifar_path: Path) -> None:
    with Image.open(cifar_path) as im:
        expected = np.asarray(im.convert("RGB"))
    from_path = load_rgb(cifar_path)
    _assert_rgb(from_path, (32, 32))
    np.testing.assert_array_equal(from_path, expected)
    np.testing.assert_array_equal(load_rgb(str(cifar_path)), expected)
    np.testing.assert_array_equal(load_rgb(cifar_path.read_bytes()), expected)
    np.testing.assert_array_equal(load_rgb(bytearray(cifar_path.read_bytes())), expected)


def test_result_is_writable(coco_path: Path) -> None:
    arr = load_rgb(coco_path)
    _assert_rgb(arr, (480, 640))
    arr[0, 0] = 0  # callers augment in place


@pytest.mark.parametrize(
    ("suffix", "kwargs"),
    [
        (".png", {}),
        (".bmp", {}),
        (".tif", {}),
        (".tiff", {"compression": "tiff_lzw"}),
        (".ppm", {}),
        (".webp", {"lossless": True}),
    ],
)
def test_lossless_formats_round_trip_exactly(
    tmp_path: Path, photo: np.ndarray, suffix: str, kwargs: dict
) -> None:
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(photo).save(path, **kwargs)
    out = load_rgb(path)
    _assert_rgb(out, photo.shape[:2])
    np.testing.assert_array_equal(out, photo)


# --- modes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".pgm", ".jpg"])
def test_greyscale_L(tmp_path: Path, grey: np.ndarray, suffix: str) -> None:
    path = tmp_path / f"grey{suffix}"
    Image.fromarray(grey).save(path)
    with Image.open(path) as im:
        assert im.mode == "L"
        decoded = np.asarray(im)
    out = load_rgb(path)
    _assert_rgb(out, grey.shape)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], decoded)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_bilevel_mode_1(tmp_path: Path, photo: np.ndarray, suffix: str) -> None:
    bw = Image.fromarray(photo).convert("1")
    path = tmp_path / f"bw{suffix}"
    bw.save(path)
    with Image.open(path) as im:
        assert im.mode == "1"
    out = load_rgb(path)
    expected = np.where(np.asarray(bw), 255, 0).astype(np.uint8)
    assert set(np.unique(out)) <= {0, 255}
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_la_composites_on_white(tmp_path: Path, grey: np.ndarray) -> None:
    h, w = grey.shape
    alpha = np.full((h, w), 255, np.uint8)
    alpha[:, : w // 3] = 0
    alpha[:, w // 3 : 2 * w // 3] = 128
    path = tmp_path / "la.png"
    Image.fromarray(np.dstack([grey, alpha])).save(path)
    out = load_rgb(path)
    _assert_rgb(out, (h, w))
    assert (out[:, : w // 3] == 255).all()  # fully transparent -> white, not black
    expected = _composite_on_white(np.dstack([grey] * 3), alpha)
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0
    np.testing.assert_array_equal(out[:, 2 * w // 3 :, 0], grey[:, 2 * w // 3 :])


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif"])
def test_rgba_composites_on_white(tmp_path: Path, photo: np.ndarray, suffix: str) -> None:
    h, w, _ = photo.shape
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    path = tmp_path / f"rgba{suffix}"
    Image.fromarray(np.dstack([photo, alpha])).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    out = load_rgb(path)
    _assert_rgb(out, (h, w))
    assert (out[:, 0] == 255).all()
    expected = _composite_on_white(photo, alpha)
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0


def test_palette_without_transparency(tmp_path: Path, photo: np.ndarray) -> None:
    pal = Image.fromarray(photo).quantize(64)
    path = tmp_path / "pal.png"
    pal.save(path)
    out = load_rgb(path)
    np.testing.assert_array_equal(out, _palette_rgb(pal))


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparent_index_composites_on_white(
    tmp_path: Path, photo: np.ndarray, suffix: str
) -> None:
    pal = Image.fromarray(photo).quantize(32)
    indices = np.asarray(pal)
    transparent = int(np.bincount(indices.ravel()).argmax())  # the most common colour
    path = tmp_path / f"pal_trns{suffix}"
    pal.save(path, transparency=transparent)
    with Image.open(path) as im:
        assert im.mode == "P" and im.info.get("transparency") == transparent
    out = load_rgb(path)
    mask = indices == transparent
    assert mask.any() and (~mask).any()
    assert (out[mask] == 255).all()
    np.testing.assert_array_equal(out[~mask], _palette_rgb(pal)[~mask])


def test_palette_with_alpha_table_no_warning_escapes(tmp_path: Path, photo: np.ndarray) -> None:
    pal = Image.fromarray(photo).quantize(16)
    alphas = [0, 128] + [255] * 14
    path = tmp_path / "pal_alpha.png"
    pal.save(path, transparency=bytes(alphas))
    with Image.open(path) as im:
        assert isinstance(im.info["transparency"], bytes)  # PIL warns when converting this
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_rgb(path)
    indices = np.asarray(pal)
    expected = _composite_on_white(_palette_rgb(pal), np.array(alphas, np.uint8)[indices])
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0
    assert (out[indices == 0] == 255).all()


def test_colour_key_transparency_in_rgb_and_grey_png(
    tmp_path: Path, photo: np.ndarray, grey: np.ndarray
) -> None:
    rgb = photo.copy()
    rgb[:10, :10] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb_trns.png", transparency=(1, 2, 3))
    out = load_rgb(tmp_path / "rgb_trns.png")
    assert (out[:10, :10] == 255).all()
    keep = np.any(rgb != (1, 2, 3), axis=-1)
    np.testing.assert_array_equal(out[keep], rgb[keep])

    g = grey.copy()
    g[-5:, -5:] = 7
    Image.fromarray(g).save(tmp_path / "l_trns.png", transparency=7)
    out = load_rgb(tmp_path / "l_trns.png")
    assert (out[-5:, -5:] == 255).all()
    np.testing.assert_array_equal(out[g != 7, 0], g[g != 7])


def test_16bit_grey_png_scales_not_clips(tmp_path: Path, grey: np.ndarray) -> None:
    a16 = grey.astype(np.uint16) * 256 + 100  # real content, low byte not zero
    a16[0, :4] = (65535, 32768, 255, 0)
    path = tmp_path / "grey16.png"
    Image.fromarray(a16).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    out = load_rgb(path)
    _assert_rgb(out, grey.shape)
    assert tuple(out[0, :4, 0]) == (255, 128, 1, 0)  # round(v * 255 / 65535)
    expected = np.round(a16.astype(np.float64) * 255 / 65535)
    np.testing.assert_array_equal(out[..., 1], expected)
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("bits", [8, 10, 12, 14])
def test_16bit_png_of_fewer_bits_uses_its_real_depth(tmp_path: Path, grey: np.ndarray, bits: int) -> None:
    # cv2.imwrite of a uint16 array of 8-bit values, or a 10/12/14-bit sensor's frames, in a 16-bit
    # PNG: keeping the high byte made them black (8 bits) or 0..15 (12 bits)
    full = (1 << bits) - 1
    a16 = np.round(grey.astype(np.float64) * full / 255).astype(np.uint16)
    a16[0, 0] = full  # the sensor's white somewhere in the frame
    path = tmp_path / f"grey{bits}in16.png"
    Image.fromarray(a16).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    out = load_rgb(path)[..., 0].astype(int)
    assert out[0, 0] == 255
    assert np.abs(out.ravel()[1:] - grey.astype(int).ravel()[1:]).max() <= 1
    # the same through an in-memory uint16 array (predict/serve on arrays)
    from imgclf.data.images import image_to_rgb

    np.testing.assert_array_equal(image_to_rgb(a16)[..., 2], out)


def test_16bit_depth_is_rounded_up_to_a_sensor_depth(tmp_path: Path, grey: np.ndarray) -> None:
    # a dim 12-bit frame (largest value 3000) is read as 12-bit, not stretched to white
    a16 = (grey.astype(np.uint32) * 3000 // 255).astype(np.uint16)
    a16[0, 0] = 3000
    path = tmp_path / "dim12.png"
    Image.fromarray(a16).save(path)
    out = load_rgb(path)[..., 0]
    assert out[0, 0] == round(3000 * 255 / 4095)
    np.testing.assert_array_equal(out, np.floor(a16.astype(np.float64) * 255 / 4095 + 0.5))


def test_16bit_grey_png_with_colour_key(tmp_path: Path, grey: np.ndarray) -> None:
    a16 = grey.astype(np.uint16) * 257
    a16[:3, :3] = 12345
    path = tmp_path / "grey16_trns.png"
    Image.fromarray(a16).save(path, transparency=12345)
    out = load_rgb(path)
    assert (out[:3, :3] == 255).all()
    np.testing.assert_array_equal(out[3:, :, 0], grey[3:])


def test_16bit_big_endian_tiff(tmp_path: Path, grey: np.ndarray) -> None:
    a16 = grey.astype(np.uint16) * 257
    a16[0, :2] = (65535, 32768)
    path = tmp_path / "grey16b.tif"
    Image.frombytes("I;16B", grey.shape[::-1], a16.astype(">u2").tobytes()).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16B"
    out = load_rgb(path)
    assert tuple(out[0, :2, 0]) == (255, 128)
    np.testing.assert_array_equal(out[1:, :, 0], grey[1:])


def test_16bit_pgm_opens_as_mode_I(tmp_path: Path, grey: np.ndarray) -> None:
    a16 = grey.astype(np.uint16) * 257
    a16[0, :2] = (65535, 32768)
    path = tmp_path / "grey16.pgm"
    Image.fromarray(a16).save(path)
    with Image.open(path) as im:
        assert im.mode == "I"
    out = load_rgb(path)
    assert tuple(out[0, :2, 0]) == (255, 128)
    np.testing.assert_array_equal(out[1:, :, 2], grey[1:])


def test_32bit_int_tiff(tmp_path: Path, grey: np.ndarray) -> None:
    in_16bit_range = grey.astype(np.int32) * 257
    Image.fromarray(in_16bit_range).save(tmp_path / "i16.tif")
    np.testing.assert_array_equal(load_rgb(tmp_path / "i16.tif")[..., 0], grey)

    # beyond 16 bits there is no white point: the image's own range is stretched to 0..255
    wide = grey.astype(np.int32) * 1000 - 50_000
    Image.fromarray(wide).save(tmp_path / "i32.tif")
    out = load_rgb(tmp_path / "i32.tif")[..., 0].astype(int)
    expected = np.round((grey.astype(float) - grey.min()) * 255 / (grey.max() - grey.min()))
    assert np.abs(out - expected).max() <= 1


def test_16bit_rgb_png(tmp_path: Path, photo: np.ndarray) -> None:
    a16 = photo.astype(np.uint16) * 257
    a16[0, 0] = (65535, 32768, 0)
    path = tmp_path / "rgb48.png"
    path.write_bytes(_rgb16_png(a16))
    out = load_rgb(path)
    _assert_rgb(out, photo.shape[:2])
    assert tuple(out[0, 0]) == (255, 128, 0)
    np.testing.assert_array_equal(out.reshape(-1, 3)[1:], photo.reshape(-1, 3)[1:])


@pytest.mark.parametrize("bits", [10, 12])
def test_16bit_rgb_and_rgba_png_of_fewer_bits_use_their_real_depth(tmp_path: Path, photo: np.ndarray,
                                                                   bits: int) -> None:
    # a 12-bit camera's colour frames in 16-bit PNG: PIL keeps the high byte, so they were 0..15
    full = (1 << bits) - 1
    a16 = np.round(photo.astype(np.float64) * full / 255).astype(np.uint16)
    a16[0, 0] = full
    path = tmp_path / "rgb.png"
    path.write_bytes(_rgb16_png(a16))
    out = load_rgb(path).astype(int)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert np.abs(out.reshape(-1, 3)[1:] - photo.reshape(-1, 3)[1:].astype(int)).max() <= 1
    # with alpha: half-transparent on the left half, composited on white as 8-bit RGBA is
    alpha = np.full(photo.shape[:2], 65535, np.uint16)
    alpha[:, : photo.shape[1] // 2] = 32768
    path.write_bytes(_rgb16_png(np.dstack([a16, alpha])))
    out = load_rgb(path).astype(float)
    want = _composite_on_white(np.asarray(photo), np.round(alpha / 257).astype(np.uint8))
    want[0, 0] = _composite_on_white(np.full((1, 1, 3), 255), np.array([[128]]))[0, 0]
    assert np.abs(out - want).max() <= 1.5
    # cut off: one line, as a truncated 8-bit file gets
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated or corrupt"):
        load_rgb(path)


@pytest.mark.parametrize("order, strip_rows", [("<", 7), (">", 10_000)])
def test_uncompressed_16bit_colour_tiff_uses_its_real_depth(tmp_path: Path, photo: np.ndarray, order: str,
                                                            strip_rows: int) -> None:
    # microscopes and machine-vision cameras write 12-bit colour as uncompressed 16-bit TIFF
    a16 = np.round(photo.astype(np.float64) * 4095 / 255).astype(np.uint16)
    a16[0, 0] = 4095
    path = tmp_path / "rgb.tif"
    path.write_bytes(_rgb16_tiff(a16, strip_rows, order))
    with Image.open(path) as im:
        assert im.mode == "RGB" and np.asarray(im).max() <= 16  # what PIL alone makes of it
    out = load_rgb(path).astype(int)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert np.abs(out.reshape(-1, 3)[1:] - photo.reshape(-1, 3)[1:].astype(int)).max() <= 1
    alpha = np.full(photo.shape[:2], 65535, np.uint16)
    alpha[:, : photo.shape[1] // 2] = 0  # transparent: white
    path.write_bytes(_rgb16_tiff(np.dstack([a16, alpha]), strip_rows, order))
    out = load_rgb(path)
    assert (out[:, : photo.shape[1] // 2] == 255).all()
    assert np.abs(out[1:, photo.shape[1] // 2:].astype(int) - photo[1:, photo.shape[1] // 2:]).max() <= 1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(BadImage):
        load_rgb(path)


@pytest.mark.parametrize("compression, predictor, order, strip_rows, tile", [
    (8, 1, "<", 7, 0), (8, 2, ">", 7, 0), (32946, 2, "<", 10_000, 0),  # deflate, Adobe's code and the old one
    (5, 1, ">", 5, 0), (5, 2, "<", 7, 0),  # LZW
    (32773, 1, ">", 7, 0),  # PackBits (libtiff applies no Predictor to it)
    (8, 2, "<", 0, 64), (5, 1, ">", 0, 16),  # tiled: partial tiles on the right / at the bottom
])
def test_compressed_16bit_colour_tiff_uses_its_real_depth(tmp_path: Path, photo: np.ndarray, compression: int,
                                                          predictor: int, order: str, strip_rows: int,
                                                          tile: int) -> None:
    # the same 12-bit colour compressed: libtiff decodes it, PIL kept its high byte (4095 -> 15)
    a16 = np.round(photo.astype(np.float64) * 4095 / 255).astype(np.uint16)
    a16[0, 0] = 4095
    alpha = np.broadcast_to(np.linspace(65535, 0, photo.shape[1]).astype(np.uint16), photo.shape[:2])
    path, plain = tmp_path / "packed.tif", tmp_path / "plain.tif"
    for arr in (a16, np.dstack([a16, alpha])):
        path.write_bytes(_rgb16_tiff(arr, strip_rows, order, compression, predictor, tile))
        with Image.open(path) as im:
            assert im.tile[0][0] == "libtiff" and np.asarray(im)[..., :3].max() <= 16  # what PIL alone makes of it
        plain.write_bytes(_rgb16_tiff(arr, 7, order))
        out = load_rgb(path)
        np.testing.assert_array_equal(out, load_rgb(plain))  # exactly as the uncompressed file
        assert tuple(out[0, 0]) == (255, 255, 255)
    assert np.abs(out[1:, :1].astype(int) - photo[1:, :1]).max() <= 1  # the opaque left edge
    # cut off inside the pixels (the directory first, so it survives): one line, no crash
    data = _rgb16_tiff(a16, strip_rows, order, compression, predictor, tile, ifd_first=True)
    for keep in (0.5, 0.95):
        path.write_bytes(data[: int(len(data) * keep)])
        assert _bad(path).reason == "truncated or corrupt image data"


def test_float_tiff(tmp_path: Path, grey: np.ndarray) -> None:
    unit = grey.astype(np.float32) / 255.0
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(load_rgb(tmp_path / "unit.tif")[..., 1], grey)

    odd = grey.astype(np.float32) * 4.0 - 300.0
    Image.fromarray(odd).save(tmp_path / "odd.tif")
    out = load_rgb(tmp_path / "odd.tif")[..., 0]
    assert out.min() == 0 and out.max() == 255


def test_cmyk_jpeg_red(tmp_path: Path) -> None:
    path = tmp_path / "red_cmyk.jpg"
    Image.new("CMYK", (48, 32), (0, 255, 255, 0)).save(path, quality=95)
    data = path.read_bytes()
    assert b"Adobe" in data  # the inverted-CMYK (Photoshop) flavour, the common one
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    out = load_rgb(path)
    _assert_rgb(out, (32, 48))
    assert np.abs(out.reshape(-1, 3).mean(0) - RED).max() < 10


def test_cmyk_jpeg_photo(tmp_path: Path, photo: np.ndarray) -> None:
    path = tmp_path / "photo_cmyk.jpg"
    Image.fromarray(photo).convert("CMYK").save(path, quality=95)
    out = load_rgb(path)
    assert np.abs(out.astype(int) - photo).mean() < 4


def test_ycbcr_tiff(tmp_path: Path, photo: np.ndarray) -> None:
    ycc = Image.fromarray(photo).convert("YCbCr")
    path = tmp_path / "ycc.tif"
    ycc.save(path)
    with Image.open(path) as im:
        readable = im.mode == "YCbCr"
    if not readable:
        # Pillow before 13 opens this file as RGB and then fails to decode its own YCbCr TIFF
        # ("image file is truncated"): the loader must say so in one line, naming the file
        with pytest.raises(BadImage, match="ycc.tif"):
            load_rgb(path)
        return
    out = load_rgb(path)
    np.testing.assert_array_equal(out, np.asarray(ycc.convert("RGB")))
    assert np.abs(out.astype(int) - photo).mean() < 2


def test_lab_tiff(tmp_path: Path, photo: np.ndarray) -> None:
    path = tmp_path / "lab.tif"
    Image.fromarray(photo).convert("LAB").save(path)
    with Image.open(path) as im:
        assert im.mode == "LAB"
    out = load_rgb(path)
    assert np.abs(out.astype(int) - photo).mean() < 3


def test_multiframe_gif_uses_first_frame(tmp_path: Path, photo: np.ndarray) -> None:
    first = Image.fromarray(photo).quantize(64)
    second = Image.fromarray(255 - photo).quantize(64)
    path = tmp_path / "anim.gif"
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 2
    out = load_rgb(path).astype(int)
    assert np.abs(out - _palette_rgb(first)).mean() < 1
    assert np.abs(out - (255 - photo)).mean() > 50


def test_multipage_tiff_uses_first_page(tmp_path: Path, photo: np.ndarray) -> None:
    path = tmp_path / "pages.tif"
    Image.fromarray(photo).save(path, save_all=True, append_images=[Image.fromarray(255 - photo)])
    np.testing.assert_array_equal(load_rgb(path), photo)


def _oriented_jpeg(src: Path, dst: Path, orientation: int) -> np.ndarray:
    """Save the real photo with a red top-left block and an EXIF orientation; return the pixels."""
    with Image.open(src) as im:
        arr = np.asarray(im.convert("RGB")).copy()
    arr[:100, :100] = RED
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(dst, quality=95, exif=exif)
    return arr


def test_exif_orientation_6_rotates(tmp_path: Path, coco_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    stored = _oriented_jpeg(coco_path, path, 6)
    h, w, _ = stored.shape
    out = load_rgb(path)
    _assert_rgb(out, (w, h))  # 640x480 landscape stored, shown as 480x640 portrait
    # orientation 6 = rotate 90 degrees clockwise for display: top-left block ends top-right
    assert np.abs(out[5:95, -95:-5].reshape(-1, 3).mean(0) - RED).max() < 20
    assert np.abs(out[5:95, 5:95].reshape(-1, 3).mean(0) - RED).max() > 60
    assert np.abs(out.astype(int) - np.rot90(stored, k=-1)).mean() < 5

    # the draft (reduced-scale) path applies it too
    small = load_resized(path, 64, "crop")
    assert small.shape == (64, 64, 3)
    assert np.abs(small.astype(int) - resize_rgb(out, 64, "crop")).mean() < 6


@pytest.mark.parametrize("orientation", [1, 3, 8])
def test_other_exif_orientations(tmp_path: Path, coco_path: Path, orientation: int) -> None:
    path = tmp_path / f"o{orientation}.jpg"
    _oriented_jpeg(coco_path, path, orientation)
    out = load_rgb(path)
    expected_corner = {
        1: (slice(5, 95), slice(5, 95)),
        3: (slice(-95, -5), slice(-95, -5)),
        8: (slice(-95, -5), slice(5, 95)),
    }[orientation]
    assert out.shape == ((480, 640, 3) if orientation in (1, 3) else (640, 480, 3))
    assert np.abs(out[expected_corner].reshape(-1, 3).mean(0) - RED).max() < 20


# --- bad files --------------------------------------------------------------------------------


def _bad(source, **kwargs) -> BadImage:
    with pytest.raises(BadImage) as info:
        load_rgb(source, **kwargs)
    err = info.value
    text = str(err)
    assert "\n" not in text
    assert text == f"{err.path}: {err.reason}".replace("\n", "\\n")
    return err


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    err = _bad(path)
    assert err.reason == "empty file"
    assert err.path == str(path)
    assert str(err).startswith(str(path) + ": ")
    assert _bad(b"").reason == "empty file"


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are not the pixels you are looking for\n" * 20)
    err = _bad(path)
    assert err.reason == "not an image file (cannot identify format)"
    assert str(err) == f"{path}: not an image file (cannot identify format)"


def test_heic_without_a_decoder_says_what_reads_it(tmp_path: Path, photo: np.ndarray, monkeypatch) -> None:
    from imgclf.data import images

    assert images.AVIF_READABLE, "Pillow >= 11.3 wheels decode AVIF: pip install -U pillow"
    # a machine without pillow-heif, whether or not this one has it: PIL without its HEIF opener
    # (plugins load lazily and register into Image.ID: load them all first, or the ones loaded
    # during the test would vanish with the patched list)
    Image.init()
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != "HEIF"])
    monkeypatch.setitem(images.UNREADABLE_IMAGE_EXTENSIONS, ".heic", "pip install pillow-heif to read them")
    # an iPhone photo handed to predict or the server: HEIF (AVIF's container) with brand 'heic'
    Image.fromarray(photo).save(tmp_path / "x.avif")
    data = (tmp_path / "x.avif").read_bytes()
    assert data[4:12] == b"ftypavif"
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data[:8] + b"heic" + data[12:])
    assert _bad(path).reason == "HEIC image: pip install pillow-heif to read them"
    path.write_bytes(data[:40])  # a cut-off AVIF is still a broken file
    assert _bad(path).reason == "truncated or corrupt image data"


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg(tmp_path: Path, coco_path: Path, keep: float) -> None:
    data = coco_path.read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * keep)])
    err = _bad(path)
    assert err.reason == "truncated or corrupt image data"
    assert str(err).startswith(f"{path}: ")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # reported, not silently grey-filled
    with pytest.raises(BadImage, match="truncated"):
        load_resized(path, 64)


def test_jpeg_cut_inside_header(tmp_path: Path, cifar_path: Path) -> None:
    path = tmp_path / "head.jpg"
    path.write_bytes(cifar_path.read_bytes()[:40])
    assert _bad(path).reason == "truncated or corrupt image data"


def test_truncated_png(tmp_path: Path, photo: np.ndarray) -> None:
    full = tmp_path / "full.png"
    Image.fromarray(photo).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert _bad(cut).reason == "truncated or corrupt image data"
    assert _bad(cut.read_bytes()).reason == "truncated or corrupt image data"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "gone.png"
    err = _bad(missing)
    assert err.reason == "no such file"
    assert str(err) == f"{missing}: no such file"
    assert _bad(tmp_path).path == str(tmp_path)


def test_newline_in_file_name_keeps_message_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad\nname.jpg"
    path.write_bytes(b"")
    assert "\n" not in str(_bad(path))


def test_bad_image_pickles() -> None:
    err = pickle.loads(pickle.dumps(BadImage("a/b.jpg", "empty file")))
    assert (err.path, err.reason, str(err)) == ("a/b.jpg", "empty file", "a/b.jpg: empty file")


def test_bomb_limit_checked_before_decoding(coco_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "load" not in JpegImagePlugin.JpegImageFile.__dict__  # so the spy below sees JPEG decodes
    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        if self.tile:  # pixels still to decode; later calls are no-ops
            decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    err = _bad(coco_path, max_pixels=640 * 480 - 1)
    assert err.reason == f"image too large: 640x480 pixels exceeds limit of {640 * 480 - 1}"
    assert decoded == []
    with pytest.raises(BadImage, match="too large"):
        load_resized(coco_path, 32, max_pixels=1000)
    assert decoded == []

    assert load_rgb(coco_path, max_pixels=640 * 480).shape == (480, 640, 3)
    assert decoded == [(640, 480)]


def test_pixel_limit_applies_to_the_reduced_jpeg_decode(coco_path: Path) -> None:
    # a photo over the limit that JPEG decodes at 1/8 scale (a 108-MP phone photo for a 224-px
    # cache) is not a bomb: only the decoded pixels count
    limit = 640 * 480 // 4
    with pytest.raises(BadImage, match="image too large: 640x480"):
        load_rgb(coco_path, max_pixels=limit)  # a full decode
    assert load_resized(coco_path, 32, max_pixels=limit).shape == (32, 32, 3)


def test_bomb_header_above_default_limit(tmp_path: Path) -> None:
    # 10000x10000 grey is over the default limit but under PIL's hard 2x one: PIL only warns
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(10_000, 10_000, 8, 0, b"\x00" * 10_001 * 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = _bad(path)
    assert err.reason == ("image too large: 10000x10000 pixels exceeds limit of 89478485 (a guard against "
                          "decompression bombs; IMGCLF_MAX_PIXELS=N raises it)")


def test_the_pixel_limit_for_ones_own_files_can_be_raised(tmp_path: Path, monkeypatch) -> None:
    # a 9500x9500 scan (90 MP, just over the default) as a valid PNG: refused, then read with the
    # limit raised; an explicit max_pixels (serve's --max-pixels) is not affected
    path = tmp_path / "scan.png"
    path.write_bytes(_png(9_500, 9_500, 8, 0, (b"\x00" + b"\x80" * 9_500) * 9_500))
    assert "IMGCLF_MAX_PIXELS=N raises it" in _bad(path).reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # raised below: put back after
    monkeypatch.setenv("IMGCLF_MAX_PIXELS", "100_000_000")
    small = load_resized(path, 32)
    assert small.shape == (32, 32, 3) and (small == 128).all()
    with pytest.raises(BadImage, match="exceeds limit of 1000$"):
        load_resized(path, 32, max_pixels=1000)


def test_bomb_header_above_pil_hard_limit(tmp_path: Path) -> None:
    # PIL itself refuses this in Image.open, before the size is visible to us
    path = tmp_path / "huge.png"
    path.write_bytes(_png(20_000, 20_000, 8, 0, b"\x00" * 20_001 * 4))
    err = _bad(path)
    assert err.reason.startswith("image too large: 400000000 pixels exceeds limit of")


# --- resizing ---------------------------------------------------------------------------------


def _stripes(height: int, width: int, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """Equal vertical stripes of the given colours."""
    img = np.zeros((height, width, 3), np.uint8)
    bounds = np.linspace(0, width, len(colours) + 1).round().astype(int)
    for colour, a, b in zip(colours, bounds[:-1], bounds[1:], strict=True):
        img[:, a:b] = colour
    return img


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
@pytest.mark.parametrize(
    ("h", "w", "size"), [(480, 640, 64), (640, 480, 64), (32, 32, 96), (17, 50, 24), (1, 9, 8)]
)
def test_resize_shapes(photo: np.ndarray, policy: str, h: int, w: int, size: int) -> None:
    img = np.asarray(Image.fromarray(photo).resize((w, h)))
    out = resize_rgb(img, size, policy)
    _assert_rgb(out, (size, size))


def test_resize_same_size_returns_input(photo: np.ndarray) -> None:
    square = np.ascontiguousarray(photo[:64, :64])
    for policy in RESIZE_POLICIES:
        assert resize_rgb(square, 64, policy) is square


def test_resize_accepts_non_contiguous(photo: np.ndarray) -> None:
    flipped = photo[:, ::-1]
    out = resize_rgb(flipped, 48)
    _assert_rgb(out, (48, 48))
    np.testing.assert_array_equal(out, resize_rgb(np.ascontiguousarray(flipped), 48))


def test_stretch_geometry() -> None:
    img = _stripes(32, 64, [RED, BLUE])
    out = resize_rgb(img, 32, "stretch")
    assert (out[:, :14] == RED).all() and (out[:, -14:] == BLUE).all()
    tall = resize_rgb(img, 64, "stretch")  # height doubles, width kept
    assert (tall[:, :30] == RED).all()


def test_letterbox_geometry_wide() -> None:
    img = _stripes(32, 64, [RED, BLUE])
    out = resize_rgb(img, 32, "letterbox")
    assert (out[:8] == 114).all() and (out[-8:] == 114).all()  # 8-row grey bands top and bottom
    assert (out[8:24, :14] == RED).all() and (out[8:24, -14:] == BLUE).all()


def test_letterbox_geometry_tall_upscale() -> None:
    img = np.transpose(_stripes(16, 32, [RED, BLUE]), (1, 0, 2))  # 32 high x 16 wide
    out = resize_rgb(img, 64, "letterbox")
    assert (out[:, :16] == 114).all() and (out[:, -16:] == 114).all()
    assert (out[:28, 16:48] == RED).all() and (out[-28:, 16:48] == BLUE).all()


def test_crop_keeps_centre() -> None:
    img = _stripes(32, 64, [RED, GREEN, GREEN, BLUE])
    out = resize_rgb(img, 32, "crop")
    assert (out == GREEN).all()
    up = resize_rgb(img, 96, "crop")
    assert (up[:, 4:-4] == GREEN).all()


def test_crop_tall_keeps_centre() -> None:
    img = np.transpose(_stripes(40, 120, [RED, GREEN, BLUE]), (1, 0, 2))  # 120 high x 40 wide
    out = resize_rgb(img, 20, "crop")
    # the bicubic kernel may reach just outside the crop box, like any crop of a resample
    assert (out[1:-1] == GREEN).all()
    assert np.abs(out.astype(int) - GREEN).mean() < 5


@pytest.mark.parametrize(
    ("img", "size", "policy", "says"),
    [
        (np.zeros((8, 8), np.uint8), 4, "stretch", "expects an HxWx3 uint8 array"),
        (np.zeros((8, 8, 4), np.uint8), 4, "stretch", "expects an HxWx3 uint8 array"),
        (np.zeros((8, 8, 3), np.float32), 4, "stretch", "expects an HxWx3 uint8 array"),
        (np.zeros((0, 8, 3), np.uint8), 4, "stretch", "empty image"),
        (np.zeros((8, 8, 3), np.uint8), 0, "stretch", "size must be a positive integer"),
        (np.zeros((8, 8, 3), np.uint8), 4, "pad", "unknown resize policy"),
    ],
)
def test_resize_rejects_bad_arguments(img: np.ndarray, size: int, policy: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):  # resize_rgb's own check, not one of PIL's
        resize_rgb(img, size, policy)


# --- load_resized -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
def test_load_resized_matches_full_decode(coco_path: Path, policy: str) -> None:
    fast = load_resized(coco_path, 64, policy)
    _assert_rgb(fast, (64, 64))
    reference = resize_rgb(load_rgb(coco_path), 64, policy)
    assert np.abs(fast.astype(int) - reference).mean() < 6


@pytest.mark.parametrize("container", ["JPEG", "MPO"])
def test_load_resized_decodes_jpeg_at_reduced_scale(
    tmp_path: Path, coco_path: Path, monkeypatch: pytest.MonkeyPatch, container: str
) -> None:
    path = coco_path
    if container == "MPO":  # the multi-picture JPEG that many cameras write
        path = tmp_path / "camera.jpg"
        with Image.open(coco_path) as im:
            im.save(path, "MPO", save_all=True, append_images=[im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
        with Image.open(path) as im:
            assert im.format == "MPO"
    sizes = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = load_resized(path, 64)
    assert sizes and sizes[0][0] < 640 and sizes[0][1] < 480
    # still at least twice the target, so the final resample has pixels to average
    assert min(sizes[0]) >= 128
    assert np.abs(fast.astype(int) - resize_rgb(load_rgb(path), 64)).mean() < 6


def test_load_resized_on_other_sources(tmp_path: Path, photo: np.ndarray, cifar_path: Path) -> None:
    png = tmp_path / "photo.png"
    Image.fromarray(photo).save(png)
    for policy in RESIZE_POLICIES:
        np.testing.assert_array_equal(load_resized(png, 40, policy), resize_rgb(photo, 40, policy))
        np.testing.assert_array_equal(
            load_resized(png.read_bytes(), 40, policy), resize_rgb(photo, 40, policy)
        )
    # CIFAR at its own size: nothing to resize
    np.testing.assert_array_equal(load_resized(cifar_path, 32), load_rgb(cifar_path))


def test_load_resized_errors(tmp_path: Path) -> None:
    with pytest.raises(BadImage, match="no such file"):
        load_resized(tmp_path / "missing.jpg", 32)
    with pytest.raises(ValueError):
        load_resized(tmp_path / "missing.jpg", 32, "zoom")
