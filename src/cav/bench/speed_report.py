"""The speed benchmark's result: the JSON dict (keys documented in docs/PERFORMANCE.md), its note and its table."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from ..accel import set_gradient_checkpointing
from .stats import jsonable

PAPER_LATENT = (1, 4, 16, 32, 32)  # 16 frames of 256×256 through the 8× VAE
# Spec-sheet dense peaks the physical-limit estimates assume (no sparsity).
ASSUMED_PEAKS = {
    "h100_sxm_bf16_dense": 989e12,  # NVIDIA H100 SXM5, BF16 tensor core, dense
    "rtx_a5000_fp16_tensor_dense": 111.1e12,  # NVIDIA RTX A5000, FP16 tensor core, dense (222.2e12 with sparsity)
}
# adapters reported per rig: name → (placement, kind) of ``Rig.adapters``
_ADAPTERS = {"cav": ("cav", "temporal"), "motiondirector": ("motiondirector", "temporal"),
             "cav_s_lora": ("cav", "spatial"), "motiondirector_spatial": ("motiondirector", "spatial")}


def ratio(a, b):
    return a / b if a is not None and b else None


def _count_key(case: str, what: str) -> str:
    """The flat JSON key of a counted case's ``what`` (ops / cast_ops): t_lora_step → ops_per_step,
    generation_step → generation_ops_per_step, wan_t_lora_step_plain → wan_ops_per_step_plain."""
    base = case.removesuffix("_plain")
    return f"{base.removesuffix('t_lora_step').removesuffix('step')}{what}_per_step{case[len(base):]}"


def _counts(counted: dict | None) -> dict:
    if counted is None:
        return {}
    c, breaks = counted["counts"], counted["breaks"]
    out = {_count_key(case, what): c.get(case, {}).get(field) for case in counted["cases"]
           for what, field in (("ops", "ops"), ("cast_ops", "casts"))}
    out.update(op_counts=c, op_count_latent=counted["latent"], op_count_dtype=counted["dtype"],
               ops_ratio=ratio(out["ops_per_step"], out["ops_per_step_plain"]),
               cast_ops_ratio=ratio(out["cast_ops_per_step"], out["cast_ops_per_step_plain"]))
    if breaks:
        out["graph_breaks"] = {"training": breaks.get("t_lora_step", {}).get("count"),
                               "generation": breaks.get("generation_step", {}).get("count")}
        out["graph_break_reasons"] = {k: v["reasons"] for k, v in breaks.items() if v["reasons"]}
    return out


def rig_info(rig) -> dict:
    """What a family's rig measured on: its UNet, latent and the cav adapters."""
    cav = {k: v for k, v in _ADAPTERS.items() if k.startswith("cav")}
    return {"unet": rig.family.rig.label, "unet_params": rig.unet_params, "latent_shape": list(rig.latent_shape),
            "text_shape": rig.text_shape, **{key: {name: rig.adapters[slot][i] for name, slot in cav.items()}
                                             for i, key in enumerate(("adapted_modules", "trainable_params"))}}


def result_of(rig, others: dict, bench, res: dict, flops: dict, counted, quick: bool, size: str) -> dict:
    """The JSON-safe result of a run: its measurements, what they ran on, the derived ratios and the note."""
    cuda = rig.dev.type == "cuda"
    md, md_spatial, eager = (res.get(k) for k in ("motiondirector_step_s", "motiondirector_spatial_path_step_s",
                                                  "t_lora_step_s"))
    dual = md + md_spatial if md is not None and md_spatial is not None else None
    a = rig.adapters
    r = {
        "device": rig.dev.type, "device_name": _device_name(rig.dev), "dtype": str(rig.dtype).replace("torch.", ""),
        "autocast": str(rig.autocast).replace("torch.", "") if rig.autocast else None, "size": size, "quick": quick,
        "unet_params": rig.unet_params, "latent_shape": list(rig.latent_shape), "pixel_shape": list(rig.frames.shape),
        "text_tokens": rig.text_shape[1], "warmup_steps": bench.warmup, "timed_steps": bench.reps, **res,
        "eager_step_s": eager,
        "compiled_speedup": res.get("compiled_speedup", ratio(eager, res.get("compiled_step_s"))),
        "compiled_generation_speedup": res.get("compiled_generation_speedup", ratio(
            res.get("generation_step_s"), res.get("compiled_generation_step_s"))),
        "lean_speedup": ratio(res.get("t_lora_step_plain_s"), eager), **_counts(counted),
        "step_ratio": ratio(eager, md),
        "step_ratio_checkpointing": ratio(res.get("checkpointing_step_s"),
                                          res.get("motiondirector_checkpointing_step_s")),
        "motiondirector_dual_step_s": dual, "dual_step_ratio": ratio(eager, dual),
        "cached_speedup": ratio(res.get("uncached_step_s"), res.get("cached_step_s")),
        "checkpointing_slowdown": ratio(res.get("checkpointing_step_s"), res.get("no_checkpointing_step_s")),
        "peak_memory_bytes": bench.peak_memory.get("t_lora_step_checkpointing") if cuda else bench.peak(),
        "peak_memory": dict(bench.peak_memory),
        "peak_memory_kind": ("torch.cuda.max_memory_allocated, reset before each measurement; includes the resident "
                             "weights of UNet, VAE and text encoder" if cuda else
                             "process peak RSS (ru_maxrss) after each measurement: monotonic, whole process"),
        **flops,
        **{key: {name: a[slot][i] for name, slot in _ADAPTERS.items()}
           for i, key in enumerate(("adapted_modules", "trainable_params"))},
        "gradient_checkpointing_method": _checkpointing_method(rig.unet),
        "step_samples_s": bench.samples, "errors": bench.errors, "torch_version": torch.__version__,
        "families": {rig.family.name: rig_info(rig), **others}, "total_s": None,
    }
    r["note"] = _note(r, cuda, size, rig.cfg())
    return jsonable(r)


def _checkpointing_method(unet) -> str:
    method = set_gradient_checkpointing(unet, True)
    set_gradient_checkpointing(unet, False)
    return method


def _note(r: dict, cuda: bool, size: str, cfg) -> str:
    """What the numbers are, in short (each key: docs/PERFORMANCE.md, "What each key measures")."""
    parts = ["random weights; every step is cav's own: trainer.train_step of the stage that stages.absorber_stage / "
             f"t_lora_stage build from the family's shipped recipe (S-LoRA absorber, {cfg.absorbers.batch} frames), "
             f"and one denoising step of sampling.sample_videos (guidance {cfg.validation.guidance}, T-LoRA merged); *_plain: "
             "the same step without the lean step (before issue 16); medians of synchronised steps after warm-up"]
    if r.get("ops_per_step") is not None:
        parts.append(f"ops counted on a {r['op_count_dtype']} rig, fp32 adapters under autocast, latent "
                     f"{tuple(r['op_count_latent'])}")
    if not cuda and size == "full":
        parts.append(f"CPU: latent {tuple(r['latent_shape'])} (the paper's is {PAPER_LATENT})")
    if size == "tiny":
        parts.append("tiny random model (tests): numbers say nothing about real speed")
    if r["errors"]:
        parts.append("failed: " + ", ".join(f"{k} ({v})" for k, v in r["errors"].items()))
    return "; ".join(parts)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.processor() or platform.machine())
    return f"{name} ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------------------ table
def _fmt_s(v) -> str:
    if v is None:
        return "n/a"
    return f"{v * 1e6:.1f} µs" if v < 1e-3 else f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_flops(v, unit="FLOP") -> str:
    scale, prefix = next(((s, p) for s, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
                          if v is not None and abs(v) >= s), (1, ""))
    return "n/a" if v is None else f"{v / scale:.2f} {prefix}{unit}" if prefix else f"{v:.0f} {unit}"


_FORMATS = {"s": _fmt_s, "x": lambda v: f"{v:.3f}×", "n": lambda v: f"{v:,}", "flop": _fmt_flops,
            "flop/s": lambda v: _fmt_flops(v, "FLOP/s"), "%": lambda v: f"{100 * v:.1f} %",
            "gib": lambda v: f"{v / 2 ** 30:.2f} GiB"}
# (label, key or keys (a/b; dotted: nested), format[, the measurement whose peak memory the row shows])
_ROWS = (
    ("T-LoRA step (cav)", "t_lora_step_s", "s", "t_lora_step"),
    ("MotionDirector temporal step", "motiondirector_step_s", "s", "motiondirector_step"),
    ("  step ratio cav / MD", "step_ratio", "x"),
    ("MD spatial-path step (1 frame)", "motiondirector_spatial_path_step_s", "s", "motiondirector_spatial_path_step"),
    ("MD dual step (temporal + spatial)", "motiondirector_dual_step_s", "s"),
    ("  step ratio cav / MD dual", "dual_step_ratio", "x"),
    ("T-LoRA step, checkpointing", "checkpointing_step_s", "s", "t_lora_step_checkpointing"),
    ("T-LoRA step, no checkpointing", "no_checkpointing_step_s", "s", "t_lora_step"),
    ("MD step, checkpointing", "motiondirector_checkpointing_step_s", "s", "motiondirector_step_checkpointing"),
    ("  step ratio cav / MD (ckpt)", "step_ratio_checkpointing", "x"),
    ("Absorber step (T2I, S-LoRA)", "absorber_step_s", "s", "absorber_step"),
    ("Generation step (CFG 2)", "generation_step_s", "s", "generation_step"),
    ("Uncached step (VAE+text+UNet)", "uncached_step_s", "s", "uncached_step"),
    ("Cached step (UNet only)", "cached_step_s", "s", "cached_step"),
    ("  cached speedup", "cached_speedup", "x"),
    ("AnimateDiff T-LoRA step (cav)", "animatediff_t_lora_step_s", "s", "animatediff_t_lora_step"),
    ("Wan 2.1 1.3B T-LoRA step (cav)", "wan_t_lora_step_s", "s", "wan_t_lora_step"),
    ("T-LoRA step before issue 16 (plain)", "t_lora_step_plain_s", "s", "t_lora_step_plain"),
    ("  lean speedup", "lean_speedup", "x"),
    ("T-LoRA step, compiled", "compiled_step_s", "s", "t_lora_step_compiled"),
    ("  compiled speedup", "compiled_speedup", "x"),
    ("Generation step, compiled", "compiled_generation_step_s", "s"),
    ("Ops per T-LoRA step lean / plain", ("ops_per_step", "ops_per_step_plain"), "n"),
    ("Casts per T-LoRA step lean / plain", ("cast_ops_per_step", "cast_ops_per_step_plain"), "n"),
    ("Ops / casts per generation step", ("generation_ops_per_step", "generation_cast_ops_per_step"), "n"),
    ("  before issue 16 (plain)", ("generation_ops_per_step_plain", "generation_cast_ops_per_step_plain"), "n"),
    ("Graph breaks training / generation", ("graph_breaks.training", "graph_breaks.generation"), "n"),
    ("FLOPs per T-LoRA step", "flops_per_step", "flop"),
    ("Achieved", "achieved_flops", "flop/s"),
    ("Measured matmul peak", "measured_peak_flops", "flop/s"),
    ("  fraction of peak", "peak_fraction", "%"),
)


def format_table(result: dict) -> str:
    """A readable, aligned text table of the main numbers of ``run_speed``'s result."""
    r = result

    def cell(keys, fmt: str) -> str:
        values = (functools.reduce(lambda d, k: (d or {}).get(k), key.split("."), r)
                  for key in ((keys,) if isinstance(keys, str) else keys))
        return " / ".join("n/a" if v is None else _FORMATS[fmt](v) for v in values)

    rows = [(label, cell(keys, fmt), cell(f"peak_memory.{m[0]}", "gib") if m else "")
            for label, keys, fmt, *m in _ROWS]
    rows += [(f"Limit at {k}", _fmt_s(v), "") for k, v in (r.get("physical_limit_s") or {}).items()]
    rows += [("Trainable params cav / MD", cell(("trainable_params.cav", "trainable_params.motiondirector"), "n"), ""),
             ("Peak memory (headline)", cell("peak_memory_bytes", "gib"), "")]
    w0 = max(len(a) for a, _, _ in rows + [("measurement", "", "")])
    w1 = max(len(b) for _, b, _ in rows + [("", "time / value", "")])
    lines = [f"cav speed benchmark — {r.get('device_name')} [{r.get('device')}], {r.get('dtype')}, latent "
             f"{tuple(r.get('latent_shape', []))}, torch {r.get('torch_version')}",
             f"{'measurement':<{w0}}  {'time / value':>{w1}}  peak memory", "-" * (w0 + w1 + 15)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows]
    if r.get("errors"):
        lines.append("failed: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()))
    return "\n".join(lines)
