"""Recipes: one dataclass holds every value a training run uses, validated in ``__post_init__``, loaded from YAML.

The CLI is built from these fields (``cav train --help`` lists them); ``config.yaml`` in a run folder is the
full resolved recipe, enough to reproduce the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import CavError

ABSORBERS = ("none", "s-lora", "ti", "both")
PLACEMENTS = ("cav", "motiondirector")


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """A full training recipe. Defaults are the paper's hyperparameters (supp. A.4)."""

    prompt: str = _f("", "full prompt describing the reference video (appearance + motion)")
    spatial_prompt: str = _f("", "appearance-only prompt for the absorbers (default: the prompt)")
    base: str = _f("toy", "base model: `toy`, a diffusers T2V or AnimateDiff folder, or a hub id")
    motion_adapter: str = _f("", "AnimateDiff MotionAdapter folder or hub id that animates an image-model --base "
                             "(e.g. Stable Diffusion 1.5 + animatediff-motion-adapter-v1-5-2)")
    absorbers: str = _f("both", "appearance absorbers: none | s-lora | ti | both")
    s_lora_from: str = _f("", "start from this existing image LoRA (.safetensors, e.g. an SD 1.5 LoRA of the subject) "
                          "as the S-LoRA absorber: skips stage 1 (absorbers are then exactly the given ones)")
    ti_from: str = _f("", "start from this existing textual-inversion embedding (.safetensors) as the TI absorber: "
                      "skips stage 1 (absorbers are then exactly the given ones)")
    placement: str = _f("cav", "LoRA placement preset: cav | motiondirector")
    # T-LoRA (stage 2)
    steps: int = _f(300, "T-LoRA training steps")
    t_lora_rank: int = _f(4, "T-LoRA rank")
    t_lora_alpha: float = _f(1.0, "T-LoRA alpha")
    t_lora_lr: float = _f(5e-4, "T-LoRA learning rate")
    t_lora_timesteps: list = _f([0, 1000], "T-LoRA trains on timesteps in [low, high): raise low to stress the "
                                "high-noise steps where motion and layout form")
    t_lora_prompt_dropout: float = _f(0.0, "fraction of T-LoRA steps on the empty prompt, so the unconditional "
                                      "branch of guidance carries the motion too (0: the paper's recipe)")
    t_lora_batch: int = _f(1, "copies of the clip per T-LoRA step, each with its own noise and timestep (a "
                           "less noisy gradient for the same clip)")
    # appearance absorbers (stage 1)
    absorber_steps: int = _f(100, "absorber training steps (S-LoRA and textual inversion train together)")
    s_lora_rank: int = _f(1, "S-LoRA rank")
    s_lora_alpha: float = _f(0.5, "S-LoRA alpha")
    s_lora_lr: float = _f(5e-5, "S-LoRA learning rate")
    ti_tokens: int = _f(4, "textual inversion: number of new tokens (2-6)")
    ti_token: str = _f("<cav>", "textual inversion placeholder token (put it in the prompts or it is prefixed)")
    ti_init: str = _f("object", "textual inversion: word whose embedding initialises the new tokens")
    ti_lr: float = _f(5e-5, "textual inversion learning rate")
    absorber_batch: int = _f(4, "frames per absorber step (unordered, patch-cropped)")
    crop_ratio: list = _f([0.33, 0.67], "patch crop side ratio range for the absorbers")
    # data
    frames: int = _f(16, "frames sampled uniformly from the reference video")
    size: list = _f([256, 256], "training size [height, width] in pixels")
    fit: str = _f("crop", "fit the video to the size: crop | pad")
    # schedule
    seed: int = _f(0, "seed for every random choice (same seed, same device → same adapter)")
    checkpoint_every: int = _f(100, "save a T-LoRA checkpoint with validation samples every N steps (0: only the end)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    # validation / sampling
    validation_prompts: list = _f([], "prompts sampled at each checkpoint (default: the prompt)")
    validation_seed: int = _f(0, "seed of validation samples")
    sample_steps: int = _f(25, "denoising steps for validation samples")
    guidance: float = _f(9.0, "classifier-free guidance scale for validation samples")
    lora_weight: float = _f(1.0, "T-LoRA weight in validation samples, recorded as the default weight of "
                            "`cav generate --adapter RUN` (a smaller scale keeps more of the new appearance)")
    # system
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = _f("auto", "frozen-weight dtype: auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16")
    gradient_checkpointing: str = _f("auto", "auto (on for GPUs under 16 GB) | on | off")
    cache_inputs: bool = _f(True, "encode frames and prompts once and reuse them every step")
    offload_frozen: bool = _f(False, "move the VAE and text encoder to CPU during the training loop")
    compile: bool = _f(False, "torch.compile the UNet")

    def __post_init__(self):
        if self.s_lora_from or self.ti_from:  # given absorbers replace stage 1: they are the run's absorbers
            self.absorbers = {(True, True): "both", (True, False): "s-lora", (False, True): "ti"}[
                (bool(self.s_lora_from), bool(self.ti_from))]
        if self.absorbers not in ABSORBERS:
            raise CavError(f"unknown --absorbers '{self.absorbers}': use one of {', '.join(ABSORBERS)}")
        if self.placement not in PLACEMENTS:
            raise CavError(f"unknown --placement '{self.placement}': use one of {', '.join(PLACEMENTS)}")
        if self.steps < 0 or self.absorber_steps < 0:
            raise CavError("--steps and --absorber-steps must be ≥ 0")
        if not 1 <= self.t_lora_batch <= 64:
            raise CavError(f"--t-lora-batch {self.t_lora_batch} is out of range: use 1-64")
        if not 1 <= self.ti_tokens <= 16:
            raise CavError(f"--ti-tokens {self.ti_tokens} is out of range: use 2-6 (the paper's range)")
        if self.frames < 1:
            raise CavError(f"--frames must be ≥ 1, got {self.frames}")
        if isinstance(self.size, int):
            self.size = [self.size, self.size]
        self.size = [int(s) for s in self.size]
        if len(self.size) != 2 or min(self.size) < 8:
            raise CavError(f"--size {self.size} is invalid: pass H or HxW, each ≥ 8")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi <= 1:
            raise CavError(f"crop_ratio {self.crop_ratio} is invalid: need 0 < low ≤ high ≤ 1")
        lo_t, hi_t = (int(v) for v in self.t_lora_timesteps)
        if not 0 <= lo_t < hi_t:
            raise CavError(f"t_lora_timesteps {self.t_lora_timesteps} is invalid: need 0 ≤ low < high")
        if not 0.0 <= float(self.t_lora_prompt_dropout) < 1.0:
            raise CavError(f"t_lora_prompt_dropout {self.t_lora_prompt_dropout} is invalid: pass a value in [0, 1)")
        if self.fit not in ("crop", "pad"):
            raise CavError(f"unknown --fit '{self.fit}': use crop or pad")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise CavError("--gradient-checkpointing must be auto, on or off")
        if not 0 < float(self.lora_weight) <= 4:
            raise CavError(f"lora_weight {self.lora_weight} is invalid: pass a weight in (0, 4], e.g. 1.0")
        for name in ("t_lora_lr", "s_lora_lr", "ti_lr"):
            if getattr(self, name) <= 0:
                raise CavError(f"{name} must be > 0")

    # --- helpers -------------------------------------------------------------------------------------------
    @property
    def uses_s_lora(self) -> bool:
        return self.absorbers in ("s-lora", "both")

    @property
    def uses_ti(self) -> bool:
        return self.absorbers in ("ti", "both")

    @property
    def absorbers_given(self) -> bool:
        """Absorbers come from existing files (``--s-lora-from``/``--ti-from``): no stage 1."""
        return bool(self.s_lora_from or self.ti_from)

    def lora_config(self, kind: str, family: str = "unet3d"):
        """The peft ``LoraConfig`` of this recipe's S-LoRA (``kind="spatial"``) or T-LoRA (``"temporal"``) on a base of
        ``family`` (``Backbone.family``)."""
        from .adapters.lora import lora_config

        rank, alpha = ((self.s_lora_rank, self.s_lora_alpha) if kind == "spatial"
                       else (self.t_lora_rank, self.t_lora_alpha))
        return lora_config(kind, self.placement, rank, alpha, family)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise CavError(f"unknown recipe key(s) {', '.join(unknown)}: see `cav train --help` for the valid names")
        return cls(**data)


def load_recipe(path: str | Path) -> dict:
    """Read a YAML recipe into a dict of TrainConfig fields (validated when the config is built)."""
    path = Path(path)
    if not path.is_file():
        builtin = Path(__file__).resolve().parents[2] / "configs" / f"{path}"
        if builtin.is_file():
            path = builtin
        else:
            raise CavError(f"recipe '{path}' does not exist: pass a YAML file such as configs/modelscope.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CavError(f"recipe '{path}' is not valid YAML ({str(exc).splitlines()[0]}): fix the file") from None
    if not isinstance(data, dict):
        raise CavError(f"recipe '{path}' must be a mapping of recipe keys: see configs/modelscope.yaml")
    TrainConfig.from_dict({**data, "prompt": data.get("prompt", "x")})  # validate keys and values early
    return data


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
