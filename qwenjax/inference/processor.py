"""Images and videos into the model's inputs, as transformers' Qwen3.5 processor (`Qwen3VLProcessor`) makes them.

    processor = load_processor("path/to/checkpoint")
    batch = processor([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                    {"type": "text", "text": "What is in the picture?"}]}])
    logits = model(**batch)                   # or qwenjax.generate(model, **batch, max_new_tokens=...)

- `ImageProcessor` is transformers' PIL backend of `Qwen2VLImageProcessor` (`Qwen2VLImageProcessorPil`; the class
  transformers 5 picks by default is a torchvision port of it): RGB as `media_loading.load_image` makes it (a file
  or an image file's bytes as transformers' `load_image`: upright by EXIF orientation, an alpha band dropped; a PIL
  image or array in memory composited on white, as transformers' processors do), `smart_resize` to multiples of
  patch·merge within [min_pixels, max_pixels], Pillow bicubic on the uint8 image, rescale, normalise, the image
  repeated over one temporal patch, patches in merge-block order. Equal to transformers' output.
- `VideoProcessor` is `Qwen3VLVideoProcessor`: frames sampled at `fps` per second of the source (between
  min_frames and max_frames), the video's own `smart_resize`, the last frame repeated to a whole temporal patch,
  and one timestamp per temporal patch for the prompt. transformers resizes video frames with torchvision only;
  here Pillow does it, in torch's pass order (values differ from torch's by one uint8 level on under 1% of the
  pixels). A video is its decoded frames, [T, H, W, 3] uint8, a directory of frame images, or a video file (mp4,
  webm, mkv, ...: decoded with PyAV, `pip install av` or `qwenjax[video]`, as transformers' `read_video_pyav`
  decodes it: the first video stream's frame count and average frame rate drive the sampling and the timestamps,
  and only the frames up to the last one sampled are decoded). Wrap frames in `Video(frames, fps)` to give the
  source frame rate; without it 24 fps is assumed, as transformers assumes. Each frame read from a file is resized
  as it is decoded: one frame at a time is held at full size.
- `prepare(picture, name, limits)` reads one picture within `ReadLimits` (the pixels of an image or frame, the
  directory files must resolve into, the decoders reached) and processes it at once: a `ProcessedPicture`, which
  the processor takes back as is wherever a picture goes (a server reads each picture of a request this way).
- `Processor` renders the chat template and expands each image placeholder `<|image_pad|>` into t·h·w/merge² pad
  tokens, and each video placeholder `<|vision_start|><|video_pad|><|vision_end|>` (or a bare `<|video_pad|>`)
  into, per temporal patch, `<{seconds:.1f} seconds><|vision_start|>` + h·w/merge² video pads + `<|vision_end|>`,
  as the Qwen3-VL processor that Qwen wrote does (transformers 4.57). transformers 5 replaces only the inner
  `<|video_pad|>`, leaving the template's wrapper around the frame blocks (two extra tokens per video); the
  prompts here follow the original.

Pillow is imported only when an image or video is processed, PyAV only when a video file is.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from typing import Any, NamedTuple, Sequence

import numpy as np

from qwenjax.config import load_config
from qwenjax.inference.media_loading import NO_LIMITS, ReadLimits, frame_files, load_image, pil, read_frames
from qwenjax.inference.media_loading import MissingVideoDecoder as MissingVideoDecoder  # re-exported
from qwenjax.inference.media_loading import ProcessorError, read_video_file
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.validate import check, check_range, read_json_object

IMAGE_CONFIG_FILE = "preprocessor_config.json"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END  # what a chat template writes for an image
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END
MAX_ASPECT_RATIO = 200
ASSUMED_VIDEO_FPS = 24.0  # transformers' guess when a video's frame rate is not given
PIL_BICUBIC = 3
# transformers' defaults (image_utils): Qwen2VLImageProcessor normalises with CLIP's; Qwen3.5 configs set 0.5.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD = (0.5, 0.5, 0.5)


class Video(NamedTuple):
    """A video: `frames` ([T, H, W, 3] uint8, a directory of frame images read in name order, so name them with
    zero-padded numbers, a video file, or a video file's bytes) and the frame rate they were taken at (None:
    unknown, 24 assumed; for a video file, the file's own average frame rate; a rate given here overrides it)."""

    frames: Any
    fps: float | None = None


class ProcessedPicture(NamedTuple):
    """An image or video already read and processed (`ImageProcessor.prepare`, `VideoProcessor.prepare`): its
    patches, grid (t, h, w), the seconds of each temporal patch (videos; None for an image), and the processor
    that made it, which alone takes it back, as is, where a picture goes (`__call__`, content parts)."""

    pixels: np.ndarray
    grid: tuple[int, int, int]
    timestamps: list[float] | None
    processor: Any


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible (transformers' `smart_resize`, Qwen2-VL's image processor)."""
    _check_aspect_ratio(height, width)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = 128 * 32 * 32, max_pixels: int = 32 * 32 * 768) -> tuple[int, int]:
    """The (height, width) a video's frames are resized to: as `smart_resize`, but the pixel bounds count all
    frames, and frames smaller than `factor` are first scaled up to it (Qwen3-VL's video `smart_resize`)."""
    if num_frames < temporal_factor:
        raise ProcessorError(f"a video of {num_frames} frame(s): needs at least temporal_patch_size = "
                             f"{temporal_factor} sampled frames (transformers refuses it too); give it as an image")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect_ratio(height, width)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_aspect_ratio(height: int, width: int) -> None:
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ProcessorError(f"an image of {height} x {width} pixels (height x width): its aspect ratio "
                             f"{max(height, width) / min(height, width):.4g} is above {MAX_ASPECT_RATIO}, the most "
                             "the Qwen vision processors accept; crop or pad it")


# ---- the processors ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _VisionProcessor:
    """What images and videos share: sizes, normalisation, resizing, patch layout. Defaults are overridden by
    each processor's; `source` names where the settings came from in errors."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    source: str = dataclasses.field(default="", repr=False, compare=False)

    # JSON keys naming a field differently; and whether top-level min_pixels/max_pixels override `size` (images)
    _KEYS: typing.ClassVar[dict[str, str]] = {"min_pixels": "size.shortest_edge", "max_pixels": "size.longest_edge"}
    _PIXEL_KEYS: typing.ClassVar[bool] = False
    # transformers' PIL backend rescales (float64) then normalises (float32); its torchvision backend fuses both
    _FUSED_NORMALIZE: typing.ClassVar[bool] = False

    def __post_init__(self):
        for name, value in (("image_mean", self.image_mean), ("image_std", self.image_std)):
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # one value for all channels
                object.__setattr__(self, name, (value,) * 3)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name != "source":
                object.__setattr__(self, f.name, check(getattr(self, f.name), hints[f.name], self._where(f.name),
                                                       ProcessorError))
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            check_range(getattr(self, name), self._where(name), minimum=1, error=ProcessorError)
        check_range(self.rescale_factor, self._where("rescale_factor"), above=0, error=ProcessorError)
        check_range(self.resample, self._where("resample"), minimum=0, maximum=5, error=ProcessorError)
        for i, s in enumerate(self.image_std):
            if s == 0:
                raise ProcessorError(f"{self._where('image_std')}[{i}]: must not be 0 (pixels are divided by it)")
        if self.min_pixels > self.max_pixels:
            raise ProcessorError(f"{self._where('min_pixels')} = {self.min_pixels} is above "
                                 f"{self._where('max_pixels')} = {self.max_pixels}")

    def _where(self, name: str) -> str:
        return f"{self.source or type(self).__name__} field `{self._KEYS.get(name, name)}`"

    @classmethod
    def from_config(cls, config: dict, source: str = ""):
        """The processor a `*preprocessor_config.json` object describes (keys it does not use are ignored)."""
        where = f"{source or cls.__name__} field"
        values = {f.name: config[f.name] for f in dataclasses.fields(cls)
                  if f.name in config and f.name not in cls._KEYS and f.name != "source"}
        size = check(config.get("size"), dict | None, f"{where} `size`", ProcessorError)
        if size is not None:  # transformers 5 keeps the pixel bounds here
            for name, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
                if key not in size:
                    raise ProcessorError(f"{where} `size`: has no `{key}` (the {name.replace('_', ' ')}), got {size}")
                values[name] = size[key]
        if cls._PIXEL_KEYS:  # Qwen2-VL's older names, which win over `size` as in transformers
            values.update({k: config[k] for k in ("min_pixels", "max_pixels") if config.get(k) is not None})
        return cls(**values, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike):
        path = os.fspath(path)
        return cls.from_config(read_json_object(path, ProcessorError), path)

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def _resize(self, frame: np.ndarray, height: int, width: int) -> np.ndarray:
        """[H, W, 3] uint8 → [height, width, 3] uint8 with Pillow, as transformers' PIL backend resizes."""
        PIL = pil()
        return np.asarray(PIL.Image.fromarray(frame).resize((width, height), resample=self.resample))

    def _normalize(self, frames: np.ndarray) -> np.ndarray:
        """uint8 pixels → float32 model inputs, in transformers' order of float operations (_FUSED_NORMALIZE)."""
        mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
        if self._FUSED_NORMALIZE and self.do_rescale and self.do_normalize:
            scale = np.float32(1.0 / self.rescale_factor)
            return (frames.astype(np.float32) - mean * scale) / (std * scale)
        x = (frames.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.do_rescale \
            else frames.astype(np.float32)
        return (x - mean) / std if self.do_normalize else x

    def _patchify(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """[T, H, W, C] float32 → ([patches, C·T·P·P], grid (t, h, w)): the last frame repeated to whole temporal
        patches, patches ordered by merge block (t, h/m, w/m, m, m), each flattened as (C, T, P, P)."""
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -len(frames) % tp:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        t, h, w, c = frames.shape
        gt, gh, gw = t // tp, h // p, w // p
        x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
        x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # → (gt, gh/m, gw/m, m, m, c, tp, p, p)
        return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)

    def _taken_back(self, picture: ProcessedPicture, name: str) -> ProcessedPicture:
        if picture.processor != self:  # another config's patches would not match the prompt or the tower
            raise ProcessorError(f"{name}: a picture processed by another processor ({picture.processor!r:.200})")
        return picture

    def _check_not_resized(self, height: int, width: int) -> None:
        factor = self.patch_size * self.merge_size
        if height % factor or width % factor:
            raise ProcessorError(f"{height} x {width} pixels (height x width) with {self._where('do_resize')} "
                                 f"false: both sides must be multiples of patch_size · merge_size = {factor}")


@dataclasses.dataclass(frozen=True)
class ImageProcessor(_VisionProcessor):
    """Images → (pixel_values [patches, C·T·P·P] float32, image_grid_thw [images, 3] int64), as transformers'
    `Qwen2VLImageProcessorPil`. Defaults are transformers' (Qwen2-VL's); a checkpoint's preprocessor_config.json
    sets Qwen3.5's (`ImageProcessor.from_file`)."""

    _PIXEL_KEYS: typing.ClassVar[bool] = True

    def __call__(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """`images`: one image or a list (PIL images, [H, W, 3] uint8 arrays, file paths, image files' bytes,
        `ProcessedPicture`s of this processor)."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ProcessorError("no images given")
        patches, grids = [], []
        for i, image in enumerate(images):
            if isinstance(image, ProcessedPicture):
                image = self._taken_back(image, f"images[{i}]")
            else:
                image = self.prepare(image, os.fspath(image) if isinstance(image, (str, os.PathLike)) else
                                     f"images[{i}]")
            patches.append(image.pixels)
            grids.append(image.grid)
        return np.concatenate(patches), np.array(grids, np.int64)

    def prepare(self, image: Any, name: str | None = None, limits: ReadLimits = NO_LIMITS) -> ProcessedPicture:
        """One image (as `__call__` takes one) read within `limits` and processed now. Errors start with `name`
        (default: the file's path, or "image")."""
        pixels = load_image(image, name, limits)
        name = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "image")
        try:
            return ProcessedPicture(*self._one(pixels), None, self)
        except ProcessorError as e:
            raise ProcessorError(f"{name}: {e}") from None

    def _one(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        height, width = image.shape[:2]
        if self.do_resize:
            image = self._resize(image, *smart_resize(height, width, self.patch_size * self.merge_size,
                                                      self.min_pixels, self.max_pixels))
        else:
            self._check_not_resized(height, width)
        return self._patchify(self._normalize(image)[None])


@dataclasses.dataclass(frozen=True)
class VideoProcessor(_VisionProcessor):
    """Videos → (pixel_values_videos [patches, C·T·P·P] float32, video_grid_thw [videos, 3] int64, timestamps: per
    video, the seconds of each temporal patch), as transformers' `Qwen3VLVideoProcessor` with the timestamps of
    `Qwen3VLProcessor`. A video is a `Video`, or frames alone ([T, H, W, 3] uint8, a directory of frame images or
    a video file)."""

    patch_size: int = 16
    min_pixels: int = 128 * 32 * 32
    max_pixels: int = 32 * 32 * 768
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD
    image_std: tuple[float, float, float] = IMAGENET_STANDARD
    fps: float | None = 2.0          # frames sampled per second of video (None: `num_frames`, or every frame)
    num_frames: int | None = None    # or this many frames, spread evenly (exclusive with fps, as in transformers)
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True    # false: every frame given is used
    cap_pixels_per_frame: bool = False  # qwen-vl-utils' per-frame pixel budget (transformers' option, off by default)
    max_video_tokens: int = 768

    _FUSED_NORMALIZE: typing.ClassVar[bool] = True

    def _resize(self, frame: np.ndarray, height: int, width: int) -> np.ndarray:
        # torch's uint8 resampling (torchvision's, which transformers resizes videos with) runs the horizontal
        # pass first, then the vertical one; Pillow may run them the other way round, and the uint8 rounding and
        # clipping in between then differs by up to ~18 levels where bicubic overshoots. Two passes fix the order.
        return super()._resize(super()._resize(frame, frame.shape[0], width), height, width)

    def __post_init__(self):
        super().__post_init__()
        if self.fps is not None:
            check_range(self.fps, self._where("fps"), above=0, error=ProcessorError)
        if self.num_frames is not None:
            check_range(self.num_frames, self._where("num_frames"), minimum=1, error=ProcessorError)
            if self.fps is not None:
                raise ProcessorError(f"{self._where('num_frames')} and {self._where('fps')} are both set; they are "
                                     "exclusive (set fps to null to sample a fixed number of frames)")
        for name in ("min_frames", "max_frames", "max_video_tokens"):
            check_range(getattr(self, name), self._where(name), minimum=1, error=ProcessorError)

    def sample_indices(self, total_frames: int, video_fps: float | None) -> np.ndarray:
        """Which of a video's `total_frames` frames are kept (`Qwen3VLVideoProcessor.sample_frames`): `fps` per
        second of the source, within [min_frames, max_frames] and at most all of them, evenly spread and rounded."""
        if not self.do_sample_frames:
            return np.arange(total_frames)
        num_frames = self.num_frames
        if num_frames is None and self.fps is not None:
            video_fps = ASSUMED_VIDEO_FPS if video_fps is None else video_fps
            num_frames = int(total_frames / video_fps * self.fps)
            num_frames = min(max(num_frames, self.min_frames), self.max_frames, total_frames)
        if num_frames is None:
            num_frames = min(max(total_frames, self.min_frames), self.max_frames)
        return np.linspace(0, total_frames - 1, num_frames).round().astype(int)

    def timestamps(self, indices: Sequence[int], video_fps: float | None) -> list[float]:
        """Seconds of each temporal patch: the mean time of its first and last frame, the last frame repeated to
        fill the final patch (`Qwen3VLProcessor._calculate_timestamps`)."""
        video_fps = ASSUMED_VIDEO_FPS if video_fps is None else video_fps
        tp = self.temporal_patch_size
        indices = list(indices) + [indices[-1]] * (-len(indices) % tp)
        seconds = [i / video_fps for i in indices]
        return [(seconds[i] + seconds[i + tp - 1]) / 2 for i in range(0, len(seconds), tp)]

    def __call__(self, videos: Any) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
        """`videos`: one video or a list of them (`ProcessedPicture`s of this processor too)."""
        videos = list(videos) if isinstance(videos, list) else [videos]
        if not videos:
            raise ProcessorError("no videos given")
        patches, grids, timestamps = [], [], []
        for i, video in enumerate(videos):
            if isinstance(video, ProcessedPicture):
                video = self._taken_back(video, f"videos[{i}]")
            else:
                video = self.prepare(video, f"videos[{i}]")
            patches.append(video.pixels)
            grids.append(video.grid)
            timestamps.append(video.timestamps)
        return np.concatenate(patches), np.array(grids, np.int64), timestamps

    def prepare(self, video: Any, name: str | None = None, limits: ReadLimits = NO_LIMITS) -> ProcessedPicture:
        """One video (as `__call__` takes one) read within `limits` and processed now. Errors start with `name`."""
        try:
            return ProcessedPicture(*self._one(video if isinstance(video, Video) else Video(video), limits), self)
        except ProcessorError as e:
            raise type(e)(f"{name}: {e}" if name else str(e)) from None

    def _frame_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """The size the `num_frames` frames sampled from a video of height x width frames are resized to."""
        factor, max_pixels = self.patch_size * self.merge_size, self.max_pixels
        if self.cap_pixels_per_frame:  # as transformers: per-frame budget, floored at 1.05 · min_pixels
            per_frame = max(min(self.max_video_tokens * factor * factor, self.max_pixels // num_frames),
                            int(self.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return smart_resize_video(num_frames, height, width, self.temporal_patch_size, factor, self.min_pixels,
                                  max_pixels)

    def _fit(self, frame: np.ndarray, num_frames: int) -> np.ndarray:
        """One of `num_frames` sampled frames at the size the model takes: resized as soon as it is read, so
        that a video file or directory is never held at full size."""
        height, width = frame.shape[:2]
        if not self.do_resize:
            self._check_not_resized(height, width)
            return frame
        size = self._frame_size(num_frames, height, width)
        # torchvision, which transformers resizes videos with, skips equal sizes
        return frame if size == (height, width) else self._resize(frame, *size)

    def _one(self, video: Video, limits: ReadLimits) -> tuple[np.ndarray, tuple[int, int, int], list[float]]:
        fps = video.fps
        if fps is not None:
            fps = check_range(check(fps, float, "Video.fps", ProcessorError), "Video.fps", above=0,
                              error=ProcessorError)
        source = video.frames
        if isinstance(source, (str, os.PathLike)):
            source = os.fspath(source)
            resolved = limits.resolve(source)  # first: nothing is said of a path outside the root
        if isinstance(source, (bytes, bytearray, memoryview)) or \
                (isinstance(source, str) and os.path.isfile(resolved)):
            frames, indices, file_fps = read_video_file(
                source, lambda total, file_fps: self.sample_indices(total, file_fps if fps is None else fps),
                limits=limits, transform=self._fit)
            fps = file_fps if fps is None else fps
        elif isinstance(source, str):
            if not os.path.isdir(resolved):
                hint = " (URLs are not fetched: download the video first)" if "://" in source else ""
                raise ProcessorError(f"video {source!r} does not exist: neither a video file nor a directory of "
                                     f"frame images{hint}")
            files = frame_files(source, limits)
            indices = self.sample_indices(len(files), fps)
            frames = read_frames(files, indices, limits, self._fit)  # only the sampled frames are read
        else:
            if not isinstance(source, np.ndarray) or source.dtype != np.uint8 or source.ndim != 4 \
                    or source.shape[3] != 3 or len(source) == 0:
                shown = f"{list(source.shape)} {source.dtype}" if isinstance(source, np.ndarray) \
                    else type(source).__name__
                raise ProcessorError(f"a video must be a [T, H, W, 3] uint8 array of frames (T >= 1), a directory "
                                     f"of frame images, a video file or its bytes, got {shown}")
            indices = self.sample_indices(len(source), fps)
            frames = np.stack([self._fit(frame, len(indices)) for frame in source[indices]])
        pixels, grid = self._patchify(self._normalize(frames))
        return pixels, grid, self.timestamps(indices.tolist(), fps)


# ---- text and pictures together ----------------------------------------------------------------------------------
_PLACEHOLDERS = re.compile(f"(?P<image>{re.escape(IMAGE_PAD)})"
                           f"|(?P<video>{re.escape(VIDEO_PLACEHOLDER)}|{re.escape(VIDEO_PAD)})")


class Processor:
    """A prompt with images and videos → the model's inputs (`Qwen3VLProcessor`). See the module docstring."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor | None = None,
                 video_processor: VideoProcessor | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor()
        self.video_processor = video_processor or VideoProcessor()

    def __call__(self, messages: list[dict] | None = None, *, text: str | None = None, images: Any = None,
                 videos: Any = None, add_generation_prompt: bool = True, enable_thinking: bool = True,
                 **template_kwargs) -> dict[str, np.ndarray | None]:
        """Model inputs for one prompt: `m(**inputs)` and `qwenjax.generate(m, **inputs, ...)` take them.

        Either `messages`, a conversation rendered with the chat template: a message's content may be a list of
        parts, `{"type": "text", "text": ...}`, `{"type": "image", "image": IMAGE}` (a path, PIL image, array or
        image file's bytes), `{"type": "video", "video": VIDEO}` (a `Video`, or frames), either also a
        `ProcessedPicture` of this processor's (`prepare`); each picture becomes its placeholder,
        `IMAGE_PLACEHOLDER` / `VIDEO_PLACEHOLDER`, and the parts are joined into one string before the template
        renders the message (as Qwen's own templates render list content; templates that only take string
        content, like the demo's, work too). Or `text`, the prompt already rendered, holding one placeholder
        per entry of `images` and `videos`, in order.

        Returns input_ids and attention_mask ([1, seq] int64), pixel_values and image_grid_thw,
        pixel_values_videos and video_grid_thw (None where there are no images or videos).
        """
        text, out, _ = self.expand(messages, text=text, images=images, videos=videos,
                                   add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                                   **template_kwargs)
        ids = np.array([self.tokenizer.encode(text)], np.int64)
        return dict(input_ids=ids, attention_mask=np.ones_like(ids), **out)

    def expand(self, messages: list[dict] | None = None, *, text: str | None = None, images: Any = None,
               videos: Any = None, add_generation_prompt: bool = True, enable_thinking: bool = True,
               **template_kwargs) -> tuple[str, dict[str, np.ndarray | None], list[str]]:
        """What `__call__` tokenizes: (the prompt text with every placeholder expanded to its pad tokens, the
        pictures' arrays as `__call__` returns them, each picture's kind — "image" or "video" — in prompt order)."""
        if (messages is None) == (text is None):
            raise ProcessorError("give either `messages` (a conversation) or `text` (a rendered prompt)")
        if messages is not None:
            if images is not None or videos is not None:
                raise ProcessorError("with `messages`, images and videos go in the messages' content parts, not in "
                                     "`images=` / `videos=`")
            messages, images, videos = inline_pictures(messages)
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      enable_thinking=enable_thinking, **template_kwargs)
        text = check(text, str, "text", ProcessorError)
        images = None if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        videos = None if videos is None else list(videos) if isinstance(videos, list) else [videos]
        counts = {"image": 0, "video": 0}
        for match in _PLACEHOLDERS.finditer(text):
            counts[match.lastgroup] += 1
        for kind, given in (("image", images), ("video", videos)):
            if counts[kind] != len(given or []):
                raise ProcessorError(f"the prompt holds {counts[kind]} {kind} placeholder(s) "
                                     f"({IMAGE_PAD if kind == 'image' else VIDEO_PLACEHOLDER}) but {len(given or [])} "
                                     f"{kind}(s) were given")
        out: dict[str, np.ndarray | None] = dict(pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                                                 video_grid_thw=None)
        replacements = {"image": [], "video": []}
        if images:
            self._require_tokens(VISION_START, VISION_END, IMAGE_PAD)
            out["pixel_values"], out["image_grid_thw"] = self.image_processor(images)
            merge = self.image_processor.merge_size ** 2
            replacements["image"] = [IMAGE_PAD * (int(np.prod(grid)) // merge) for grid in out["image_grid_thw"]]
        if videos:
            self._require_tokens(VISION_START, VISION_END, VIDEO_PAD)
            out["pixel_values_videos"], out["video_grid_thw"], timestamps = self.video_processor(videos)
            merge = self.video_processor.merge_size ** 2
            replacements["video"] = [
                "".join(f"<{seconds:.1f} seconds>{VISION_START}{VIDEO_PAD * (int(h * w) // merge)}{VISION_END}"
                        for seconds in seconds_per_patch)
                for (_, h, w), seconds_per_patch in zip(out["video_grid_thw"], timestamps)]
        pending = {kind: iter(texts) for kind, texts in replacements.items()}
        kinds = [match.lastgroup for match in _PLACEHOLDERS.finditer(text)]
        text = _PLACEHOLDERS.sub(lambda match: next(pending[match.lastgroup]), text)
        return text, out, kinds

    def _require_tokens(self, *tokens: str) -> None:
        missing = [t for t in tokens if self.tokenizer.token_to_id(t) is None]
        if missing:
            raise ProcessorError(f"{self.tokenizer.path}: the tokenizer has no {', '.join(missing)} token(s), so "
                                 "it cannot take images or videos (is this a multimodal checkpoint's tokenizer?)")


def inline_pictures(messages: list[dict]) -> tuple[list[dict], list | None, list | None]:
    """(messages with list content joined into strings, placeholders for pictures; the images; the videos)."""
    images, videos, rendered = [], [], []
    for i, message in enumerate(check(messages, list, "messages", ProcessorError)):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            rendered.append(message)
            continue
        pieces = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image", "video") or kind not in part:
                raise ProcessorError(f"{where}: must be {{'type': 'text', 'text': ...}}, {{'type': 'image', "
                                     f"'image': ...}} or {{'type': 'video', 'video': ...}}, got {part!r:.120}")
            if kind == "text":
                pieces.append(check(part["text"], str, f"{where} `text`", ProcessorError))
            else:
                (images if kind == "image" else videos).append(part[kind])
                pieces.append(IMAGE_PLACEHOLDER if kind == "image" else VIDEO_PLACEHOLDER)
        rendered.append({**message, "content": "".join(pieces)})
    return rendered, images or None, videos or None


def load_processor(path: str | os.PathLike) -> Processor:
    """The processor of the checkpoint directory `path`: its tokenizer, preprocessor_config.json and
    video_preprocessor_config.json (a missing one: transformers' defaults). The patch sizes must agree with
    config.json's vision_config where there is one."""
    path = os.fspath(path)
    tokenizer = Tokenizer(path)
    processors = []
    for cls, name in ((ImageProcessor, IMAGE_CONFIG_FILE), (VideoProcessor, VIDEO_CONFIG_FILE)):
        file = os.path.join(path, name)
        processors.append(cls.from_file(file) if os.path.isfile(file) else cls(source=f"{file} (missing: default)"))
    vision = load_config(path).vision if os.path.isfile(os.path.join(path, "config.json")) else None
    if vision is not None:
        for processor in processors:
            for name, model_name in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                                     ("merge_size", "spatial_merge_size")):
                if getattr(processor, name) != getattr(vision, model_name):
                    raise ProcessorError(
                        f"{processor._where(name)} = {getattr(processor, name)}, but "
                        f"{os.path.join(path, 'config.json')} field `vision_config.{model_name}` = "
                        f"{getattr(vision, model_name)}: the vision tower would not fit these patches")
    return Processor(tokenizer, *processors)
