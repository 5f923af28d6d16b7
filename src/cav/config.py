"""Recipes: dataclasses hold every value a training run or a generation uses, parsed and validated in
``__post_init__``, loaded from YAML. Shipped recipes live in the package (``cav/configs``) and are found by name.

The CLI is built from these fields (``cav train --help``, ``cav generate --help`` list them, with defaults and units);
``config.yaml`` in a run folder is the full resolved recipe, enough to reproduce the run.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from . import versioned
from .errors import CavError
from .options import coerce_fields, flag_name, hints, is_section, key_name, leaves, option as _f, own_fields

ABSORBERS = ("none", "s-lora", "ti", "both")
PLACEMENTS = ("cav", "motiondirector", "motiondirector+tconv", "qk", "temporal-heads")  # qk, temporal-heads: DiTs
EXPERTS = ("high", "low", "both")  # --experts on a two-expert base (whether it has two: backbone.check_experts)
WEIGHT_MAX = 4.0  # adapter weights above this only saturate the video


def _compile_setting(value) -> str:
    """``--compile`` is auto | on | off; recipes written before ``auto`` said true / false."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in ("auto", "on", "off"):
        raise CavError(f"compile '{value}' is invalid: use auto, on or off")
    return value


def check_weight(weight, what: str, *, zero_ok: bool = False, example: str = "1.0", source: str = "") -> float:
    """The one rule for adapter weights: a finite number in (0, 4] — or [0, 4] where 0 means "off" (weights of
    adapters composed by `cav generate`; a recorded default weight of 0 would make the adapter a no-op)."""
    interval = "[0, 4] (0 turns it off)" if zero_ok else "(0, 4]"
    try:
        w = float(weight)
    except (TypeError, ValueError):
        w = math.nan
    if isinstance(weight, bool) or not (math.isfinite(w) and (0 <= w if zero_ok else 0 < w) and w <= WEIGHT_MAX):
        shown = w if math.isfinite(w) else weight  # the number as parsed, else the text as written
        raise CavError(f"{what} {shown}{source} is invalid: pass a weight in {interval}, e.g. {example}")
    return w


def parse_weighted(spec: str, flag: str = "--adapter") -> tuple[str, float | None]:
    """``PATH[:WEIGHT]`` → (path, weight or None); None means the adapter's own default (the weight its run validated
    with, ``lora_weight``, else 1). A path that exists as written keeps its colons; otherwise the text after the last
    colon must be a weight (``RUN:abc`` is a bad weight, not a missing adapter)."""
    spec = str(spec)
    path, sep, weight = spec.rpartition(":")
    drive = len(path) == 1 and weight[:1] in ("\\", "/")  # C:\models, C:/models
    if not sep or not path or drive or Path(spec).exists():
        return spec, None
    return path, check_weight(weight.strip() or "''", f"{flag} weight", zero_ok=True, example=f"{path}:0.7",
                              source=f" (in '{spec}')")


# Each family's size unit: heights and widths are multiples of it (its VAE's downsampling times its UNet's, from the
# shipped configs by ``backbone.shape_unit``; a test keeps these in step). A size that does not fit is refused with
# the nearest ones that do.
SIZE_UNITS = {"the toy": 16, "AnimateDiff SDXL": 32, "ModelScope, Zeroscope and AnimateDiff (SD 1.5)": 64}
SIZE_RULE = "multiples of the base's size unit: " + ", ".join(f"{u} for {name}" for name, u in SIZE_UNITS.items())


@dataclass
class SampleConfig:
    """How videos are sampled: by `cav generate` and for a training run's validation samples (one set of defaults;
    a run records its settings in the T-LoRA's ``cav.json`` and `cav generate --adapter RUN` starts from them)."""

    frames: int = _f(16, "frames per video", unit="frames")
    size: tuple[int, int] | None = _f(None, f"sampling size, H or HxW ({SIZE_RULE})", unit="pixels", repeat=True,
                                      metavar="H[xW]",
                                      default_text="the adapter's training size, else the base's native size "
                                                   "(toy: 32x32)")
    steps: int = _f(25, "denoising steps", unit="steps")
    guidance: float = _f(9.0, "classifier-free guidance scale")
    negative_prompt: str | None = _f(None, "what the video should not show (replaces the empty unconditional prompt)")
    seed: int = _f(0, "seed of the first video's initial noise (video k uses seed + k)")
    num_videos: int = _f(1, "videos to sample (seeds seed, seed+1, ...)", unit="videos")
    lora_weight: float | None = _f(None, "weight of every --adapter given without :WEIGHT, in (0, 4]",
                                   default_text="the weight the adapter's run validated with, else 1",
                                   parse=lambda w: None if w is None else check_weight(w, "lora_weight"))
    # where sampling starts (cav.sampling: the formulas) and the weight x seed grid
    reference: str | None = _f(None, "reference for --noise-prior / --invert: a clip (video or image folder), or a "
                               "run folder of `cav train` (its own clip, with the frames and fit the run used)",
                               metavar="CLIP_OR_RUN")
    reference_clip: int = _f(1, "with --reference RUN of a run on several clips: which of its clips, counted from 1 "
                             "in `cav train`'s order", metavar="K")
    noise_prior: float = _f(0.0, "start from sqrt(A)·reference latents + sqrt(1-A)·noise, A in [0, 1] (needs "
                            "--reference; the reference's latents are DDIM-inverted with --invert, else noised)",
                            metavar="A")
    invert: bool = _f(False, "start from the DDIM inversion of --reference (or of --image): Tune-A-Video's start")
    inversion_steps: int | None = _f(None, "DDIM inversion steps of --reference", unit="steps",
                                     default_text="--steps")
    image: str | None = _f(None, "animate this image: a still clip of it, taken back --strength of the schedule "
                           "(inverted with --invert, else noised), re-sampled with the adapters", metavar="FILE")
    strength: float = _f(0.6, "with --image: share of the sampling schedule re-run from the image, in (0, 1] "
                         "(1: from pure noise; lower keeps more of the image)")
    weights: list[float] = _f([], "a grid: every --adapter weight in this comma list (× --seeds), e.g. 0.5,0.75,1",
                              metavar="W[,W...]", default_text="off")
    seeds: list[int] = _f([], "a grid: every seed in this comma list (× --weights), e.g. 1,2", metavar="S[,S...]",
                          default_text="off")

    NOT_OPTIONS = ()  # inherited fields a subclass's owner sets (not flags or recipe keys): see ValidationConfig

    def __post_init__(self):
        for name in ("weights", "seeds"):  # a flag gives "0.5,0.75", a recipe a list: one list either way
            value = getattr(self, name)
            items = value if isinstance(value, (list, tuple)) else [value]
            setattr(self, name, [p for v in items for p in (str(v).replace(",", " ").split() if isinstance(v, str)
                                                            else [v])])
        coerce_fields(self)
        for name in ("frames", "steps", "num_videos"):
            if getattr(self, name) < 1:
                raise CavError(f"{self._named(name)} must be ≥ 1, got {getattr(self, name)}")
        if self.size is not None and min(self.size) < 8:
            raise CavError(f"{self._named('size')} {self.size[0]}x{self.size[1]} is too small: pass H or HxW, each ≥ 8")
        if self.guidance < 0:
            raise CavError(f"{self._named('guidance')} must be ≥ 0, got {self.guidance}")
        self._check_start()

    @classmethod
    def _option(cls, name: str) -> dataclasses.Field:
        return next(f for f in dataclasses.fields(cls) if f.name == name)

    def _flag(self, name: str) -> str:
        """The flag of option ``name`` in this class (``--noise-prior``; a run's validation: ``--validation-noise-prior``)."""
        return flag_name(self._option(name))

    def _named(self, name: str) -> str:
        """How a message names option ``name``: its key and flag, ``noise_prior (--noise-prior)``."""
        f = self._option(name)
        return f"{key_name(f)} ({flag_name(f)})"

    def _reference_given(self) -> bool:
        return bool(self.reference)

    def _check_start(self) -> None:
        """The starting-point options (noise prior, inversion, image) and the grid, checked before any work."""
        if not 0.0 <= self.noise_prior <= 1.0:
            raise CavError(f"{self._named('noise_prior')} {self.noise_prior} is invalid: pass a value in [0, 1]")
        if self.starts_from_reference and not self._reference_given():
            raise CavError("--noise-prior and --invert start from a reference clip: pass --reference CLIP (or RUN, "
                           "the run's own clip), or --image FILE with --invert")
        if self.image and (self.reference or self.noise_prior > 0):
            drop = " / ".join(self._flag(n) for n in ("reference", "noise_prior") if n not in self.NOT_OPTIONS)
            raise CavError(f"{self._flag('image')} starts from the image: drop {drop}, or drop {self._flag('image')}")
        if not 0.0 < self.strength <= 1.0:
            raise CavError(f"{self._named('strength')} {self.strength} is invalid: pass a value in (0, 1], e.g. 0.6")
        if self.inversion_steps is not None and self.inversion_steps < 1:
            raise CavError(f"{self._named('inversion_steps')} must be ≥ 1, got {self.inversion_steps}")
        if self.reference_clip < 1:
            raise CavError(f"{self._named('reference_clip')} must be ≥ 1 (the first clip is 1), got "
                           f"{self.reference_clip}")
        self.weights = [check_weight(w, "--weights entry", zero_ok=True, example="0.5,0.75,1") for w in self.weights]
        for name in ("weights", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise CavError(f"--{name} {','.join(map(str, values))} repeats a value: list each once")

    @property
    def grid(self) -> list[tuple[float | None, int]]:
        """(weight, seed) per video: --weights × --seeds, else the plain seeds (weight None: the adapter's)."""
        seeds = self.seeds or [self.seed + k for k in range(self.num_videos)]
        return [(w, s) for w in (self.weights or [None]) for s in seeds]

    @property
    def starts_from_reference(self) -> bool:
        return self.noise_prior > 0 or (self.invert and not self.image)

    # the keys a T-LoRA's cav.json records under "validation" (kept from before SampleConfig existed)
    _RECORDED = {"frames": "frames", "size": "size", "steps": "steps", "guidance": "guidance", "seed": "seed",
                 "lora_weight": "weight"}

    def to_validation(self) -> dict:
        """The ``validation`` record of a T-LoRA's cav.json."""
        out = {key: getattr(self, name) for name, key in self._RECORDED.items()}
        out["size"] = list(self.size) if self.size else None
        return out

    @classmethod
    def from_validation(cls, record: dict) -> "SampleConfig":
        """Settings `cav generate --adapter RUN` starts from: the run's frames, size, steps and guidance (not its seed
        or weight: the seed is generate's own, the weight applies per adapter)."""
        keep = ("frames", "size", "steps", "guidance")
        return cls(**{n: record[cls._RECORDED[n]] for n in keep if record.get(cls._RECORDED[n]) is not None})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def updated(self, **settings) -> "SampleConfig":
        """A copy with the settings given (None values: not given), parsed and checked."""
        return dataclasses.replace(self, **{k: v for k, v in settings.items() if v is not None})


_SAMPLE = SampleConfig()


@dataclass
class ValidationConfig(SampleConfig):
    """A training run's validation samples: a ``SampleConfig`` (one set of checks and defaults with `cav generate`),
    with the flags of `cav train`, plus the prompts sampled. Its frames and size are the run's own (``TrainConfig``
    sets them); the reference of its noise prior / inversion is the run's own clip, so it is never missing."""

    NOT_OPTIONS = ("frames", "size", "negative_prompt", "num_videos", "reference", "weights", "seeds")

    seed: int = _f(_SAMPLE.seed, "seed of validation samples", flag="--validation-seed")
    steps: int = _f(_SAMPLE.steps, "denoising steps for validation samples", unit="steps", flag="--sample-steps")
    guidance: float = _f(_SAMPLE.guidance, "classifier-free guidance scale for validation samples")
    lora_weight: float = _f(1.0, "T-LoRA weight in validation samples, in (0, 4], recorded as the default weight of "
                            "`cav generate --adapter RUN` (a smaller scale keeps more of the new appearance)",
                            parse=lambda w: check_weight(w, "lora_weight"))
    # where validation samples start: `cav generate`'s start options, the reference being the run's own clip
    noise_prior: float = _f(0.0, "validation samples start from the noise prior A of the run's (first) clip "
                            "(`cav generate --noise-prior`, the reference read as the run reads it), A in [0, 1]",
                            metavar="A", flag="--validation-noise-prior")
    invert: bool = _f(False, "validation samples start from the DDIM inversion of the run's (first) clip, or of "
                      "--validation-image (`cav generate --invert`)", flag="--validation-invert")
    inversion_steps: int | None = _f(None, "DDIM inversion steps of the validation start", unit="steps",
                                     default_text="--sample-steps", flag="--validation-inversion-steps")
    reference_clip: int = _f(1, "with several clips: which one is the reference of the validation noise prior / "
                             "inversion, counted from 1 in the clips' order", metavar="K",
                             flag="--validation-reference-clip")
    image: str | None = _f(None, "validation samples animate this image (`cav generate --image`)", metavar="FILE",
                           flag="--validation-image")
    strength: float = _f(_SAMPLE.strength, "with --validation-image: share of the sampling schedule re-run from the "
                         "image, in (0, 1]", flag="--validation-strength")
    prompts: list[str] = _f([], "prompt sampled at each checkpoint (repeatable)", flag="--validation-prompt",
                            key="validation_prompts", metavar="PROMPT", default_text="the prompt")

    def _reference_given(self) -> bool:
        return True  # the run's own clip

    def sample_config(self, run: str | Path | None = None) -> SampleConfig:
        """How the validation samples are made, as a plain ``SampleConfig`` (what a sample's recipe records and
        `cav generate` reads). With ``run`` (the run folder: its clip is the reference of a noise prior /
        inversion) the start too; without, only the sampling settings (what `cav generate --adapter RUN` starts
        from)."""
        keep = ("frames", "size", "steps", "guidance", "seed", "lora_weight")
        if run is not None:
            keep += ("noise_prior", "invert", "inversion_steps", "image", "strength", "reference_clip")
        return SampleConfig(**{name: getattr(self, name) for name in keep},
                            reference=str(run) if run is not None and self.starts_from_reference else None)


@dataclass
class DataConfig:
    """Which frames of the reference video, at what size (the validation samples take the same frames and size)."""

    frames: int = _f(_SAMPLE.frames, "frames taken from the reference video (uniformly, or the first of --stride/"
                     "--fps); also the validation samples' length; a motion needs ≥ 2", unit="frames")
    size: tuple[int, int] = _f((256, 256), f"training size, H or HxW ({SIZE_RULE})", unit="pixels", repeat=True,
                               metavar="H[xW]")
    fit: Literal["crop", "pad"] = _f("crop", "fit the video to the size: crop to cover, or pad to fit")
    stride: int | None = _f(None, "take every K-th frame of the video, then the first --frames of those", unit="frames",
                            metavar="K", default_text="off: --frames spread uniformly")
    fps: float | None = _f(None, "take one frame per 1/F seconds, then the first --frames of those", metavar="F",
                           default_text="off: --frames spread uniformly")
    start: float | None = _f(None, "use the video from this time on", unit="seconds", metavar="SECONDS",
                             default_text="the first frame")
    end: float | None = _f(None, "use the video up to this time (exclusive)", unit="seconds", metavar="SECONDS",
                           default_text="the last frame")

    def __post_init__(self):
        coerce_fields(self)  # types first: every rule below sees numbers, tuples and choices
        if self.frames < 2:
            raise CavError(f"--frames {self.frames} is too few: a motion adapter learns how frames change, so it "
                           "needs ≥ 2 frames (the paper uses 16)")
        if min(self.size) < 8:
            raise CavError(f"--size {self.size[0]}x{self.size[1]} is invalid: pass H or HxW, each ≥ 8")

    def frame_selection(self) -> dict:
        """``stride`` / ``fps`` / ``start`` / ``end`` for ``read_video`` (only those set)."""
        return {k: getattr(self, k) for k in FRAME_SELECTION if getattr(self, k) is not None}


FRAME_SELECTION = ("stride", "fps", "start", "end")  # the keys of a clip's frame selection (data.json records them)


@dataclass
class AbsorberConfig:
    """Stage 1: the appearance absorbers (S-LoRA and textual inversion), trained or given as files."""

    kind: Literal["none", "s-lora", "ti", "both"] = _f("both", "appearance absorbers", flag="--absorbers")
    mode: Literal["image", "video"] = _f(
        "image", "how the absorbers see the clip: image (the paper's: unordered patch-cropped frames, each alone, "
        "temporal layers bypassed / attention frame-local) or video (whole clips in order, one patch crop per clip, "
        "temporal layers and full attention active: the ablation's 'does image mode matter?')", flag="--absorber-mode")
    s_lora_from: str = _f("", "start from this existing image LoRA (.safetensors, e.g. an SD 1.5 LoRA of the subject) "
                          "as the S-LoRA absorber: skips stage 1 (absorbers are then exactly the given ones)")
    ti_from: str = _f("", "start from this existing textual-inversion embedding (.safetensors) as the TI absorber: "
                      "skips stage 1 (absorbers are then exactly the given ones)")
    steps: int = _f(100, "absorber training steps (S-LoRA and textual inversion train together)", unit="steps",
                    flag="--absorber-steps")
    s_lora_rank: int = _f(1, "S-LoRA rank")
    s_lora_alpha: float = _f(0.5, "S-LoRA alpha")
    s_lora_lr: float = _f(5e-5, "S-LoRA learning rate")
    ti_tokens: int = _f(4, "textual inversion: number of new tokens (2-6)", unit="tokens")
    ti_token: str = _f("<cav>", "textual inversion placeholder token (put it in the prompts or it is prefixed)")
    ti_init: str = _f("object", "textual inversion: word whose embedding initialises the new tokens")
    ti_lr: float = _f(5e-5, "textual inversion learning rate")
    batch: int = _f(4, "frames per absorber step (unordered, patch-cropped)", unit="frames", flag="--absorber-batch")
    crop_ratio: tuple[float, float] = _f((0.33, 0.67), "patch crop side ratio range for the absorbers",
                                         metavar=("LOW", "HIGH"))

    def __post_init__(self):
        coerce_fields(self)
        if self.s_lora_from or self.ti_from:  # given absorbers replace stage 1: they are the run's absorbers
            self.kind = {(True, True): "both", (True, False): "s-lora", (False, True): "ti"}[
                (bool(self.s_lora_from), bool(self.ti_from))]
        if self.steps < 0:
            raise CavError("--absorber-steps must be ≥ 0")
        if not 1 <= self.ti_tokens <= 16:
            raise CavError(f"--ti-tokens {self.ti_tokens} is out of range: use 2-6 (the paper's range)")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi <= 1:
            raise CavError(f"crop_ratio {list(self.crop_ratio)} is invalid: need 0 < low ≤ high ≤ 1")
        for name in ("s_lora_lr", "ti_lr"):
            if getattr(self, name) <= 0:
                raise CavError(f"{name} must be > 0")

    @property
    def uses_s_lora(self) -> bool:
        return self.kind in ("s-lora", "both")

    @property
    def uses_ti(self) -> bool:
        return self.kind in ("ti", "both")

    @property
    def given(self) -> bool:
        """Absorbers come from existing files (``--s-lora-from``/``--ti-from``): no stage 1."""
        return bool(self.s_lora_from or self.ti_from)

    def clip_token(self, clip: int) -> str:
        """Clip ``clip``'s textual-inversion placeholder: ``--ti-token`` for the first, ``<cav2>``, ``<cav3>`` … after."""
        if clip == 0:
            return self.ti_token
        t = self.ti_token
        return f"{t[:-1]}{clip + 1}>" if t.endswith(">") else f"{t}{clip + 1}"


@dataclass
class MotionConfig:
    """Stage 2: the motion LoRA (T-LoRA): where it goes, what it trains on, its schedule."""

    placement: Literal["cav", "motiondirector", "motiondirector+tconv", "qk", "temporal-heads"] = _f(
        "cav", "LoRA placement preset: where each adapter goes (the base family's row); qk (the T-LoRA on "
        "self-attention's query and key only: values carry appearance) and temporal-heads (only the quarter of all "
        "self-attention heads whose attention falls most across frames, measured on the clip once and recorded in "
        "the run) exist on DiT bases (Wan) only")
    frame_diff_loss: float = _f(0.0, "weight W of a frame-difference term in the T-LoRA's loss: W × the mean squared "
                                "error between the predicted and the true target's differences of consecutive "
                                "latent frames (blind to an error that is the same in every frame, i.e. a static "
                                "appearance, so it weighs what changes between frames); 0: off, the loss as "
                                "without it; flow-matching bases (Wan) only", metavar="W")
    experts: str = _f("", "two-expert bases (Wan 2.2 T2V-A14B): the expert the LoRAs train on, each on its own noise "
                      "range: high (transformer, the steps at or above the pipeline's boundary), low (transformer_2, "
                      "below it) or both (each step's draws routed as the pipeline routes); samples use both experts",
                      default_text="high on a two-expert base", metavar="high|low|both")
    steps: int = _f(300, "T-LoRA training steps", unit="steps")
    rank: int = _f(4, "T-LoRA rank", flag="--t-lora-rank")
    alpha: float = _f(1.0, "T-LoRA alpha", flag="--t-lora-alpha")
    lr: float = _f(5e-4, "T-LoRA learning rate", flag="--t-lora-lr")
    timesteps: tuple[int, int] = _f((0, 1000), "T-LoRA trains on timesteps in [low, high): raise low to stress the "
                                    "high-noise steps where motion and layout form", metavar=("LOW", "HIGH"),
                                    flag="--t-lora-timesteps")
    prompt_dropout: float = _f(0.0, "fraction of T-LoRA steps on the empty prompt, so the unconditional branch of "
                               "guidance carries the motion too (0: the paper's recipe)",
                               flag="--t-lora-prompt-dropout")
    batch: int = _f(1, "copies of the clip per T-LoRA step, each with its own noise and timestep (a less noisy "
                    "gradient for the same clip)", flag="--t-lora-batch")

    def __post_init__(self):
        coerce_fields(self)
        if self.experts not in ("", *EXPERTS):  # whether the base has two experts: backbone.check_experts
            raise CavError(f"--experts {self.experts} is not a choice: pass --experts high, low or both")
        if not (math.isfinite(self.frame_diff_loss) and self.frame_diff_loss >= 0):
            raise CavError(f"--frame-diff-loss {self.frame_diff_loss} is invalid: pass a weight ≥ 0 (0: off), "
                           "e.g. 0.5")
        if self.steps < 1:  # 0 steps would train, save and publish no T-LoRA at all
            raise CavError(f"--steps {self.steps} trains no T-LoRA: pass --steps N with N ≥ 1 (T-LoRA training "
                           "steps)")
        if not 1 <= self.batch <= 64:
            raise CavError(f"--t-lora-batch {self.batch} is out of range: use 1-64")
        lo_t, hi_t = self.timesteps
        if not 0 <= lo_t < hi_t:
            raise CavError(f"t_lora_timesteps {list(self.timesteps)} is invalid: need 0 ≤ low < high")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise CavError(f"t_lora_prompt_dropout {self.prompt_dropout} is invalid: pass a value in [0, 1)")
        if self.lr <= 0:
            raise CavError("t_lora_lr must be > 0")


@dataclass
class SystemConfig:
    """Where and how the run computes: device, precision, memory and speed switches."""

    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = _f("auto", "frozen-weight dtype: auto = bf16/fp16 on GPU, fp32 "
                                                        "on CPU; fp16 is for GPUs only")
    gradient_checkpointing: Literal["auto", "on", "off"] = _f("auto", "recompute activations in the backward pass "
                                                              "(auto: on for GPUs under 16 GB)")
    cache_inputs: bool = _f(True, "encode frames and prompts once and reuse them every step")
    offload_frozen: bool = _f(False, "move the VAE and text encoder to CPU during the training loop; on a DiT (Wan) "
                                     "also block swap: each block's frozen weights come from the CPU for its own use")
    compile: Literal["auto", "on", "off"] = _f("off", "torch.compile the UNet as one graph (CUDA: with CUDA graphs); "
                                               "auto: on for CUDA only", parse=_compile_setting)

    def __post_init__(self):
        coerce_fields(self)


@dataclass
class TrainConfig:
    """A full training recipe: what to learn (prompts, base, seed, schedule) and one section per concern. Defaults
    are the paper's hyperparameters (supp. A.4). Every option keeps the flat key its flag names (``--t-lora-rank`` →
    ``t_lora_rank`` → ``motion.rank``): flags, batch manifest columns and recipes of format 1 use those keys."""

    prompt: str = _f("", "full prompt describing the reference video (appearance + motion)")
    spatial_prompt: list[str] = _f([], "appearance-only prompt for the absorbers; with several clips, repeat it "
                                   "once per clip, in their order", metavar="PROMPT", default_text="the prompt")
    base: str = _f("toy", "base model: `toy`, a diffusers T2V or AnimateDiff folder, or a hub id")
    motion_adapter: str = _f("", "AnimateDiff MotionAdapter folder or hub id that animates an image-model --base "
                             "(e.g. Stable Diffusion 1.5 + animatediff-motion-adapter-v1-5-2)")
    seed: int = _f(0, "seed for every random choice (same seed, same device → same adapter)")
    checkpoint_every: int = _f(100, "save a T-LoRA checkpoint with validation samples every N steps (0: only the end)",
                               unit="steps")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    data: DataConfig = _f(DataConfig(), "which frames of the reference video, at what size")
    absorbers: AbsorberConfig = _f(AbsorberConfig(), "stage 1: the appearance absorbers")
    motion: MotionConfig = _f(MotionConfig(), "stage 2: the motion LoRA (T-LoRA)")
    validation: ValidationConfig = _f(ValidationConfig(), "validation samples, made at each checkpoint as `cav "
                                      "generate` makes them (their frames and size: the data's)")
    system: SystemConfig = _f(SystemConfig(), "device, precision, memory and speed switches")

    def __post_init__(self):
        coerce_fields(self)  # the top-level keys; each section checked itself when it was built
        self.spatial_prompt = [p for p in self.spatial_prompt if p.strip()]  # "" (none given) is the empty list
        # the validation samples are as long and as large as the clip the run trains on
        self.validation = dataclasses.replace(self.validation, frames=self.data.frames, size=self.data.size)

    # --- helpers -------------------------------------------------------------------------------------------
    def spatial_prompt_of(self, clip: int = 0) -> str:
        """The appearance-only prompt of clip ``clip`` (the full prompt when none is given)."""
        given = [p for p in self.spatial_prompt if p.strip()]
        return given[clip] if clip < len(given) else self.prompt

    def check_clips(self, n: int) -> None:
        """Several clips need one spatial prompt each (or none: every clip then absorbs under the full prompt)."""
        given = [p for p in self.spatial_prompt if p.strip()]
        if len(given) > 1 and len(given) != n or (n == 1 and len(given) > 1):
            raise CavError(f"{len(given)} --spatial-prompt for {n} clip(s): pass one per clip, in the clips' order")
        if n > 1 and len(given) == 1:
            raise CavError(f"one --spatial-prompt for {n} clips: each clip has its own appearance, pass "
                           f"--spatial-prompt once per clip ({n} times), in the clips' order")

    def lora_config(self, kind: str, family):
        """The peft ``LoraConfig`` of this recipe's S-LoRA (``kind="spatial"``) or T-LoRA (``"temporal"``) on a base of
        ``family`` (``Backbone.family``, a ``families.Family``)."""
        from .adapters.lora import lora_config

        rank, alpha = ((self.absorbers.s_lora_rank, self.absorbers.s_lora_alpha) if kind == "spatial"
                       else (self.motion.rank, self.motion.alpha))
        return lora_config(kind, self.motion.placement, rank, alpha, family)

    def to_dict(self) -> dict:
        """The recipe in its nested shape (config.yaml's): one mapping per section."""
        return _plain(self)

    def keys(self) -> dict:
        """The recipe as flat recipe keys (each the name of its flag: ``t_lora_rank``, ``validation_seed``)."""
        return flatten(self.to_dict())

    @classmethod
    def field_names(cls) -> list[str]:
        """Every flat recipe key, in the order of `cav train --help`."""
        return [leaf.key for leaf in leaves(cls)]

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """A recipe from recipe keys (flat, as flags and batch columns name them) and/or sections (``to_dict``'s
        shape); a key that is neither is refused by name."""
        return _build(cls, nest(data), "")

    @classmethod
    def of(cls, **keys) -> "TrainConfig":
        """``TrainConfig.of(prompt="…", frames=8, t_lora_rank=2)``: a recipe from recipe keys."""
        return cls.from_dict(keys)


# ------------------------------------------------------------------------------------ nested ↔ flat recipe keys
def _sections(cls=None) -> dict:
    cls = cls or TrainConfig
    types_ = hints(cls)
    return {f.name: types_[f.name] for f in own_fields(cls) if is_section(types_[f.name])}


def nest(data: dict) -> dict:
    """Recipe keys (flat) → the nested shape. A section given as a mapping is kept (merged with flat keys of the same
    section); a key that is neither a recipe key nor a section is kept as it is, for ``from_dict`` to name."""
    paths = {leaf.key: leaf.path for leaf in leaves(TrainConfig)}
    sections = _sections()
    out: dict = {}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        elif key in paths:
            *parents, name = paths[key]
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[name] = value
        else:
            out[key] = value
    return out


def flatten(nested: dict) -> dict:
    """The nested shape → recipe keys (flat); the inverse of ``nest`` for known keys."""
    out = {}
    for leaf in leaves(TrainConfig):
        node, found = nested, True
        for p in leaf.path:
            if not isinstance(node, dict) or p not in node:
                found = False
                break
            node = node[p]
        if found:
            out[leaf.key] = node
    return out


def _build(cls, data: dict, prefix: str):
    """``cls(**data)`` with its sections built from their mappings; unknown keys are named with their section."""
    types_ = hints(cls)
    names = [f.name for f in own_fields(cls)]
    unknown = sorted(prefix + str(k) for k in data if k not in names)
    if unknown:
        raise CavError(f"unknown recipe key(s) {', '.join(unknown)}: see `cav train --help` for the valid names "
                       "(a flag --a-b is the key a_b)")
    kw = {}
    for key, value in data.items():
        if is_section(types_[key]):
            if not isinstance(value, dict):
                raise CavError(f"recipe key {prefix}{key} is a section: give a mapping of its keys, e.g. "
                               f"{key}: {{...}}")
            kw[key] = _build(types_[key], value, f"{prefix}{key}.")
        else:
            kw[key] = value
    return cls(**kw)


def _plain(obj) -> dict:
    types_ = hints(type(obj))
    out = {}
    for f in own_fields(type(obj)):
        value = getattr(obj, f.name)
        out[f.name] = (_plain(value) if is_section(types_[f.name]) else list(value) if isinstance(value, tuple)
                       else value)
    return out


# ---------------------------------------------------------------------------------------------------- recipes
def _recipe_root() -> Path:
    # cav is installed as files (wheels unpack), so the package folder is a real directory
    return Path(str(importlib.resources.files("cav") / "configs"))


def recipe_names() -> list[str]:
    """Names of the shipped recipes: ``toy``, ``modelscope``, ``ablation/toy`` …"""
    root = _recipe_root()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def recipe_path(recipe: str | Path) -> Path:
    """A YAML file as given, else the shipped recipe of that name (``toy``, ``ablation/toy``, ``toy.yaml``)."""
    path = Path(recipe)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removeprefix("configs/")
    shipped = _recipe_root() / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise CavError(f"recipe '{recipe}' is neither a file nor a shipped recipe: pass a YAML path or one of "
                   f"{', '.join(recipe_names())}")


def load_recipe(recipe: str | Path) -> dict:
    """Read a YAML recipe (a path or a shipped name; a run's config.yaml) into recipe keys (flat: every source of
    values — flags, batch columns, form fields, overrides — merges into these), checked now. A recipe written
    before sections existed (format 1: flat keys) is upgraded by ``versioned.upgrade``."""
    path = recipe_path(recipe)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CavError(f"recipe '{path}' is not valid YAML ({str(exc).splitlines()[0]}): fix the file") from None
    if not isinstance(data, dict):
        raise CavError(f"recipe '{path}' must be a mapping of recipe keys: see `cav train --help`")
    data = versioned.upgrade(RECIPE_FILE, data, path)
    try:
        TrainConfig.from_dict({**data, "prompt": data.get("prompt", "x")})  # validate keys and values early
    except CavError as exc:
        raise CavError(f"recipe '{recipe}': {exc}") from None
    return flatten(data)


RECIPE_FILE = "config.yaml"  # the versioned format every recipe (shipped, the user's, a run's own) is written in
versioned.UPGRADES[(RECIPE_FILE, 1)] = nest  # format 1 (flat keys, before sections) → 2


def dump_yaml(cfg: TrainConfig) -> str:
    """A recipe file: its format version, then the top-level keys and one block per section."""
    return yaml.dump({versioned.KEY: versioned.CURRENT[RECIPE_FILE], **cfg.to_dict()}, Dumper=_RecipeDumper,
                     sort_keys=False)


class _RecipeDumper(yaml.SafeDumper):
    """Sections as blocks, a list of values on one line (``size: [256, 256]``), as the shipped recipes are written."""


_RecipeDumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))
