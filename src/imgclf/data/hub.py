"""``--data hf:OWNER/NAME[:CONFIG]``: a Hugging Face Hub data set, downloaded once.

The Hub's dataset viewer keeps every public data set as parquet files and lists them by
configuration and split at ``{endpoint}/api/datasets/{repo}/parquet``. Those files are fetched
once into the cache folder (``datasets/hf/<owner>--<name>/<config>/<split>-00000.parquet``,
each written to a ``.part`` file and renamed when complete) and then read as any parquet folder
(:mod:`imgclf.data.parquet`). A finished download is marked ``complete.json`` and reused
without the network, so a resumed run or ``evaluate`` works offline.

``HF_ENDPOINT`` points at a mirror (as ``huggingface_hub`` reads it); ``HF_TOKEN`` (or the
token ``huggingface-cli login`` saved) is sent for gated and private data sets. urllib, not
``huggingface_hub``: a JSON listing and plain file downloads need nothing more.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from imgclf import log
from imgclf.errors import UserError

PREFIX = "hf:"
TIMEOUT_S = 60.0
_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_DONE = "complete.json"


def is_hub(spec) -> bool:
    return isinstance(spec, str) and spec[:3].lower() == PREFIX


def parse(spec: str) -> tuple[str, str | None]:
    """``hf:owner/name[:config]`` -> (repo, config or None)."""
    body = spec[3:].strip().strip("/")
    if body.startswith("datasets/"):  # hf:datasets/owner/name, as in hf:// paths
        body = body[len("datasets/"):]
    repo, _, config = body.partition(":")
    if not _REPO.match(repo):
        raise UserError(f"--data {spec}: not a Hub data set name (hf:OWNER/NAME, or hf:OWNER/NAME:CONFIG)")
    return repo, config or None


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _token() -> str | None:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    try:
        return (home / "token").read_text().strip() or None
    except OSError:
        return None


def _request(url: str) -> urllib.request.Request:
    from imgclf import __version__

    headers = {"User-Agent": f"imgclf/{__version__}"}
    token = _token()
    # the token goes only to the Hub (the listing's file URLs are on it too), never elsewhere
    if token and urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(endpoint()).netloc:
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, headers=headers)


class _NoTokenElsewhere(urllib.request.HTTPRedirectHandler):
    """Follows redirects without the token where they leave the Hub's host (its files redirect
    to a CDN with signed URLs, which need none); urllib would carry every header along."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_NoTokenElsewhere)


def _why(spec: str, e: BaseException) -> UserError:
    if isinstance(e, urllib.error.HTTPError):
        if e.code in (401, 403):
            return UserError(f"--data {spec}: the Hub refused access (HTTP {e.code}): a gated or private data set "
                             "needs a token with access (set HF_TOKEN, and accept its terms on its page)")
        if e.code == 404:
            return UserError(f"--data {spec}: no such data set on the Hub, or it has no parquet files (HTTP 404)")
        return UserError(f"--data {spec}: the Hub answered HTTP {e.code} {e.reason}".rstrip())
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return UserError(f"--data {spec}: cannot reach {endpoint()} ({text}); offline? Download its parquet files "
                     "elsewhere and pass their folder to --data")


def _listing(spec: str, repo: str) -> dict[str, dict[str, list[str]]]:
    url = f"{endpoint()}/api/datasets/{repo}/parquet"
    try:
        with _OPENER.open(_request(url), timeout=TIMEOUT_S) as r:
            data = json.loads(r.read())
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _why(spec, e) from None
    except ValueError:
        raise UserError(f"--data {spec}: {url} did not answer with a JSON listing of parquet files") from None
    ok = isinstance(data, dict) and all(isinstance(v, dict) and all(isinstance(u, list) for u in v.values())
                                        for v in data.values())
    if not ok or not data:
        raise UserError(f"--data {spec}: the Hub lists no parquet files for it")
    return data


def _choose(spec: str, listing: dict, config: str | None) -> str:
    if config is not None:
        if config not in listing:
            raise UserError(f"--data {spec}: no configuration {config!r}; it has {', '.join(sorted(listing))}")
        return config
    if len(listing) == 1:
        return next(iter(listing))
    chosen = next((c for c in ("default", "plain_text") if c in listing), sorted(listing)[0])
    log.info(f"{spec}: configurations {', '.join(sorted(listing))}; reading {chosen!r} "
             f"({PREFIX}{spec[3:].split(':')[0]}:NAME picks another)")
    return chosen


def _fetch(spec: str, url: str, dest: Path) -> None:
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        with _OPENER.open(_request(url), timeout=TIMEOUT_S) as r, open(part, "wb") as out:
            total = r.headers.get("Content-Length") if r.headers else None
            with tqdm(total=int(total) if total and total.isdigit() else None, unit="B", unit_scale=True,
                      unit_divisor=1024, desc=dest.name, disable=None, leave=False) as bar:
                while block := r.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
            if total and total.isdigit() and out.tell() != int(total):
                raise http.client.IncompleteRead(b"", int(total) - out.tell())
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        part.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, urllib.error.URLError) and e.errno is not None \
                and not isinstance(e, (TimeoutError, ConnectionError)):  # disk full, permissions
            raise UserError(f"--data {spec}: cannot write {dest}: {e.strerror}") from None
        raise _why(spec, e) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)


def _used(folder: Path) -> Path:
    with contextlib.suppress(OSError):  # last used now, for 'imgclf cache --older-than'
        os.utime(folder)
    return folder


def download(spec: str, cache_dir: Path) -> Path:
    """The folder holding the data set's parquet files, downloading them on first use."""
    from imgclf.data.parquet import require_pyarrow

    repo, config = parse(spec)
    require_pyarrow()  # reading them needs pyarrow: say so before downloading, not after
    home = Path(cache_dir) / "datasets" / "hf" / repo.replace("/", "--")
    done = sorted(p.parent for p in home.glob(f"*/{_DONE}")) if home.is_dir() else []
    if config is not None and (home / config / _DONE).is_file():
        return _used(home / config)
    if config is None and len(done) == 1:  # downloaded before: no network needed
        return _used(done[0])
    listing = _listing(spec, repo)
    config = _choose(spec, listing, config)
    folder = home / config
    if (folder / _DONE).is_file():
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--data {spec}: cannot create {folder} ({e.strerror or e}); choose a writable cache "
                        "folder (--cache-dir or IMGCLF_CACHE)") from None
    files = []
    for split, urls in sorted(listing[config].items()):
        for i, url in enumerate(urls):
            dest = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}-{i:05d}.parquet"
            files.append(dest.name)
            if not dest.is_file():
                log.info(f"{spec}: downloading {config}/{split} part {i + 1} of {len(urls)} into {folder}")
                _fetch(spec, url, dest)
    (folder / _DONE).write_text(json.dumps({"repo": repo, "config": config, "files": files}, indent=1))
    return folder
