"""What `cav generate` does beyond sampling one video from noise: the start of each video (noise prior, inversion,
an image; formulas in ``cav.sampling``), the weight × seed grid with its contact sheet, and the recipe saved beside
each output. ``api.generate`` drives it; the latents themselves are made in ``cav.sampling``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import versioned
from .config import SampleConfig, load_recipe
from .errors import CavError
from .io_utils import content_hash
from .sampling import Start, image_start, noise_prior_start


@dataclass(frozen=True)
class StartInputs:
    """The pictures a start needs, read (and checked) once before any sampling."""

    reference: np.ndarray | None = None  # uint8 (F, H, W, 3)
    image: np.ndarray | None = None  # uint8 (H, W, 3)


def read_inputs(sample: SampleConfig, size: tuple[int, int]) -> StartInputs:
    """Read --reference (at the sampled frames and size) and --image (at the size); bad files are CavErrors."""
    return StartInputs(read_reference(sample, size), read_image_input(sample, size))


def read_image_input(sample: SampleConfig, size: tuple[int, int]) -> np.ndarray | None:
    from .data.video import read_image

    return read_image(sample.image, tuple(size)) if sample.image else None


def read_reference(sample: SampleConfig, size: tuple[int, int]) -> np.ndarray | None:
    """The reference clip's frames (None when the start needs none): a clip as given (``--frames`` spread uniformly,
    cropped to the size), or a run's clip ``--reference-clip`` with the run's own frame selection and fit, so a
    checkpoint's validation start is made again exactly."""
    from .data.video import read_video

    if not sample.starts_from_reference:
        return None
    clip, selection, fit = reference_source(sample.reference, sample.reference_clip)
    return read_video(clip, frames=sample.frames, size=tuple(size), fit=fit, **selection)


def run_of(path: str | Path) -> Path | None:
    """The `cav train` run folder ``path`` is or lies in (a checkpoint, its T-LoRA), else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for folder in [path, *list(path.parents)[:2]]:
        if (folder / "data.json").is_file() and (folder / "config.yaml").is_file():
            return folder
    return None


def reference_source(reference: str, clip: int = 1) -> tuple[str, dict, str]:
    """(clip path, frame selection, fit) of ``--reference``: a clip as it is (uniform frames, crop), or clip ``clip``
    (from 1) of a run folder as that run read it, checked to be the same content."""
    run = run_of(reference)
    if run is None:
        if clip != 1:
            raise CavError(f"--reference-clip {clip} picks one clip of a run on several: pass --reference RUN (a "
                           "`cav train` folder), or drop --reference-clip")
        return reference, {}, "crop"
    record = versioned.read(run / "data.json")
    clips = record.get("clips") or [record]
    if clip > len(clips):
        raise CavError(f"--reference-clip {clip} is out of range: the run in '{run}' was trained on {len(clips)} "
                       f"clip(s), pass 1 to {len(clips)}")
    chosen = clips[clip - 1]
    if not Path(chosen["clip"]).exists():
        raise CavError(f"the run's clip '{chosen['clip']}' is missing: pass --reference with the clip itself")
    if content_hash(chosen["clip"]) != chosen["sha256"]:
        raise CavError(f"the run's clip '{chosen['clip']}' changed since the run was trained: pass --reference with "
                       "the clip itself to start from it as it is now")
    fit = load_recipe(run / "config.yaml").get("fit", "crop")
    return chosen["clip"], dict(chosen.get("selection") or {}), fit


def start_for(bb, sample: SampleConfig, inputs: StartInputs, seed: int) -> Start | None:
    """The initial latents of the video of ``seed`` (None: fresh noise, as plain sampling)."""
    if inputs.image is not None:
        return image_start(bb, inputs.image, sample.frames, [seed], steps=sample.steps, strength=sample.strength,
                           invert=sample.invert)
    if inputs.reference is not None:
        prior = sample.noise_prior if sample.noise_prior > 0 else 1.0  # --invert alone: the inversion itself
        return noise_prior_start(bb, inputs.reference, [seed], steps=sample.steps, prior=prior, invert=sample.invert,
                                 inversion_steps=sample.inversion_steps)
    return None


def output_names(out: Path, sample: SampleConfig) -> list[Path]:
    """One file per video: ``out``; ``out-k`` for --num-videos; ``out-wW-sS`` for a --weights / --seeds grid."""
    grid = sample.grid
    if sample.weights or sample.seeds:
        return [out.with_name(f"{out.stem}{'' if w is None else f'-w{w:g}'}-s{s}{out.suffix}") for w, s in grid]
    return [out] if len(grid) == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(len(grid))]


def record(prompt: str, adapters, sample: SampleConfig, weight: float | None, seed: int, weights_used) -> dict:
    """The generation recipe of one output, saved beside it as ``NAME.json`` (enough to make it again)."""
    return {"prompt": prompt, "adapters": [{"path": str(p), "weight": w} for (p, _), w in zip(adapters, weights_used)],
            "sample": {**sample.to_dict(), "seed": seed, "num_videos": 1, "weights": [], "seeds": []},
            "grid_weight": weight}


def write_sheet(path: Path, videos: list[np.ndarray], sample: SampleConfig) -> Path:
    """A contact sheet of the grid: one row per weight, the seeds side by side."""
    from .data.video import write_contact_sheet

    grid = sample.grid
    weights = list(dict.fromkeys(w for w, _ in grid))
    rows = [[v for v, (w, _) in zip(videos, grid) if w == weight] for weight in weights]
    labels = [("adapter's weight" if w is None else f"weight {w:g}") + " | seeds " +
              ",".join(str(s) for ww, s in grid if ww == w) for w in weights]
    return write_contact_sheet(path, rows, labels=labels)
