"""The options of each command that are not recipe values: one dataclass per command, each field an
:func:`options.option` (its flag, type, default, help and check), from which ``cli.py`` builds the flags
(``options.add_flags(..., defaults=True)``) and reads them back as the dataclass (``options.from_args``).

Recipe values are declared in ``config.py`` (``TrainConfig``, ``SampleConfig``) and the toy bases' recipes in
``toy/``; a command whose options sit beside the code it calls declares them there (``batch.Options``,
``toy.check.CheckBaseOptions``, ``toy.train_base.TrainBaseOptions``). This module imports no torch: `cav --help`
builds every command's flags from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .options import REQUIRED, at_least, option

DTYPE = Literal["auto", "fp32", "fp16", "bf16"]
DEVICE = "auto | cpu | cuda | cuda:N"


# ---------------------------------------------------------------------------------------------- generate
@dataclass
class GenerateInputs:
    """`cav generate`: the prompt, the adapters and the base (the flags before the sampling settings)."""

    prompt: str = option(REQUIRED, "what the videos show (a textual inversion's token may appear in it)")
    adapter: list[str] | None = option(
        None, "T-LoRA: a run, checkpoint or adapter folder; WEIGHT in [0, 4] (0: off), default the run's "
        "--lora-weight, else 1 (repeatable; weights compose)", metavar="RUN_OR_ADAPTER[:WEIGHT]",
        default_text="none: the base alone")
    image_lora: list[str] | None = option(None, "spatial LoRA folder, WEIGHT in [0, 4], default 1 (repeatable)",
                                          metavar="PATH[:WEIGHT]")
    textual_inversion: list[str] | None = option(
        None, "textual inversion .safetensors file, e.g. RUN/absorbers/textual_inversion.safetensors (repeatable)",
        metavar="FILE")
    base: str | None = option(None, "base model: toy, a diffusers folder or a hub id",
                              default_text="the adapter's base, else toy")
    motion_adapter: str | None = option(None, "AnimateDiff MotionAdapter folder or hub id for an image-model --base",
                                        default_text="the adapter's own")


@dataclass
class GenerateOutput:
    """`cav generate`: where the videos go and what runs them (the flags after the sampling settings)."""

    out: str = option("out.mp4", "output video, .mp4 or .gif; the other format is written beside it (with "
                      "--num-videos N: NAME-0 … NAME-N-1). Videos are written scaled up by a whole factor (nearest "
                      "neighbour) until the longer side is ≥ 128 px, so a 32x32 toy video is written at 128x128",
                      metavar="FILE")
    overwrite: bool = option(False, "replace output files that exist")
    device: str = option("auto", DEVICE)
    dtype: DTYPE = option("auto", "weights' dtype: auto = bf16/fp16 on GPU, fp32 on CPU (fp16 is for GPUs only)")
    quiet: bool = option(False, "no progress bars")


# ------------------------------------------------------------------------------------------------- train
def _recipe_help() -> str:
    from .config import recipe_names

    return f"shipped recipe name ({', '.join(recipe_names())}) or a YAML file; flags override it"


@dataclass
class TrainCommand:
    """`cav train`: the clips, where the run goes and how the command runs (the recipe's values are
    ``config.TrainConfig``'s flags)."""

    video: list[str] = option([], "reference video (any ffmpeg format) or a folder of images; several clips of one "
                              "motion train one T-LoRA, each clip with its own absorbers and --spatial-prompt",
                              positional=True)
    recipe: str | None = option(None, _recipe_help, metavar="NAME_OR_YAML", default_text="the base's own recipe")
    out: str = option("runs/train", "run folder", metavar="DIR")
    clips: str | None = option(None, "the clips of one motion from a .csv or .yaml file with the fields clip and "
                               "spatial_prompt, one row per clip, in order (instead of clip arguments and "
                               "--spatial-prompt)", metavar="FILE")
    dry_run: bool = option(False, "print the plan without training: parameters per stage, the resolved size, frames, "
                           "steps, device and dtype, and an estimated time per stage from a few steps timed on this "
                           "machine")
    estimate: bool = option(True, "time a few steps on this machine to estimate the run's duration, with --dry-run "
                            "and at the start of a run (loads the base once more)")
    json: bool = option(False, "with --dry-run: JSON output")
    resume: bool = option(False, "continue the run in --out from its last checkpoint, with its recorded config.yaml "
                          "and frame selection")
    overwrite: bool = option(False, "replace a run already in --out")
    quiet: bool = option(False, "no progress bars")


# ----------------------------------------------------------------------------------------------------- ui
@dataclass
class UiOptions:
    """`cav ui` (``ui.layout.serve``'s arguments)."""

    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only; any other address needs --auth)")
    port: int = option(7860, "port", check=at_least(1))
    base: str = option("toy", "base model of new runs")
    runs: str = option("runs", "folder of the runs the app trains and lists", metavar="DIR")
    auth: str | None = option(None, "ask for a login as USER, with the password from --password-file or "
                              "$CAV_UI_PASSWORD (never on the command line)", metavar="USER",
                              default_text="none: only for --host 127.0.0.1")
    password_file: str | None = option(None, "file holding the --auth password", metavar="FILE",
                                       default_text="none: $CAV_UI_PASSWORD")
    max_upload_mb: int = option(500, "largest upload accepted, in MB", metavar="MB", check=at_least(1))
    share: bool = option(False, "also open a public share link (needs --auth)")


# --------------------------------------------------------------------------------------------------- demo
def _recipes_own(key: str):
    """--help's default of a demo flag that leaves each recipe its own value (read from the shipped recipes)."""

    def text() -> str:
        from .config import load_recipe

        names = ("toy", "toy-best", "toy-wan", "toy-wan-best")
        return "each recipe's own: " + ", ".join(f"{name} {load_recipe(name)[key]}" for name in names)

    return text


@dataclass
class DemoOptions:
    """`cav demo`."""

    out: str = option("runs/demo", "demo folder (videos, contact sheet, metrics.json; its run/ is replaced)",
                      metavar="DIR")
    prompts: int = option(4, "new-appearance prompts to generate", unit="prompts", check=at_least(1))
    steps: int | None = option(None, "T-LoRA training steps of every recipe", default_text=_recipes_own("steps"))
    absorber_steps: int | None = option(None, "absorber training steps of every recipe",
                                        default_text=_recipes_own("absorber_steps"))
    base: str = option("toy", "base model (a toy-world model)")
    best: bool = option(True, "also train and score each base's shipped best recipe (toy-best: MotionDirector "
                        "placement + temporal convs; toy-wan-best on the toy Wan; docs/DEMO-TUNING.md) as "
                        "metrics.json's `best` blocks and the sheets' extra column; --no-best runs the paper's recipe "
                        "alone")
    wan: bool = option(True, "also run the demo on the toy Wan (base toy-wan, a DiT; the paper's port, recipe "
                       "toy-wan, and toy-wan-best) into OUT/toy-wan/ and metrics.json's `toy-wan` block; --no-wan "
                       "runs the toy UNet alone")
    quiet: bool = option(False, "no progress bars")


# -------------------------------------------------------------------------------------------------- toy
@dataclass
class TrainBaseOptions:
    """`cav toy train-base`: which toy base and where (its recipe's flags: ``toy.train_base.BaseRecipe``, and with
    --family wan ``toy.wan_base.WanRecipe`` / ``ToyWanSpec``)."""

    family: Literal["unet", "wan"] = option("unet", "which toy base: unet (UNet3D, ModelScope's layout) or wan (a DiT "
                                            "in Wan's layout)")
    out: str | None = option(None, "model folder (its .train_state/ holds the resume state)", metavar="DIR",
                             default_text="runs/toy-base, with --family wan runs/toy-wan")
    device: str = option("auto", DEVICE + " (the toy Wan trains on the CPU)")
    restart: bool = option(False, "ignore saved state in --out and start over")
    quiet: bool = option(False, "no progress bars")


# --------------------------------------------------------------------------------------------------- eval
@dataclass
class EvalOptions:
    """`cav eval`."""

    videos: list[str] = option(REQUIRED, "generated videos (files or image folders)", positional=True)
    prompt: str = option(REQUIRED, "the prompt the videos were generated for")
    reference: str | None = option(None, "reference video, for the motion metrics",
                                   default_text="none: no motion metrics")
    clip: str | None = option(None, "CLIP model folder or hub id (a hub id is only looked up in the local cache)",
                              default_text="openai/clip-vit-large-patch14")
    lpips: str | None = option(None, "LPIPS AlexNet weights (.safetensors)", metavar="FILE",
                               default_text="$CAV_LPIPS, else ~/.cache/cav/lpips_alex.safetensors")
    metrics: str | None = option(None, "comma-separated metric names", metavar="NAMES",
                                 default_text="every metric whose inputs and weights are available")
    json: bool = option(False, "JSON output")


# -------------------------------------------------------------------------------------------------- bench
@dataclass
class SpeedOptions:
    """`cav bench speed`."""

    device: str = option("auto", DEVICE)
    size: Literal["full", "tiny"] = option("full", "model size: full (ModelScope's shapes) or tiny (a smoke test)")
    json: bool = option(False, "JSON output")
    quick: bool = option(False, "fewer timed steps (1 warm-up, 2 timed)")
    only: str | None = option(None, "comma-separated cases or groups (timing, compile, counts, graph_breaks, flops, "
                              "wan: the Wan 2.1 1.3B row)", metavar="CASES", default_text="every case")


@dataclass
class AblationOptions:
    """`cav bench ablation`."""

    recipe: str = option("ablation/toy", "ablation file: a shipped name or a YAML path", metavar="NAME_OR_YAML")
    quick: bool = option(False, "a CI-sized run: every row, one reference, a few steps")
    out: str = option("runs/ablation", "folder for runs, samples and ablation.json|md", metavar="DIR")
    json: bool = option(False, "print JSON instead of the markdown table")


# ------------------------------------------------------------------------------------------------- export
@dataclass
class ExportOptions:
    """`cav export` (the formats are not listed from cav.export: importing it would make every --help load peft)."""

    run: str = option(REQUIRED, "run, checkpoint or T-LoRA folder", positional=True)
    format: str | None = option(None, "target layout: animatediff (the original MotionLoRA key layout) or comfyui "
                                "(Wan's original names)", metavar="FORMAT",
                                default_text="the first layout of the run's base family")
    out: str | None = option(None, "output .safetensors", metavar="FILE",
                             default_text="RUN/export/<the format's file name>")
    overwrite: bool = option(False, "replace an existing output file")


# ------------------------------------------------------------------------------------------------- select
@dataclass
class SelectOptions:
    """`cav select`."""

    run: str = option(REQUIRED, "run folder of `cav train`", positional=True)
    clip: str | None = option(None, "CLIP folder or cached hub id for text alignment",
                              default_text="openai/clip-vit-large-patch14 if cached, else left out")
    json: bool = option(False, "JSON output")
