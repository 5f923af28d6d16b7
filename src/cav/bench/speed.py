"""`cav bench speed`: what one step of each of cav's phases costs, side by side, on random weights (no download).

The model is each family's ``Family.rig`` (full: ModelScope's 1.4 B UNet3D from ``assets/``; tiny: the tests'),
assembled into a ``Backbone`` with its VAE and text encoder (``bench.rig``), and every step is the one cav runs:
the stages of ``run.stage_plan`` (its builders and merge policy) + ``trainer.train_step``, and
``sampling.sample_with``. Each measurement is one row: ``TIMED`` (a ``Case``: name, JSON key, the step it times),
``COUNTED`` (a ``Count``: ops, casts and graph breaks of a step in the GPU's configuration). Adding a measurement is
adding a row. ``run_speed`` returns a JSON-serialisable dict; ``speed_report.format_table`` renders it."""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import families
from ..accel import set_gradient_checkpointing, tune_backends  # noqa: F401 — set_gradient_checkpointing: tests
from ..backbone import resolve_device
from ..errors import CavError
from ..opcount import OpCounter, count_ops
from .rig import Bench as _Bench, Rig, log
from .speed_report import ASSUMED_PEAKS, PAPER_LATENT, format_table, ratio, result_of, rig_info

TINY_UNET = families.TINY_UNET3D  # the UNet3D rig's tiny UNet (each family's rig: ``families.Family.rig``)
CPU_FULL_LATENT = (1, 4, 8, 8, 8)  # 8 frames of 64×64: as large as the 5-minute CPU budget allows
TINY_LATENT = (1, 4, 4, 8, 8)
COUNT_LATENT = (1, 4, 2, 8, 8)  # small: counting runs the full UNet in bf16 on the CPU too


@dataclass(frozen=True)
class Case:
    """One timed measurement: ``make(rig)`` gives the step factory; its median time lands in ``result[key]``."""

    name: str  # names its peak memory, samples and errors
    key: str
    make: Callable[[Rig], Callable]
    group: str = "timing"  # --only picks cases by name or group
    quick: bool = True  # also run with --quick
    family: families.Family = families.UNET3D  # the family whose rig (``Family.rig``) the step runs on
    # compiled cases: the JSON key of the speedup over the same step eager, measured with the two alternating
    # (``step.eager``), so that a change of machine load hits both sides of every pair
    paired: str | None = None


MD = "motiondirector"
TIMED = (
    Case("t_lora_step", "t_lora_step_s", lambda r: r.train()),
    Case("t_lora_step_plain", "t_lora_step_plain_s", lambda r: r.train(plain=True)),
    Case("motiondirector_step", "motiondirector_step_s", lambda r: r.train(MD)),
    Case("t_lora_step_checkpointing", "checkpointing_step_s", lambda r: r.train(checkpointing=True)),
    Case("motiondirector_step_checkpointing", "motiondirector_checkpointing_step_s",
         lambda r: r.train(MD, checkpointing=True)),
    Case("motiondirector_spatial_path_step", "motiondirector_spatial_path_step_s",
         lambda r: r.train(MD, spatial_path=True)),
    Case("absorber_step", "absorber_step_s", lambda r: r.train(absorber=True)),
    Case("generation_step", "generation_step_s", lambda r: r.generation()),
    Case("uncached_step", "uncached_step_s", lambda r: r.train(uncached=True)),
    # measured again right after the uncached step; its spread against t_lora_step shows the timing noise
    Case("cached_step", "cached_step_s", lambda r: r.train(), quick=False),
    Case("t_lora_step_compiled", "compiled_step_s", lambda r: r.train(compiled=True), group="compile",
         paired="compiled_speedup"),
    Case("generation_step_compiled", "compiled_generation_step_s", lambda r: r.generation(compiled=True),
         group="compile", paired="compiled_generation_speedup"),
    # the cav T-LoRA step on the motion modules of SD 1.5 + v1-5-2 (S-LoRA on the image UNet, active and frozen)
    Case("animatediff_t_lora_step", "animatediff_t_lora_step_s", lambda r: r.train(), family=families.ANIMATEDIFF),
    # the cav T-LoRA step on Wan 2.1 T2V 1.3B (self-attention q/k/v/o of every block, S-LoRA merged); its own group:
    # a full-size Wan rig is another 1.3 B model to build, asked for with --only wan
    Case("wan_t_lora_step", "wan_t_lora_step_s", lambda r: r.train(), group="wan", family=families.WAN),
)


@dataclass(frozen=True)
class Count:
    """One op count (and graph-break check) in the GPU's configuration: bf16 frozen weights, fp32 adapters, bf16
    autocast, on whatever device runs the benchmark (op counts do not depend on the device or the latent size)."""

    name: str
    make: Callable[[Rig], Callable]
    graph_breaks: bool = True
    family: families.Family = families.UNET3D
    group: str = "counts"  # counted when this group is chosen (``counts``, or a family's own: ``wan``)


COUNTED = (
    Count("t_lora_step", lambda r: r.train()),
    Count("t_lora_step_plain", lambda r: r.train(plain=True), graph_breaks=False),
    Count("generation_step", lambda r: r.generation()),
    Count("generation_step_plain", lambda r: r.generation(plain=True), graph_breaks=False),
    Count("animatediff_t_lora_step", lambda r: r.train(), graph_breaks=False, family=families.ANIMATEDIFF),
    Count("wan_t_lora_step", lambda r: r.train(), graph_breaks=False, family=families.WAN, group="wan"),
    Count("wan_t_lora_step_plain", lambda r: r.train(plain=True), graph_breaks=False, family=families.WAN,
          group="wan"),
)
GROUPS = ("timing", "compile", "counts", "graph_breaks", "flops", "wan")


def _ops_per_step(step) -> OpCounter:
    """The ops of one step after the first (AdamW builds its state on the first); a generation step's are the ops of
    sampling with 2 denoising steps minus those with 1: one step of the loop, nothing of the fixed cost."""
    if not hasattr(step, "sample"):
        step()
        return count_ops(step)
    one, two = count_ops(lambda: step.sample(1)), count_ops(lambda: step.sample(2))
    diff = OpCounter()
    diff.ops, diff.cast_ops = two.ops - one.ops, two.cast_ops - one.cast_ops
    return diff


def _count_phase(size: str, dev: torch.device, bench: _Bench, only: set[str]) -> dict:
    """Ops, casts and graph breaks per counted step, on a rig built in the GPU's configuration."""
    dtype = torch.bfloat16 if dev.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    latent = COUNT_LATENT if dev.type != "cuda" else PAPER_LATENT if size == "full" else TINY_LATENT
    counts, breaks, rig = {}, {}, None
    for case in COUNTED:
        counting = case.group in only
        if not counting and not (case.graph_breaks and "graph_breaks" in only):
            continue
        if rig is None or rig.family is not case.family:  # one rig per family, built when its first count comes
            rig = None
            gc.collect()
            rig = Rig(case.family, size, dev, dtype, latent, autocast=dtype)
        if counting:
            try:
                step, teardown = case.make(rig)()
                try:
                    c = _ops_per_step(step)
                finally:
                    teardown()
                counts[case.name] = c.summary(top=10)
                log(f"{case.name}: {c.total} ops, {c.casts} casts per step")
            except Exception as exc:  # noqa: BLE001
                bench.fail(f"ops_{case.name}", exc)
        if case.graph_breaks and "graph_breaks" in only:
            try:
                n, reasons = rig.explain(case.make(rig))
                breaks[case.name] = {"count": n, "reasons": reasons}
                log(f"{case.name}: {n} graph breaks")
            except Exception as exc:  # noqa: BLE001
                bench.fail(f"graph_breaks_{case.name}", exc)
        bench.release()
    del rig
    gc.collect()  # the bf16 UNet sits in reference cycles (step closures): free it before the timing rig is built
    bench.release()
    return {"counts": counts, "breaks": breaks, "latent": list(latent), "dtype": str(dtype).replace("torch.", ""),
            "cases": [c.name for c in COUNTED]}


def _select(only) -> set[str]:
    names = {c.name for c in TIMED}
    if not only:
        return names | set(GROUPS)
    chosen = set(only)
    unknown = chosen - names - set(GROUPS)
    if unknown:
        raise CavError(f"unknown benchmark case(s) {', '.join(sorted(unknown))}: use any of "
                       f"{', '.join(GROUPS + tuple(c.name for c in TIMED))}")
    return chosen | {c.name for c in TIMED if c.group in chosen}


def run_speed(device: str = "auto", size: str = "full", quick: bool = False, only=None) -> dict:
    """Run the benchmark (see module doc); ``size`` is ``full`` (each family's real sizes) or ``tiny`` (tests);
    ``only`` limits it to some cases (names from ``TIMED``) or groups (``GROUPS``)."""
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    chosen = _select(only)
    t_all = time.perf_counter()
    dev = resolve_device(device)
    tune_backends(dev)  # as training does
    cuda = dev.type == "cuda"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    warmup, reps = (1, 2) if quick else (2, 6) if cuda else (1, 3 if size == "tiny" else 2)
    bench = _Bench(dev, warmup, reps)
    counted = None
    if chosen & {"counts", "graph_breaks", "wan"}:
        log("counting ops per step (bf16 weights, fp32 adapters, bf16 autocast) ...")
        counted = _count_phase(size, dev, bench, chosen)

    latent = TINY_LATENT if size == "tiny" else PAPER_LATENT if cuda else CPU_FULL_LATENT
    cases = [c for c in TIMED if c.name in chosen and (c.quick or not quick)]
    # The UNet3D rig carries the headline keys (and FLOPs); another family's rig is built only for its own cases,
    # first, and freed before the next is built: two full-size UNets at once do not fit a 24 GB machine.
    rows = list(dict.fromkeys([families.UNET3D] * (not cases or "flops" in chosen) + [c.family for c in cases]))
    primary = families.UNET3D if families.UNET3D in rows else rows[-1]
    rig, res, others = None, {}, {}
    for family in [f for f in rows if f is not primary] + [primary]:
        current = _warm_rig(family, size, dev, dtype, latent, bench)
        for case in (c for c in cases if c.family is family):
            res[case.key] = bench.measure(case.name, case.make(current), paired=case.paired is not None)
            if case.paired and case.name in bench.paired:
                res[case.paired] = bench.paired[case.name]
        if family is primary:
            rig = current  # the rig the result's model keys describe
        else:
            others[family.name] = rig_info(current)  # the rig itself goes: its UNet would not fit beside the next
            current = None
            gc.collect()
            bench.release()
    if "cached_step_s" not in res and "t_lora_step_s" in res:
        res["cached_step_s"] = res["t_lora_step_s"]  # the very same computation: reuse it where time is short
    if "t_lora_step_s" in res:
        res["no_checkpointing_step_s"] = res["t_lora_step_s"]  # t_lora_step runs without checkpointing
    flops = _flops_section(rig, bench, res, quick) if "flops" in chosen else {}
    result = result_of(rig, others, bench, res, flops, counted, quick, size)
    result["total_s"] = round(time.perf_counter() - t_all, 2)
    log(f"done in {result['total_s']:.1f} s")
    return result


def _warm_rig(family, size, dev, dtype, latent, bench: _Bench) -> Rig:
    """The rig of ``family``, after one untimed T-LoRA step: a fresh process (or model) pays for page faults,
    allocator growth and kernel/library setup on its first big steps, which would otherwise land on whichever
    measurement comes first."""
    t0 = time.perf_counter()
    rig = Rig(family, size, dev, dtype, latent, autocast=dtype if dtype != torch.float32 else None)
    log(f"device {dev}, dtype {str(dtype).replace('torch.', '')}, size {size}, latent {latent}, warm-up "
        f"{bench.warmup}, timed {bench.reps}; built random-weight {family.rig.label} ({rig.unet_params / 1e9:.3f} B "
        f"params), VAE, text encoder in {time.perf_counter() - t0:.1f} s; process warm-up ...")
    try:
        step, teardown = rig.train()()
        step()
        bench.sync()
        teardown()
    except Exception as exc:  # noqa: BLE001 — the measurements record the failure properly
        log(f"warm-up failed ({type(exc).__name__})")
    bench.release()
    return rig


# ------------------------------------------------------------------------------------------------------ FLOPs
def _flops_section(rig: Rig, bench: _Bench, res: dict, quick: bool) -> dict:
    """FLOPs (matmul, convolution, attention; forward + backward) of the rig's cav T-LoRA step (with checkpointing
    only if the plain one failed), the device's matmul peak, and what they imply."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    flops, step_s = None, res.get("t_lora_step_s")
    counted = "one cav T-LoRA step (forward + backward, no checkpointing)"
    log("counting FLOPs of one cav T-LoRA step (forward + backward) ...")
    for checkpointing in (False, True):
        if checkpointing and (flops is not None or res.get("checkpointing_step_s") is None):
            break
        try:
            bench.release()
            step, teardown = rig.train(checkpointing=checkpointing)()
            counter = FlopCounterMode(display=False)
            try:  # the CPU's attention in the math backend: the counter has no formula for its flash kernel
                with sdpa_kernel(SDPBackend.MATH) if rig.dev.type == "cpu" else contextlib.nullcontext(), counter:
                    step()
            finally:
                teardown()
            flops = int(counter.get_total_flops())
            if checkpointing:
                counted = "one cav T-LoRA step WITH checkpointing (the plain step failed)"
                step_s = res["checkpointing_step_s"]
        except Exception as exc:  # noqa: BLE001
            bench.fail("flops" + "_checkpointing" * checkpointing, exc)
    cuda = rig.dev.type == "cuda"
    mm = ((2048, 2, 3) if quick else (8192, 3, 10)) if cuda else ((256, 2, 2) if quick else (2048, 3, 1))
    peak = None
    try:
        peak = _matmul_peak(rig.dev, rig.dtype, *mm)
    except Exception as exc:  # noqa: BLE001
        bench.fail("matmul_peak", exc)
    bench.release()
    achieved = flops / step_s if flops and step_s else None
    peaks = {"measured_device": peak, **ASSUMED_PEAKS}
    limits = lambda f: {k: (f / v if f and v else None) for k, v in peaks.items()}  # noqa: E731
    paper = flops if tuple(rig.latent_shape) == PAPER_LATENT else None  # measured at the paper's latent: GPU, full
    return {"flops_per_step": flops, "flops_counted": counted + ": matmul, conv, attention", "achieved_flops": achieved,
            "measured_peak_flops": peak, "measured_peak_how": f"{mm[0]}^3 matmul in "
            f"{str(rig.dtype).replace('torch.', '')}, best of {mm[1]}×{mm[2]}", "peak_fraction": ratio(achieved, peak),
            "assumed_peak_flops": dict(ASSUMED_PEAKS), "physical_limit_s": limits(flops),
            "paper_shape_latent": list(PAPER_LATENT), "paper_shape_flops_per_step": paper,
            "paper_shape_physical_limit_s": limits(paper)}


def _matmul_peak(device: torch.device, dtype: torch.dtype, n: int, trials: int, per_trial: int) -> float:
    """Best FLOP/s of an n³ matmul on this device in ``dtype`` (the first trial is a warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    times = []
    for _ in range(trials + 1):
        t0 = time.perf_counter()
        for _ in range(per_trial):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) / per_trial)
    return 2.0 * n ** 3 / min(times[1:])


__all__ = ["run_speed", "format_table", "set_gradient_checkpointing", "TIMED", "COUNTED"]
