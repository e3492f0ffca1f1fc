"""Reading pictures: image files and bytes, directories of frame images, video files and bytes, as transformers
reads them, within the limits a server sets (`ReadLimits`).

- `load_image`: a file or an image file's bytes is opened, turned upright by its EXIF orientation and converted to
  RGB, as `transformers.image_utils.load_image` does (an alpha band dropped, not composited); a PIL image or an
  array already in memory is converted as transformers' processors convert it (transparency composited on white).
- `read_video_file`: a video file (or its bytes) decoded with PyAV, as transformers' `read_video_pyav` decodes it.
- `frame_files` and `read_frames`: a directory of frame images, in name order.

`ReadLimits` bounds what a read may touch: the pixels of one image or frame (checked from the file's header, before
anything is decoded), the directory every file read must resolve into (each frame of a directory too), and the
decoders a file may reach. Nothing here keeps state between calls: readers may run in several threads at once.

Pillow is imported only when an image or video is read, PyAV only when a video file is.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable

import numpy as np

from qwenjax.validate import InputError

# The ways a frame is handed on once decoded: (frame [H, W, 3] uint8, how many frames are sampled) → the kept array.
FrameTransform = Callable[[np.ndarray, int], np.ndarray]


class ProcessorError(InputError):
    """An image, video, prompt or processor config that cannot become model inputs."""


class MissingVideoDecoder(ProcessorError, ImportError):
    """A video file given where PyAV, which decodes video files, is not installed."""


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    """What a read may touch. `max_pixels`: the most pixels (width · height) of one image or video frame, checked
    from the file's header before decoding (None: only Pillow's own decompression-bomb limit). `root`: every file
    read, each frame of a directory included, must resolve (symlinks followed) inside this directory (None:
    anywhere); `root_name` and `max_pixels_name` name them in errors. `image_formats` (Pillow format names) and
    `video_demuxers` (FFmpeg demuxer names) are the decoders a file may reach (None: all that Pillow / FFmpeg
    have)."""

    max_pixels: int | None = None
    root: str | None = None
    root_name: str = "the allowed directory"
    max_pixels_name: str = "the limit"
    image_formats: tuple[str, ...] | None = None
    video_demuxers: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                                            or self.max_pixels < 1):
            raise ValueError(f"ReadLimits.max_pixels must be a positive int or None, got {self.max_pixels!r}")
        if self.root is not None:
            object.__setattr__(self, "root", os.path.realpath(self.root))

    def resolve(self, path: str | os.PathLike) -> str:
        """`path` with its symlinks resolved; it must lie inside `root`. The refusal names `path` as given and says
        nothing of where it leads (nor whether that exists)."""
        path = os.fspath(path)
        if "\0" in path:  # the OS takes no such name (os functions raise ValueError)
            raise ProcessorError(f"{path[:200]!r} is not a valid path (it holds a NUL character)")
        if self.root is None:
            return path
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.root]) != self.root:
            raise ProcessorError(f"{path!r} is outside {self.root_name}")
        return real

    def check_pixels(self, width: int, height: int, name: str) -> None:
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise ProcessorError(f"{name}: {width} x {height} pixels (width x height) = {width * height:,}, above "
                                 f"{self.max_pixels_name} of {self.max_pixels:,} pixels per image or video frame")


NO_LIMITS = ReadLimits()


def pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:
        raise ImportError("images and videos need Pillow: pip install pillow") from None
    return PIL


# ---- images ------------------------------------------------------------------------------------------------------
def load_image(image: Any, name: str | None = None, limits: ReadLimits = NO_LIMITS) -> np.ndarray:
    """`image` as [H, W, 3] uint8 RGB. A file path or the bytes of an image file: opened (the format within
    `limits.image_formats`, the size within `limits.max_pixels`, read from the header before decoding), turned
    upright by its EXIF orientation and converted to RGB, as `transformers.image_utils.load_image` does
    (`PIL.ImageOps.exif_transpose`, then `convert("RGB")`: an alpha band is dropped, a transparent colour kept and
    then composited on white, as its processors' `convert_to_rgb` does). A PIL image or an
    [H, W(, C)] uint8 array: converted as transformers' image processors convert one (`convert_to_rgb`:
    transparency composited on white); `limits` applies to files and bytes only. Errors name `name` (a file:
    its path)."""
    PIL = pil()
    if isinstance(image, (str, os.PathLike)):
        shown = os.fspath(image)
        path = limits.resolve(shown)  # before anything else: nothing is said of a file outside the root
        if not os.path.isfile(path):
            hint = " (URLs are not fetched: download the image first)" if "://" in shown else ""
            raise ProcessorError(f"image file {shown!r} does not exist{hint}")
        return _decode_image(path, name or path, limits)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode_image(io.BytesIO(image), name or "image", limits)
    name = name or "image"
    if isinstance(image, PIL.Image.Image):
        return _rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ProcessorError(f"{name}: an image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] uint8 "
                                 f"(channels last), got {list(image.shape)} {image.dtype}")
        image = image.reshape(*image.shape[:2], -1)
        if image.shape[2] == 1:
            return np.repeat(image, 3, axis=2)
        if image.shape[2] == 4:
            alpha = image[..., 3:] / 255
            return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return image
    raise ProcessorError(f"{name}: an image must be a PIL image, a uint8 array, a file path or an image file's "
                         f"bytes, got {type(image).__name__}")


def _rgb(image) -> np.ndarray:
    """A PIL image as transformers' image processors convert one (`convert_to_rgb`): transparency, an alpha band
    or a transparent colour (`info["transparency"]`), composited on white."""
    PIL = pil()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # a conversion to itself: a copy


def _decode_image(file: str | io.BytesIO, name: str, limits: ReadLimits) -> np.ndarray:
    """An image file as transformers' `load_image` then its image processor make it: `convert("RGB")` drops an
    alpha band, but keeps a palette's or grey image's transparent colour, which `convert_to_rgb` then composites."""
    PIL = pil()
    formats = limits.image_formats
    if formats is not None:
        PIL.Image.init()  # registers every plugin: `formats` may name one not loaded yet
        formats = [f for f in formats if f in PIL.Image.OPEN]  # this Pillow's build may lack some (WEBP)
    try:
        with PIL.Image.open(file, formats=formats) as opened:  # reads the header only
            limits.check_pixels(*opened.size, name)
            # in place, and no conversion of RGB to itself: each would copy the whole image (67 MB at 2^24 pixels)
            PIL.ImageOps.exif_transpose(opened, in_place=True)  # decodes
            return _rgb(opened if opened.mode == "RGB" else opened.convert("RGB"))
    except ProcessorError:
        raise
    except PIL.UnidentifiedImageError:
        accepted = f"; accepted formats: {', '.join(limits.image_formats)}" if limits.image_formats else ""
        raise ProcessorError(f"{name}: not a readable image (Pillow cannot identify it{accepted})") from None
    except Exception as e:  # Pillow raises OSError, DecompressionBombError, SyntaxError, ...
        raise ProcessorError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


# ---- directories of frame images ---------------------------------------------------------------------------------
def frame_files(directory: str | os.PathLike, limits: ReadLimits = NO_LIMITS) -> list[str]:
    """The frame images of `directory` in name order (names starting with '.' skipped), each resolved within
    `limits.root`: a frame that is a link out of the root is refused, whatever it leads to."""
    directory = os.fspath(directory)
    files = []
    try:
        entries = os.listdir(limits.resolve(directory))
    except OSError as e:
        raise ProcessorError(f"video directory {directory!r} cannot be listed ({type(e).__name__})") from None
    for entry in sorted(n for n in entries if not n.startswith(".")):
        path = limits.resolve(os.path.join(directory, entry))
        if os.path.isfile(path):
            files.append(path)
    if not files:
        raise ProcessorError(f"video directory {directory!r} holds no frame images")
    return files


def read_frames(files: list[str], indices: np.ndarray, limits: ReadLimits = NO_LIMITS,
                transform: FrameTransform | None = None) -> np.ndarray:
    """The frame images `files[indices]` (only those are read; an index repeated repeats its frame), as
    `load_image` reads a file, each passed through `transform` as it is read: [len(indices), H, W, 3] uint8."""
    kept: dict[int, np.ndarray] = {}
    first = None
    for i in dict.fromkeys(indices.tolist()):
        frame = load_image(files[i], limits=limits)
        if first is None:
            first = i, frame.shape
        elif frame.shape != first[1]:
            raise ProcessorError(f"{files[i]}: {frame.shape[0]} x {frame.shape[1]} pixels, but {files[first[0]]} "
                                 f"is {first[1][0]} x {first[1][1]}; a video's frames must all have one size")
        kept[i] = transform(frame, len(indices)) if transform else frame
    return np.stack([kept[i] for i in indices.tolist()])


# ---- video files -------------------------------------------------------------------------------------------------
def read_video_file(source: str | os.PathLike | bytes, sample_indices: Any = None, *, name: str | None = None,
                    limits: ReadLimits = NO_LIMITS, transform: FrameTransform | None = None
                    ) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Decode a video file (a path, or the file's bytes) with PyAV as transformers' `read_video_pyav` does: the
    first video stream, its frame count (`stream.frames`; where the container does not record it, as Matroska/WebM,
    the stream's packets are counted instead) and average frame rate (None where the file has none) give the frame
    `indices` to keep, `sample_indices(total_frames, fps)` (None: every frame); the frames are decoded from the
    start up to the last index and converted to RGB (`to_ndarray(format="rgb24")`), then passed through
    `transform` (with the number of indices) as they are decoded. Returns (frames [len(indices), H', W', 3] uint8,
    frames[k] the frame at indices[k], the indices, the frame rate). An index repeated (more frames asked for than
    there are) repeats its frame, as indexing an array of the frames does (and torchcodec, transformers' default
    decoder); transformers' PyAV reader keeps such a frame once, and its prompt then disagrees with its pixels.
    A header that counts more frames than the decoder yields: the indices are sampled again from the frames
    decoded. `limits`: the path's root, the frame size (from the stream's header, and each frame's before it is
    converted), the demuxers FFmpeg may pick. Errors name `name` (default: the path, or "video" for bytes);
    without PyAV, `MissingVideoDecoder` (an ImportError) says how to install it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "video"
        open_source = lambda: io.BytesIO(source)  # noqa: E731
    else:
        shown = os.fspath(source)
        path = limits.resolve(shown)
        name = name or path
        open_source = lambda: path  # noqa: E731
    try:
        import av
    except ImportError:
        raise MissingVideoDecoder(f"{name}: decoding a video file needs PyAV: pip install av (or pip install "
                                  "'qwenjax[video]'); or pass the decoded frames, [T, H, W, 3] uint8, or a "
                                  "directory of frame images") from None
    if not isinstance(source, (bytes, bytearray, memoryview)) and not os.path.isfile(path):
        raise ProcessorError(f"video file {shown!r} does not exist")
    sample_indices = sample_indices or (lambda total, fps: np.arange(total))
    # FFmpeg picks a demuxer from the content; some (playlists, concat lists) open further files or URLs
    options = {"format_whitelist": ",".join(limits.video_demuxers)} if limits.video_demuxers else {}

    def decode(indices: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
        """(the kept frames by index, how many frames were decoded: last + 1, or fewer where the stream ends)."""
        kept, decoded, first, keep, last = {}, 0, None, set(indices.tolist()), int(indices.max())
        with av.open(open_source(), options=options) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # threads decode the same frames, in order
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in keep:
                    limits.check_pixels(frame.width, frame.height, f"{name}: frame {i}")
                    if first is None:
                        first = i, (frame.height, frame.width)
                    elif (frame.height, frame.width) != first[1]:
                        raise ProcessorError(f"{name}: its frames change size ({first[1][0]} x {first[1][1]} "
                                             f"pixels at frame {first[0]}, {frame.height} x {frame.width} at frame "
                                             f"{i}); a video's frames must all have one size")
                    array = frame.to_ndarray(format="rgb24")
                    kept[i] = transform(array, len(indices)) if transform else array
                if i >= last:
                    break
        return kept, decoded

    try:
        with av.open(open_source(), options=options) as container:
            if not container.streams.video:
                raise ProcessorError(f"{name}: holds no video stream")
            stream = container.streams.video[0]
            limits.check_pixels(stream.codec_context.width, stream.codec_context.height, name)
            fps = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames
            if total <= 0:  # not in the header (Matroska, WebM): one packet per frame
                total = sum(1 for packet in container.demux(stream) if packet.size > 0)
        for _ in range(2):
            if total <= 0:
                raise ProcessorError(f"{name}: its video stream holds no frames")
            indices = np.asarray(sample_indices(total, fps), dtype=np.int64)
            kept, decoded = decode(indices)
            if decoded > indices.max():
                break
            total = decoded  # fewer frames than the header says: sample from those there are
        else:
            raise ProcessorError(f"{name}: the decoder yields {decoded} frame(s), fewer than it did a moment "
                                 "before; a damaged file?")
    except av.error.FFmpegError as e:
        accepted = f"; accepted containers: {', '.join(limits.video_demuxers)}" if limits.video_demuxers else ""
        shown_error = str(e).split(": '", 1)[0]  # FFmpeg's message, without the path or '<none>' it appends
        raise ProcessorError(f"{name}: not a readable video ({type(e).__name__}: {shown_error}{accepted})") from None
    return np.stack([kept[i] for i in indices.tolist()]), indices, fps
