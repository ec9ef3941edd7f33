"""frontend.media: each kind of source works within a MediaPolicy, and each attack found by probing the server is
refused promptly. HTTP servers listen on 127.0.0.1 only and every handler stops by itself."""

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import io
import ipaddress
import os
import re
import struct
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from frontend import media
from frontend.media import MediaError, MediaPolicy, fetch_image, image_size, read_video

LOCAL_HTTP = MediaPolicy(allow_private_urls=True)  # the test servers are on 127.0.0.1


def png(width=8, height=6, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, media_type="image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def write_video(path: Path, frames=10, fps=10, width=64, height=48) -> Path:
    """`frames` frames of width x height at `fps`, mpeg4 in MP4, frame i a flat grey of level 20 * i."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def bomb_png(width=20000, height=20000) -> bytes:
    """A valid all-black 1-bit PNG of width x height: ~50 KB on disk, 400 million pixels decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def refusal(coro) -> str:
    with pytest.raises(MediaError) as e:
        asyncio.run(coro)
    return str(e.value)


@contextlib.asynccontextmanager
async def serving(routes: dict):
    """An aiohttp server on 127.0.0.1 with GET `routes` {path: handler}; yields its base URL and a Counter of the
    paths requested."""
    hits = collections.Counter()

    @web.middleware
    async def count(request, handler):
        hits[request.path] += 1
        return await handler(request)

    app = web.Application(middlewares=[count])
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", hits
    finally:
        await runner.cleanup()


def body(data: bytes, content_type="image/png"):
    async def handler(request):
        return web.Response(body=data, content_type=content_type)
    return handler


def redirect(location: str):
    async def handler(request):
        return web.Response(status=302, headers={"Location": location.replace("{port}", str(request.url.port))})
    return handler


def stream(total: int, chunk: int, delay_s: float = 0.0):
    """A chunked body (no Content-Length) of `total` zero bytes in `chunk`-byte writes `delay_s` apart; it ends by
    itself, or sooner when the client hangs up."""
    async def handler(request):
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(0, total, chunk):
            await response.write(bytes(chunk))
            await asyncio.sleep(delay_s)
        await response.write_eof()
        return response
    return handler


def fetched(routes: dict, path: str, policy: MediaPolicy, fetch=fetch_image):
    """Serve `routes`, fetch `path` from them: (the result, or the MediaError raised; the Counter of paths served)."""
    async def scenario():
        async with serving(routes) as (base, hits):
            try:
                return await fetch(base + path, policy), hits
            except MediaError as e:
                return e, hits

    return asyncio.run(scenario())


# data URIs

def test_data_uri_image_is_decoded():
    assert asyncio.run(fetch_image(data_uri(png()), MediaPolicy())) == png()


def test_data_uri_with_bad_base64_is_refused():
    message = refusal(fetch_image("data:image/png;base64,iVBOR*w0K", MediaPolicy()))
    assert message == "the image data URI is not valid base64"


def test_data_uri_of_another_media_type_is_refused():
    message = refusal(fetch_image(data_uri(png(), "text/plain"), MediaPolicy()))
    assert message == "image data URIs must be base64-encoded image data: data:image/png;base64,..."


# http(s)

def test_http_image_is_fetched_when_private_urls_are_allowed():
    image, hits = fetched({"/cat.png": body(png())}, "/cat.png", LOCAL_HTTP)
    assert image == png() and hits == {"/cat.png": 1}


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # an IP literal, and a name resolved to loopback
def test_private_target_is_refused_by_default(host):
    async def scenario():
        async with serving({"/cat.png": body(png())}) as (base, hits):
            url = base.replace("127.0.0.1", host) + "/cat.png"
            with pytest.raises(MediaError) as e:
                await fetch_image(url, MediaPolicy())
            return str(e.value), hits

    message, hits = asyncio.run(scenario())
    assert message == "the image URL names a private, loopback or link-local address, which is not allowed"
    assert hits["/cat.png"] == 0


def test_redirect_to_a_private_address_is_refused_even_from_an_allowed_host(monkeypatch):
    # Pretend 127.0.0.1 is a public host; its redirect to 0.0.0.0 (which Linux connects to this host) is refused.
    monkeypatch.setattr(media, "is_public_address", lambda ip: ip == ipaddress.ip_address("127.0.0.1"))
    routes = {"/start": redirect("http://0.0.0.0:{port}/secret"), "/secret": body(b"secret")}
    error, hits = fetched(routes, "/start", MediaPolicy())
    assert str(error) == "the image URL names a private, loopback or link-local address, which is not allowed"
    assert hits == {"/start": 1}


def test_redirect_off_the_allowed_media_domains_is_refused():
    policy = MediaPolicy(allow_private_urls=True, allowed_media_domains=("127.0.0.1",))
    routes = {"/start": redirect("http://localhost:{port}/secret"), "/secret": body(b"secret")}
    error, hits = fetched(routes, "/start", policy)
    assert str(error) == "the image URL's host localhost is not one of the allowed media domains: 127.0.0.1"
    assert hits == {"/start": 1}


def test_redirect_to_a_file_url_is_refused():
    error, _ = fetched({"/start": redirect("file:///etc/passwd")}, "/start", LOCAL_HTTP)
    assert str(error) == "the image URL redirected to a non-http(s) URL, which is not allowed"


def test_redirect_loop_stops_after_max_redirects():
    error, hits = fetched({"/loop": redirect("/loop")}, "/loop", LOCAL_HTTP)
    assert str(error) == "the image URL redirected more than 3 times"
    assert hits == {"/loop": LOCAL_HTTP.max_redirects + 1}


def test_unreachable_url_error_names_no_detail():
    async def closed_port_url():
        async with serving({}) as (base, _):
            return base  # the server is gone once this returns

    message = refusal(fetch_image(asyncio.run(closed_port_url()) + "/x.png", LOCAL_HTTP))
    assert message == "could not fetch the image URL"  # not "connection refused" on which port


def test_error_status_is_named():
    error, _ = fetched({}, "/missing.png", LOCAL_HTTP)
    assert str(error) == "the image URL answered HTTP 404"


def test_declared_content_length_over_the_cap_is_refused_before_the_body():
    async def declares_a_tebibyte(request):
        response = web.StreamResponse()
        response.content_length = 2**40
        await response.prepare(request)
        await response.write(b"\x89PNG")
        for _ in range(40):  # up to 2 s, over as soon as the client hangs up: it must not wait for the rest
            if request.transport is None or request.transport.is_closing():
                break
            await asyncio.sleep(0.05)
        return response

    start = time.monotonic()
    error, _ = fetched({"/big.png": declares_a_tebibyte}, "/big.png", LOCAL_HTTP)
    assert str(error) == "the image is larger than the 20 MiB allowed"
    assert time.monotonic() - start < 1.0


def test_chunked_body_over_the_cap_is_refused():
    policy = MediaPolicy(allow_private_urls=True, max_image_bytes=2**20)
    error, _ = fetched({"/big.png": stream(2**20 + 2**16, 2**16)}, "/big.png", policy)
    assert str(error) == "the image is larger than the 1 MiB allowed"


def test_endless_body_stops_at_the_cap():
    policy = MediaPolicy(allow_private_urls=True, max_image_bytes=2**20)
    start = time.monotonic()
    error, _ = fetched({"/endless.png": stream(2**30, 2**16)}, "/endless.png", policy)
    assert str(error) == "the image is larger than the 1 MiB allowed"
    assert time.monotonic() - start < 2.0


def test_slow_drip_hits_the_overall_deadline():
    policy = MediaPolicy(allow_private_urls=True, fetch_timeout_s=0.5)
    start = time.monotonic()
    error, _ = fetched({"/drip.png": stream(100, 1, delay_s=0.1)}, "/drip.png", policy)  # 10 s long
    assert str(error) == "the image took longer than 0.5 s to fetch and decode"
    assert time.monotonic() - start < 0.5 + 0.5


class RefusingPool(concurrent.futures.ThreadPoolExecutor):
    def submit(self, *args, **kwargs):
        raise AssertionError("media work was sent to the event loop's default thread pool")


def test_nothing_runs_on_the_default_thread_pool(tmp_path):
    write_video(tmp_path / "clip.mp4")

    async def scenario():
        asyncio.get_running_loop().set_default_executor(RefusingPool())
        async with serving({"/cat.png": body(png())}) as (base, _):
            image = await fetch_image(base.replace("127.0.0.1", "localhost") + "/cat.png", LOCAL_HTTP)  # DNS too
        video = await read_video(str(tmp_path / "clip.mp4"), 10, MediaPolicy(allowed_local_media_path=tmp_path))
        return image, video

    image, video = asyncio.run(scenario())
    assert image == png() and video.shape == (10, 48, 64, 3)


# local files

def test_no_local_files_without_an_allowed_folder(tmp_path):
    (tmp_path / "cat.png").write_bytes(png())
    message = refusal(fetch_image(str(tmp_path / "cat.png"), MediaPolicy()))
    assert message == "this server reads no local image files: send http(s) URLs or data:image/...;base64, URIs"


@pytest.mark.parametrize("form", ["path", "file_url"])
def test_local_image_under_the_allowed_folder_is_read(tmp_path, form):
    (tmp_path / "cat.png").write_bytes(png())
    url = str(tmp_path / "cat.png") if form == "path" else (tmp_path / "cat.png").as_uri()
    assert asyncio.run(fetch_image(url, MediaPolicy(allowed_local_media_path=tmp_path))) == png()


@pytest.mark.parametrize("url", ["/etc/passwd", "{root}/../outside.png", "file://{root}/../outside.png"])
def test_path_outside_the_allowed_folder_is_refused(tmp_path, url):
    root = tmp_path / "media"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(png())
    message = refusal(fetch_image(url.format(root=root), MediaPolicy(allowed_local_media_path=root)))
    assert message == f"local image paths must lie under {root}"


def test_symlink_escaping_the_allowed_folder_is_refused(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(png())
    (root / "cat.png").symlink_to(tmp_path / "outside.png")
    message = refusal(fetch_image(str(root / "cat.png"), MediaPolicy(allowed_local_media_path=root)))
    assert message == f"local image paths must lie under {root}"


@pytest.mark.parametrize("fetch", [fetch_image, lambda url, policy: read_video(url, 2.0, policy)],
                         ids=["image", "video"])
def test_fifo_is_refused_promptly(tmp_path, fetch):
    os.mkfifo(tmp_path / "pipe.mp4")  # no writer: opening it for reading would block forever
    start = time.monotonic()
    message = refusal(fetch(str(tmp_path / "pipe.mp4"), MediaPolicy(allowed_local_media_path=tmp_path)))
    assert message.endswith("is not a regular file")
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("path", ["/dev/zero", "/proc/self/fd/0", "/proc/self/environ"])
def test_devices_and_proc_are_refused_even_under_an_allowed_root(path):
    message = refusal(read_video(path, 2.0, MediaPolicy(allowed_local_media_path=Path("/"))))
    assert message == "the local video path is not a regular file"


def test_local_file_over_the_cap_is_refused(tmp_path):
    (tmp_path / "big.png").write_bytes(bytes(2**20 + 1))
    policy = MediaPolicy(allowed_local_media_path=tmp_path, max_image_bytes=2**20)
    message = refusal(fetch_image(str(tmp_path / "big.png"), policy))
    assert message == "the local image file is larger than the 1 MiB allowed"


# videos

# 10 frames at t = 0.0, 0.1, ..., 0.9 s, frame i grey 20 * i: at 2 fps frames 0 and 5 (t = 0.0, 0.5) are taken
@pytest.mark.parametrize("fps, frames, last_grey", [(10, 10, 180), (5, 5, 160), (2, 2, 100)])
def test_video_file_is_sampled_at_the_requested_fps(tmp_path, fps, frames, last_grey):
    write_video(tmp_path / "clip.mp4")
    video = asyncio.run(read_video(str(tmp_path / "clip.mp4"), fps, MediaPolicy(allowed_local_media_path=tmp_path)))
    assert video.shape == (frames, 48, 64, 3) and video.dtype == np.uint8
    assert abs(video[-1].mean() - last_grey) < 3  # mpeg4 is lossy


def test_video_over_http_is_decoded_from_memory(tmp_path):
    clip = write_video(tmp_path / "clip.mp4").read_bytes()
    video, _ = fetched({"/clip.mp4": body(clip, "video/mp4")}, "/clip.mp4", LOCAL_HTTP,
                       fetch=lambda url, policy: read_video(url, 10, policy))
    assert video.shape == (10, 48, 64, 3)


@pytest.mark.parametrize("limit", [dict(max_video_frames=3), dict(max_video_pixels=3 * 64 * 48)])
def test_video_past_the_frame_budget_is_refused(tmp_path, limit):
    url = data_uri(write_video(tmp_path / "clip.mp4").read_bytes(), "video/mp4")
    message = refusal(read_video(url, 10, MediaPolicy(**limit)))
    assert message == "the video has more than 3 frames at 10 fps, the most allowed at 64x48: " \
                      "send a shorter clip or a lower fps"


def test_frame_folder_is_read_in_name_order(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:03d}.png").write_bytes(png(colour=(i, i, i)))
    (tmp_path / "notes.txt").write_text("not a frame")
    video = asyncio.run(read_video(str(tmp_path), 2.0, MediaPolicy(allowed_local_media_path=tmp_path)))
    assert video.shape == (3, 6, 8, 3)
    assert video[:, 0, 0, 0].tolist() == [0, 1, 2]


def test_frame_folder_over_the_frame_cap_is_refused_before_reading(tmp_path):
    for i in range(6):
        (tmp_path / f"{i:03d}.png").write_bytes(b"not even an image")
    policy = MediaPolicy(allowed_local_media_path=tmp_path, max_video_frames=5)
    assert refusal(read_video(str(tmp_path), 2.0, policy)) == "the video folder holds more than 5 frame images"


@pytest.mark.parametrize("playlist", ["hls", "ffconcat"])
def test_playlists_naming_other_files_or_urls_are_refused(tmp_path, monkeypatch, playlist):
    write_video(tmp_path / "clip.mp4")
    monkeypatch.chdir(tmp_path)  # ffconcat names files relative to the working directory

    async def scenario():
        async with serving({"/clip.ts": body(b"", "video/mp2t")}) as (base, hits):
            if playlist == "hls":
                text = (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\n{tmp_path}/clip.mp4\n"
                        f"#EXTINF:10.0,\n{base}/clip.ts\n#EXT-X-ENDLIST\n")
            else:
                text = "ffconcat version 1.0\nfile clip.mp4\n"
            (tmp_path / "list.m3u8").write_text(text)
            with pytest.raises(MediaError) as e:
                await read_video(str(tmp_path / "list.m3u8"), 2.0, MediaPolicy(allowed_local_media_path=tmp_path))
            return str(e.value), hits

    message, hits = asyncio.run(scenario())
    assert message == "the video could not be decoded: send an MP4/MOV, MKV/WebM, AVI or MPEG-TS file"
    assert hits["/clip.ts"] == 0


# images

def test_decompression_bomb_is_refused_from_its_header():
    bomb = bomb_png()
    assert len(bomb) < 100_000
    start = time.monotonic()
    with pytest.raises(MediaError, match="the image has more than the 67108864 pixels allowed"):
        image_size(bomb, MediaPolicy())
    assert time.monotonic() - start < 0.5  # decoding 400 million pixels would take seconds


def test_image_over_the_pixel_limit_is_refused_with_its_size():
    with pytest.raises(MediaError, match=r"^the image is 8x6, more than the 40 pixels allowed$"):
        image_size(png(), MediaPolicy(max_image_pixels=40))


def test_image_format_outside_the_allowlist_is_refused():
    tiff = io.BytesIO()
    Image.new("RGB", (8, 6)).save(tiff, format="TIFF")
    with pytest.raises(MediaError, match="^the image is not a PNG, JPEG, WebP, GIF or BMP file$"):
        image_size(tiff.getvalue(), MediaPolicy())


def test_image_size_reads_width_and_height():
    assert image_size(png(8, 6), MediaPolicy()) == (8, 6)


@pytest.mark.parametrize("fetch, url", [
    (fetch_image, data_uri(b"<_io.BytesIO object at 0x7f00deadbeef>")),
    (fetch_image, "gopher://example.com/cat.png"),
    (fetch_image, "http://[::1"),
    (read_video, data_uri(b"\x00\x00\x00\x18ftypmp42 truncated", "video/mp4")),
    (read_video, data_uri(png(), "video/mp4")),
], ids=["image_garbage", "image_scheme", "image_bad_url", "video_truncated", "video_is_a_png"])
def test_error_messages_hold_no_memory_addresses(fetch, url):
    call = fetch(url, MediaPolicy()) if fetch is fetch_image else fetch(url, 2.0, MediaPolicy())
    message = refusal(call)
    assert not re.search(r"0x[0-9a-fA-F]+|object at|Errno|Traceback", message), message
