"""Images named by URL (``imgclf predict RUN https://.../cat.jpg``, explain, ``Classifier.predict``):
fetched into memory once each, never written to disk. A URL that cannot be fetched is one
unreadable input (its reason in one line), as an unreadable file is; the others go on.
urllib, not requests: one GET with a timeout and a size cap needs nothing more."""

from __future__ import annotations

import urllib.error
import urllib.request

TIMEOUT_S = 30.0
MAX_BYTES = 100 << 20  # larger than any photo; a link to a video or an archive stops here


def is_url(item) -> bool:
    return isinstance(item, str) and item[:8].lower().startswith(("http://", "https://"))


def fetch(url: str, *, timeout: float = TIMEOUT_S, max_bytes: int = MAX_BYTES) -> tuple[bytes | None, str]:
    """``(data, "")``, or ``(None, reason)`` when ``url`` cannot be fetched."""
    from imgclf import __version__

    # some hosts refuse Python's default agent (403): say who asks
    req = urllib.request.Request(url, headers={"User-Agent": f"imgclf/{__version__}", "Accept": "image/*,*/*;q=0.5"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        return None, f"HTTP {e.code} {e.reason}".rstrip()
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            return None, f"no answer from the server in {timeout:g} s"
        return None, f"cannot fetch it ({getattr(reason, 'strerror', None) or reason}); offline?"
    except TimeoutError:
        return None, f"no answer from the server in {timeout:g} s"
    except (OSError, ValueError) as e:  # a connection reset mid-body, a malformed URL
        return None, f"cannot fetch it ({e})"
    if len(data) > max_bytes:
        return None, f"larger than {max_bytes >> 20} MB: not an image"
    return data, ""
