"""Command line: parse arguments, call one API function, print, set the exit code.

Every ``CavError`` and every bad flag becomes one line on stderr and exit code 2; Ctrl-C exits 130. Every flag is
built by ``options.add_flags`` from a dataclass field (help, default, unit and check from its metadata): recipe values
from the ``TrainConfig`` / ``SampleConfig`` fields, so a flag and a recipe key are one list and follow one parsing
rule; each command's own options from its dataclass in ``commands.py`` (``batch.Options``,
``toy.check.CheckBaseOptions`` beside their code), read back with ``options.from_args``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

from . import __version__
from . import options
from .errors import CavError

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


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
    from .commands import TrainCommand

    run = options.from_args(TrainCommand, args)
    cfg = build_config(args)  # bad recipe values and flags fail here, before the libraries load
    if run.clips:  # the clips (and their spatial prompts) from a manifest (args.video: Ctrl-C's hint names them)
        from .clips import apply

        args.video, cfg = apply(run.clips, args.video, cfg, args.spatial_prompt is not None)
    _quiet_libraries()
    from . import api
    from .estimate import format_statement

    if run.dry_run:
        result = api.plan(cfg, clips=max(1, len(args.video)), estimate=run.estimate)
        result["recipe"] = args.recipe_used
        if run.json:
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
    announce = None if run.quiet else (lambda info: print(f"recipe: {args.recipe_used}\n{format_statement(info)}",
                                                           flush=True))
    out = api.train(video, cfg, run.out, overwrite=run.overwrite, resume=run.resume, quiet=run.quiet,
                    announce=announce, estimate=run.estimate)
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
    from .commands import TrainCommand
    from .config import TrainConfig

    t = sub.add_parser("train", help="train absorbers then a T-LoRA on one reference video",
                       description="Train absorbers then a T-LoRA on one reference video. Values come from "
                                   "--recipe (without it: the base's own recipe, toy for the toy base, modelscope "
                                   "for ModelScope, zeroscope, animatediff, animatediff-sdxl), then the flags given "
                                   "(with --resume: the run's config.yaml, then the flags given); the defaults shown "
                                   "fill keys a recipe leaves out. Every flag --a-b is the recipe key a_b, in a recipe "
                                   "file at the top or in the section its group names (--t-lora-rank: motion: rank).")
    options.add_flags(t, TrainCommand, defaults=True)
    options.add_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train, command="train")


# ---------------------------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from .commands import GenerateInputs, GenerateOutput
    from .config import SampleConfig, parse_weighted

    inputs, output = options.from_args(GenerateInputs, args), options.from_args(GenerateOutput, args)
    adapters = [parse_weighted(a, "--adapter") for a in inputs.adapter or []]
    image_loras = [parse_weighted(a, "--image-lora") for a in inputs.image_lora or []]
    _quiet_libraries()
    from . import api

    given = options.given(args, SampleConfig)  # over the first adapter's recorded settings (else the defaults)
    paths = api.generate(inputs.prompt, adapters, **given, image_loras=image_loras,
                         textual_inversions=inputs.textual_inversion or [], base=inputs.base, out=output.out,
                         overwrite=output.overwrite, device=output.device, dtype=output.dtype, quiet=output.quiet,
                         motion_adapter=inputs.motion_adapter)
    for p in paths:
        print(f"wrote {p} and {p.with_suffix('.gif' if p.suffix.lower() == '.mp4' else '.mp4')}{_written_size(p)}")
    return 0


def _written_size(path: Path) -> str:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return f" ({stream.frames or '?'} frames, {stream.height}x{stream.width} px)"


def cmd_select(args) -> int:
    from .commands import SelectOptions

    opts = options.from_args(SelectOptions, args)
    _quiet_libraries()
    from . import api

    from .selection import format_text

    result = api.select(opts.run, clip=opts.clip)
    print(json.dumps(result) if opts.json else format_text(result))
    return 0


def _add_select(sub) -> None:
    from .commands import SelectOptions

    s = sub.add_parser("select", help="score a run's checkpoints against its reference; publish the best as RUN/selected")
    options.add_flags(s, SelectOptions, defaults=True)
    s.set_defaults(func=cmd_select)


def _add_generate(sub) -> None:
    from .commands import GenerateInputs, GenerateOutput
    from .config import SampleConfig

    g = sub.add_parser("generate", help="sample videos with T-LoRA(s) on a base model",
                       description="Sample videos with T-LoRA(s). Unset sampling flags take the first --adapter's "
                                   "recorded values (frames, size, steps, guidance), else the defaults shown.")
    options.add_flags(g, GenerateInputs, defaults=True)
    recorded = dict.fromkeys(("frames", "steps", "guidance"), "the adapter's, else ")
    options.add_flags(g, SampleConfig, before_default=recorded)
    options.add_flags(g, GenerateOutput, defaults=True)
    g.set_defaults(func=cmd_generate)


# -------------------------------------------------------------------------------------------------- batch
def cmd_batch(args) -> int:
    _quiet_libraries()
    from . import batch

    opts = options.from_args(batch.Options, args)
    steps, out = batch.prepare(opts.manifest, opts.out, opts.recipe, opts.retry_failed)
    if opts.dry_run:
        print(batch.format_plan(steps, out, opts))
        return 0
    index = batch.run(steps, out, opts, opts.manifest)
    print(batch.summary(index))
    return 0 if index["counts"]["finished"] == len(index["rows"]) else 1


def _add_batch(sub) -> None:
    from .batch import Options

    b = sub.add_parser("batch", help="a motion library: one run per manifest row, on Ray (this machine or a cluster)")
    options.add_flags(b, Options, defaults=True)
    b.set_defaults(func=cmd_batch, command="batch")


# ------------------------------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from .commands import ExportOptions

    opts = options.from_args(ExportOptions, args)
    _quiet_libraries()
    from .export import export_files

    for path in export_files(opts.run, opts.format, opts.out, overwrite=opts.overwrite):
        print(f"wrote {path}")
    return 0


def _add_export(sub) -> None:
    from .commands import ExportOptions

    ex = sub.add_parser("export", help="write a run's T-LoRA in another tool's layout (e.g. AnimateDiff MotionLoRA)")
    options.add_flags(ex, ExportOptions, defaults=True)
    ex.set_defaults(func=cmd_export)


# --------------------------------------------------------------------------------------------- toy, demo
TOY_FAMILIES = {"unet": "UNet", "wan": "Wan"}  # `cav toy train-base --family` → the name its messages use


def cmd_toy_train_base(args) -> int:
    from .commands import TrainBaseOptions

    opts = options.from_args(TrainBaseOptions, args)
    _quiet_libraries()
    from .toy.train_base import BaseRecipe
    from .toy.wan_base import ToyWanSpec, WanRecipe

    own = {"unet": (BaseRecipe,), "wan": (WanRecipe, ToyWanSpec)}  # each family's recipe (and sizes) dataclasses
    mine = {f.name for cls in own[opts.family] for f in dataclasses.fields(cls)}
    for other in set(own) - {opts.family}:
        for cls in own[other]:
            stray = sorted(set(options.given(args, cls)) - mine)
            if stray:
                flag = "--" + stray[0].replace("_", "-")
                raise CavError(f"{flag} is a flag of the toy {TOY_FAMILIES[other]}, not of the toy "
                               f"{TOY_FAMILIES[opts.family]}: drop it or pass --family {other}")
    return _TOY_TRAINERS[opts.family](args, opts)


def _train_toy_unet(args, opts) -> int:
    from .toy.train_base import BaseRecipe, train_base

    recipe = BaseRecipe(**options.typed(BaseRecipe, options.given(args, BaseRecipe)))
    stats = train_base(opts.out or "runs/toy-base", recipe, device=opts.device, quiet=opts.quiet,
                       resume=not opts.restart)
    print(json.dumps({k: v for k, v in stats.items() if k != "loss_log"}))
    return 0


def _train_toy_wan(args, opts) -> int:
    from .toy.wan_base import ToyWanSpec, WanRecipe, train_wan_base

    if opts.device not in ("auto", "cpu"):
        raise CavError(f"--device {opts.device}: the toy Wan's trainer runs on the CPU only: pass --device cpu")
    recipe = WanRecipe(**options.typed(WanRecipe, options.given(args, WanRecipe)))
    spec = ToyWanSpec(**options.typed(ToyWanSpec, options.given(args, ToyWanSpec)))
    stats = train_wan_base(opts.out or "runs/toy-wan", recipe, spec, quiet=opts.quiet, resume=not opts.restart)
    print(json.dumps({k: v for k, v in stats.items() if k not in ("log", "vae_log", "recipe", "spec")}))
    return 0


_TOY_TRAINERS = {"unet": _train_toy_unet, "wan": _train_toy_wan}


def cmd_toy_check_base(args) -> int:
    from .toy.check import CheckBaseOptions, check_base

    opts = options.from_args(CheckBaseOptions, args)
    _quiet_libraries()
    from .metrics import shown

    result = check_base(opts.base, n=opts.videos, heldout=opts.heldout, seed=opts.seed, steps=opts.steps,
                        device=opts.device, quiet=opts.quiet)
    if opts.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<24} {shown(v)}")
    return 0


def cmd_demo(args) -> int:
    from .commands import DemoOptions

    opts = options.from_args(DemoOptions, args)
    _quiet_libraries()
    from .toy.demo import run_demo, summary

    overrides = {k: v for k, v in (("steps", opts.steps), ("absorber_steps", opts.absorber_steps)) if v is not None}
    metrics = run_demo(opts.out, prompts=opts.prompts, overrides=overrides, quiet=opts.quiet, base=opts.base,
                       best=opts.best, wan=opts.wan)
    print(summary(metrics, Path(opts.out)))
    return 0


def _add_toy(sub, flags: bool = True) -> None:
    """``flags`` False: the command's name and help only (its flags need torch and diffusers: seconds to import)."""
    toy = sub.add_parser("toy", help="the embedded toy world: train or check its base model")
    _choose(toy, "a toy command", "train-base, check-base")
    if not flags:
        return
    from .commands import TrainBaseOptions
    from .toy.check import CheckBaseOptions
    from .toy.train_base import BaseRecipe
    from .toy.wan_base import ToyWanSpec, WanRecipe

    cmds = toy.add_subparsers(title="commands", metavar="COMMAND")
    tb = cmds.add_parser("train-base", help="train the toy T2V base model (seeded, resumable)")
    options.add_flags(tb, TrainBaseOptions, defaults=True)
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
    options.add_flags(cb, CheckBaseOptions, defaults=True)
    cb.set_defaults(func=cmd_toy_check_base)


def _add_demo(sub) -> None:
    from .commands import DemoOptions

    d = sub.add_parser("demo", help="the whole method on the toy bases (toy UNet, toy Wan), scored against ground truth")
    options.add_flags(d, DemoOptions, defaults=True)
    d.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------------------------------------- eval, bench
def cmd_eval(args) -> int:
    from .commands import EvalOptions

    opts = options.from_args(EvalOptions, args)
    _quiet_libraries()
    from .evaluate import evaluate, format_text
    from .metrics.clip_score import DEFAULT_CLIP

    result = evaluate(opts.videos, opts.prompt, reference=opts.reference, clip=opts.clip or DEFAULT_CLIP,
                      lpips=opts.lpips, metrics=opts.metrics.split(",") if opts.metrics else None)
    if opts.json:
        print(json.dumps(result))
    else:
        print(format_text(result))
    return 0


def cmd_bench_speed(args) -> int:
    from .commands import SpeedOptions

    opts = options.from_args(SpeedOptions, args)
    _quiet_libraries()
    from .bench.speed import format_table, run_speed

    only = [c.strip() for c in opts.only.split(",") if c.strip()] if opts.only else None
    result = run_speed(opts.device, opts.size, quick=opts.quick, only=only)
    print(json.dumps(result) if opts.json else format_table(result))
    return 0


def cmd_bench_ablation(args) -> int:
    from .commands import AblationOptions

    opts = options.from_args(AblationOptions, args)
    _quiet_libraries()
    from .bench.ablation import format_markdown, run_ablation, write_outputs

    result = run_ablation(opts.recipe, quick=opts.quick, out=opts.out, command="cav " + shlex.join(args.argv))
    write_outputs(result, opts.out)
    print(json.dumps(result) if opts.json else format_markdown(result))
    return 0


def _add_eval_bench(sub) -> None:
    from .commands import AblationOptions, EvalOptions, SpeedOptions

    ev = sub.add_parser("eval", help="score generated videos (CLIPScore, LPIPS, motion fidelity, toy truth)")
    options.add_flags(ev, EvalOptions, defaults=True)
    ev.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks (JSON and markdown output)")
    _choose(bench, "a benchmark", "speed, ablation")
    cmds = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    bs = cmds.add_parser("speed", help="training/generation step time, memory and FLOPs at full ModelScope size")
    options.add_flags(bs, SpeedOptions, defaults=True)
    bs.set_defaults(func=cmd_bench_speed)
    ba = cmds.add_parser("ablation", help="the paper's Table 1 rows in the toy world, with 95%% bootstrap CIs")
    options.add_flags(ba, AblationOptions, defaults=True)
    ba.set_defaults(func=cmd_bench_ablation)


def cmd_ui(args) -> int:
    from .commands import UiOptions

    opts = options.from_args(UiOptions, args)
    check_runs_folder(opts.runs)  # before gradio loads and the server starts
    _quiet_libraries()
    from .ui.layout import serve

    return serve(**dataclasses.asdict(opts))


def check_runs_folder(runs) -> None:
    """`cav ui --runs`: a folder the app can write (created if missing), or one line naming the problem."""
    from .runfolder import check_writable

    path = Path(runs)
    if path.exists() and not path.is_dir():
        raise CavError(f"--runs '{runs}' is a file: pass a folder for the app's runs (it is created if missing)")
    check_writable(path, "--runs")


def _add_ui(sub) -> None:
    from .commands import UiOptions

    ui = sub.add_parser("ui", help="the web app (train, generate, browse runs) on a local address")
    options.add_flags(ui, UiOptions, defaults=True)
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
