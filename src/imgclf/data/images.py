"""Decode image files of any common format/mode into HxWx3 uint8 RGB arrays and resize them.

Every failure of a file is a :class:`BadImage` with a one-line reason, so callers (the cache
builder, the HTTP server) can skip or report a file without knowing PIL's exception zoo.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

__all__ = [
    "BadImage",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "RESIZE_POLICIES",
    "SIXTEEN_BIT_RULE",
    "UNREADABLE_IMAGE_EXTENSIONS",
    "load_resized",
    "load_rgb",
    "resize_rgb",
]


def _heif_opener() -> bool:
    """Register pillow-heif's HEIC/HEIF decoder with PIL when it is installed (optional: iPhones
    save photos as .heic, but libheif is a large native dependency most users never need)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    try:
        pillow_heif.register_heif_opener()
    except Exception:  # noqa: BLE001 - a broken install reads as "not installed", with the same hint
        return False
    return True


def _avif_decoder() -> bool:
    """Pillow >= 11.3 ships an AVIF decoder in its wheels; older ones (or builds without libavif)
    do not know the name, or have no such module."""
    from PIL import features

    try:
        return bool(features.check_module("avif"))
    except (ValueError, ImportError):
        return False


HEIF_READABLE = _heif_opener()
AVIF_READABLE = _avif_decoder()

# .jfif and .jpe are JPEG's other extensions (what Windows and some browsers save), not other formats.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
    | ({".avif"} if AVIF_READABLE else set())
    | ({".heic", ".heif"} if HEIF_READABLE else set())
)

# Extensions of pictures that cannot be read here, with what to do about them: a folder scan
# counts them and says so once, where skipping them silently would quietly shrink a class.
_RAW_HINT = "camera raw files: convert them to JPEG or PNG"
UNREADABLE_IMAGE_EXTENSIONS: dict[str, str] = {
    ext: hint
    for ext, hint in {
        ".heic": "pip install pillow-heif to read them",
        ".heif": "pip install pillow-heif to read them",
        ".avif": "this Pillow has no AVIF decoder: pip install -U pillow to read them",
        ".jxl": "JPEG XL is not supported: convert them to JPEG or PNG",
        ".svg": "vector drawings are not supported: render them to PNG",
        ".psd": "Photoshop files are not read: export them to PNG",
        **dict.fromkeys((".dng", ".cr2", ".cr3", ".nef", ".nrw", ".arw", ".orf", ".rw2", ".raf", ".pef",
                         ".srw"), _RAW_HINT),
        # formats PIL may decode but a folder scan does not take (a file named on the command line
        # is still tried): JPEG 2000 scans, TGA textures, icons. Passed over without a word, a
        # folder of them gave 'no images' or quietly fewer predictions.
        **dict.fromkeys((".jp2", ".j2k", ".jpx", ".jpf", ".tga", ".ico", ".pcx", ".qoi", ".sgi", ".dds"),
                        "not read from folders: convert them to PNG or JPEG"),
    }.items()
    if ext not in IMAGE_EXTENSIONS
}

RESIZE_POLICIES = ("stretch", "crop", "letterbox")

# Same value as PIL's own default Image.MAX_IMAGE_PIXELS (about 256 MiB of RGB at 3 bytes/pixel).
DEFAULT_MAX_PIXELS = 89_478_485
# For one's own large images (a 12000x9000 PNG scan or map tile; a JPEG that size decodes at
# reduced scale and passes): IMGCLF_MAX_PIXELS raises the limit of training, predict and check.
# serve has its own --max-pixels, for uploads from others.
MAX_PIXELS_ENV = "IMGCLF_MAX_PIXELS"


def _max_pixels() -> int:
    text = os.environ.get(MAX_PIXELS_ENV, "").replace("_", "")
    if text.isdigit() and int(text) > 0:
        if Image.MAX_IMAGE_PIXELS and int(text) > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = int(text)  # PIL's own refusal sits at twice its value
        return int(text)
    return DEFAULT_MAX_PIXELS

LETTERBOX_FILL = 114  # YOLO's padding grey: mid-range, so padding is not mistaken for content
RESAMPLE = Image.Resampling.BICUBIC  # every resize (export.py records it for deployments)
ALPHA_BACKGROUND = (255, 255, 255)  # transparency is composited on white

# A resize that shrinks by more than this factor first does a cheap integer box reduction
# (PIL's reducing_gap); 3.0 is what PIL documents as indistinguishable from a full resample.
_REDUCING_GAP = 3.0

# JPEG draft decoding keeps at least this many times the final size, so the last (bicubic)
# resampling step still has real pixels to average over instead of DCT-upsampled blur.
_DRAFT_MARGIN = 2.0

_ORIENTATION_TAG = 0x0112

# Signatures of the formats we list: a file that starts with one but that PIL cannot even
# identify is a broken image, not "some other kind of file", and deserves that reason.
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"P2",
    b"P3",
    b"P5",
    b"P6",
)
# AVIF and HEIC are ISO-BMFF files: a 'ftyp' box at offset 4 names the brand (mif1/msf1: any HEIF)
_BMFF_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")

_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
_BIT_DEPTHS = (8, 10, 12, 14, 16)  # the sample depths 16-bit containers really hold

# What 16-bit (and in-range 32-bit integer) data becomes; deploy/export.py records it.
SIXTEEN_BIT_RULE = (
    "per image: bits = the smallest of 8, 10, 12, 14, 16 that holds the image's largest value, then "
    "round(value * 255 / (2**bits - 1)) (16-bit: 65535 -> 255; 12-bit: 4095 -> 255; 8-bit values "
    "stored in 16 bits stay as they are); 32-bit integer data outside 0..65535 is min-max stretched to 0..255"
)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class BadImage(Exception):
    """An image file that cannot be used; str() is one line: '<path>: <reason>'."""

    path: str
    reason: str

    def __init__(self, path: str, reason: str) -> None:
        # both in args so the exception pickles across worker processes
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return _one_line(f"{self.path}: {self.reason}")


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def load_rgb(source: str | os.PathLike | bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode any image into an HxWx3 uint8 RGB array.

    ``source`` is a path or the encoded file's bytes. EXIF orientation is applied, the first
    frame of animations/multi-page files is used and transparency is composited on white.
    Raises :class:`BadImage` for anything that cannot be decoded.
    """
    return _as_array(_decode(source, max_pixels, None))


def resize_rgb(img: np.ndarray, size: int, policy: str = "stretch") -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8.

    ``stretch`` ignores the aspect ratio, ``crop`` fills the square and cuts the centre out of
    the longer side, ``letterbox`` fits the whole image and pads it with grey 114, centred.
    """
    _check_size_policy(size, policy)
    if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8):
        desc = (
            f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        )
        raise ValueError(f"resize_rgb expects an HxWx3 uint8 array, got {desc}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"resize_rgb got an empty image of shape {img.shape}")
    if img.shape[:2] == (size, size):
        return np.ascontiguousarray(img)
    return _resize_pil(Image.fromarray(np.ascontiguousarray(img)), size, policy)


def image_to_rgb(image, name: str = "<array>") -> np.ndarray:
    """An in-memory image -> HxWx3 uint8 RGB, converted as decoded files are: a PIL image of any
    mode (EXIF orientation applied), or a numpy array HxW (grey), HxWx1, HxWx3 or HxWx4 (RGBA:
    alpha on white) of uint8, other integers in 0..255, uint16 (scaled by the bit depth it uses, see
    SIXTEEN_BIT_RULE) or float ([0, 1], [0, 255] or [-1, 1]). Raises :class:`BadImage` for anything else."""
    if isinstance(image, Image.Image):
        try:
            return _as_array(_to_rgb(_apply_orientation(image)))
        except Exception as e:  # noqa: BLE001 - a PIL image that will not convert is one bad input
            raise BadImage(name, f"cannot convert PIL mode {image.mode}: {e}") from e
    if not isinstance(image, np.ndarray):
        raise BadImage(name, f"not an image: {type(image).__name__}")
    a = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    if a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise BadImage(name, f"an image array is HxW, HxWx1, HxWx3 or HxWx4; got shape {image.shape}")
    return _as_array(_to_rgb(Image.fromarray(np.ascontiguousarray(pixels_to_uint8(a, name)))))


def pixels_to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    """Pixel values of any numeric type -> uint8, by one rule for the whole array (an image, or a
    data set's N x H x W x C): uint16 by its bit depth, floats by their range, bools as 0/255,
    other integers if in 0..255. Raises :class:`BadImage` otherwise."""
    if a.dtype == np.uint16:
        return _depth_to_uint8(a)
    if a.dtype.kind == "f":
        return _float_array_to_uint8(a, name)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind in "iu" and a.dtype != np.uint8:  # int32/int64: np.asarray of Python ints
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise BadImage(name, f"integer image values span [{lo}, {hi}]: pass 0..255 (or uint16 data as uint16)")
        return a.astype(np.uint8)
    if a.dtype != np.uint8:
        raise BadImage(name, f"unsupported image array dtype {a.dtype}")
    return a


def load_resized(
    source: str | os.PathLike | bytes,
    size: int,
    policy: str = "stretch",
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """load_rgb + resize_rgb, using PIL's JPEG draft mode (Image.draft) to decode large JPEGs at
    reduced scale when the target is much smaller: this is the hot path of the cache builder,
    so it must be fast.

    Results differ slightly from ``resize_rgb(load_rgb(...))`` for large JPEGs (the DCT-domain
    downscale is not bicubic), by a mean of about one grey level.
    """
    _check_size_policy(size, policy)
    img = _decode(source, max_pixels, (size, policy))
    if img.size == (size, size) and img.imgclf_box is None:
        return _as_array(img)
    return _resize_pil(img, size, policy)


# --- decoding ---------------------------------------------------------------------------------


def _decode(source: str | os.PathLike | bytes, max_pixels: int | None, draft: tuple[int, str] | None) -> Image.Image:
    """Open, validate and fully decode ``source`` into an RGB PIL image (see load_rgb)."""
    max_pixels = max_pixels or _max_pixels()
    name, fp = _open_source(source)
    # PIL warns about harmless things (palette transparency given as bytes, odd EXIF/TIFF
    # tags, big-but-allowed images); callers get either an array or a BadImage, never noise.
    # catch_warnings is process-global: in a threaded server a warning raised elsewhere during
    # a decode may also be hidden, which is acceptable for warnings.
    with fp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = _identify(fp, name, max_pixels)
        width, height = img.size
        extent = None
        if draft is not None:
            # only JPEG (and MPO, the multi-picture JPEG many cameras write) can decode at
            # reduced scale (down to 1/8 a side); for every other format draft() is a no-op
            img.draft(None, _draft_request(img.size, *draft))
            if img.size != (width, height):
                # a DCT-scaled decode rounds each side up (640x428 at 1/8 is 80x54, not 80x53.5):
                # its last row/column holds a part pixel, so the picture spans width/k x height/k
                # of it. Resizing the rounded-up size distorted the aspect ratio, and a letterbox
                # of a JPEG got another height than the same photo as a PNG (22 rows, not 21)
                k = next((k for k in (2, 4, 8) if img.size == (-(-width // k), -(-height // k))),
                         width / img.size[0])
                extent = (width / k, height / k)
        # before load(): the whole point is not to allocate/decode a bomb's pixels. The limit is
        # on the pixels decoded, so a 108-MP phone photo that decodes at 1/8 scale is fine.
        if img.size[0] * img.size[1] > max_pixels:
            raise BadImage(name, f"image too large: {width}x{height} pixels exceeds limit of {max_pixels}"
                           + ("" if max_pixels != DEFAULT_MAX_PIXELS else
                              f" (a guard against decompression bombs; {MAX_PIXELS_ENV}=N raises it)"))
        deep = _deep_colour(img, fp, name)
        if deep is not None:
            img = deep
        else:
            try:
                # never ImageFile.LOAD_TRUNCATED_IMAGES: a cut-off file must be reported, not grey-filled
                img.load()
            except Exception as exc:
                raise BadImage(name, "truncated or corrupt image data") from exc
        # pixels are in memory now; fp (ours, not PIL's) may close when the with-block ends
        oriented = _apply_orientation(img)
        box = None
        if extent is not None:
            turned = oriented is not img  # exif_transpose ran: the part pixels may now lead
            box = _picture_box(img.size, extent, img.getexif().get(_ORIENTATION_TAG, 1) if turned else 1)
        try:
            img = _to_rgb(oriented)
        except (ValueError, OSError) as exc:
            raise BadImage(name, f"unsupported image mode {oriented.mode}") from exc
        img.imgclf_box = box  # read by _resize_pil; None: the whole image is the picture
        return img


# EXIF orientation -> the transpose ImageOps.exif_transpose applies for it
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _picture_box(size: tuple[int, int], extent: tuple[float, float], orientation: int) -> tuple[float, ...]:
    """Where a draft decode's picture lies once EXIF-oriented: (left, top, right, bottom). Decoded,
    the part pixels are the last column and row; a rotation or mirror can bring them first (a
    180-degree turn puts them left and top), so the box then ends at the image's far edge."""
    (w, h), (width, height) = extent, size
    method = _EXIF_TRANSPOSE.get(orientation)
    if method is None:
        return (0.0, 0.0, w, h)
    corner = Image.new("L", (2, 2))
    corner.putpixel((0, 0), 255)  # the decode's first pixel: where the whole pixels start
    cx, cy = corner.transpose(method).getbbox()[:2]
    if method in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                  Image.Transpose.ROTATE_270):
        w, h, width, height = h, w, height, width
    left, top = (width - w if cx else 0.0), (height - h if cy else 0.0)
    return (left, top, left + w, top + h)


_DEEP_COLOUR_PNG = ("RGB;16B", "RGBA;16B")  # PIL's raw modes for 16-bit colour PNG
# ... and for uncompressed 16-bit colour TIFF: numpy dtype and planes
_DEEP_COLOUR_TIFF = {"RGB;16L": ("<u2", 3), "RGB;16B": (">u2", 3), "RGB;16N": ("=u2", 3),
                     "RGBA;16L": ("<u2", 4), "RGBA;16B": (">u2", 4), "RGBA;16N": ("=u2", 4)}


def _deep_colour(img: Image.Image, fp: io.BufferedIOBase, name: str) -> Image.Image | None:
    """A 16-bit RGB(A) PNG or TIFF decoded at its full depth, then scaled as 16-bit grey is
    (SIXTEEN_BIT_RULE); None for any other image. PIL opens such files as 8-bit RGB by keeping
    the high byte of each sample, so the 10- and 12-bit data of scientific and machine-vision
    cameras came out near black (4095 -> 15). PIL has no 16-bit colour mode to decode them into:
    PNG goes through pypng (pure Python, slower than PIL, fine for these rare files); an
    uncompressed TIFF's strips are read as they lie in the file; a TIFF compressed with LZW,
    deflate or PackBits (strips or tiles, with or without horizontal differencing) is decoded by
    libtiff as 16-bit grey (_compressed_tiff_samples). Other 16-bit colour TIFFs (planar ones,
    other compressions, BigTIFF) still go through PIL, high byte only."""
    try:
        if img.format == "PNG" and len(img.tile) == 1 and img.tile[0][3] in _DEEP_COLOUR_PNG:
            values, bits = _png_samples(fp)
        elif img.format == "TIFF" and img.tile and all(
                t[0] == "raw" and isinstance(t[3], tuple) and t[3][0] in _DEEP_COLOUR_TIFF and tuple(t[3][1:]) == (0, 1)
                and t[3][0] == img.tile[0][3][0] for t in img.tile):
            values, bits = _raw_tiff_samples(img, fp), 16
        elif _compressed_deep_tiff(img, fp):
            values, bits = _compressed_tiff_samples(img, fp), 16
        else:
            return None
    except Exception as exc:
        raise BadImage(name, "truncated or corrupt image data") from exc
    rgb = _depth_to_uint8(values[..., :3])
    if values.shape[2] == 3:
        out = Image.fromarray(rgb, "RGB")
    else:  # alpha is a fraction: its full scale is the file's bit depth, whatever values it holds
        full = (1 << bits) - 1
        alpha = ((values[..., 3].astype(np.uint32) * 255 + full // 2) // full).astype(np.uint8)
        out = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    exif = img.getexif()
    if exif.get(_ORIENTATION_TAG, 1) != 1:  # applied next, as on any other image
        tags = Image.Exif()
        tags[_ORIENTATION_TAG] = exif[_ORIENTATION_TAG]
        out.info["exif"] = tags.tobytes()
    return out


def _png_samples(fp: io.BufferedIOBase) -> tuple[np.ndarray, int]:
    import png

    fp.seek(0)
    width, height, rows, info = png.Reader(file=fp).asDirect()  # tRNS becomes an alpha plane
    values = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows])
    return values.reshape(height, width, info["planes"]), info["bitdepth"]


def _raw_tiff_samples(img: Image.Image, fp: io.BufferedIOBase) -> np.ndarray:
    dtype, planes = _DEEP_COLOUR_TIFF[img.tile[0][3][0]]
    out = np.zeros((img.size[1], img.size[0], planes), np.uint16)
    for _, (x0, y0, x1, y1), offset, _ in img.tile:
        n = (x1 - x0) * (y1 - y0) * planes
        fp.seek(offset)
        buf = fp.read(2 * n)
        if len(buf) < 2 * n:
            raise ValueError("strip cut off")
        out[y0:y1, x0:x1] = np.frombuffer(buf, dtype).reshape(y1 - y0, x1 - x0, planes)
    return out


# TIFF compressions libtiff decodes to the samples as written: LZW, deflate (two codes), PackBits
_TIFF_LOSSLESS = (5, 8, 32946, 32773)
_TIFF_SHORT_TAGS = (258, 259, 262, 266, 277, 284)  # of those _compressed_tiff_samples writes


def _compressed_deep_tiff(img: Image.Image, fp: io.BufferedIOBase) -> bool:
    """Whether ``img`` is a compressed 16-bit RGB(A) TIFF that _compressed_tiff_samples reads:
    a classic (not Big) TIFF, chunky (PlanarConfiguration 1), Predictor none or horizontal differencing."""
    if img.format != "TIFF":
        return False
    tags = img.tag_v2
    if not (len(img.tile) == 1 and img.tile[0][0] == "libtiff" and img.tile[0][3][0] in _DEEP_COLOUR_TIFF
            and tags.get(259) in _TIFF_LOSSLESS and tags.get(284, 1) == 1 and tags.get(317, 1) in (1, 2)):
        return False
    fp.seek(0)
    return fp.read(4) in (b"II*\x00", b"MM\x00*")


def _compressed_tiff_samples(img: Image.Image, fp: io.BufferedIOBase) -> np.ndarray:
    """The (height, width, planes) uint16 samples of a compressed 16-bit RGB(A) TIFF.

    libtiff decodes these samples in full, but PIL has no 16-bit colour mode to put them in and
    keeps their high bytes. So the file gets a new first directory that describes the very same
    compressed strips or tiles as a 16-bit grey image ``planes`` times as wide (the compressed
    bytes do not depend on what the samples mean), which PIL decodes as I;16. That directory has
    no Predictor: libtiff would undo horizontal differencing between neighbouring samples rather
    than pixels, so it is undone here, along each row of each strip or tile.
    """
    tags = img.tag_v2
    planes = _DEEP_COLOUR_TIFF[img.tile[0][3][0]][1]
    width, height = img.size
    fp.seek(0)
    data = fp.read()
    order = "<" if data[:2] == b"II" else ">"
    new = {256: width * planes, 257: height, 258: 16, 259: tags[259], 262: 1, 277: 1, 284: 1}
    tiled = 324 in tags
    new.update({t: tags[t] for t in ((266, 323, 324, 325) if tiled else (266, 273, 278, 279)) if t in tags})
    if tiled:
        new[322] = tags[322] * planes
    end = len(data) + len(data) % 2  # a directory starts on a word boundary
    extra_at = end + 2 + 12 * len(new) + 4  # arrays too long for their entry follow the directory
    entries, extra = [struct.pack(order + "H", len(new))], b""
    for tag, value in sorted(new.items()):
        values = value if isinstance(value, tuple) else (value,)
        kind, code = (3, "H") if tag in _TIFF_SHORT_TAGS else (4, "I")
        packed = struct.pack(f"{order}{len(values)}{code}", *values)
        if len(packed) > 4:
            packed, extra = struct.pack(order + "I", extra_at + len(extra)), extra + packed
        entries.append(struct.pack(f"{order}HHI", tag, kind, len(values)) + packed.ljust(4, b"\0"))
    data = data[:4] + struct.pack(order + "I", end) + data[8:end] + b"\0" * (end - len(data))
    with TiffImagePlugin.TiffImageFile(io.BytesIO(data + b"".join(entries) + b"\0" * 4 + extra)) as grey:
        # not Image.open: its pixel limit would count each sample as a pixel (ours is checked already)
        if grey.mode not in _SIXTEEN_BIT_GREY or grey.size != (width * planes, height):
            raise ValueError(f"re-read as {grey.mode} {grey.size}")
        values = np.array(grey, dtype=np.uint16).reshape(height, width, planes)
    if tags.get(317, 1) == 2 and tags[259] != 32773:  # libtiff ignores a Predictor with PackBits: so here
        step = tags[322] if tiled else width  # each tile's rows are differenced on their own
        for x in range(0, width, step):
            block = values[:, x:x + step]
            np.cumsum(block, axis=1, dtype=np.uint16, out=block)  # modulo 2**16, as it was differenced
    return values


def _open_source(source: str | os.PathLike | bytes) -> tuple[str, io.BufferedIOBase]:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        name = f"<{len(data)} bytes>"
        if not data:
            raise BadImage(name, "empty file")
        return name, io.BytesIO(data)
    try:
        path = os.fspath(source)
    except TypeError:
        raise TypeError(f"image source must be a path or bytes, not {type(source).__name__}") from None
    name = os.fsdecode(path)
    try:
        fp = open(path, "rb")  # closed by _decode's with-block
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise BadImage(name, f"a link to {os.fsdecode(os.readlink(path))}, which does not exist: "
                                 "mount or restore the target, or remove the link") from exc
        raise BadImage(name, "no such file") from exc
    except IsADirectoryError as exc:
        raise BadImage(name, "is a directory, not a file") from exc
    except PermissionError as exc:
        raise BadImage(name, "permission denied") from exc
    except OSError as exc:
        raise BadImage(name, f"cannot read file ({exc.strerror or exc})") from exc
    try:
        regular = stat.S_ISREG(os.fstat(fp.fileno()).st_mode)
        empty = regular and os.fstat(fp.fileno()).st_size == 0
    except OSError:
        regular, empty = True, False
    if not regular:
        # a pipe, FIFO or character device (``cat x.jpg | imgclf predict RUN /dev/stdin``,
        # ``<(curl ...)``): its size reads 0 whatever it holds, and PIL needs to seek, so its
        # bytes are read here (the pixel limit still applies when they are decoded)
        try:
            with fp:
                data = fp.read()
        except OSError as exc:
            raise BadImage(name, f"cannot read file ({exc.strerror or exc})") from exc
        if not data:
            raise BadImage(name, "empty file (nothing was written to this pipe or device)")
        return name, io.BytesIO(data)
    if empty:
        fp.close()
        raise BadImage(name, "empty file")
    return name, fp


def _identify(fp: io.BufferedIOBase, name: str, max_pixels: int) -> Image.Image:
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as exc:
        # PIL refuses images over 2 * Image.MAX_IMAGE_PIXELS itself, before we see the size
        raise BadImage(name, _pil_bomb_reason(str(exc), max_pixels)) from exc
    except UnidentifiedImageError as exc:
        fp.seek(0)
        head = fp.read(16)
        if head[4:8] == b"ftyp" and head[8:12] in _BMFF_BRANDS:
            ext = ".avif" if head[8:12] in (b"avif", b"avis") else ".heic"
            if ext in UNREADABLE_IMAGE_EXTENSIONS:  # a phone photo, not a broken file: say what reads it
                raise BadImage(name, f"{ext[1:].upper()} image: {UNREADABLE_IMAGE_EXTENSIONS[ext]}") from exc
            raise BadImage(name, "truncated or corrupt image data") from exc
        if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            raise BadImage(name, "truncated or corrupt image data") from exc
        raise BadImage(name, "not an image file (cannot identify format)") from exc
    except Exception as exc:
        # plugins raise OSError/SyntaxError/struct.error/... on mangled headers
        raise BadImage(name, "truncated or corrupt image data") from exc


def _pil_bomb_reason(message: str, max_pixels: int) -> str:
    pil_limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else max_pixels
    limit = min(max_pixels, pil_limit)
    match = re.search(r"\((\d+) pixels\)", message)
    if match:
        return f"image too large: {int(match.group(1))} pixels exceeds limit of {limit}"
    return f"image too large: exceeds limit of {limit} pixels"


def _draft_request(image_size: tuple[int, int], size: int, policy: str) -> tuple[int, int]:
    """The smallest decode size that still leaves the final resize _DRAFT_MARGIN to work with."""
    width, height = image_size
    if policy == "stretch":
        target_w = target_h = size
    else:
        # crop and letterbox scale both axes alike; an EXIF rotation swaps w/h, which leaves
        # min/max (and so this request, in stored orientation) unchanged
        scale = size / (min(width, height) if policy == "crop" else max(width, height))
        target_w, target_h = width * scale, height * scale
    return (
        max(1, min(width, math.ceil(target_w * _DRAFT_MARGIN))),
        max(1, min(height, math.ceil(target_h * _DRAFT_MARGIN))),
    )


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        # exif_transpose copies the image even when there is nothing to do
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(img)
    except Exception:
        # a mangled EXIF block should not cost us pixels that decoded fine
        pass
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> mode "RGB", with 16/32-bit and float data rescaled rather than clipped."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT_GREY or mode == "I":
        return _grey_to_rgb(_high_range_to_uint8(img), img)
    if mode == "F":
        return _grey_to_rgb(_float_to_uint8(np.asarray(img)), img)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        # Transparent pixels go on white rather than black: most product/clip-art style images
        # with alpha are shown on white, and a black background would be a spurious cue for the
        # classifier. This is a choice, not a standard; any fixed colour keeps results stable.
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    # 1, L, P, CMYK (PIL already undoes Adobe's inverted JPEG CMYK), YCbCr, LAB, HSV, RGBX ...
    return img.convert("RGB")


def _high_range_to_uint8(img: Image.Image) -> np.ndarray:
    values = np.asarray(img)
    if img.mode == "I" and (values.size == 0 or values.min() < 0 or values.max() > 65535):
        # genuine 32-bit data has no fixed white point: stretch its own range
        return _stretch_to_uint8(values.astype(np.float64))
    # 16-bit data (I;16*, and mode I as PIL opens 16-bit PNG/PGM/TIFF)
    return _depth_to_uint8(values)


def _depth_to_uint8(values: np.ndarray) -> np.ndarray:
    """Integers 0..65535 -> uint8, scaled by the bit depth the image really uses (SIXTEEN_BIT_RULE).

    A 16-bit container rarely holds 16 bits: cv2.imwrite of a uint16 array of 8-bit values,
    medical and machine-vision sensors of 10 or 12 bits. Keeping the high byte made the first
    all black and 12-bit data 0..15. The depth is inferred per image from its largest value,
    rounded up to a depth sensors have: a true 16-bit photo has highlights far above 4095, so it
    still maps 65535 to 255, while a 12-bit image maps 4095 to 255. (PNG's sBIT chunk would say
    the depth outright, but PIL does not parse it, and cv2 and most sensors do not write it.)
    """
    peak = max((int(c.max()) for c in _chunks(values)), default=0)
    bits = next(b for b in _BIT_DEPTHS if peak < 1 << b)
    full = (1 << bits) - 1
    # integer round-half-up of value * 255 / full: exact, and uint32 holds 65535 * 255
    return _convert(values, lambda c: (c.astype(np.uint32) * 255 + full // 2) // full)


# Elements converted at a time: a data set's N x H x W x C array goes through its wide
# intermediates (uint32, float64) a slice at a time, so the memory it takes is its uint8 result
# plus some 30 MB, not four to eight times the array (a notebook's 12 GB float32 array of
# 224-px images took 24 GB more at once).
_CHUNK_ELEMENTS = 1 << 21


def _chunks(values: np.ndarray):
    """``values`` in slices along its first axis of about _CHUNK_ELEMENTS elements each."""
    if values.ndim == 0 or values.size == 0:
        if values.size:
            yield values
        return
    step = max(1, _CHUNK_ELEMENTS // max(1, values.size // values.shape[0]))
    for i in range(0, values.shape[0], step):
        yield values[i:i + step]


def _convert(values: np.ndarray, fn) -> np.ndarray:
    """``fn`` applied slice by slice (_chunks), each result cast to uint8 into one array."""
    out = np.empty(values.shape, np.uint8)
    if values.ndim == 0:
        out[()] = fn(values)
        return out
    i = 0
    for c in _chunks(values):
        out[i:i + len(c)] = fn(c)
        i += len(c)
    return out


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        return np.round(values * 255.0).astype(np.uint8)  # the usual [0, 1] convention
    if lo >= 0.0 and hi <= 255.0:
        return np.round(values).astype(np.uint8)  # float-typed 8-bit data
    return _stretch_to_uint8(values)


def _float_array_to_uint8(values: np.ndarray, name: str) -> np.ndarray:
    """A float array handed in by a user: [0, 1], [0, 255], or [-1, 1] (Keras' and TF's
    ``preprocess_input`` "tf" mode, torchvision's Normalize(0.5, 0.5)). Anything else is mean/std
    normalised data whose statistics are unknown here: stretching it per image (as float TIFF
    files are) would give plausible-looking but wrong predictions, so it is refused."""
    ranges = [(float(c.min()), float(c.max())) for c in _chunks(values)]  # a NaN or inf shows in these
    lo, hi = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0.0, 0.0)
    if not all(np.isfinite(r).all() for r in ranges):
        raise BadImage(name, "float image array holds NaN or infinite values")
    if lo < 0.0:
        if lo >= -1.0 and hi <= 1.0:
            return _convert(values, lambda c: np.round((c.astype(np.float64) + 1.0) * 127.5))
        raise BadImage(name, f"float image values span [{lo:.3g}, {hi:.3g}]: pass pixels in 0..1, 0..255 or "
                             "-1..1 (undo any mean/std normalisation first)")
    if hi > 255.0:
        raise BadImage(name, f"float image values reach {hi:.3g}: pass pixels in 0..1 or 0..255")
    if hi <= 1.0:  # the usual [0, 1] convention
        return _convert(values, lambda c: np.round(c.astype(np.float64) * 255.0))
    return _convert(values, lambda c: np.round(c.astype(np.float64)))  # float-typed 8-bit data


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray, img: Image.Image) -> Image.Image:
    transparency = img.info.get("transparency")
    if isinstance(transparency, int):
        # a tRNS colour key on 16-bit grey: those pixels are fully transparent -> white
        grey = np.where(np.asarray(img) == transparency, np.uint8(255), grey)
    return Image.fromarray(np.ascontiguousarray(grey)).convert("RGB")


def _as_array(img: Image.Image) -> np.ndarray:
    # np.asarray(PIL image) is read-only; callers (augmentation, batching) may write in place
    return np.array(img, dtype=np.uint8, copy=True)


# --- resizing ---------------------------------------------------------------------------------


def _check_size_policy(size: int, policy: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}: expected one of {', '.join(RESIZE_POLICIES)}")


def _resize_pil(img: Image.Image, size: int, policy: str) -> np.ndarray:
    size = int(size)
    # a draft-decoded JPEG's picture may end inside its last row/column (_decode): the geometry
    # is that of the picture, as for the same photo decoded at full size
    box = getattr(img, "imgclf_box", None)
    x0, y0, x1, y1 = box or (0, 0, *img.size)
    width, height = x1 - x0, y1 - y0
    if policy == "stretch":
        return _as_array(img.resize((size, size), RESAMPLE, box=(x0, y0, x1, y1), reducing_gap=_REDUCING_GAP))
    if policy == "crop":
        # resample only the centred square of the source (box is in source pixels, may be
        # fractional): one pass, no intermediate full-size resize to crop from
        side = min(width, height)
        left, top = x0 + (width - side) / 2, y0 + (height - side) / 2
        box = (left, top, left + side, top + side)
        return _as_array(
            img.resize((size, size), RESAMPLE, box=box, reducing_gap=_REDUCING_GAP)
        )
    scale = size / max(width, height)
    new_w = min(size, max(1, round(width * scale)))
    new_h = min(size, max(1, round(height * scale)))
    out = np.full((size, size, 3), LETTERBOX_FILL, np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    resized = (
        img
        if (new_w, new_h) == img.size and box is None
        else img.resize((new_w, new_h), RESAMPLE, box=(x0, y0, x1, y1), reducing_gap=_REDUCING_GAP)
    )
    out[top : top + new_h, left : left + new_w] = np.asarray(resized)
    return out
