"""Downstream checks found by a new user's session (s33)."""

import io

import numpy as np
from PIL import Image

from imgclf.data.images import load_resized


def _photo(w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.int16)
    return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def _encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_draft_decoded_jpeg_keeps_the_picture_geometry():
    # 640x428 at 1/8 decodes to 80x54 (54 = ceil(53.5)): the letterbox of the JPEG had 22 rows of
    # picture, the same photo as a PNG (and the documented rule, round(428 * 32 / 640)) 21
    arr = _photo(640, 428)
    jpeg, png = _encoded(arr, "JPEG"), _encoded(arr, "PNG")
    for policy in ("letterbox", "crop", "stretch"):
        a = load_resized(jpeg, 32, policy).astype(int)
        b = load_resized(png, 32, policy).astype(int)
        if policy == "letterbox":
            rows = lambda x: int((np.abs(x - 114).sum((1, 2)) > 0).sum())  # noqa: E731
            assert rows(a) == rows(b) == 21
        # the DCT downscale itself differs from bicubic by about a grey level on average
        assert np.abs(a - b).mean() < 2.0, policy


def test_draft_geometry_holds_for_every_exif_orientation():
    # after a rotation or mirror the part pixels of a draft decode may come first (left or top):
    # orientations 3 and 8 were resampled from the wrong corner (3.7 grey levels off a full decode)
    from imgclf.data.images import _EXIF_TRANSPOSE, load_rgb, resize_rgb

    shown = Image.fromarray(_photo(640, 428))
    undo = {Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90}
    for orientation, method in _EXIF_TRANSPOSE.items():
        stored = shown.transpose(undo.get(method, method))  # what a camera writes for this tag
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
        data = buf.getvalue()
        assert load_rgb(data).shape == (428, 640, 3)
        for policy in ("letterbox", "crop", "stretch"):
            full = resize_rgb(load_rgb(data), 32, policy).astype(int)
            fast = load_resized(data, 32, policy).astype(int)
            assert np.abs(full - fast).mean() < 1.0, (orientation, policy)
