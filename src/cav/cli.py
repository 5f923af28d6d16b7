"""Command line: parse arguments, call one API function, print, set the exit code.

Every ``CavError`` and every bad flag becomes one line on stderr and exit code 2; Ctrl-C exits 130. Flags of
``train`` and ``generate`` come from the ``TrainConfig`` / ``SampleConfig`` fields (help, defaults and units from
their metadata), so a flag and a recipe key are one list and follow one parsing rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Literal

from . import __version__
from . import options
from .errors import CavError

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DTYPE = Literal["auto", "fp32", "fp16", "bf16"]
POSITIVE = "a whole number ≥ 1"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in cav's format (argparse prints the usage block and names internal dests)."""

    def error(self, message: str):
        self.exit(2, f"cav: error: {message} (see `{self.prog} --help`)\n")



def _memory_line(memory: dict) -> str:
    """The dry run's memory estimate in one line (the family's ``memory``: Wan)."""
    gib = memory["gib"]
    return (f"memory (estimate): peak {gib['peak']} GiB on {memory['device']} in {memory['dtype']} — load + text "
            f"encoding (umT5 once per text, then released) {gib['text_encoding']} GiB, stage 1 (absorbers) "
            f"{gib['stage_1']} GiB, stage 2 (T-LoRA steps) {gib['stage_2']} GiB, "
            f"checkpoints (validation samples) {gib['checkpoints']} GiB; checkpointing "
            f"{'on' if memory['checkpointing'] else 'off'}, offload-frozen {'on' if memory['offload_frozen'] else 'off'}"
            f"; not counted: {memory['not_counted']}")

def _opt(p: argparse.ArgumentParser, flag: str, help: str, default=None, unit: str = "", **kw) -> None:
    """A hand-written flag whose help states its default (with its unit)."""
    if default is not None and kw.get("action") not in ("store_true", "append"):
        help += f" [default: {default}{' ' + unit if unit else ''}]"
    p.add_argument(flag, default=default, help=help.replace("%", "%%"), **kw)


def _positive(text: str) -> int:
    value = options.arg_type(int)(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not {POSITIVE}")
    return value


def _choose(p: argparse.ArgumentParser, what: str, names: str):
    """A command group run without a command: say which commands exist (argparse would name its internal dest)."""

    def fail(args) -> int:
        raise CavError(f"choose {what}: {names} (see `{p.prog} --help`)")

    p.set_defaults(func=fail)


# ------------------------------------------------------------------------------------------------- train
def build_config(args: argparse.Namespace):
    """Recipe values, then explicit flags; with --resume the run's own config.yaml is the starting point. Without
    --recipe the base's own recipe is (``native.BASES``: toy → toy, ModelScope → modelscope, …);
    ``args.recipe_used`` says which recipe the values came from."""
    from .config import TrainConfig, load_recipe

    given = options.given(args, TrainConfig)
    options.typed_keys(TrainConfig, given)  # a flag's bad value is named before the base is read (and torch imported)
    saved = Path(args.out) / "config.yaml"
    if getattr(args, "resume", False) and saved.is_file():
        data, args.recipe_used = load_recipe(saved), f"the run's own {saved}"
    elif args.recipe:
        data, args.recipe_used = load_recipe(args.recipe), f"{args.recipe} (--recipe)"
    else:
        from . import native

        row, data = native.starting_recipe(args.base, args.motion_adapter)
        args.recipe_used = f"{row.recipe}, the base's own ({row.what}; --recipe picks another)"
    data.update(given)
    return TrainConfig.from_dict(data)


def cmd_train(args) -> int:
    cfg = build_config(args)  # bad recipe values and flags fail here, before the libraries load
    if args.clips:  # the clips (and their spatial prompts) from a manifest
        from .clips import apply

        args.video, cfg = apply(args.clips, args.video, cfg, args.spatial_prompt is not None)
    _quiet_libraries()
    from . import api
    from .estimate import format_statement

    if args.dry_run:
        result = api.plan(cfg, clips=max(1, len(args.video)), estimate=args.estimate)
        result["recipe"] = args.recipe_used
        if args.json:
            print(json.dumps(result))
        else:
            print(f"base {result['base']} ({result['family']}): {result['model_class']} {result['unet_params']:,} "
                  "parameters; "
                  f"placement {result['placement']}"
                  + (f"; {result['clips']} clips, each with its own absorbers, one T-LoRA" if "clips" in result else ""))
            for s in result["stages"]:
                own = f"  clip {s['clip'] + 1}: {s['spatial_prompt']}" if "clip" in s else ""
                own += f"  on {s['expert']} (--experts {result['experts']})" if "expert" in s else ""
                own += (f"  at most: it trains the {s['heads_share']:.0%} of heads measured on the clip"
                        if "upper_bound" in s else "")
                print(f"  {s['name']:<18} {s['trainable_params']:>12,} trainable parameters in {s['modules']} modules{own}")
            print(f"recipe: {result['recipe']}")
            if "memory" in result:
                print(_memory_line(result["memory"]))
            print(format_statement(result))
        if result["warning"]:
            print(result["warning"], file=sys.stderr)
        return 0
    if not args.video:
        raise CavError("no reference video given: pass `cav train VIDEO --prompt ...`")
    video = args.video[0] if len(args.video) == 1 else args.video
    announce = None if args.quiet else (lambda info: print(f"recipe: {args.recipe_used}\n{format_statement(info)}",
                                                           flush=True))
    out = api.train(video, cfg, args.out, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet,
                    announce=announce, estimate=args.estimate)
    print(done_line(out))
    return 0


def done_line(out: Path) -> str:
    """What a finished `cav train` wrote, naming only folders that exist (never a T-LoRA that was not saved)."""
    parts = [f"{what} in {out / name}" for what, name in (("T-LoRA", "t_lora"), ("samples", "samples"),
                                                           ("checkpoints", "checkpoints")) if (out / name).is_dir()]
    return "done: " + (", ".join(parts) if parts else f"no T-LoRA was written to {out}")


def _interrupt_hint(args) -> str:
    """What to do after Ctrl-C in `cav train` (resume only when a checkpoint exists) or `cav batch`; paths are quoted
    for the shell."""
    from . import resume, runfolder

    if getattr(args, "command", None) == "batch":
        again = [args.manifest, "--out", args.out] + (["--recipe", args.recipe] if args.recipe else []) + (
            ["--address", args.address] if args.address else [])
        return f"; running rows checkpointed their last step: continue with `cav batch {shlex.join(again)}`"
    if getattr(args, "command", None) != "train" or not getattr(args, "video", None):
        return ""
    out = Path(args.out)
    clips = ["--clips", str(args.clips)] if getattr(args, "clips", None) else [str(v) for v in args.video]
    if resume.latest(out) is not None:
        return (f"; the last completed step is checkpointed: continue with "
                f"`cav train {shlex.join(clips)} --resume --out {shlex.quote(str(out))}`")
    if runfolder.holds_run(out):  # not a leftover lock file (.cav.lock) of a killed run: that is no run
        return "; no checkpoint was saved yet, so there is nothing to resume: start over with --overwrite"
    return "; no checkpoint was saved yet: run the same command again"


def _add_train(sub) -> None:
    from .config import TrainConfig, recipe_names

    t = sub.add_parser("train", help="train absorbers then a T-LoRA on one reference video",
                       description="Train absorbers then a T-LoRA on one reference video. Values come from "
                                   "--recipe (without it: the base's own recipe, toy for the toy base, modelscope "
                                   "for ModelScope, zeroscope, animatediff, animatediff-sdxl), then the flags given "
                                   "(with --resume: the run's config.yaml, then the flags given); the defaults shown "
                                   "fill keys a recipe leaves out. Every flag --a-b is the recipe key a_b, in a recipe "
                                   "file at the top or in the section its group names (--t-lora-rank: motion: rank).")
    t.add_argument("video", nargs="*", help="reference video (any ffmpeg format) or a folder of images; several "
                   "clips of one motion train one T-LoRA, each clip with its own absorbers and --spatial-prompt")
    _opt(t, "--recipe", f"shipped recipe name ({', '.join(recipe_names())}) or a YAML file; flags override it "
         "[default: the base's own recipe]", metavar="NAME_OR_YAML")
    _opt(t, "--out", "run folder", "runs/train", metavar="DIR")
    _opt(t, "--clips", "the clips of one motion from a .csv or .yaml file with the fields clip and spatial_prompt, "
         "one row per clip, in order (instead of clip arguments and --spatial-prompt) [default: none]", metavar="FILE")
    t.add_argument("--dry-run", action="store_true", help="print the plan without training: parameters per stage, "
                   "the resolved size, frames, steps, device and dtype, and an estimated time per stage from a few "
                   "steps timed on this machine")
    t.add_argument("--estimate", action=argparse.BooleanOptionalAction, default=True,
                   help="time a few steps on this machine to estimate the run's duration, with --dry-run and at the "
                        "start of a run (loads the base once more) [default: on]")
    t.add_argument("--json", action="store_true", help="with --dry-run: JSON output")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with its "
                                                        "recorded config.yaml and frame selection")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    options.add_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train, command="train")


# ---------------------------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from .config import SampleConfig, parse_weighted

    adapters = [parse_weighted(a, "--adapter") for a in args.adapter or []]
    image_loras = [parse_weighted(a, "--image-lora") for a in args.image_lora or []]
    _quiet_libraries()
    from . import api

    given = options.given(args, SampleConfig)  # over the first adapter's recorded settings (else the defaults)
    paths = api.generate(args.prompt, adapters, **given, image_loras=image_loras,
                         textual_inversions=args.textual_inversion or [], base=args.base, out=args.out,
                         overwrite=args.overwrite, device=args.device, dtype=args.dtype, quiet=args.quiet,
                         motion_adapter=args.motion_adapter)
    for p in paths:
        print(f"wrote {p} and {p.with_suffix('.gif' if p.suffix.lower() == '.mp4' else '.mp4')}{_written_size(p)}")
    return 0


def _written_size(path: Path) -> str:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return f" ({stream.frames or '?'} frames, {stream.height}x{stream.width} px)"


def cmd_select(args) -> int:
    _quiet_libraries()
    from . import api

    from .selection import format_text

    result = api.select(args.run, clip=args.clip)
    print(json.dumps(result) if args.json else format_text(result))
    return 0


def _add_select(sub) -> None:
    s = sub.add_parser("select", help="score a run's checkpoints against its reference; publish the best as RUN/selected")
    s.add_argument("run", help="run folder of `cav train`")
    _opt(s, "--clip", "CLIP folder or cached hub id for text alignment [default: openai/clip-vit-large-patch14 if "
         "cached, else left out]")
    s.add_argument("--json", action="store_true", help="JSON output")
    s.set_defaults(func=cmd_select)


def _add_generate(sub) -> None:
    from .config import SampleConfig

    g = sub.add_parser("generate", help="sample videos with T-LoRA(s) on a base model",
                       description="Sample videos with T-LoRA(s). Unset sampling flags take the first --adapter's "
                                   "recorded values (frames, size, steps, guidance), else the defaults shown.")
    _opt(g, "--prompt", "what the videos show (a textual inversion's token may appear in it)", required=True)
    _opt(g, "--adapter", "T-LoRA: a run, checkpoint or adapter folder; WEIGHT in [0, 4] (0: off), default the run's "
         "--lora-weight, else 1 (repeatable; weights compose) [default: none: the base alone]", action="append",
         metavar="RUN_OR_ADAPTER[:WEIGHT]")
    _opt(g, "--image-lora", "spatial LoRA folder, WEIGHT in [0, 4], default 1 (repeatable) [default: none]",
         action="append", metavar="PATH[:WEIGHT]")
    _opt(g, "--textual-inversion", "textual inversion .safetensors file, e.g. RUN/absorbers/"
         "textual_inversion.safetensors (repeatable) [default: none]", action="append", metavar="FILE")
    _opt(g, "--base", "base model: toy, a diffusers folder or a hub id [default: the adapter's base, else toy]")
    _opt(g, "--motion-adapter", "AnimateDiff MotionAdapter folder or hub id for an image-model --base [default: the "
         "adapter's own]")
    recorded = dict.fromkeys(("frames", "steps", "guidance"), "the adapter's, else ")
    options.add_flags(g, SampleConfig, before_default=recorded)
    _opt(g, "--out", "output video, .mp4 or .gif; the other format is written beside it (with --num-videos N: "
         "NAME-0 … NAME-N-1). Videos are written scaled up by a whole factor (nearest neighbour) until the longer "
         "side is ≥ 128 px, so a 32x32 toy video is written at 128x128", "out.mp4", metavar="FILE")
    g.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    _opt(g, "--device", "auto | cpu | cuda | cuda:N", "auto")
    _opt(g, "--dtype", "weights' dtype: auto = bf16/fp16 on GPU, fp32 on CPU (fp16 is for GPUs only)", "auto",
         type=options.arg_type(DTYPE), metavar="{auto,fp32,fp16,bf16}")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=cmd_generate)


# -------------------------------------------------------------------------------------------------- batch
def cmd_batch(args) -> int:
    _quiet_libraries()
    from . import batch

    opts = batch.Options(address=args.address, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
                         max_parallel=args.max_parallel, retry_failed=args.retry_failed, quiet=args.quiet)
    steps, out = batch.prepare(args.manifest, args.out, args.recipe, args.retry_failed)
    if args.dry_run:
        print(batch.format_plan(steps, out, opts))
        return 0
    index = batch.run(steps, out, opts, args.manifest)
    print(batch.summary(index))
    return 0 if index["counts"]["finished"] == len(index["rows"]) else 1


def _add_batch(sub) -> None:
    b = sub.add_parser("batch", help="a motion library: one run per manifest row, on Ray (this machine or a cluster)")
    b.add_argument("manifest", help="CSV, JSONL or YAML: clip, prompt, spatial_prompt[, name, recipe keys] per row")
    _opt(b, "--out", "library folder: one run folder per row, index.md", "runs/library", metavar="DIR")
    _opt(b, "--recipe", "recipe for every row: a shipped name or a YAML file (a row's own recipe keys override it) "
         "[default: none: the defaults of `cav train --help`]", metavar="NAME_OR_YAML")
    _opt(b, "--address", "existing Ray cluster: ray://HOST:10001, HOST:6379 or auto [default: a private Ray on this "
         "machine]")
    _opt(b, "--gpus-per-run", "GPUs per row where the cluster has GPUs", 1.0, "GPUs", type=options.arg_type(float))
    _opt(b, "--cpus-per-run", "CPU slots per row (training threads on CPU)", 1.0, "CPU slots",
         type=options.arg_type(float))
    _opt(b, "--max-parallel", "rows at once [default: as many as fit]", type=options.arg_type(int), metavar="N")
    b.add_argument("--retry-failed", action="store_true", help="run the rows that failed before again")
    b.add_argument("--dry-run", action="store_true", help="print the plan without starting Ray")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_batch, command="batch")


# ------------------------------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    _quiet_libraries()
    from .export import export_files

    for path in export_files(args.run, args.format, args.out, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="write a run's T-LoRA in another tool's layout (e.g. AnimateDiff MotionLoRA)")
    ex.add_argument("run", help="run, checkpoint or T-LoRA folder")
    # the formats are not listed from cav.export: importing it would make every --help load peft
    _opt(ex, "--format", "target layout: animatediff (the original MotionLoRA key layout) or comfyui (Wan's "
         "original names) [default: the first layout of the run's base family]", metavar="FORMAT")
    _opt(ex, "--out", "output .safetensors [default: RUN/export/<the format's file name>]", metavar="FILE")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ex.set_defaults(func=cmd_export)


# --------------------------------------------------------------------------------------------- toy, demo
TOY_FAMILIES = {"unet": "UNet", "wan": "Wan"}  # `cav toy train-base --family` → the name its messages use


def cmd_toy_train_base(args) -> int:
    _quiet_libraries()
    from .toy.train_base import BaseRecipe
    from .toy.wan_base import ToyWanSpec, WanRecipe

    own = {"unet": (BaseRecipe,), "wan": (WanRecipe, ToyWanSpec)}  # each family's recipe (and sizes) dataclasses
    mine = {f.name for cls in own[args.family] for f in dataclasses.fields(cls)}
    for other in set(own) - {args.family}:
        for cls in own[other]:
            stray = sorted(set(options.given(args, cls)) - mine)
            if stray:
                flag = "--" + stray[0].replace("_", "-")
                raise CavError(f"{flag} is a flag of the toy {TOY_FAMILIES[other]}, not of the toy "
                               f"{TOY_FAMILIES[args.family]}: drop it or pass --family {other}")
    return _TOY_TRAINERS[args.family](args)


def _train_toy_unet(args) -> int:
    from .toy.train_base import BaseRecipe, train_base

    recipe = BaseRecipe(**options.typed(BaseRecipe, options.given(args, BaseRecipe)))
    stats = train_base(args.out or "runs/toy-base", recipe, device=args.device, quiet=args.quiet,
                       resume=not args.restart)
    print(json.dumps({k: v for k, v in stats.items() if k != "loss_log"}))
    return 0


def _train_toy_wan(args) -> int:
    from .toy.wan_base import ToyWanSpec, WanRecipe, train_wan_base

    if args.device not in ("auto", "cpu"):
        raise CavError(f"--device {args.device}: the toy Wan's trainer runs on the CPU only: pass --device cpu")
    recipe = WanRecipe(**options.typed(WanRecipe, options.given(args, WanRecipe)))
    spec = ToyWanSpec(**options.typed(ToyWanSpec, options.given(args, ToyWanSpec)))
    stats = train_wan_base(args.out or "runs/toy-wan", recipe, spec, quiet=args.quiet, resume=not args.restart)
    print(json.dumps({k: v for k, v in stats.items() if k not in ("log", "vae_log", "recipe", "spec")}))
    return 0


_TOY_TRAINERS = {"unet": _train_toy_unet, "wan": _train_toy_wan}


def cmd_toy_check_base(args) -> int:
    _quiet_libraries()
    from .metrics import shown
    from .toy.check import check_base

    result = check_base(args.base, n=args.videos, heldout=args.heldout, seed=args.seed, steps=args.steps,
                        device=args.device, quiet=args.quiet)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<24} {shown(v)}")
    return 0


def cmd_demo(args) -> int:
    _quiet_libraries()
    from .toy.demo import run_demo, summary

    overrides = {k: v for k, v in (("steps", args.steps), ("absorber_steps", args.absorber_steps)) if v is not None}
    metrics = run_demo(args.out, prompts=args.prompts, overrides=overrides, quiet=args.quiet, base=args.base,
                       best=args.best, wan=args.wan)
    print(summary(metrics, Path(args.out)))
    return 0


def _add_toy(sub, flags: bool = True) -> None:
    """``flags`` False: the command's name and help only (its flags need torch and diffusers: seconds to import)."""
    toy = sub.add_parser("toy", help="the embedded toy world: train or check its base model")
    _choose(toy, "a toy command", "train-base, check-base")
    if not flags:
        return
    from .toy.check import TOY_STEPS
    from .toy.train_base import BaseRecipe
    from .toy.wan_base import TOY_WAN, ToyWanSpec, WanRecipe

    cmds = toy.add_subparsers(title="commands", metavar="COMMAND")
    tb = cmds.add_parser("train-base", help="train the toy T2V base model (seeded, resumable)")
    _opt(tb, "--family", "which toy base: unet (UNet3D, ModelScope's layout) or wan (a DiT in Wan's layout)",
         "unet", type=options.arg_type(Literal["unet", "wan"]), metavar="{unet,wan}")
    tb.add_argument("--out", metavar="DIR", help="model folder (its .train_state/ holds the resume state) "
                    "[default: runs/toy-base, with --family wan runs/toy-wan]")
    _opt(tb, "--device", "auto | cpu | cuda | cuda:N (the toy Wan trains on the CPU)", "auto")
    tb.add_argument("--restart", action="store_true", help="ignore saved state in --out and start over")
    tb.add_argument("--quiet", action="store_true", help="no progress bars")
    options.add_flags(tb, BaseRecipe)
    unet = {f.name for f in dataclasses.fields(BaseRecipe)}
    shared = [f for f in dataclasses.fields(WanRecipe) if f.name in unet]
    wan = tb.add_argument_group(
        "--family wan", "the toy Wan's recipe and sizes. With --family wan, the flags above that both share "
        "default to: " + ", ".join(f"--{f.name.replace('_', '-')} {f.default}" for f in shared))
    options.add_flags(wan, WanRecipe, skip=tuple(unet))
    options.add_flags(wan, ToyWanSpec, skip=("patch", "vae_dim_mult"))
    tb.set_defaults(func=cmd_toy_train_base)
    cb = cmds.add_parser("check-base", help="score a base model's videos against the toy world's ground truth")
    _opt(cb, "--base", f"base model to check: toy, {TOY_WAN} (sampled by the stock WanPipeline) or a folder of "
         "either", "toy")
    _opt(cb, "--videos", "seen-motion videos to generate and score", 64, "videos", type=_positive)
    _opt(cb, "--heldout", "held-out-motion videos (the base must not make these motions)", 24, "videos",
         type=_positive)
    _opt(cb, "--steps", "denoising steps per video", TOY_STEPS, "steps", type=_positive)
    _opt(cb, "--seed", "seed of the prompts drawn and of the videos' noise", 0, type=options.arg_type(int))
    _opt(cb, "--device", "auto | cpu | cuda | cuda:N", "auto")
    cb.add_argument("--json", action="store_true", help="JSON output")
    cb.add_argument("--quiet", action="store_true", help="no progress bar")
    cb.set_defaults(func=cmd_toy_check_base)


def _add_demo(sub) -> None:
    from .config import load_recipe

    toy, best, wan = load_recipe("toy"), load_recipe("toy-best"), load_recipe("toy-wan")
    own = "[default: each recipe's own: toy {}, toy-best {}, toy-wan {}]"  # None: a recipe keeps its own schedule
    d = sub.add_parser("demo", help="the whole method on the toy bases (toy UNet, toy Wan), scored against ground truth")
    _opt(d, "--out", "demo folder (videos, contact sheet, metrics.json; its run/ is replaced)", "runs/demo",
         metavar="DIR")
    _opt(d, "--prompts", "new-appearance prompts to generate", 4, "prompts", type=_positive)
    _opt(d, "--steps", "T-LoRA training steps of every recipe "
         + own.format(toy["steps"], best["steps"], wan["steps"]), type=options.arg_type(int))
    _opt(d, "--absorber-steps", "absorber training steps of every recipe "
         + own.format(toy["absorber_steps"], best["absorber_steps"], wan["absorber_steps"]),
         type=options.arg_type(int))
    _opt(d, "--base", "base model (a toy-world model)", "toy")
    d.add_argument("--best", action=argparse.BooleanOptionalAction, default=True,
                   help="also train and score the shipped toy-best recipe (MotionDirector placement + temporal convs, "
                        "docs/RESULTS.md) as metrics.json's `best` and the side-by-side GIF's extra column; --no-best "
                        "runs the paper's recipe alone [default: on]")
    d.add_argument("--wan", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the demo on the toy Wan (base toy-wan, a DiT; the paper's port, recipe toy-wan) "
                        "into OUT/toy-wan/ and metrics.json's `toy-wan` block; it has no best recipe yet (the block "
                        "says why); --no-wan runs the toy UNet alone [default: on]")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------------------------------------- eval, bench
def cmd_eval(args) -> int:
    _quiet_libraries()
    from .evaluate import evaluate, format_text
    from .metrics.clip_score import DEFAULT_CLIP

    result = evaluate(args.videos, args.prompt, reference=args.reference, clip=args.clip or DEFAULT_CLIP,
                      lpips=args.lpips, metrics=args.metrics.split(",") if args.metrics else None)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_text(result))
    return 0


def cmd_bench_speed(args) -> int:
    _quiet_libraries()
    from .bench.speed import format_table, run_speed

    only = [c.strip() for c in args.only.split(",") if c.strip()] if args.only else None
    result = run_speed(args.device, args.size, quick=args.quick, only=only)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def cmd_bench_ablation(args) -> int:
    _quiet_libraries()
    from .bench.ablation import format_markdown, run_ablation, write_outputs

    result = run_ablation(args.recipe, quick=args.quick, out=args.out, command="cav " + shlex.join(args.argv))
    write_outputs(result, args.out)
    print(json.dumps(result) if args.json else format_markdown(result))
    return 0


def _add_eval_bench(sub) -> None:
    ev = sub.add_parser("eval", help="score generated videos (CLIPScore, LPIPS, motion fidelity, toy truth)")
    ev.add_argument("videos", nargs="+", help="generated videos (files or image folders)")
    _opt(ev, "--prompt", "the prompt the videos were generated for", required=True)
    _opt(ev, "--reference", "reference video, for the motion metrics [default: none: no motion metrics]")
    _opt(ev, "--clip", "CLIP model folder or hub id (a hub id is only looked up in the local cache) "
         "[default: openai/clip-vit-large-patch14]")
    _opt(ev, "--lpips", "LPIPS AlexNet weights (.safetensors) [default: $CAV_LPIPS, else "
         "~/.cache/cav/lpips_alex.safetensors]", metavar="FILE")
    _opt(ev, "--metrics", "comma-separated metric names [default: every metric whose inputs and weights are "
         "available]", metavar="NAMES")
    ev.add_argument("--json", action="store_true", help="JSON output")
    ev.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks (JSON and markdown output)")
    _choose(bench, "a benchmark", "speed, ablation")
    cmds = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    bs = cmds.add_parser("speed", help="training/generation step time, memory and FLOPs at full ModelScope size")
    _opt(bs, "--device", "auto | cpu | cuda | cuda:N", "auto")
    _opt(bs, "--size", "model size: full (ModelScope's shapes) or tiny (a smoke test)", "full",
         type=options.arg_type(Literal["full", "tiny"]), metavar="{full,tiny}")
    bs.add_argument("--json", action="store_true", help="JSON output")
    bs.add_argument("--quick", action="store_true", help="fewer timed steps (1 warm-up, 2 timed)")
    bs.add_argument("--only", metavar="CASES", help="comma-separated cases or groups (timing, compile, counts, "
                    "graph_breaks, flops, wan: the Wan 2.1 1.3B row) [default: every case]")
    bs.set_defaults(func=cmd_bench_speed)
    ba = cmds.add_parser("ablation", help="the paper's Table 1 rows in the toy world, with 95%% bootstrap CIs")
    _opt(ba, "--recipe", "ablation file: a shipped name or a YAML path", "ablation/toy", metavar="NAME_OR_YAML")
    ba.add_argument("--quick", action="store_true", help="a CI-sized run: every row, one reference, a few steps")
    _opt(ba, "--out", "folder for runs, samples and ablation.json|md", "runs/ablation", metavar="DIR")
    ba.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    ba.set_defaults(func=cmd_bench_ablation)


def cmd_ui(args) -> int:
    check_runs_folder(args.runs)  # before gradio loads and the server starts
    _quiet_libraries()
    from .ui.layout import serve

    return serve(host=args.host, port=args.port, base=args.base, runs=args.runs, auth=args.auth, share=args.share,
                 password_file=args.password_file, max_upload_mb=args.max_upload_mb)


def check_runs_folder(runs) -> None:
    """`cav ui --runs`: a folder the app can write (created if missing), or one line naming the problem."""
    from .runfolder import check_writable

    path = Path(runs)
    if path.exists() and not path.is_dir():
        raise CavError(f"--runs '{runs}' is a file: pass a folder for the app's runs (it is created if missing)")
    check_writable(path, "--runs")


def _add_ui(sub) -> None:
    ui = sub.add_parser("ui", help="the web app (train, generate, browse runs) on a local address")
    _opt(ui, "--host", "address to bind (127.0.0.1: this machine only; any other address needs --auth)",
         "127.0.0.1")
    _opt(ui, "--port", "port", 7860, type=_positive)
    _opt(ui, "--base", "base model of new runs", "toy")
    _opt(ui, "--runs", "folder of the runs the app trains and lists", "runs", metavar="DIR")
    _opt(ui, "--auth", "ask for a login as USER, with the password from --password-file or $CAV_UI_PASSWORD "
         "(never on the command line) [default: none: only for --host 127.0.0.1]", metavar="USER")
    _opt(ui, "--password-file", "file holding the --auth password [default: none: $CAV_UI_PASSWORD]",
         metavar="FILE")
    _opt(ui, "--max-upload-mb", "largest upload accepted, in MB", 500, type=_positive, metavar="MB")
    ui.add_argument("--share", action="store_true", help="also open a public share link (needs --auth)")
    ui.set_defaults(func=cmd_ui, command="ui")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with ``command`` (the one being run) the others that are slow to build (toy) get
    their name and help only, so `cav --help` and `cav train ...` do not import torch and diffusers to parse."""
    parser = _Parser(prog="cav", description="One-shot motion customization of text-to-video models")
    parser.add_argument("--version", action="version", version=f"cav {__version__}")
    _choose(parser, "a command", "train, generate, select, batch, export, demo, eval, toy, bench, ui")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_train(sub)
    _add_generate(sub)
    _add_select(sub)
    _add_batch(sub)
    _add_export(sub)
    _add_toy(sub, flags=command in (None, "toy"))
    _add_demo(sub)
    _add_eval_bench(sub)
    _add_ui(sub)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (deprecation notices, weight-loading bars) is not for our users' terminals. Each command calls
    it once its own arguments are checked: importing diffusers takes seconds, a typo's message should not."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else "")
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except CavError as exc:
        print(f"cav: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cav: interrupted{_interrupt_hint(args)}", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
