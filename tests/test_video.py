"""Tests for cav.data.video: reading (files, folders, selection, fit, rotation, alpha), writing, errors."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from cav.data import video
from cav.data.video import read_video, to_tensor, to_uint8, write_contact_sheet, write_video
from cav.errors import CavError

CLIP = Path(__file__).parent / "data" / "man-skiing-64.mp4"  # 64x64, 8 fps, 24 frames (see ATTRIBUTION.md)
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg(*args: str | Path) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True)


@functools.cache
def has_encoder(name: str) -> bool:
    out = subprocess.run([FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == [name] for line in out.splitlines())


def make_testsrc(path: Path, frames: int, size: str = "32x32", rate: int = 8, *codec: str) -> Path:
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-frames:v", frames, *codec, path)
    return path


def h264(path: Path, lavfi: str, *extra: str) -> Path:
    ffmpeg("-f", "lavfi", "-i", lavfi, *extra, "-c:v", "libx264", "-pix_fmt", "yuv420p", path)
    return path


@pytest.fixture(scope="module")
def clip_all() -> np.ndarray:
    return read_video(CLIP, frames=None, size=(64, 64))


def raises(match: str) -> pytest.RaisesExc[CavError]:
    return pytest.raises(CavError, match=match)


# ----------------------------------------------------------------------------------------------- real clip


def test_real_clip_default(clip_all: np.ndarray) -> None:
    out = read_video(CLIP)
    assert out.shape == (8, 256, 256, 3) and out.dtype == np.uint8
    assert clip_all.shape == (24, 64, 64, 3)
    assert 60 < clip_all.mean() < 250  # a real, non-blank picture
    assert np.abs(np.diff(clip_all.astype(int), axis=0)).mean() > 1  # and it moves


@pytest.mark.parametrize("n", [1, 5, 8, 24])
def test_uniform_sampling(clip_all: np.ndarray, n: int) -> None:
    expected = np.linspace(0, 23, n).round().astype(int)
    np.testing.assert_array_equal(read_video(CLIP, frames=n, size=(64, 64)), clip_all[expected])


def test_stride(clip_all: np.ndarray) -> None:
    np.testing.assert_array_equal(read_video(CLIP, frames=None, stride=5, size=(64, 64)), clip_all[::5])
    np.testing.assert_array_equal(read_video(CLIP, frames=3, stride=5, size=(64, 64)), clip_all[[0, 5, 10]])
    with raises(r"has 5 frames at --stride 5, fewer than --frames 8: pass --frames 5"):
        read_video(CLIP, stride=5)


def test_fps(clip_all: np.ndarray) -> None:
    np.testing.assert_array_equal(read_video(CLIP, frames=None, fps=8, size=(64, 64)), clip_all)
    np.testing.assert_array_equal(read_video(CLIP, frames=None, fps=4, size=(64, 64)), clip_all[::2])
    np.testing.assert_array_equal(read_video(CLIP, frames=5, fps=4, size=(64, 64)), clip_all[:10:2])
    up = read_video(CLIP, frames=None, fps=16, size=(64, 64))  # upsampling repeats frames
    assert len(up) == 47
    np.testing.assert_array_equal(up[::2], clip_all)
    with raises("fewer than --frames 30"):
        read_video(CLIP, frames=30, fps=8)


def test_start_end(clip_all: np.ndarray) -> None:
    np.testing.assert_array_equal(read_video(CLIP, frames=None, start=1, end=2, size=(64, 64)), clip_all[8:16])
    np.testing.assert_array_equal(read_video(CLIP, frames=None, start=2.5, size=(64, 64)), clip_all[20:])
    np.testing.assert_array_equal(read_video(CLIP, frames=None, end=0.5, size=(64, 64)), clip_all[:4])
    np.testing.assert_array_equal(read_video(CLIP, frames=3, start=1, size=(64, 64)), clip_all[[8, 16, 23]])
    strided = read_video(CLIP, frames=None, stride=2, start=1, end=2, size=(64, 64))
    np.testing.assert_array_equal(strided, clip_all[8:16:2])
    with raises("has 8 frames from 1 s before 2 s, fewer than --frames 9"):
        read_video(CLIP, frames=9, start=1, end=2)
    with raises("no frames from 10 s"):
        read_video(CLIP, start=10)


# ----------------------------------------------------------------------------------------------- lengths, sizes


@pytest.mark.parametrize("n", [8, 16, 24])
def test_frame_counts(tmp_path: Path, n: int) -> None:
    path = make_testsrc(tmp_path / f"v{n}.mp4", n)
    everything = read_video(path, frames=None, size=(32, 32))
    assert everything.shape == (n, 32, 32, 3)
    picked = read_video(path, frames=8, size=(32, 32))
    np.testing.assert_array_equal(picked, everything[np.linspace(0, n - 1, 8).round().astype(int)])


def test_long_video(tmp_path: Path) -> None:
    path = make_testsrc(tmp_path / "long.mp4", 250, "16x16", 25)
    everything = read_video(path, frames=None, size=(16, 16))
    assert everything.shape == (250, 16, 16, 3)
    uniform = np.linspace(0, 249, 8).round().astype(int)
    np.testing.assert_array_equal(read_video(path, size=(16, 16)), everything[uniform])
    assert read_video(path, frames=None, stride=10, size=(16, 16)).shape[0] == 25
    np.testing.assert_array_equal(read_video(path, frames=None, fps=5, size=(16, 16)), everything[::5])


@pytest.mark.parametrize("source", ["96x48", "48x96"])
@pytest.mark.parametrize("size", [(64, 64), (40, 72), (72, 40)])
def test_crop_and_pad(tmp_path: Path, source: str, size: tuple[int, int]) -> None:
    path = h264(tmp_path / f"white-{source}.mp4", f"color=c=white:s={source}:r=8:d=0.25")
    crop = read_video(path, frames=1, size=size, fit="crop")
    assert crop.shape == (1, *size, 3) and crop.min() > 230
    pad = read_video(path, frames=1, size=size, fit="pad")[0]
    assert pad.shape == (*size, 3)
    w, h = map(int, source.split("x"))
    scale = min(size[0] / h, size[1] / w)
    inner_h, inner_w = round(h * scale), round(w * scale)
    top, left = (size[0] - inner_h) // 2, (size[1] - inner_w) // 2
    assert pad[top : top + inner_h, left : left + inner_w].min() > 230
    border = np.ones(size, bool)
    border[top : top + inner_h, left : left + inner_w] = False
    assert border.any() and (pad[border] == 0).all()


def test_rotation_metadata(tmp_path: Path) -> None:
    # 64 wide x 32 tall, red 16x16 marker in the top-left corner; then flagged "rotate 90 degrees counter-clockwise"
    marker = "drawbox=x=0:y=0:w=16:h=16:color=red:t=fill"
    plain = h264(tmp_path / "plain.mp4", "color=c=black:s=64x32:r=8:d=0.5", "-vf", marker)
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-display_rotation", "90", "-i", plain, "-c", "copy", rotated)
    with av.open(str(rotated)) as container:
        assert next(container.decode(video=0)).rotation == 90

    upright = read_video(plain, frames=1, size=(32, 64))[0]
    assert upright[:16, :16, 0].mean() > 150 and upright[16:, :, 0].mean() < 40

    turned = read_video(rotated, frames=1, size=(64, 32))[0]  # now portrait: 32 wide, 64 tall
    assert turned[48:, :16, 0].mean() > 150  # marker moved to the bottom-left
    assert turned[:48, :, 0].mean() < 40 and turned[:, 16:, 0].mean() < 40
    # same picture as ffmpeg's own auto-rotation
    raw = subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(rotated), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
    ).stdout
    reference = np.frombuffer(raw, np.uint8).reshape(64, 32, 3)
    assert np.abs(turned.astype(int) - reference).mean() < 8


# ----------------------------------------------------------------------------------------------- containers

CONTAINERS = {
    "mp4": ("libx264", ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "gif": ("gif", []),
    "avi": ("mpeg4", ["-c:v", "mpeg4", "-q:v", "2"]),
    "mkv": ("ffv1", ["-c:v", "ffv1"]),
    "mov": ("libx264", ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "webm": ("libvpx-vp9", ["-c:v", "libvpx-vp9", "-crf", "20", "-b:v", "0"]),
}


def test_required_encoders_present() -> None:
    assert all(has_encoder(CONTAINERS[ext][0]) for ext in ("mp4", "gif", "avi", "mkv"))


@pytest.mark.parametrize("ext", list(CONTAINERS))
def test_container_round_trip(tmp_path: Path, ext: str) -> None:
    encoder, args = CONTAINERS[ext]
    if not has_encoder(encoder):
        pytest.skip(f"this ffmpeg build has no {encoder} encoder")
    lossless = make_testsrc(tmp_path / "ref.mkv", 12, "32x32", 8, "-c:v", "ffv1")
    reference = read_video(lossless, frames=None, size=(32, 32))
    out = read_video(make_testsrc(tmp_path / f"clip.{ext}", 12, "32x32", 8, *args), frames=None, size=(32, 32))
    assert out.shape == (12, 32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - reference).mean() < 25  # lossy codecs / gif palette, same picture


def test_alpha_video_composited_on_black(tmp_path: Path) -> None:
    if not has_encoder("png"):
        pytest.skip("this ffmpeg build has no png encoder")
    path = tmp_path / "alpha.mov"  # left half opaque red, right half fully transparent (white underneath)
    left = "lt(X,16)"
    lavfi = (
        "color=c=white:s=32x32:r=8:d=0.5,format=rgba,"
        f"geq=r='255':g='if({left},0,255)':b='if({left},0,255)':a='if({left},255,0)'"
    )
    ffmpeg("-f", "lavfi", "-i", lavfi, "-c:v", "png", "-pix_fmt", "rgba", path)
    out = read_video(path, frames=2, size=(32, 32))
    np.testing.assert_array_equal(out[:, :, :16], np.broadcast_to(np.array([255, 0, 0], np.uint8), (2, 32, 16, 3)))
    assert (out[:, :, 16:] == 0).all()


def test_transparent_gif(tmp_path: Path) -> None:
    frames = []
    for value in (0, 1):
        rgba = np.zeros((16, 16, 4), np.uint8)
        rgba[:, :8] = (200, 200, 200, 255)
        rgba[:, 8:] = (255, 255, 255, 0)
        rgba[0, 0, :3] = value  # make the frames differ so Pillow keeps both
        frames.append(Image.fromarray(rgba, "RGBA"))
    path = tmp_path / "t.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0, disposal=2)
    out = read_video(path, frames=2, size=(16, 16))
    assert (out[:, 1:, :8] == 200).all() and (out[:, :, 8:] == 0).all()


# ----------------------------------------------------------------------------------------------- folders


def save(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    Image.fromarray(array, mode).save(path, **kwargs)
    return path


def test_folder_natural_order(tmp_path: Path) -> None:
    for i, name in enumerate(["1.png", "2.jpg", "10.bmp", "11.webp"]):
        save(tmp_path / name, np.full((24, 24, 3), 40 * (i + 1), np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    save(tmp_path / ".hidden.png", np.zeros((4, 4, 3), np.uint8))
    out = read_video(tmp_path, frames=None, size=(16, 16))
    assert out.shape == (4, 16, 16, 3)
    np.testing.assert_allclose(out.reshape(4, -1).mean(1), [40, 80, 120, 160], atol=2)  # 1, 2, 10, 11
    assert read_video(tmp_path, frames=2, size=(16, 16))[:, 0, 0, 0].tolist() == out[[0, 3], 0, 0, 0].tolist()
    np.testing.assert_array_equal(read_video(tmp_path, frames=None, stride=2, size=(16, 16)), out[::2])
    with raises("has 4 images, fewer than --frames 8: pass --frames 4"):
        read_video(tmp_path)
    with raises("no timestamps"):
        read_video(tmp_path, frames=2, start=1)
    with raises("no timestamps"):
        read_video(tmp_path, frames=2, fps=4)


def test_folder_greyscale_alpha_and_16bit(tmp_path: Path) -> None:
    save(tmp_path / "a.png", np.full((8, 8), 100, np.uint8), "L")
    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[:, :4, 3] = 0  # left half transparent white
    save(tmp_path / "b.png", rgba, "RGBA")
    save(tmp_path / "c.png", np.full((8, 8), 65535, np.uint16))  # 16-bit greyscale, mode I;16
    la = np.stack([np.full((8, 8), 50, np.uint8), np.full((8, 8), 255, np.uint8)], -1)
    save(tmp_path / "d.png", la, "LA")
    out = read_video(tmp_path, frames=None, size=(8, 8))
    assert out.shape == (4, 8, 8, 3) and out.dtype == np.uint8
    assert (out[0] == 100).all()
    assert (out[1, :, :4] == 0).all() and (out[1, :, 4:] == 255).all()
    assert (out[2] == 255).all()
    assert (out[3] == 50).all()


def test_folder_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the 32x16 landscape image is shown portrait
    save(tmp_path / "0.jpg", np.full((16, 32, 3), 255, np.uint8), exif=exif)
    out = read_video(tmp_path, frames=1, size=(32, 16), fit="pad")
    assert out.min() > 230  # portrait fills a portrait target with no black bars


# ----------------------------------------------------------------------------------------------- errors


def test_missing_and_empty(tmp_path: Path) -> None:
    with raises("missing"):
        read_video(tmp_path / "nope.mp4")
    with raises("no images"):
        read_video(tmp_path)
    (tmp_path / "readme.txt").write_text("no frames here")
    with raises("no images"):
        read_video(tmp_path)
    (tmp_path / "empty.mp4").touch()
    with raises("empty"):
        read_video(tmp_path / "empty.mp4")


def test_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is a text file, not a video\n" * 20)
    with raises("not a video") as info:
        read_video(path)
    assert "\n" not in str(info.value)


def test_truncated_and_corrupt(tmp_path: Path) -> None:
    data = CLIP.read_bytes()
    for n in (100, 1000, 3000):
        (tmp_path / f"cut{n}.mp4").write_bytes(data[:n])
        with raises("not a video|could not decode"):
            read_video(tmp_path / f"cut{n}.mp4")
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])  # decodes a few frames, then stops
    with raises("fewer than --frames 24"):
        read_video(tmp_path / "half.mp4", frames=24)
    corrupt = bytearray(data)
    corrupt[3000:6000] = np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes()
    (tmp_path / "corrupt.mp4").write_bytes(bytes(corrupt))
    with raises("could not decode|fewer"):
        read_video(tmp_path / "corrupt.mp4", frames=24)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.png").write_bytes(b"not a png")
    with raises("could not decode image"):
        read_video(tmp_path / "broken", frames=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"frames": 0}, "--frames must be at least 1"),
        ({"fit": "stretch"}, "unknown fit 'stretch'"),
        ({"stride": 2, "fps": 4}, "both --stride and --fps"),
        ({"stride": 0}, "--stride must be at least 1"),
        ({"fps": 0}, "--fps must be positive"),
        ({"start": 2, "end": 1}, "not after --start"),
        ({"start": -1}, "--start must be >= 0"),
        ({"size": (0, 64)}, "size"),
        ({"frames": 25}, "has 24 frames, fewer than --frames 25: pass --frames 24 or a longer video"),
    ],
)
def test_argument_errors(kwargs: dict, match: str) -> None:
    with raises(match) as info:
        read_video(CLIP, **kwargs)
    assert "\n" not in str(info.value) and ": " in str(info.value)


# ----------------------------------------------------------------------------------------------- writing


def toy(frames: int = 12, size: int = 32) -> np.ndarray:
    """A moving bright square on a gradient, uint8 (F, size, size, 3)."""
    y, x = np.mgrid[:size, :size]
    out = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        out[t, ..., 0] = x * 255 // size
        out[t, ..., 2] = y * 255 // size
        out[t, 8:16, t : t + 8] = 255
    return out


@pytest.mark.parametrize("ext", ["mp4", "gif"])
def test_write_video_round_trip(tmp_path: Path, ext: str) -> None:
    frames = toy()
    path = write_video(tmp_path / "out" / f"toy.{ext}", frames, fps=8)
    assert path == tmp_path / "out" / f"toy.{ext}" and path.stat().st_size > 0
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (128, 128)  # toy 32x32 upscaled 4x to be visible
    back = read_video(path, frames=None, size=(32, 32))
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 12


def test_write_mp4_odd_size_and_mpeg4_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = toy(6, 50)[:, :, :33]  # 50 x 33: upscaled 3x to 150 x 99, padded to 150 x 100
    path = write_video(tmp_path / "odd.mp4", frames)
    with av.open(str(path)) as container:
        assert (container.streams.video[0].height, container.streams.video[0].width) == (150, 100)
    assert len(read_video(path, frames=None)) == 6
    monkeypatch.setattr(video, "_mp4_codec", lambda: "mpeg4")
    path = write_video(tmp_path / "mpeg4.mp4", toy())
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    back = read_video(path, frames=None, size=(32, 32))
    assert back.shape == (12, 32, 32, 3) and np.abs(back.astype(int) - toy()).mean() < 12


def test_write_video_errors(tmp_path: Path) -> None:
    with raises(r"use a file name ending in \.mp4 or \.gif"):
        write_video(tmp_path / "x.avi", toy())
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", toy().astype(np.float32))
    assert not list(tmp_path.iterdir())


def test_contact_sheet(tmp_path: Path) -> None:
    g = video._GAP
    rows = [[toy(12, 32), toy(3, 32)], [toy(4, 16)]]
    path = write_contact_sheet(tmp_path / "sheet.png", rows, scale=2)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG" and sheet.mode == "RGB"
        width = g + (8 * 64 + g) + (3 * 64 + g)  # 12 frames shown as 8
        assert sheet.size == (width, g + 64 + g + 32 + g)
        tile = np.asarray(sheet)[g : g + 64, g : g + 64]
    np.testing.assert_array_equal(tile, toy(1, 32)[0].repeat(2, 0).repeat(2, 1))
    labelled = write_contact_sheet(tmp_path / "labelled.png", rows, labels=["reference", "ours"], scale=2)
    with Image.open(labelled) as sheet:
        assert sheet.size[1] == g + 64 + g + 32 + g and sheet.size[0] > width + 10
        assert np.asarray(sheet)[:, g : sheet.size[0] - width].max() > 200  # label text drawn at the left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled.png", "sheet.png"]
    # issue 28: without a scale, small frames are shown at least 128 px (a toy library.png was 299x76)
    with Image.open(write_contact_sheet(tmp_path / "auto.png", [[toy(8, 32)]], labels=["run-1"])) as sheet:
        assert sheet.size[1] == g + 128 + g and sheet.size[0] > 8 * 128
    with Image.open(write_contact_sheet(tmp_path / "big.png", [[toy(2, 256)]])) as sheet:
        assert sheet.size == (g + 2 * 256 + g, g + 256 + g)  # large frames as they are


# ----------------------------------------------------------------------------------------------- tensors


def test_tensor_round_trip() -> None:
    frames = toy(4, 16)
    tensor = to_tensor(frames)
    assert tensor.shape == (4, 3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1 and tensor.min() == -1 and tensor.max() == 1
    np.testing.assert_array_equal(to_uint8(tensor), frames)
    assert np.abs(to_uint8(tensor.to(torch.bfloat16)).astype(int) - frames).max() <= 2
    np.testing.assert_array_equal(to_uint8(tensor.numpy()), frames)
    np.testing.assert_array_equal(to_uint8(frames.astype(np.float32) / 255), frames)  # channels-last [0, 1]
    np.testing.assert_array_equal(to_uint8(frames), frames)
    assert (to_uint8(torch.full((1, 3, 2, 2), 5.0)) == 255).all()  # clipped


def test_to_uint8_rejects_ambiguous_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="ambiguous"):
        to_uint8(torch.zeros(2, 3, 4, 3))
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError):
        to_uint8(np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(ValueError):
        to_tensor(np.zeros((2, 4, 4, 3), np.float32))


def test_viewable_factor() -> None:
    assert video._viewable(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 128, 128, 3)
    assert video._viewable(np.zeros((1, 100, 30, 3), np.uint8)).shape == (1, 200, 60, 3)
    assert video._viewable(np.zeros((1, 256, 16, 3), np.uint8)).shape == (1, 256, 16, 3)


def test_comparison_sheet_grid_and_captions(tmp_path: Path) -> None:
    """One captioned row per prompt, a column per video kind, frames scaled to the tile height."""
    from cav.data import sheet as sh

    rows = [[toy(8, 32), toy(8, 32), toy(3, 32)], [toy(12, 16), toy(8, 32), toy(8, 32)]]
    path = sh.write_comparison_sheet(tmp_path / "s.png", rows, columns=["reference", "base", "T-LoRA"],
                                     captions=["a red circle", "a blue square " * 40], title="reference: x",
                                     frames=8, tile=48, font_size=18)
    cell = 8 * (48 + sh.FRAME_GAP) - sh.FRAME_GAP  # 8 frames of 48 px
    line = 18 + 9
    with Image.open(path) as im:
        assert im.size == (2 * sh.MARGIN + 3 * cell + 2 * sh.CELL_GAP,
                           sh.MARGIN + line + sh.MARGIN + line + 2 * (line + 48 + sh.MARGIN))
        a = np.asarray(im)
    y0 = 2 * sh.MARGIN + 3 * line  # first row's frames, under the title, the headers and its caption
    x1 = sh.MARGIN + cell + sh.CELL_GAP  # second column
    first = np.asarray(Image.fromarray(toy(8, 32)[0]).resize((48, 48), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(a[y0:y0 + 48, x1:x1 + 48], first)
    text = a[y0 - line:y0, sh.MARGIN:sh.MARGIN + 200]  # the caption is drawn: dark pixels on the light background
    assert (text.min(axis=-1) < 100).sum() > 50
    assert (a[sh.MARGIN:sh.MARGIN + line, : sh.MARGIN + 100].min(axis=-1) < 100).any()  # the title
    assert sh._fit(ImageDraw.Draw(Image.new("RGB", (1, 1))), "a blue square " * 40,
                   ImageFont.load_default(size=18), 300).endswith("...")
    with pytest.raises(ValueError, match="one caption per row"):
        sh.write_comparison_sheet(tmp_path / "bad.png", rows, columns=["a", "b"], captions=["x", "y"])
