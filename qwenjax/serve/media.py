"""The images and videos of chat messages (image_url and video_url parts): base64 data URLs always, local files
only under the server's --allowed-local-media-path. Each picture is read and processed as its part is read
(`Pictures.image`, `Pictures.video`): a request holds one picture at full size at a time, and every error is a 400
naming the part. Nothing here touches an event loop or keeps state between calls: call it from worker threads."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from typing import Any

from qwenjax.inference.media_loading import ProcessorError, ReadLimits
from qwenjax.serve.errors import APIError

# 2^24 pixels (4096 x 4096), Qwen3-VL's image processor's `longest_edge`: the most pixels it passes to the model
# unscaled. Decoding one such image (RGB, then upright) peaks near 200 MB; a 13300² one, under Pillow's own
# decompression-bomb limit, took 1.65 GB and 7 s. Checked from the header, before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 1 << 24
# Pillow's formats that photos and screenshots come in (MPO: many cameras' JPEG); not EPS (Ghostscript) nor the
# long tail of rarely used parsers.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
# video/<subtype> of a data URL; FFmpeg picks the demuxer from the content, within VIDEO_DEMUXERS
VIDEO_TYPES = frozenset({"mp4", "webm", "quicktime", "x-matroska", "matroska", "x-msvideo", "avi", "mpeg", "ogg",
                         "3gpp", "3gpp2", "x-m4v", "mp2t", "x-flv"})
# single-file containers: not playlists (hls), lists of files (concat) or image sequences, which open other files
VIDEO_DEMUXERS = ("mov", "mp4", "matroska", "webm", "avi", "mpeg", "mpegts", "ogg", "flv")
_SUBTYPE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,126}")  # RFC 6838's restricted names


@dataclasses.dataclass(frozen=True)
class Pictures:
    """How image_url and video_url parts are read: data URLs always, local files only under `local_dir`
    (--allowed-local-media-path; every file read, each frame of a directory too, must resolve inside it);
    `processor` is None for a model without a vision tower. `max_image_pixels` (--max-image-pixels; None: no
    limit but Pillow's own) bounds the pixels of one image or video frame, checked before it is decoded."""
    processor: Any = None
    local_dir: str | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self):
        cap = self.max_image_pixels
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"--max-image-pixels must be a positive whole number, got {cap!r}")
        root = None if self.local_dir is None else os.path.realpath(self.local_dir)
        object.__setattr__(self, "_limits", ReadLimits(
            cap, root, root_name="the server's --allowed-local-media-path",
            max_pixels_name="the server's limit (--max-image-pixels)", image_formats=IMAGE_FORMATS,
            video_demuxers=VIDEO_DEMUXERS))

    def image(self, image_url, where: str):
        """The image of an image_url part, read and processed (a `ProcessedPicture` the processor takes)."""
        url = self._url(image_url, "image_url", where)
        if url.startswith("data:"):
            _, data = self._data(url, "image", where)
            source, name = data, "the image"
        else:
            source, name = self._local(url, "image_url", where), None  # errors name the file
        return self._read(self.processor.image_processor, source, name, where)

    def video(self, video_url, where: str, scratch: str | None = None):
        """The video of a video_url part, read and processed (a `ProcessedPicture` the processor takes): a video
        file or a directory of frame images under `local_dir`, or a data URL's video, decoded from memory.
        `scratch` is not used (no file is written); it stays until the routes stop passing it."""
        url = self._url(video_url, "video_url", where)
        if url.startswith("data:"):
            subtype, data = self._data(url, "video", where)
            if subtype not in VIDEO_TYPES:
                raise APIError(400, f"{where}: video type {'video/' + subtype[:40]!r} is not one the server reads "
                                    f"(video/{', video/'.join(sorted(VIDEO_TYPES))})", where)
            source, name = data, "the video"
        else:
            source, name = self._local(url, "video_url", where), None
        return self._read(self.processor.video_processor, source, name, where)

    def _read(self, processor, source, name: str | None, where: str):
        try:
            return processor.prepare(source, name, self._limits)
        except ProcessorError as e:  # MissingVideoDecoder too: a video file and no PyAV
            message = str(e) if len(str(e)) <= 1000 else str(e)[:1000] + "..."  # a long path is not echoed whole
            raise APIError(400, f"{where}: {message}", where) from None

    def _url(self, part, kind: str, where: str) -> str:
        url = part.get("url") if isinstance(part, dict) else part
        if self.processor is None:
            raise APIError(400, f"{where}: this model takes no images or videos (its config has no vision_config)",
                           where)
        if not isinstance(url, str):
            raise APIError(400, f"{where}: {kind} needs a 'url' string", where)
        return url

    @staticmethod
    def _data(url: str, kind: str, where: str) -> tuple[str, bytes]:
        """(the subtype of the data URL's `kind`/subtype media type, its decoded bytes)."""
        header, _, data = url.partition(",")
        example = f"data:{kind}/{'png' if kind == 'image' else 'mp4'};base64,..."
        fields = header[len("data:"):].split(";")
        if fields[-1] != "base64":
            raise APIError(400, f"{where}: a data URL must be base64 ({example})", where)
        major, _, subtype = fields[0].lower().partition("/")
        if major != kind:
            raise APIError(400, f"{where}: a {kind}_url data URL needs a {kind} media type ({example}), got "
                                f"{fields[0][:60]!r}", where)
        if not _SUBTYPE.fullmatch(subtype):
            raise APIError(400, f"{where}: {fields[0][:60]!r}... is not a valid media type" if len(fields[0]) > 60
                           else f"{where}: {fields[0]!r} is not a valid media type", where)
        try:
            return subtype, base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise APIError(400, f"{where}: not a readable {kind} (not base64: {e})", where) from None

    def _local(self, url: str, kind: str, where: str) -> str:
        path = url.removeprefix("file://")
        if "\0" in path:
            raise APIError(400, f"{where}: {url[:200]!r} is not a valid path (it holds a NUL character)", where)
        if self.local_dir is None or not os.path.isabs(path):
            raise APIError(400, f"{where}: {kind} must be a base64 data URL (URLs are not fetched; local files "
                                "need the server's --allowed-local-media-path)", where)
        try:
            return self._limits.resolve(path)
        except ProcessorError:
            raise APIError(400, f"{where}: {url[:200]!r} is outside the server's --allowed-local-media-path",
                           where) from None
