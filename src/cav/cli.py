"""Command line: parse arguments, call one API function, print, set the exit code.

Every ``CavError`` becomes one line on stderr and exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .errors import CavError

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _size(text: str) -> list[int]:
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size: use H or HxW, e.g. 256 or 256x448") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size: use H or HxW")
    return parts


def _add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (default None: only given flags override the recipe)."""
    from .config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.name == "size":
            p.add_argument(flag, type=_size, default=None, help=help_ + " (H or HxW)")
        elif f.name == "validation_prompts":
            p.add_argument("--validation-prompt", dest="validation_prompts", action="append", default=None, help=help_)
        elif f.name == "crop_ratio":
            p.add_argument(flag, type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help=help_)
        elif f.name == "t_lora_timesteps":
            p.add_argument(flag, type=int, nargs=2, default=None, metavar=("LOW", "HIGH"), help=help_)
        elif f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=typ, default=None, help=help_)


def build_config(args: argparse.Namespace):
    """Recipe values, then explicit flags; with --resume the run's own config.yaml is the starting point."""
    from pathlib import Path

    from .config import TrainConfig, load_recipe

    saved = Path(args.out) / "config.yaml"
    if getattr(args, "resume", False) and saved.is_file():
        data = load_recipe(saved)
    else:
        data = load_recipe(args.recipe) if args.recipe else {}
    for name in TrainConfig.field_names():
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    return TrainConfig.from_dict(data)


def cmd_train(args) -> int:
    from . import api

    cfg = build_config(args)
    if args.dry_run:
        result = api.plan(cfg)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"base {result['base']} ({result['family']}): UNet {result['unet_params']:,} parameters; "
                  f"placement {result['placement']}")
            for s in result["stages"]:
                print(f"  {s['name']:<18} {s['trainable_params']:>12,} trainable parameters in {s['modules']} modules")
        return 0
    if args.video is None:
        raise CavError("no reference video given: pass `cav train VIDEO --prompt ...`")
    if not cfg.prompt.strip():
        raise CavError("the prompt is empty: pass --prompt 'a description of the video and its motion'")
    video_options = {k: getattr(args, k) for k in ("stride", "fps", "start", "end") if getattr(args, k) is not None}
    out = api.train(args.video, cfg, args.out, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet,
                    video_options=video_options)
    print(f"done: T-LoRA in {out / 't_lora'}, samples in {out / 'samples'}, checkpoints in {out / 'checkpoints'}")
    return 0


def cmd_generate(args) -> int:
    from . import api

    adapters = [api.parse_weighted(a) for a in args.adapter or []]
    image_loras = [api.parse_weighted(a) for a in args.image_lora or []]
    paths = api.generate(args.prompt, adapters, image_loras=image_loras, textual_inversions=args.textual_inversion or [],
                         base=args.base, frames=args.frames, size=args.size, steps=args.steps, guidance=args.guidance,
                         seed=args.seed, num_videos=args.num_videos, out=args.out, device=args.device,
                         dtype=args.dtype, negative_prompt=args.negative_prompt, quiet=args.quiet,
                         motion_adapter=args.motion_adapter)
    for p in paths:
        print(f"wrote {p} and {p.with_suffix('.gif')}")
    return 0


def cmd_batch(args) -> int:
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


def cmd_export(args) -> int:
    from .export import export

    path = export(args.run, args.format, args.out, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_toy_train_base(args) -> int:
    from dataclasses import fields

    from .toy.train_base import BaseRecipe, train_base

    overrides = {f.name: getattr(args, f.name) for f in fields(BaseRecipe) if getattr(args, f.name, None) is not None}
    stats = train_base(args.out, BaseRecipe(**overrides), device=args.device, quiet=args.quiet, resume=not args.restart)
    print(json.dumps({k: v for k, v in stats.items() if k != "loss_log"}))
    return 0


def cmd_toy_check_base(args) -> int:
    from .toy.check import check_base

    result = check_base(args.base, n=args.videos, heldout=args.heldout, seed=args.seed, steps=args.steps,
                        device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<24} {v:.3f}" if isinstance(v, float) else f"{k:<24} {v}")
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    from .toy.demo import run_demo, summary

    overrides = {k: v for k, v in (("steps", args.steps), ("absorber_steps", args.absorber_steps)) if v is not None}
    metrics = run_demo(args.out, prompts=args.prompts, overrides=overrides, quiet=args.quiet, base=args.base)
    print(summary(metrics, Path(args.out)))
    return 0


def cmd_eval(args) -> int:
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
    from .bench.speed import format_table, run_speed

    result = run_speed(args.device, args.size)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def cmd_bench_ablation(args) -> int:
    from .bench.ablation import format_markdown, run_ablation, write_outputs

    result = run_ablation(args.recipe, quick=args.quick, out=args.out)
    write_outputs(result, args.out)
    print(json.dumps(result) if args.json else format_markdown(result))
    return 0


def cmd_ui(args) -> int:
    from .ui.layout import serve

    return serve(host=args.host, port=args.port, base=args.base, runs=args.runs, auth=args.auth, share=args.share)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cav", description="One-shot motion customization of text-to-video models")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train absorbers then a T-LoRA on one reference video")
    t.add_argument("video", nargs="?", help="reference video (any ffmpeg format) or a folder of images")
    t.add_argument("--recipe", help="YAML recipe (e.g. configs/modelscope.yaml); flags override it")
    t.add_argument("--out", default="runs/train", help="run folder")
    t.add_argument("--dry-run", action="store_true", help="print the plan (parameters per stage) without weights")
    t.add_argument("--json", action="store_true", help="with --dry-run: JSON output")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    for name in ("start", "end", "fps"):
        t.add_argument(f"--{name}", type=float, default=None, help=f"video frame selection: {name}")
    t.add_argument("--stride", type=int, default=None, help="video frame selection: every K-th frame")
    _add_recipe_flags(t)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample videos with T-LoRA(s) on a base model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--adapter", action="append", metavar="RUN_OR_ADAPTER_DIR[:WEIGHT]",
                   help="T-LoRA to load (repeatable; weights compose; no WEIGHT: the run's --lora-weight, else 1)")
    g.add_argument("--image-lora", action="append", metavar="PATH[:WEIGHT]", help="spatial LoRA folder (repeatable)")
    g.add_argument("--textual-inversion", action="append", metavar="FILE", help="textual inversion file (repeatable)")
    g.add_argument("--base", default=None, help="base model (default: the adapter's base, else toy)")
    g.add_argument("--motion-adapter", default=None,
                   help="AnimateDiff MotionAdapter for an image-model --base (default: the adapter's own)")
    g.add_argument("--frames", type=int, default=None)
    g.add_argument("--size", type=_size, default=None, help="H or HxW")
    g.add_argument("--steps", type=int, default=None, help="denoising steps")
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-videos", type=int, default=1)
    g.add_argument("--out", default="out.mp4", help="output .mp4 (a .gif is written beside it)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("batch", help="a motion library: one run per manifest row, on Ray (this machine or a cluster)")
    b.add_argument("manifest", help="CSV, JSONL or YAML: clip, prompt, spatial_prompt[, name, recipe keys] per row")
    b.add_argument("--out", default="runs/library", help="library folder: one run folder per row, index.md")
    b.add_argument("--recipe", help="YAML recipe for every row (a row's own recipe keys override it)")
    b.add_argument("--address", default=None, help="existing Ray cluster: ray://HOST:10001, HOST:6379 or auto "
                   "(default: a private Ray on this machine)")
    b.add_argument("--gpus-per-run", type=float, default=1.0, help="GPUs per row where the cluster has GPUs")
    b.add_argument("--cpus-per-run", type=float, default=1.0, help="CPU slots per row (training threads on CPU)")
    b.add_argument("--max-parallel", type=int, default=None, help="rows at once (default: as many as fit)")
    b.add_argument("--retry-failed", action="store_true", help="run the rows that failed before again")
    b.add_argument("--dry-run", action="store_true", help="print the plan without starting Ray")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_batch)

    ex = sub.add_parser("export", help="write a run's T-LoRA in another tool's layout (e.g. AnimateDiff MotionLoRA)")
    ex.add_argument("run", help="run, checkpoint or T-LoRA folder")
    ex.add_argument("--format", default="animatediff", help="animatediff: the original MotionLoRA key layout")
    ex.add_argument("--out", default=None, help="output .safetensors (default RUN/export/<format file name>)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ex.set_defaults(func=cmd_export)

    toy = sub.add_parser("toy", help="the embedded toy world: train or check its base model").add_subparsers(
        dest="toy_command", required=True)
    tb = toy.add_parser("train-base", help="train the toy T2V base model (seeded, resumable)")
    tb.add_argument("--out", default="runs/toy-base")
    tb.add_argument("--device", default="auto")
    tb.add_argument("--restart", action="store_true", help="ignore saved state in --out and start over")
    tb.add_argument("--quiet", action="store_true")
    from dataclasses import fields as _fields

    from .toy.train_base import BaseRecipe

    for f in _fields(BaseRecipe):
        tb.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    tb.set_defaults(func=cmd_toy_train_base)
    cb = toy.add_parser("check-base", help="score a base model's videos against the toy world's ground truth")
    cb.add_argument("--base", default="toy")
    cb.add_argument("--videos", type=int, default=64)
    cb.add_argument("--heldout", type=int, default=24)
    cb.add_argument("--steps", type=int, default=25)
    cb.add_argument("--seed", type=int, default=0)
    cb.add_argument("--device", default="auto")
    cb.add_argument("--json", action="store_true")
    cb.set_defaults(func=cmd_toy_check_base)

    d = sub.add_parser("demo", help="the whole method on the embedded toy model, scored against ground truth")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--prompts", type=int, default=4, help="new-appearance prompts to generate")
    d.add_argument("--steps", type=int, default=None, help="override the T-LoRA steps of configs/toy.yaml")
    d.add_argument("--absorber-steps", type=int, default=None)
    d.add_argument("--base", default="toy")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="score generated videos (CLIPScore, LPIPS, motion fidelity, toy truth)")
    ev.add_argument("videos", nargs="+", help="generated videos")
    ev.add_argument("--prompt", required=True)
    ev.add_argument("--reference", default=None, help="reference video for motion metrics")
    ev.add_argument("--clip", default=None, help="CLIP model folder or hub id (default openai/clip-vit-large-patch14)")
    ev.add_argument("--lpips", default=None, help="LPIPS AlexNet weights (.safetensors; default $CAV_LPIPS)")
    ev.add_argument("--metrics", default=None, help="comma-separated metric names (default: all available)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks (JSON output)").add_subparsers(dest="bench_command", required=True)
    bs = bench.add_parser("speed", help="training/generation step time, memory and FLOPs at full ModelScope size")
    bs.add_argument("--device", default="auto", help="auto | cpu | cuda")
    bs.add_argument("--size", default="full", choices=("full", "tiny"))
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=cmd_bench_speed)
    ba = bench.add_parser("ablation", help="the paper's Table 1 rows in the toy world, with 95% bootstrap CIs")
    ba.add_argument("--recipe", default="configs/ablation/toy.yaml")
    ba.add_argument("--quick", action="store_true", help="a CI-sized run")
    ba.add_argument("--out", default="runs/ablation")
    ba.add_argument("--json", action="store_true")
    ba.set_defaults(func=cmd_bench_ablation)

    ui = sub.add_parser("ui", help="the web app (train, generate, browse runs) on a local address")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--base", default="toy", help="base model of new runs")
    ui.add_argument("--runs", default="runs", help="folder of the runs the app trains and lists")
    ui.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="ask for this login")
    ui.add_argument("--share", action="store_true", help="also open a public share link (off by default)")
    ui.set_defaults(func=cmd_ui)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (deprecation notices, weight-loading bars) is not for our users' terminals."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except CavError as exc:
        print(f"cav: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if getattr(args, "command", None) == "train" and getattr(args, "video", None):
            hint = f"; the last step is checkpointed: continue with `cav train {args.video} --resume --out {args.out}`"
        if getattr(args, "command", None) == "batch":
            again = " ".join([args.manifest, "--out", args.out] + (["--recipe", args.recipe] if args.recipe else [])
                             + (["--address", args.address] if args.address else []))
            hint = f"; running rows checkpointed their last step: continue with `cav batch {again}`"
        print(f"cav: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    sys.exit(main())
