"""Video input/output: read clips or image folders as RGB uint8 arrays, write mp4/gif/contact sheets.

Arrays are ``uint8`` with layout ``(F, H, W, 3)`` (frames, height, width, RGB) unless stated otherwise;
:func:`to_tensor` / :func:`to_uint8` convert to and from the model layout ``(F, 3, H, W)`` in ``[-1, 1]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from functools import partial
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from cav.errors import CavError
from cav.io_utils import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FITS = ("crop", "pad")
_EPS = 1e-6  # seconds; tolerance when comparing frame timestamps
_VIEW_MIN = 128  # write_video upscales so the longer side is at least this many pixels
_GAP = 4  # contact sheet: pixels between and around tiles
_SHEET_FRAMES = 8  # contact sheet: frames shown per video at most
_SHEET_FONT = 16  # contact sheet: label size in pixels
_SHEET_MIN_SIDE = 128  # contact sheet: frames are upscaled to at least this many pixels unless a scale is given
_REENCODE = "re-encode it, e.g. `ffmpeg -i in.mp4 -c:v libx264 -pix_fmt yuv420p fixed.mp4`"


# ----------------------------------------------------------------------------------------------- reading


def read_video(
    path: str | Path,
    *,
    frames: int | None = 8,
    stride: int | None = None,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    size: tuple[int, int] = (256, 256),
    fit: str = "crop",
) -> np.ndarray:
    """Read a video file or a folder of images as ``uint8 (F, H, W, 3)`` RGB, resized to ``size = (H, W)``.

    ``path`` is anything ffmpeg decodes (mp4, mov, webm, mkv, avi, gif, ...) or a folder of
    png/jpg/jpeg/webp/bmp images taken in natural name order (``2.png`` before ``10.png``; hidden files skipped).

    Frame selection, within ``[start, end)`` seconds counted from the first frame (video files only):

    * default: ``frames`` frames spread uniformly (``np.linspace`` over the frame indices, rounded);
      ``frames=None`` keeps every frame. This decodes the whole span, holding each frame at output size;
    * ``stride=K``: every K-th frame, then the first ``frames`` of those (all if ``frames`` is None);
    * ``fps=F``: one frame per ``1/F`` seconds (nearest timestamp, duplicating frames when ``F`` exceeds the
      source rate), then the first ``frames`` of those.

    ``fit="crop"`` scales the frame to cover ``size`` and centre-crops; ``fit="pad"`` scales it to fit inside and
    pads with black. Rotation metadata (phone videos) and JPEG EXIF orientation are applied, transparency is
    composited on black and greyscale becomes RGB. Problems the user can fix raise :class:`CavError`.
    """
    _check_read_args(frames, stride, fps, start, end, size, fit)
    size = (int(size[0]), int(size[1]))
    path = check_exists(path)
    if path.is_dir():
        return _read_folder(path, frames=frames, stride=stride, fps=fps, start=start, end=end, size=size, fit=fit)
    if path.stat().st_size == 0:
        raise CavError(f"video '{path}' is empty (0 bytes): re-export or re-download it")

    convert = partial(_frame_array, size=size, fit=fit)
    with closing(_timed_frames(path, start, end)) as timed:
        if fps is not None:
            picked = _resample(timed, convert, fps, frames)
        else:
            picked = _every(timed, convert, stride or 1, frames if stride else None)
    if frames is not None and stride is None and fps is None and len(picked) >= frames:
        picked = [picked[i] for i in _uniform_indices(len(picked), frames)]
    _check_count(path, len(picked), frames, stride, fps, start, end)
    return np.stack(picked)


def check_exists(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CavError(f"video '{path}' is missing (no such file or folder): check the path")
    return path


def _check_read_args(
    frames: int | None,
    stride: int | None,
    fps: float | None,
    start: float | None,
    end: float | None,
    size: tuple[int, int],
    fit: str,
) -> None:
    if frames is not None and frames < 1:
        raise CavError(f"--frames must be at least 1 (got {frames}): pass e.g. --frames 8")
    if stride is not None and stride < 1:
        raise CavError(f"--stride must be at least 1 (got {stride}): pass e.g. --stride 2")
    if fps is not None and not fps > 0:
        raise CavError(f"--fps must be positive (got {fps}): pass e.g. --fps 8")
    if stride is not None and fps is not None:
        raise CavError("both --stride and --fps were given: pass only one of them")
    if start is not None and start < 0:
        raise CavError(f"--start must be >= 0 seconds (got {start}): pass e.g. --start 0")
    if start is not None and end is not None and end <= start:
        raise CavError(f"--end {end} is not after --start {start}: pass an --end later than --start")
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise CavError(f"size {tuple(size)} is invalid: pass two positive integers (height, width), e.g. 256 256")
    if fit not in FITS:
        raise CavError(f"unknown fit '{fit}': use one of {', '.join(FITS)}")


def _every(
    timed: Iterable[tuple[float, av.VideoFrame]],
    convert: Callable[[av.VideoFrame], np.ndarray],
    stride: int,
    limit: int | None,
) -> list[np.ndarray]:
    """Every ``stride``-th frame, stopping (and decoding no further) once ``limit`` frames are kept."""
    picked: list[np.ndarray] = []
    for i, (_, frame) in enumerate(timed):
        if i % stride == 0:
            picked.append(convert(frame))
            if len(picked) == limit:
                break
    return picked


def _uniform_indices(n: int, frames: int) -> list[int]:
    """``frames`` distinct indices spread uniformly over ``range(n)`` (requires ``n >= frames``)."""
    return np.linspace(0, n - 1, frames).round().astype(int).tolist()


def _resample(
    timed: Iterable[tuple[float, av.VideoFrame]],
    convert: Callable[[av.VideoFrame], np.ndarray],
    fps: float,
    frames: int | None,
) -> list[np.ndarray]:
    """For targets ``t0 + k / fps`` up to the last frame, take the frame with the nearest timestamp."""
    picked: list[np.ndarray] = []
    prev: tuple[float, av.VideoFrame] | None = None
    origin: float | None = None
    last: tuple[float, np.ndarray] | None = None  # converted once, reused when a frame is duplicated
    for t, frame in timed:
        origin = t if origin is None else origin
        while (target := origin + len(picked) / fps) <= t + _EPS:
            t_c, f_c = prev if prev is not None and target - prev[0] < t - target else (t, frame)
            if last is None or last[0] != t_c:
                last = (t_c, convert(f_c))
            picked.append(last[1])
            if frames is not None and len(picked) == frames:
                return picked
        prev = (t, frame)
    return picked


def _check_count(
    path: Path,
    n: int,
    frames: int | None,
    stride: int | None,
    fps: float | None,
    start: float | None,
    end: float | None,
) -> None:
    span = (f" from {start:g} s" if start is not None else "") + (f" before {end:g} s" if end is not None else "")
    if n == 0:
        raise CavError(f"video '{path}' has no frames{span}: pass a --start/--end inside the video")
    if frames is None or n >= frames:
        return
    how = f" at --stride {stride}" if stride else f" at --fps {fps:g}" if fps else ""
    fix = "a smaller --stride" if stride else "a lower --fps" if fps else ""
    raise CavError(f"video '{path}' has {n} frame{'s' if n != 1 else ''}{how}{span}, fewer than --frames {frames}: "
                   + _fewer_fix(n, fix, "a longer video"))


def _fewer_fix(n: int, fix: str, more: str) -> str:
    """The advice for a clip with ``n`` frames, fewer than asked: ``--frames n`` only where that is allowed (a motion
    needs ≥ 2 frames, so a 1-frame clip is told to bring more frames, never ``--frames 1``)."""
    ways = ([f"--frames {n}"] if n >= 2 else []) + ([fix] if fix else []) + [more]
    need = "" if n >= 2 else "a motion needs ≥ 2 frames: "
    return need + "pass " + (", ".join(ways[:-1]) + " or " if len(ways) > 1 else "") + ways[-1]


def _timed_frames(path: Path, start: float | None, end: float | None) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decode ``path``, yielding ``(seconds since the first frame, frame)`` for frames in ``[start, end)``.

    Decoding stops at ``end``; ffmpeg/OS errors become :class:`CavError`.
    """
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise CavError(
            f"'{path}' is not a video ffmpeg can read ({_reason(e)}): "
            "pass a video file (mp4, mov, webm, mkv, avi, gif) or a folder of images"
        ) from e
    with container:
        if not container.streams.video:
            raise CavError(
                f"'{path}' is not a video (no video stream; truncated, or audio only?): "
                "pass a video file or a folder of images"
            )
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        first: float | None = None
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.pts is not None else i / rate
                first = t if first is None else first
                t -= first
                if end is not None and t >= end - _EPS:
                    return
                if start is None or t >= start - _EPS:
                    yield t, frame
        except (av.FFmpegError, OSError) as e:
            raise CavError(f"could not decode video '{path}' ({_reason(e)}): {_REENCODE}") from e
        if first is None:
            raise CavError(f"could not decode any frame of video '{path}' (truncated or corrupt?): {_REENCODE}")


def _reason(e: Exception) -> str:
    return " ".join(str(getattr(e, "strerror", None) or e).split()) or type(e).__name__


def _frame_array(frame: av.VideoFrame, size: tuple[int, int], fit: str) -> np.ndarray:
    """Decoded frame -> fitted RGB array, with the display rotation applied and alpha composited on black."""
    turns = round(frame.rotation / 90) % 4  # counter-clockwise quarter turns, from the display matrix
    fmt = frame.format
    if fmt.has_palette or any(c.is_alpha for c in fmt.components):  # composite at full size, then resize
        rgb = np.rot90(_on_black(frame.to_ndarray(format="rgba")), turns)
        return _fit(Image.fromarray(np.ascontiguousarray(rgb)), size, fit)
    shown = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
    nw, nh = _scaled_size(*shown, size, fit)
    if turns % 2:
        nw, nh = nh, nw
    # swscale converts and resizes in one pass, several times faster than Pillow; area averaging when shrinking
    interpolation = "AREA" if nw < frame.width else "BICUBIC"
    rgb = frame.reformat(width=nw, height=nh, format="rgb24", interpolation=interpolation).to_ndarray()
    return _crop_or_pad(np.rot90(rgb, turns), size, fit)


def _on_black(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha ``(..., 4)`` uint8 on black -> ``(..., 3)`` uint8."""
    alpha = rgba[..., 3:].astype(np.uint16)
    return ((rgba[..., :3] * alpha + 127) // 255).astype(np.uint8)


def _flatten(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency composited on black, greyscale (8 or 16 bit) repeated to 3 channels."""
    if image.mode.startswith("I"):  # 16/32-bit greyscale; Pillow's own convert would clip at 255
        grey = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        return Image.fromarray(_on_black(np.asarray(image.convert("RGBA"))), "RGB")
    return image.convert("RGB")


def _scaled_size(width: int, height: int, size: tuple[int, int], fit: str) -> tuple[int, int]:
    """(width, height) after scaling to cover (``crop``) or fit inside (``pad``) ``size = (H, W)``."""
    h, w = size
    scale = (max if fit == "crop" else min)(h / height, w / width)
    nh, nw = round(height * scale), round(width * scale)
    return (max(nw, w), max(nh, h)) if fit == "crop" else (max(min(nw, w), 1), max(min(nh, h), 1))


def _crop_or_pad(rgb: np.ndarray, size: tuple[int, int], fit: str) -> np.ndarray:
    """Centre-crop (``crop``) or centre on black (``pad``) an ``(h, w, 3)`` array to ``size = (H, W)``."""
    h, w = size
    nh, nw = rgb.shape[:2]
    top, left = abs(nh - h) // 2, abs(nw - w) // 2
    if fit == "crop":
        return np.ascontiguousarray(rgb[top : top + h, left : left + w])
    out = np.zeros((h, w, 3), np.uint8)
    out[top : top + nh, left : left + nw] = rgb
    return out


def _fit(image: Image.Image, size: tuple[int, int], fit: str) -> np.ndarray:
    """Resize an RGB Pillow image (Lanczos) and crop or pad it to ``size = (H, W)``."""
    scaled = _scaled_size(*image.size, size, fit)
    if scaled != image.size:
        image = image.resize(scaled, Image.Resampling.LANCZOS)
    return _crop_or_pad(np.asarray(image), size, fit)


def _natural_key(name: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _read_folder(
    folder: Path,
    *,
    frames: int | None,
    stride: int | None,
    fps: float | None,
    start: float | None,
    end: float | None,
    size: tuple[int, int],
    fit: str,
) -> np.ndarray:
    if fps is not None or start is not None or end is not None:
        raise CavError(
            f"'{folder}' is a folder of images, which has no timestamps: drop --fps/--start/--end "
            "(use --frames or --stride) or pass a video file"
        )
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
        key=lambda p: _natural_key(p.name),
    )
    if not files:
        raise CavError(f"folder '{folder}' has no images ({', '.join(IMAGE_SUFFIXES)}): add frames or pass a video")
    if stride is not None:
        files = files[::stride][:frames]
    elif frames is not None and len(files) >= frames:
        files = [files[i] for i in _uniform_indices(len(files), frames)]
    if frames is not None and len(files) < frames:
        how = f" at --stride {stride}" if stride else ""
        raise CavError(f"folder '{folder}' has {len(files)} image{'s' if len(files) != 1 else ''}{how}, fewer than "
                       f"--frames {frames}: "
                       + _fewer_fix(len(files), "a smaller --stride" if stride else "", "add images"))
    return np.stack([_fit(_open_image(p), size, fit) for p in files])


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return _flatten(ImageOps.exif_transpose(image))
    except OSError as e:
        raise CavError(f"could not decode image '{path}' ({_reason(e)}): remove or re-save it") from e


# ----------------------------------------------------------------------------------------------- writing


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write ``uint8 (F, H, W, 3)`` frames to ``.mp4`` (H.264, or MPEG-4 part 2 without libx264) or ``.gif``.

    Small videos are upscaled by an integer factor (nearest neighbour) until the longer side is at least
    128 px, so toy 32x32 clips are visible; mp4 sizes are then padded to even numbers (yuv420p). GIFs loop
    forever; note that Pillow merges identical consecutive GIF frames into one longer frame. The file is
    written atomically.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise CavError(f"cannot write video '{path}': use a file name ending in .mp4 or .gif")
    if not fps > 0:
        raise CavError(f"video fps must be positive (got {fps}): pass e.g. --fps 8")
    frames = _viewable(_check_frames(frames))
    with atomic_path(path) as tmp:
        if suffix == ".mp4":
            _write_mp4(tmp, frames, fps)
        else:
            images = [Image.fromarray(f) for f in frames]
            images[0].save(
                tmp, format="GIF", save_all=True, append_images=images[1:], loop=0, duration=round(1000 / fps)
            )
    return path


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (F, H, W, 3) with F >= 1, got {frames.dtype} {frames.shape}")
    return frames


def _viewable(frames: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so the longer side reaches ``_VIEW_MIN`` px."""
    k = math.ceil(_VIEW_MIN / max(frames.shape[1:3]))
    return frames.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else frames


def _mp4_codec() -> str:
    """``libx264`` when this PyAV build has it, else ffmpeg's native ``mpeg4``."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # yuv420p: even sizes
    codec = _mp4_codec()
    # near-transparent quality: x264 crf 18, or mpeg4 fixed quantiser 2 (ffmpeg's `-q:v 2`; 118 = FF_QP2LAMBDA)
    options = {"crf": "18"} if codec == "libx264" else {"flags": "+qscale", "global_quality": str(2 * 118)}
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def write_contact_sheet(
    path: str | Path, rows: list[list[np.ndarray]], labels: list[str] | None = None, scale: int | None = None
) -> Path:
    """Write a PNG grid: one line per row, each video as up to 8 of its frames side by side (uniformly chosen).

    Videos are ``uint8 (F, H, W, 3)`` and are upscaled by the integer ``scale`` (nearest neighbour); None: the
    smallest factor that shows the largest frame at least ``_SHEET_MIN_SIDE`` px (a 32-px toy frame 4×), so a sheet
    is legible at a glance. Tiles are
    separated and surrounded by 4 px of dark grey; ``labels`` (one per row) are drawn in a column at the left.
    The file is written atomically.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise CavError(f"cannot write contact sheet '{path}': use a file name ending in .png")
    if not rows or not all(rows):
        raise ValueError("contact sheet needs at least one row and at least one video per row")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} rows")
    if scale is None:
        side = max(max(v.shape[1:3]) for row in rows for v in row)
        scale = max(1, -(-_SHEET_MIN_SIDE // side))
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    strips = [[_strip(video, int(scale)) for video in row] for row in rows]
    font = ImageFont.load_default(size=_SHEET_FONT)  # the scalable font: the old bitmap one is unreadable on screens
    boxes = [ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font) for text in labels or []]
    text_h = max((b[3] - b[1] for b in boxes), default=0)
    heights = [max(text_h, max(s.shape[0] for s in row)) for row in strips]
    x0 = _GAP + (max(b[2] - b[0] for b in boxes) + _GAP if boxes else 0)
    width = x0 + max(sum(s.shape[1] + _GAP for s in row) for row in strips)
    sheet = Image.new("RGB", (width, _GAP + sum(h + _GAP for h in heights)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    y = _GAP
    for i, (row, h) in enumerate(zip(strips, heights, strict=True)):
        if boxes:
            left, top, _, bottom = boxes[i]
            draw.text((_GAP - left, y + (h - (bottom - top)) // 2 - top), labels[i], fill=(255, 255, 255), font=font)
        x = x0
        for strip in row:
            sheet.paste(Image.fromarray(strip), (x, y))
            x += strip.shape[1] + _GAP
        y += h + _GAP
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _strip(video: np.ndarray, scale: int) -> np.ndarray:
    """Up to ``_SHEET_FRAMES`` frames of ``video`` side by side, upscaled ``scale`` times: (H*s, n*W*s, 3)."""
    video = _check_frames(video)
    if len(video) > _SHEET_FRAMES:
        video = video[_uniform_indices(len(video), _SHEET_FRAMES)]
    strip = np.concatenate(list(video), axis=1)
    return strip.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else strip


# ----------------------------------------------------------------------------------------------- tensors


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``uint8 (F, H, W, 3)`` -> ``float32 (F, 3, H, W)`` in ``[-1, 1]`` (the model layout)."""
    frames = _check_frames(frames)
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """Convert a video back to ``uint8 (F, H, W, 3)``; values outside the range are clipped.

    Accepted layouts, told apart by dtype and by which axis has size 3:

    * ``uint8 (F, H, W, 3)``: returned as a copy;
    * float ``(F, 3, H, W)`` in ``[-1, 1]``: channels-first model layout (the output of :func:`to_tensor`);
    * float ``(F, H, W, 3)`` in ``[0, 1]``: channels-last display layout (e.g. diffusers ``output_type="np"``).

    A float array with size 3 on both axis 1 and the last axis is ambiguous and raises ``ValueError``.
    """
    if isinstance(video, torch.Tensor):
        video = video.detach().to("cpu", torch.float32).numpy()
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"expected a 4-D video (F, 3, H, W) or (F, H, W, 3), got shape {video.shape}")
    if video.dtype == np.uint8:
        return _check_frames(video).copy()
    first, last = video.shape[1] == 3, video.shape[-1] == 3
    if first and last:
        raise ValueError(f"ambiguous video layout {video.shape}: both axis 1 and the last axis have size 3")
    if first:
        unit = (video.transpose(0, 2, 3, 1).astype(np.float32) + 1.0) / 2.0
    elif last:
        unit = video.astype(np.float32)
    else:
        raise ValueError(f"expected a video (F, 3, H, W) or (F, H, W, 3), got shape {video.shape}")
    return np.ascontiguousarray((unit.clip(0.0, 1.0) * 255.0).round().astype(np.uint8))


def read_image(path: str | Path, size: tuple[int, int], fit: str = "crop") -> np.ndarray:
    """One image file as ``uint8 (H, W, 3)`` at ``size`` (alpha flattened on black, EXIF rotation applied); a
    missing file, a folder or a file that is not an image is a one-line CavError."""
    path = Path(path)
    if not path.exists():
        raise CavError(f"image '{path}' is missing (no such file): check the path")
    if path.is_dir():
        raise CavError(f"image '{path}' is a folder: pass one image file (PNG, JPEG, ...)")
    return _fit(_open_image(path), tuple(size), fit)
