"""Image URLs of requests -> checked, decoded `PIL.Image`s.

Three sources, each refused unless the server allows it:
- `data:image/...;base64,...` URIs: always accepted (size checked before decoding the base64);
- `http(s)://` URLs: only under a prefix of `ServerSettings.allowed_url_prefixes` (none by default), fetched
  without redirects, with a timeout and a byte cap;
- local paths (`file://...` or a plain path): only inside `ServerSettings.image_root`, after resolving links.
Every image then goes through `sphinx_mllm.processing.load_image` with the server's pixel limit
(decompression-bomb guard, truncated data); any failure becomes a 400 that names the problem.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from sphinx_mllm.processing import BadImageError, load_image
from sphinx_mllm.serving.protocol import APIError, bad_request
from sphinx_mllm.serving.settings import ServerSettings

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
PARAM = "messages.content.image_url"


def resolve_image(url: str, settings: ServerSettings) -> Image.Image:
    """A request's image URL -> a decoded RGB image, or `APIError` (400) saying what is wrong."""
    if url[:5].lower() == "data:":
        data = _decode_data_uri(url, settings.max_image_bytes)
        return _load(data, settings)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _load(_fetch(url, settings), settings)
    if scheme in ("", "file"):
        return _load(_local_path(url, settings), settings)
    raise bad_request(f"image URL scheme {scheme!r} is not supported; send the image as a data: URI",
                      param=PARAM, code="invalid_image_url")


def _load(source: bytes | Path, settings: ServerSettings) -> Image.Image:
    try:
        return load_image(source, max_pixels=settings.max_image_pixels)
    except BadImageError as exc:
        code = "image_too_large" if "limit" in str(exc) or "too large" in str(exc) else "invalid_image"
        raise bad_request(f"invalid image: {exc}", param=PARAM, code=code) from exc


def _decode_data_uri(url: str, max_bytes: int) -> bytes:
    match = _DATA_URI.match(url)
    if match is None or not match.group("b64"):
        raise bad_request("image data URI must look like data:image/png;base64,<data>", param=PARAM,
                          code="invalid_image_url")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise bad_request(f"image data URI has media type {mime!r}; expected image/*", param=PARAM,
                          code="invalid_image_url")
    payload = url[match.end():]
    if len(payload) // 4 * 3 > max_bytes + 3:  # checked before decoding anything
        raise bad_request(f"image data is over the limit of {max_bytes} bytes", param=PARAM, code="image_too_large")
    payload = "".join(payload.split())  # line-wrapped base64 is common
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"image data URI is not valid base64: {exc}", param=PARAM, code="invalid_image_url") from exc
    if not data:
        raise bad_request("image data URI is empty", param=PARAM, code="invalid_image_url")
    return data


def _local_path(url: str, settings: ServerSettings) -> Path:
    root = settings.image_root
    if root is None:
        raise bad_request("local image paths are not allowed on this server (no image root is configured); "
                          "send the image as a data: URI", param=PARAM, code="invalid_image_url")
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
        raise bad_request(f"file URL names a remote host {parts.netloc!r}", param=PARAM, code="invalid_image_url")
    raw = unquote(parts.path) if parts.scheme == "file" else url
    candidate = Path(raw)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not path.is_relative_to(root):
        raise bad_request(f"image path {raw!r} is outside the server's image root", param=PARAM,
                          code="invalid_image_url")
    if not path.is_file():
        raise bad_request(f"image file not found under the image root: {raw!r}", param=PARAM, code="invalid_image_url")
    if path.stat().st_size > settings.max_image_bytes:
        raise bad_request(f"image file is over the limit of {settings.max_image_bytes} bytes", param=PARAM,
                          code="image_too_large")
    return path


def url_allowed(url: str, prefixes: tuple[str, ...]) -> bool:
    """Is `url` under one of the allowed prefixes? (no credentials, no dot segments, exact prefix)"""
    parts = urlsplit(url)
    if parts.username or parts.password or "/../" in f"{parts.path}/" or "\\" in url:
        return False
    return any(url.startswith(prefix) for prefix in prefixes)


def _fetch(url: str, settings: ServerSettings) -> bytes:
    if not url_allowed(url, settings.allowed_url_prefixes):
        raise bad_request("remote image URLs are not allowed on this server; send the image as a data: URI "
                          "(base64)", param=PARAM, code="invalid_image_url")
    import httpx

    limit = settings.max_image_bytes
    try:
        with httpx.Client(timeout=settings.fetch_timeout_s, follow_redirects=False, trust_env=False) as client, \
                client.stream("GET", url) as resp:
            if resp.status_code != 200:
                raise bad_request(f"fetching the image URL answered HTTP {resp.status_code}", param=PARAM,
                                  code="invalid_image_url")
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise bad_request(f"image at URL is over the limit of {limit} bytes", param=PARAM,
                                      code="image_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise APIError(400, f"could not fetch the image URL: {exc}", param=PARAM, code="invalid_image_url") from exc
    return b"".join(chunks)
