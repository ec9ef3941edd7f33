"""The images and videos a request names, fetched within a MediaPolicy: data URIs, http(s) URLs (every redirect hop
re-checked, bytes capped while streaming, one deadline) and local files under one allowed folder; videos decoded from
memory by PyAV, which never opens a file or URL itself. A MediaError's message is safe to show the client."""

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import math
import os
import re
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import aiohttp
import av
import numpy as np
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image
from yarl import URL

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # PIL decoders tried on fetched bytes; no others
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}  # files of a frame folder; others in it are ignored
# Single-file containers only: playlists (hls, dash, concat) and image sequences name other files or URLs.
VIDEO_DEMUXERS = "mov,matroska,avi,mpegts"  # mov covers mp4/m4v/3gp, matroska covers webm
VIDEO_OPTIONS = {"format_whitelist": VIDEO_DEMUXERS, "protocol_whitelist": "none"}  # "none" names no protocol
PSEUDO_FILESYSTEMS = (PurePosixPath("/proc"), PurePosixPath("/sys"), PurePosixPath("/dev"))
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
READ_CHUNK = 1 << 20

# Blocking work (DNS, file reads, PIL, PyAV) runs here, never on the event loop or the default pool that serves
# other requests: hostile media can at worst keep these threads busy until its deadline.
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="media")


class MediaError(ValueError):
    """Bad or refused media; the message is what the client sees: what was wrong and what is allowed, never an
    internal repr or a detail of the server's own network."""


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_media_path: Path | None = None  # local files and frame folders only under here; None: none at all
    allowed_media_domains: tuple[str, ...] = ()  # non-empty: every http(s) hop must name one of these hosts exactly
    allow_private_urls: bool = False  # loopback, private, link-local, reserved targets too (see is_public_address)
    fetch_timeout_s: float = 20.0  # deadline of one image or video: waiting, fetching, reading and decoding
    max_redirects: int = 3
    max_image_bytes: int = 20 * 2**20
    max_video_bytes: int = 256 * 2**20  # a video file, or all frame files of a folder together
    max_video_frames: int = 768  # sampled frames (or frame files); a longer video is refused, not cut
    max_image_pixels: int = 8192 * 8192  # width * height of an image or one video frame, read from the header
    max_video_pixels: int = 2**28  # width * height * frames of a video: about 805 MB of RGB

    def __post_init__(self):
        if self.allowed_local_media_path is not None:
            root = Path(os.path.realpath(self.allowed_local_media_path))
            if not root.is_dir():
                raise ValueError(f"allowed_local_media_path {self.allowed_local_media_path} is not a directory")
            object.__setattr__(self, "allowed_local_media_path", root)
        object.__setattr__(self, "allowed_media_domains",
                           tuple(domain.lower().rstrip(".") for domain in self.allowed_media_domains))


async def fetch_image(url: str, policy: MediaPolicy) -> bytes:
    """The encoded bytes of an image given as a data:image/...;base64, URI, an http(s) URL, or a file:// URL or
    absolute path under policy.allowed_local_media_path; checked by image_size before they are returned."""
    job = _Job("image", policy)
    async with job.time_limit():
        if _is_remote(url):
            data = await _fetch_remote(url, policy.max_image_bytes, job)
        else:
            path = _local_path(url, job)
            data = await _in_pool(lambda: _read_regular_file(_resolve_local(path, job), policy.max_image_bytes, job))
        await _in_pool(lambda: image_size(data, policy))
    return data


def image_size(data: bytes, policy: MediaPolicy) -> tuple[int, int]:
    """(width, height) of encoded image bytes, read from the header without decoding pixels; refuses a format
    outside IMAGE_FORMATS and more than policy.max_image_pixels pixels (decompression bombs)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # PIL's own limit, past ours when ours is the default
        raise MediaError(f"the image has more than the {policy.max_image_pixels} pixels allowed") from None
    except Exception:  # UnidentifiedImageError, or whatever a corrupt header makes PIL raise
        raise MediaError("the image is not a PNG, JPEG, WebP, GIF or BMP file") from None
    if width * height > policy.max_image_pixels:
        raise MediaError(f"the image is {width}x{height}, more than the {policy.max_image_pixels} pixels allowed")
    return width, height


async def read_video(url: str, fps: float, policy: MediaPolicy) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: a video sampled at `fps` frames per second (a data:video/...;base64, URI, an http(s)
    URL, or a file:// URL or absolute path under the allowed folder), or a folder of frame images under it, taken as
    already sampled at `fps` and ordered by name."""
    if not (math.isfinite(fps) and fps > 0):
        raise MediaError("the video fps must be a positive number")
    job = _Job("video", policy)
    async with job.time_limit():
        if _is_remote(url):
            data = await _fetch_remote(url, policy.max_video_bytes, job)
            return await _in_pool(lambda: _decode_video(data, fps, job))
        path = _local_path(url, job)
        return await _in_pool(lambda: _read_local_video(path, fps, job))


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally routable unicast address. Loopback, private, shared (CGNAT), link-local (cloud metadata),
    reserved, multicast and unspecified addresses are not, nor an IPv6 address that maps onto one of them."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _Job:
    """One fetch: what it is (named in every message), its policy and the monotonic time it must be done by."""

    def __init__(self, kind: str, policy: MediaPolicy):
        self.kind = kind  # "image" or "video"
        self.policy = policy
        self.deadline = time.monotonic() + policy.fetch_timeout_s

    @contextlib.asynccontextmanager
    async def time_limit(self):
        try:
            async with asyncio.timeout(self.remaining()):
                yield
        except TimeoutError:
            raise self.too_slow() from None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check_deadline(self) -> None:
        """For work in the pool, which asyncio cannot interrupt: stop at the same deadline."""
        if self.remaining() < 0:
            raise self.too_slow()

    def too_slow(self) -> MediaError:
        return MediaError(f"the {self.kind} took longer than {self.policy.fetch_timeout_s:g} s to fetch and decode")

    def too_large(self, limit: int, what: str = "") -> MediaError:
        return MediaError(f"the {what or self.kind} is larger than the {limit / 2**20:g} MiB allowed")

    def not_allowed(self) -> MediaError:
        return MediaError(f"the {self.kind} URL names a private, loopback or link-local address, which is not allowed")


async def _in_pool(work):
    return await asyncio.get_running_loop().run_in_executor(_POOL, work)


def _scheme(url: str) -> str:
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", url)
    return match.group(1).lower() if match else ""


def _is_remote(url: str) -> bool:
    return _scheme(url) in ("data", "http", "https")


async def _fetch_remote(url: str, limit: int, job: _Job) -> bytes:
    if _scheme(url) == "data":
        return await _in_pool(lambda: _decode_data_uri(url, limit, job))
    return await _download(url, limit, job)


def _decode_data_uri(url: str, limit: int, job: _Job) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith(f"data:{job.kind}/") or not header.lower().endswith(";base64"):
        example = "image/png" if job.kind == "image" else "video/mp4"
        raise MediaError(f"{job.kind} data URIs must be base64-encoded {job.kind} data: data:{example};base64,...")
    if len(payload) > 4 * math.ceil(limit / 3):
        raise job.too_large(limit)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"the {job.kind} data URI is not valid base64") from None
    if len(data) > limit:
        raise job.too_large(limit)
    return data


async def _download(url: str, limit: int, job: _Job) -> bytes:
    """GET with redirects followed by hand, each hop checked by _check_hop and connected only to addresses
    _CheckedResolver let through; the body read in chunks and refused once past `limit`."""
    connector = aiohttp.TCPConnector(resolver=_CheckedResolver(job), use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                     auto_decompress=False,  # no gzip bombs: the bytes as sent
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:  # job.time_limit() rules
        try:
            target = URL(url)
        except ValueError:
            raise MediaError(f"the {job.kind} URL is not a valid URL") from None
        for _ in range(job.policy.max_redirects + 1):
            _check_hop(target, job)
            try:
                async with session.get(target, allow_redirects=False, headers={"Accept-Encoding": "identity"}) as r:
                    if r.status in REDIRECT_STATUSES:
                        target = _redirect_target(r, job)
                        continue
                    if r.status != 200:
                        raise MediaError(f"the {job.kind} URL answered HTTP {r.status}")
                    if r.content_length is not None and r.content_length > limit:
                        raise job.too_large(limit)
                    body = bytearray()
                    async for chunk in r.content.iter_chunked(READ_CHUNK):
                        body += chunk
                        if len(body) > limit:
                            raise job.too_large(limit)
                    return bytes(body)
            except (aiohttp.ClientError, OSError):  # refused, reset, TLS, DNS failure: which one is nobody's business
                raise MediaError(f"could not fetch the {job.kind} URL") from None
        raise MediaError(f"the {job.kind} URL redirected more than {job.policy.max_redirects} times")


def _redirect_target(response: aiohttp.ClientResponse, job: _Job) -> URL:
    try:
        return response.url.join(URL(response.headers["Location"]))
    except (KeyError, ValueError):
        raise MediaError(f"the {job.kind} URL redirected without a valid Location") from None


def _check_hop(url: URL, job: _Job) -> None:
    """Scheme and host allowlist for every hop; the private-address rule here for an IP literal (aiohttp does not
    resolve those), in _CheckedResolver for a name."""
    if url.scheme not in ("http", "https"):
        raise MediaError(f"the {job.kind} URL redirected to a non-http(s) URL, which is not allowed")
    host = (url.raw_host or "").lower().rstrip(".")
    if not host:
        raise MediaError(f"the {job.kind} URL names no host")
    domains = job.policy.allowed_media_domains
    if domains and host not in domains:
        raise MediaError(f"the {job.kind} URL's host {host} is not one of the allowed media domains: "
                         f"{', '.join(domains)}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return
    if not job.policy.allow_private_urls and not is_public_address(ip):
        raise job.not_allowed()


class _CheckedResolver(AbstractResolver):
    """getaddrinfo in the media pool; a name that resolves to any address is_public_address refuses is refused
    (unless private URLs are allowed). aiohttp connects only to the addresses returned here, so a DNS answer that
    changes between a check and the connect (rebinding) cannot get round the rule."""

    def __init__(self, job: _Job):
        self.job = job

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        infos = await _in_pool(lambda: socket.getaddrinfo(host, port, family, socket.SOCK_STREAM))
        results = []
        for info_family, _, proto, _, address in infos:
            ip = ipaddress.ip_address(address[0])
            if not self.job.policy.allow_private_urls and not is_public_address(ip):
                raise self.job.not_allowed()
            results.append(ResolveResult(hostname=host, host=address[0], port=address[1], family=info_family,
                                         proto=proto, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        return results

    async def close(self) -> None:
        """AbstractResolver asks for it; this resolver holds nothing to release (lookups run in the media pool)."""


def _local_path(url: str, job: _Job) -> str:
    """The path a file:// URL or absolute path names, if this server reads local files at all."""
    root = job.policy.allowed_local_media_path
    scheme = _scheme(url)
    sources = f"http(s) URLs or data:{job.kind}/...;base64, URIs"
    if scheme not in ("", "file") or (scheme == "" and not url.startswith("/")):
        local = f", or file:// URLs or absolute paths under {root}" if root else ""
        raise MediaError(f"{job.kind} URLs must be {sources}{local}")
    if root is None:
        raise MediaError(f"this server reads no local {job.kind} files: send {sources}")
    if scheme == "":
        return url
    try:
        file_url = URL(url)
    except ValueError:
        raise MediaError(f"the {job.kind} URL is not a valid URL") from None
    if file_url.host not in (None, "", "localhost"):
        raise MediaError(f"file:// {job.kind} URLs must name a path on this server, not host {file_url.host}")
    return file_url.path


def _resolve_local(path: str, job: _Job) -> str:
    """The real path of `path` if it and whatever its symlinks point at lie under the allowed folder and outside
    /proc, /sys and /dev. A path outside the folder is refused before the filesystem is touched, so whether it
    exists is not told."""
    root = job.policy.allowed_local_media_path
    outside = MediaError(f"local {job.kind} paths must lie under {root}")
    if "\0" in path:
        raise outside
    lexical = os.path.normpath(path)  # ".." collapsed without reading the filesystem
    if not PurePosixPath(lexical).is_relative_to(root):
        raise outside
    real = os.path.realpath(lexical)
    if not PurePosixPath(real).is_relative_to(root):
        raise outside
    if any(PurePosixPath(real).is_relative_to(p) for p in PSEUDO_FILESYSTEMS):  # /proc files stat as regular
        raise MediaError(f"the local {job.kind} path is not a regular file")
    return real


def _stat(real: str, job: _Job) -> os.stat_result:
    try:
        return os.stat(real)
    except FileNotFoundError:
        raise MediaError(f"no local {job.kind} file at {real}") from None
    except OSError:
        raise MediaError(f"could not read the local {job.kind} file {real}") from None


def _read_regular_file(real: str, limit: int, job: _Job, what: str = "") -> bytes:
    """At most `limit` bytes of a regular file. FIFOs, devices and sockets are refused from their stat before they
    are opened (opening a device can act on it), and again from the open descriptor (O_NONBLOCK: a FIFO swapped in
    meanwhile cannot block the open)."""
    what = what or f"local {job.kind} file"
    expected = _stat(real, job)
    not_regular = MediaError(f"the {what} is not a regular file")
    if not stat.S_ISREG(expected.st_mode):
        raise not_regular
    if expected.st_size > limit:
        raise job.too_large(limit, what)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise MediaError(f"could not read the {what}") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (expected.st_dev, expected.st_ino):
            raise not_regular
        chunks, size = [], 0
        while chunk := os.read(fd, min(READ_CHUNK, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # the file grew since its stat
                raise job.too_large(limit, what)
            job.check_deadline()
    except OSError:
        raise MediaError(f"could not read the {what}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def _read_local_video(path: str, fps: float, job: _Job) -> np.ndarray:
    real = _resolve_local(path, job)
    if stat.S_ISDIR(_stat(real, job).st_mode):
        return _read_frame_folder(real, job)
    return _decode_video(_read_regular_file(real, job.policy.max_video_bytes, job), fps, job)


def _frame_limit(width: int, height: int, job: _Job) -> int:
    """How many frames of this size a video may have: max_video_frames, fewer if max_video_pixels says so."""
    policy = job.policy
    if width * height == 0:
        raise MediaError("the video does not say its frame size")
    if width * height > policy.max_image_pixels:
        raise MediaError(f"the video's frames are {width}x{height}, more than the {policy.max_image_pixels} "
                         f"pixels allowed")
    return min(policy.max_video_frames, policy.max_video_pixels // (width * height))


def _too_many_frames(limit: int, width: int, height: int, fps: float | None) -> MediaError:
    at = f" at {fps:g} fps" if fps else ""
    return MediaError(f"the video has more than {limit} frames{at}, the most allowed at {width}x{height}: "
                      f"send a shorter clip{' or a lower fps' if fps else ''}")


def _decode_video(data: bytes, fps: float, job: _Job) -> np.ndarray:
    """Frames sampled at `fps` from a video in memory. The demuxer must be one of VIDEO_DEMUXERS and may open no
    protocol, so a playlist cannot make FFmpeg read a file or URL."""
    try:
        with av.open(io.BytesIO(data), container_options=VIDEO_OPTIONS) as container:
            if not container.streams.video:
                raise MediaError("the video has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            limit = _frame_limit(width, height, job)  # from the header, before any frame is decoded
            frames, next_t = [], 0.0
            for frame in container.decode(stream):
                job.check_deadline()
                if frame.time is not None and frame.time + 1e-6 < next_t:
                    continue
                if (frame.width, frame.height) != (width, height):
                    raise MediaError(f"the video changes frame size ({width}x{height} to "
                                     f"{frame.width}x{frame.height}), which is not supported")
                if len(frames) == limit:
                    raise _too_many_frames(limit, width, height, fps)
                frames.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3)
                next_t += 1.0 / fps
    except MediaError:
        raise
    except Exception:  # anything PyAV raises on the user's bytes is bad input, and its message names internals
        raise MediaError("the video could not be decoded: send an MP4/MOV, MKV/WebM, AVI or MPEG-TS file") from None
    if not frames:
        raise MediaError("no frames could be decoded from the video")
    return np.stack(frames)  # (T, H, W, 3)


def _read_frame_folder(folder: str, job: _Job) -> np.ndarray:
    """Frame images of a folder in name order: refused past max_video_frames before any is read, each a regular
    file under the allowed folder, header-checked by image_size, all of one size."""
    policy = job.policy
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            job.check_deadline()
            if os.path.splitext(entry.name)[1].lower() in FRAME_SUFFIXES:
                names.append(entry.name)
                if len(names) > policy.max_video_frames:
                    raise MediaError(f"the video folder holds more than {policy.max_video_frames} frame images")
    if not names:
        raise MediaError(f"the video folder holds no frame images ({', '.join(sorted(FRAME_SUFFIXES))})")
    frames, total_bytes, size, limit = [], 0, None, 0
    for name in sorted(names):
        what = f"video frame {name}"
        data = _read_regular_file(_resolve_local(os.path.join(folder, name), job), policy.max_image_bytes, job, what)
        total_bytes += len(data)
        if total_bytes > policy.max_video_bytes:
            raise job.too_large(policy.max_video_bytes, "video folder")
        try:
            frame_size = image_size(data, policy)
        except MediaError as e:
            raise MediaError(f"{what}: {e}") from None
        if size is None:
            size, limit = frame_size, _frame_limit(*frame_size, job)
        if frame_size != size:
            raise MediaError(f"{what} is {frame_size[0]}x{frame_size[1]}, the first frame {size[0]}x{size[1]}: "
                             f"all frames must be one size")
        if len(frames) == limit:
            raise _too_many_frames(limit, *size, None)
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                frames.append(np.asarray(image.convert("RGB")))  # (H, W, 3)
        except Exception:  # truncated or corrupt pixel data only fails here
            raise MediaError(f"{what} could not be decoded") from None
        job.check_deadline()
    return np.stack(frames)  # (T, H, W, 3)
