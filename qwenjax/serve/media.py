"""The images and videos of chat messages (image_url and video_url parts): base64 data URLs always, local files
only under the server's --allowed-local-media-path."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
from typing import Any

from qwenjax.serve.errors import APIError


@dataclasses.dataclass
class Pictures:
    """How image_url and video_url parts are read: data URLs always, local files only under `local_dir`
    (--allowed-local-media-path); `processor` is None for a model without a vision tower."""
    processor: Any = None
    local_dir: str | None = None

    def image(self, image_url, where: str):
        """The image of an image_url part: a PIL image (a data URL) or a file path."""
        url = self._url(image_url, "image_url", where)
        if url.startswith("data:"):
            try:
                from PIL import Image

                image = Image.open(io.BytesIO(self._data(url, "image/png", where)))
                image.load()
                return image
            except APIError:
                raise
            except Exception as e:  # PIL's UnidentifiedImageError, DecompressionBombError, ...
                raise APIError(400, f"{where}: not a readable image ({type(e).__name__}: {e})", where) from None
        return self._local(url, "image_url", where)

    def video(self, video_url, where: str, scratch: str):
        """The video of a video_url part, as the processor reads it: a video file or a directory of frame
        images under `local_dir`, or a data URL's video written to a file in `scratch` (the caller's temporary
        directory, removed once the processor has read it)."""
        url = self._url(video_url, "video_url", where)
        if not url.startswith("data:"):
            return self._local(url, "video_url", where)
        data = self._data(url, "video/mp4", where)
        path = os.path.join(scratch, f"video{len(os.listdir(scratch))}.{url[5:].split(';')[0].split('/')[-1]}")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _url(self, part, kind: str, where: str) -> str:
        url = part.get("url") if isinstance(part, dict) else part
        if self.processor is None:
            raise APIError(400, f"{where}: this model takes no images or videos (its config has no vision_config)",
                           where)
        if not isinstance(url, str):
            raise APIError(400, f"{where}: {kind} needs a 'url' string", where)
        return url

    @staticmethod
    def _data(url: str, example: str, where: str) -> bytes:
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, f"{where}: a data URL must be base64 (data:{example};base64,...)", where)
        try:
            return base64.b64decode(data, validate=True)
        except ValueError as e:  # binascii.Error
            raise APIError(400, f"{where}: not a readable {example.split('/')[0]} (not base64: {e})", where) from None

    def _local(self, url: str, kind: str, where: str) -> str:
        path = url.removeprefix("file://")
        if self.local_dir is None or not os.path.isabs(path):
            raise APIError(400, f"{where}: {kind} must be a base64 data URL (URLs are not fetched; local files "
                                "need the server's --allowed-local-media-path)", where)
        path, root = os.path.realpath(path), os.path.realpath(self.local_dir)
        if os.path.commonpath([path, root]) != root:
            raise APIError(400, f"{where}: {url!r} is outside the server's --allowed-local-media-path", where)
        return path
