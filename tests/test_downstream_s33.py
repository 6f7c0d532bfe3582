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
