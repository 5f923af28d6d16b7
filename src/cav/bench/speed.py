"""Speed benchmark: what one step of each of cav's phases costs on the full-size ModelScope UNet, side by side.

Everything is measured in one process on random weights (no download): the UNet3D is built from
``assets/modelscope_unet_config.json`` (1.4 B parameters), the VAE and text encoder from ModelScope's sizes.
Each measurement is one row of a table: ``TIMED`` (a ``Case``: name, JSON key, the step it times), ``COUNTED``
(a ``Count``: ops, casts and graph breaks of a step in the GPU's configuration). Adding a measurement is adding a
row; the step factories (``_Rig.train``, ``_Rig.generation``) run ``trainer.train_step`` as training does.
Timed cases are medians of synchronised steps after warm-up:

1. T-LoRA training step (forward + backward + AdamW, only LoRA trainable), placement ``cav`` vs ``motiondirector``,
   lean (as ``cav train`` runs it) and plain (the step before issue 16);
2. appearance-absorber step (temporal layers bypassed, S-LoRA trainable, single frames);
3. one denoising step of generation (classifier-free guidance batch of 2, T-LoRA loaded);
4. the T-LoRA step with and without input caches (VAE + text encoder run every step, or not);
5. the T-LoRA step with and without gradient checkpointing, and with the UNet compiled;
6. ops and casts per step and graph breaks (training and generation);
7. peak memory per measurement; FLOPs per step, achieved FLOP/s and the fraction of a measured matmul peak.

``run_speed`` returns a JSON-serialisable dict; ``format_table`` renders its main numbers."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import families, lean
from ..accel import compile_unet, graph_breaks, set_gradient_checkpointing, tune_backends, uncompile_unet
from ..adapters import lora
from .. import backbone as backbone_mod
from ..backbone import Backbone, resolve_device
from ..errors import CavError
from ..stages import encode_frames, encode_prompt
from ..trainer import Stage, make_optimizer, train_step
from .opcount import count_ops

ASSETS = Path(__file__).resolve().parent.parent / "assets"
UNET_CONFIG = ASSETS / "modelscope_unet_config.json"

# ModelScope text-to-video-ms-1.7b: the VAE is Stable Diffusion's (its text encoder: families.MODELSCOPE_TEXT).
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
                scaling_factor=0.18215)
TINY_UNET = families.TINY_UNET3D  # the UNet3D rig's tiny UNet (each family's rig: ``families.Family.rig``)
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                scaling_factor=1.0)
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, hidden_act="gelu", projection_dim=32)

PAPER_LATENT = (1, 4, 16, 32, 32)  # 16 frames of 256×256 through the 8× VAE
CPU_FULL_LATENT = (1, 4, 8, 8, 8)  # 8 frames of 64×64: as large as the 5-minute CPU budget allows
TINY_LATENT = (1, 4, 4, 8, 8)

# Spec-sheet dense peaks the physical-limit estimates assume (no sparsity).
ASSUMED_PEAKS = {
    "h100_sxm_bf16_dense": 989e12,  # NVIDIA H100 SXM5, BF16 tensor core, dense
    "rtx_a5000_fp16_tensor_dense": 111.1e12,  # NVIDIA RTX A5000, FP16 tensor core, dense (222.2e12 with sparsity)
}

RANK_T, ALPHA_T = 4, 1.0  # TrainConfig defaults for the T-LoRA
RANK_S, ALPHA_S = 1, 0.5  # and for the S-LoRA / MotionDirector's spatial LoRA here
T_CAV, S_CAV, T_MD, S_MD = "t_cav", "s_cav", "t_md", "s_md"
SEED = 0


def _log(msg: str) -> None:
    print(f"[cav bench speed] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- models
def _fill_random(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights, fast: every weight is a random window of one shared uniform(-1, 1) pool, scaled to PyTorch's
    default init (std 1/sqrt(3·fan_in)); embeddings std 0.02 (CLIP's init), norm scales 1, biases 0. Speed does not
    depend on the values as long as they stay finite."""
    params = list(module.parameters())
    largest = max(p.numel() for p in params)
    pool = (torch.rand(largest * 2, generator=gen) * 2 - 1).to(params[0].device, params[0].dtype)  # var 1/3
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if p.dim() < 2:
                    is_scale = name == "weight" and isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))
                    p.fill_(1.0 if is_scale else 0.0)
                    continue
                off = int(torch.randint(0, largest + 1, (1,), generator=gen))
                scale = 0.02 * 3 ** 0.5 if isinstance(m, torch.nn.Embedding) else p[0].numel() ** -0.5
                p.copy_(pool[off:off + p.numel()].view_as(p)).mul_(scale)


def _materialize(build: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype,
                 gen: torch.Generator) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers.utils import logging as diffusers_logging

    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (position tables) computed
        module = build()
    buffers = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # no "modules that should be kept in float32: []" notice
    try:
        module = module.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    module = module.to_empty(device=device)
    _fill_random(module, gen)
    with torch.no_grad():  # to_empty left the buffers uninitialised: AnimateDiff's positional tables must be real
        for name, buf in module.named_buffers():
            buf.copy_(buffers[name])
    module.requires_grad_(False)
    module.eval()
    return module


def _build_unet(size: str, device, dtype, gen, family: families.Family):
    return _materialize(lambda: family.rig.model(size), device, dtype, gen)


def _build_vae(size: str, device, dtype, gen):
    from diffusers import AutoencoderKL

    spec = dict(FULL_VAE if size == "full" else TINY_VAE)
    n = len(spec["block_out_channels"])
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    return _materialize(lambda: AutoencoderKL(in_channels=3, out_channels=3, **blocks, **spec), device, dtype, gen)


def _build_text_encoder(size: str, device, dtype, gen, family: families.Family):
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = dict(family.rig.full_text() if size == "full" else TINY_TEXT)
    if size != "full":  # special tokens inside the tiny vocabulary
        spec.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPTextConfig(**spec)
    model = _materialize(lambda: CLIPTextModel(config), device, dtype, gen)
    for name, buf in model.named_buffers():  # the only buffer: position ids, garbage after to_empty
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand_as(buf))
    return model


class _FixedIds:
    """Stands in for the CLIP tokenizer: ``encode_prompt`` gets the same random ids of full length every call."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self.model_max_length = ids.shape[1]

    def __call__(self, *args, **kwargs):
        return type("Tokens", (), {"input_ids": self.ids})()


# ------------------------------------------------------------------------------------------------- timing
class _Bench:
    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device = device
        self.warmup = warmup
        self.reps = reps
        self.errors: dict[str, str] = {}
        self.peak_memory: dict[str, int | None] = {}
        self.samples: dict[str, list[float]] = {}
        self.paired: dict[str, float] = {}  # case → median of eager/compiled ratios over alternating pairs

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB

    def release(self) -> None:
        if self.device.type == "cuda":  # a full gc costs ~0.2 s here; only CUDA memory needs it
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def timed(self, step: Callable[[], None]) -> float:
        self.sync()
        t0 = time.perf_counter()
        step()
        self.sync()
        return time.perf_counter() - t0

    def measure(self, name: str, make: Callable[[], tuple[Callable[[], None], Callable[[], None]]],
                paired: bool = False) -> float | None:
        """``make()`` → (step, teardown); warm-up, then the median of ``reps`` synchronised steps (None if failed).
        ``paired``: the step has an eager twin (``step.eager``); after its warm-up the two alternate (eager first in
        even pairs, second in odd ones), and the median of the per-pair ratios eager/step lands in ``paired``."""
        self.release()
        t_start = time.perf_counter()
        teardown = None
        result = None
        try:
            step, teardown = make()
            for _ in range(self.warmup):
                step()
            self.sync()
            times, twins = [], []
            if paired:
                step.eager()
            for i in range(self.reps):
                if paired and i % 2 == 0:
                    twins.append(self.timed(step.eager))
                times.append(self.timed(step))
                if paired and i % 2 == 1:
                    twins.append(self.timed(step.eager))
            self.samples[name] = [round(t, 6) for t in times]
            if paired:
                self.samples[name + "_eager"] = [round(t, 6) for t in twins]
                self.paired[name] = statistics.median(e / c for e, c in zip(twins, times))
            result = statistics.median(times)
            self.peak_memory[name] = self.peak()
        except Exception as exc:  # noqa: BLE001 — one failed measurement (e.g. CUDA OOM) must not lose the others
            oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            reason = "CUDA out of memory" if oom else f"{type(exc).__name__}: {first}"
            self.errors[name] = reason
            self.peak_memory[name] = None
            _log(f"{name}: FAILED ({reason})")
        finally:
            if teardown is not None:
                try:
                    teardown()
                except Exception:  # noqa: BLE001
                    pass
            self.release()
        if result is not None:
            _log(f"{name}: {result:.4f} s/step (median of {self.reps}, {time.perf_counter() - t_start:.1f} s total)")
        return result


def _matmul_peak(device: torch.device, dtype: torch.dtype, n: int, trials: int, per_trial: int) -> float:
    """Best FLOP/s of an n³ matmul on this device in ``dtype``."""
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        torch.mm(a, b)
    sync()
    best = math.inf
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(per_trial):
            torch.mm(a, b)
        sync()
        best = min(best, (time.perf_counter() - t0) / per_trial)
    del a, b
    return 2.0 * n ** 3 / best


# ----------------------------------------------------------------------------------------------- the run
def _count_flops(fn: Callable[[], None], device: torch.device) -> int:
    """FLOPs (matmul + convolution + attention, forward and backward) of ``fn``; on the CPU attention runs the math
    backend while counting, since the counter has no formula for the CPU flash kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if device.type in ("cpu", "meta"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH), counter:
            fn()
    else:
        with counter:
            fn()
    return int(counter.get_total_flops())


def _paper_shape_flops(size: str, latent_shape: tuple, cond_shape: tuple) -> int:
    """FLOPs of one cav T-LoRA step at ``latent_shape``, counted on meta tensors (shapes only, nothing computed)."""
    meta = torch.device("meta")
    with torch.device("meta"):
        from diffusers import UNet3DConditionModel

        config = json.loads(UNET_CONFIG.read_text()) if size == "full" else dict(TINY_UNET)
        unet = UNet3DConditionModel.from_config(config)
    unet.requires_grad_(False)
    unet.train(False)
    config = lambda kind, r, a: lora.lora_config(kind, "cav", r, a, families.UNET3D)  # noqa: E731
    lora.add_lora(unet, S_CAV, config("spatial", RANK_S, ALPHA_S), low_cpu_mem_usage=True)
    lora.add_lora(unet, T_CAV, config("temporal", RANK_T, ALPHA_T), low_cpu_mem_usage=True)
    lora.activate(unet, [S_CAV, T_CAV], trainable=T_CAV)
    latents = torch.empty(latent_shape, device=meta)
    cond = torch.empty(cond_shape, device=meta)
    t = torch.full((latent_shape[0],), 500, device=meta)

    def step():  # diffusion_loss minus its elementwise noising (autocast has no meta device)
        unet(latents, t, encoder_hidden_states=cond).sample.float().pow(2).mean().backward()

    return _count_flops(step, meta)


# ------------------------------------------------------------------------------------------------- the rig
CAV, MD = (S_CAV, T_CAV), (S_MD, T_MD)  # active adapters of each placement's T-LoRA step (spatial frozen)


class _Rig:
    """The models and inputs the cases share, and the two step factories every case is made of. Each factory
    returns ``make() → (step, teardown)``; ``make`` sets the UNet up for the case, ``teardown`` undoes it."""

    def __init__(self, size: str, dev: torch.device, dtype: torch.dtype, codecs: bool = True,
                 family: families.Family = families.UNET3D):
        from diffusers import DDIMScheduler, DDPMScheduler

        self.dev, self.dtype, self.family = dev, dtype, family
        self.autocast = dtype if dtype != torch.float32 else None  # the GPU's configuration: bf16 under autocast
        gen = torch.Generator().manual_seed(SEED)
        self.unet = _build_unet(size, dev, dtype, gen, family)
        self.unet_params = sum(p.numel() for p in self.unet.parameters())
        # adapters on the family's targets: cav T-LoRA + S-LoRA; MotionDirector temporal (attn + FFN) + spatial
        # (attn1 + FFN) LoRA
        config = lambda kind, placement, r, a: lora.lora_config(kind, placement, r, a, family)  # noqa: E731
        self.n_modules = {
            T_CAV: lora.add_lora(self.unet, T_CAV, config("temporal", "cav", RANK_T, ALPHA_T)),
            S_CAV: lora.add_lora(self.unet, S_CAV, config("spatial", "cav", RANK_S, ALPHA_S)),
            T_MD: lora.add_lora(self.unet, T_MD, config("temporal", "motiondirector", RANK_T, ALPHA_T)),
            S_MD: lora.add_lora(self.unet, S_MD, config("spatial", "motiondirector", RANK_S, ALPHA_S)),
        }
        self.n_params = {name: lora.count_parameters(self.unet, name) for name in self.n_modules}
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, prediction_type="epsilon")
        self.ddim = DDIMScheduler.from_config(self.scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                              steps_offset=1)
        self.ddim.set_timesteps(50)
        self.latent_shape = TINY_LATENT if size == "tiny" else PAPER_LATENT if dev.type == "cuda" else CPU_FULL_LATENT
        self.vae = self.text_encoder = None
        # the text condition reaches the UNet as backbone.load passes it (AnimateDiff: repeated for every frame)
        backbone_mod.attach_condition(self.unet, family)
        if codecs:  # pixel frames and token ids → the cached latents / text states (computed once here)
            self.vae = _build_vae(size, dev, dtype, gen)
            self.text_encoder = _build_text_encoder(size, dev, dtype, gen, family)
            _, _, n_frames, h, w = self.latent_shape
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.frames = (torch.rand(n_frames, 3, h * factor, w * factor, generator=gen) * 2 - 1).to(dev)
            te = self.text_encoder.config
            self.ids = torch.randint(0, te.vocab_size, (1, te.max_position_embeddings), generator=gen).to(dev)
            self.bb = Backbone(self.unet, self.vae, self.text_encoder, _FixedIds(self.ids), self.scheduler, "random",
                               dev, dtype, family)
            self.latents, self.cond = self.encode_inputs()
            assert tuple(self.latents.shape) == tuple(self.latent_shape), (self.latents.shape, self.latent_shape)
            self.uncond = encode_prompt(self.bb, "")  # stands in for the negative prompt's states
        else:  # op counts only: random latents and text states of the right shapes
            self.latents = torch.randn(self.latent_shape, generator=gen).to(dev, dtype)
            text = (1, 77, self.unet.config.cross_attention_dim)
            self.cond, self.uncond = (torch.randn(text, generator=gen).to(dev, dtype) for _ in range(2))
        self.single = self.latents.permute(2, 1, 0, 3, 4).contiguous()  # (F, C, 1, h, w): F independent images
        self.cond_single = self.cond.expand(self.single.shape[0], -1, -1)
        self.first_frame = self.latents[:, :, :1].contiguous()

    def encode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        lat = encode_frames(self.bb, self.frames).permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, F, h, w) as t_lora_stage
        return lat, encode_prompt(self.bb, "")

    def train(self, active, trainable: str, lat=None, cnd=None, *, bypass=False, uncached=False,
              checkpointing=False, compiled=False, plain=False):
        """One ``trainer.train_step`` of adapter ``trainable`` with ``active`` on: lean as ``cav train`` runs it
        (frozen adapters merged, fused LoRA forward, compute-dtype copies, fused AdamW), or ``plain``: the step
        before issue 16 (peft forward for every adapter, fp32 adapters cast per layer, for-loop AdamW)."""
        def make():
            lora.activate(self.unet, list(active), trainable=trainable)
            set_gradient_checkpointing(self.unet, checkpointing)
            frozen = lean.FrozenMerge(self.unet, [] if plain else [a for a in active if a != trainable]).merge()
            x, y = (self.latents, self.cond) if lat is None else (lat, cnd)
            batch = (lambda g: self.encode_inputs()) if uncached else (lambda g: (x, y))
            fam = self.family
            stage = Stage(trainable, 0, [{"params": lora.lora_parameters(self.unet, trainable), "lr": 1e-4}], batch,
                          fam.objective, fam.image_mode if bypass else None)
            if plain:
                optimizer = torch.optim.AdamW(stage.param_groups, weight_decay=0.0)  # make_optimizer before
            else:
                lean.use_lean_step(stage, self.unet, trainable, self.autocast)
                optimizer = make_optimizer(stage)
            gen = torch.Generator().manual_seed(SEED)  # same noise and timesteps in every measurement

            def step():
                train_step(self.unet, self.scheduler, stage, optimizer, gen, autocast_dtype=self.autocast)

            step.stage = stage  # for explain()
            if compiled:
                compile_unet(self.unet, self.dev)
                step.eager = self._eager_twin(step)

            def teardown():
                optimizer.zero_grad(set_to_none=True)
                optimizer.state.clear()
                uncompile_unet(self.unet)
                frozen.restore()
                set_gradient_checkpointing(self.unet, False)

            return step, teardown

        return make

    def generation(self, compiled=False, plain=False):
        """One denoising step as ``cav generate`` runs it: CFG batch of 2, the T-LoRA alone (merged into the weights
        as ``sampling.sample_videos`` does; ``plain``: run by peft beside them, as before issue 16), DDIM update."""
        def make():
            lora.activate(self.unet, [T_CAV])
            set_gradient_checkpointing(self.unet, False)
            frozen = lean.FrozenMerge(self.unet, [] if plain else [T_CAV]).merge()
            text = torch.cat([self.uncond, self.cond])
            t = self.ddim.timesteps[len(self.ddim.timesteps) // 2]
            x0 = torch.randn(self.latents.shape, generator=torch.Generator().manual_seed(SEED)).to(self.dev, self.dtype)

            @torch.no_grad()
            def step():
                out = self.unet(torch.cat([x0, x0]), t, encoder_hidden_states=text).sample
                u, v = out.chunk(2)
                self.ddim.step(u + 9.0 * (v - u), t, x0)

            if compiled:
                compile_unet(self.unet, self.dev)
                step.eager = self._eager_twin(step)

            def teardown():
                uncompile_unet(self.unet)
                frozen.restore()

            return step, teardown

        return make

    def _eager_twin(self, step: Callable[[], None]) -> Callable[[], None]:
        """The same step with the UNet's compiled forward taken off for one call: what the compiled step is timed
        against, alternating with it (``_Bench.measure(..., paired=True)``)."""
        compiled_forward = self.unet.__dict__["forward"]

        def eager():
            del self.unet.forward
            try:
                step()
            finally:
                self.unet.forward = compiled_forward

        return eager

    def explain(self, make) -> tuple[int, list[str]]:
        """Graph breaks of the UNet call a case's step makes, traced in that call's configuration: the step's stage
        context (lean forward, compute copies), grad mode and autocast as they were."""
        step, teardown = make()
        calls = []

        def capture(*args, **kwargs):  # record the call, then run it for real so the step completes
            calls.append((args, kwargs, torch.is_grad_enabled(), torch.is_autocast_enabled(self.dev.type)))
            return type(self.unet).forward(self.unet, *args, **kwargs)

        stage = getattr(step, "stage", None)
        context = stage.forward_backward_context if stage is not None else contextlib.nullcontext
        self.unet.forward = capture
        try:
            step()
            self.unet.__dict__.pop("forward", None)
            args, kwargs, grad, autocast = calls[0]
            with context(), torch.set_grad_enabled(grad), _autocast(self.dev, self.autocast if autocast else None):
                return graph_breaks(self.unet, *args, **kwargs)
        finally:
            self.unet.__dict__.pop("forward", None)
            teardown()


@dataclass(frozen=True)
class Case:
    """One timed measurement: ``make(rig)`` gives the step factory; its median time lands in ``result[key]``."""

    name: str  # names its peak memory, samples and errors
    key: str
    make: Callable[[_Rig], Callable]
    group: str = "timing"  # --only picks cases by name or group
    quick: bool = True  # also run with --quick
    family: families.Family = families.UNET3D  # the family whose rig (``Family.rig``) the step runs on
    # compiled cases: the JSON key of the speedup over the same step eager, measured with the two alternating
    # (``step.eager``), so that a change of machine load hits both sides of every pair
    paired: str | None = None


TIMED = (
    Case("t_lora_step", "t_lora_step_s", lambda r: r.train(CAV, T_CAV)),
    Case("t_lora_step_plain", "t_lora_step_plain_s", lambda r: r.train(CAV, T_CAV, plain=True)),
    Case("motiondirector_step", "motiondirector_step_s", lambda r: r.train(MD, T_MD)),
    Case("t_lora_step_checkpointing", "checkpointing_step_s", lambda r: r.train(CAV, T_CAV, checkpointing=True)),
    Case("motiondirector_step_checkpointing", "motiondirector_checkpointing_step_s",
         lambda r: r.train(MD, T_MD, checkpointing=True)),
    Case("motiondirector_spatial_path_step", "motiondirector_spatial_path_step_s",
         lambda r: r.train([S_MD], S_MD, r.first_frame, r.cond)),
    Case("absorber_step", "absorber_step_s", lambda r: r.train([S_CAV], S_CAV, r.single, r.cond_single, bypass=True)),
    Case("generation_step", "generation_step_s", lambda r: r.generation()),
    Case("uncached_step", "uncached_step_s", lambda r: r.train(CAV, T_CAV, uncached=True)),
    # measured again right after the uncached step; its spread against t_lora_step shows the timing noise
    Case("cached_step", "cached_step_s", lambda r: r.train(CAV, T_CAV), quick=False),
    Case("t_lora_step_compiled", "compiled_step_s", lambda r: r.train(CAV, T_CAV, compiled=True), group="compile",
         paired="compiled_speedup"),
    Case("generation_step_compiled", "compiled_generation_step_s", lambda r: r.generation(compiled=True),
         group="compile", paired="compiled_generation_speedup"),
    # the cav T-LoRA step on the motion modules of SD 1.5 + v1-5-2 (S-LoRA on the image UNet, active and frozen)
    Case("animatediff_t_lora_step", "animatediff_t_lora_step_s", lambda r: r.train(CAV, T_CAV), family=families.ANIMATEDIFF),
)


@dataclass(frozen=True)
class Count:
    """One op count (and graph-break check) in the GPU's configuration: bf16 frozen weights, fp32 adapters, bf16
    autocast, on whatever device runs the benchmark (op counts do not depend on the device or the latent size)."""

    name: str
    make: Callable[[_Rig], Callable]
    graph_breaks: bool = True
    family: families.Family = families.UNET3D  # the family whose rig (``Family.rig``) the step runs on
    # compiled cases: the JSON key of the speedup over the same step eager, measured with the two alternating
    # (``step.eager``), so that a change of machine load hits both sides of every pair
    paired: str | None = None


COUNTED = (
    Count("t_lora_step", lambda r: r.train(CAV, T_CAV)),
    Count("t_lora_step_plain", lambda r: r.train(CAV, T_CAV, plain=True), graph_breaks=False),
    Count("generation_step", lambda r: r.generation()),
    Count("generation_step_plain", lambda r: r.generation(plain=True), graph_breaks=False),
    Count("animatediff_t_lora_step", lambda r: r.train(CAV, T_CAV), graph_breaks=False, family=families.ANIMATEDIFF),
)
GROUPS = ("timing", "compile", "counts", "graph_breaks", "flops")
COUNT_LATENT = (1, 4, 2, 8, 8)  # small: counting runs the full UNet in bf16 on the CPU too


def _autocast(dev: torch.device, dtype):
    return torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class _Skip(Exception):
    pass


def _count_phase(size: str, dev: torch.device, bench: "_Bench", only: set[str]) -> dict:
    """Ops, casts and graph breaks per counted step, on a UNet built in the GPU's configuration."""
    cuda = dev.type == "cuda"
    dtype = (torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16)
    counts, breaks, rig, shape = {}, {}, None, None
    for case in COUNTED:
        if "counts" not in only and not (case.graph_breaks and "graph_breaks" in only):
            continue
        if rig is None or rig.family is not case.family:  # one rig per family, built when its first count comes
            del rig
            gc.collect()
            rig = _Rig(size, dev, dtype, codecs=False, family=case.family)
            if not cuda:
                rig.latents = rig.latents[:, :, :COUNT_LATENT[2], :COUNT_LATENT[3], :COUNT_LATENT[4]].contiguous()
            shape = shape or list(rig.latents.shape)
        try:
            if "counts" not in only:
                raise _Skip
            step, teardown = case.make(rig)()
            try:
                step()  # AdamW builds its state on the first step; count the second
                c = count_ops(step)
            finally:
                teardown()
            counts[case.name] = c.summary(top=10)
            _log(f"{case.name}: {c.total} ops, {c.casts} casts per step")
        except _Skip:
            pass
        except Exception as exc:  # noqa: BLE001
            bench.errors[f"ops_{case.name}"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        if case.graph_breaks and "graph_breaks" in only:
            try:
                n, reasons = rig.explain(case.make(rig))
                breaks[case.name] = {"count": n, "reasons": reasons}
                _log(f"{case.name}: {n} graph breaks")
            except Exception as exc:  # noqa: BLE001
                bench.errors[f"graph_breaks_{case.name}"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        bench.release()
    del rig
    gc.collect()  # the bf16 UNet sits in reference cycles (step closures): free it before the timing rig is built
    bench.release()
    return {"counts": counts, "breaks": breaks, "latent": shape, "dtype": str(dtype).replace("torch.", "")}


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
    """Run the benchmark (see module doc); ``size`` is ``full`` (ModelScope sizes) or ``tiny`` (tests); ``only``
    limits it to some cases (names from ``TIMED``) or groups (``GROUPS``)."""
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    chosen = _select(only)
    t_all = time.perf_counter()
    dev = resolve_device(device)
    tune_backends(dev)  # as training does
    cuda = dev.type == "cuda"
    if cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        dtype = torch.float32
    if quick:
        warmup, reps = 1, 2
    elif cuda:
        warmup, reps = 2, 6
    else:
        warmup, reps = 1, 3 if size == "tiny" else 2
    bench = _Bench(dev, warmup, reps)

    counted = None
    if "counts" in chosen or "graph_breaks" in chosen:
        _log("counting ops per step (bf16 weights, fp32 adapters, bf16 autocast) ...")
        counted = _count_phase(size, dev, bench, chosen)

    cases = [c for c in TIMED if c.name in chosen and (c.quick or not quick)]
    # The UNet3D rig carries the headline keys (and FLOPs); another family's rig is built only for its own cases,
    # first, and freed before the next is built: two full-size UNets at once do not fit a 24 GB machine.
    rows = list(dict.fromkeys([families.UNET3D] * (not cases or "flops" in chosen) + [c.family for c in cases]))
    primary = families.UNET3D if families.UNET3D in rows else rows[-1]
    rig, res, others = None, {}, {}
    for family in [f for f in rows if f is not primary] + [primary]:
        current = _warm_rig(size, dev, dtype, family, warmup, reps, bench)
        for case in (c for c in cases if c.family is family):
            res[case.key] = bench.measure(case.name, case.make(current), paired=case.paired is not None)
            if case.paired and case.name in bench.paired:
                res[case.paired] = bench.paired[case.name]
        if family is primary:
            rig = current  # the rig the result's model keys describe
        else:
            others[family.name] = _rig_info(current)
            del current
            gc.collect()
            bench.release()
    if "cached_step_s" not in res and "t_lora_step_s" in res:
        res["cached_step_s"] = res["t_lora_step_s"]  # the very same computation: reuse it where time is short
        cached_note = "cached_step_s is the t_lora_step measurement (identical computation)"
    else:
        cached_note = "cached_step_s measured right after it (the same computation as t_lora_step)"
    if "t_lora_step_s" in res:
        res["no_checkpointing_step_s"] = res["t_lora_step_s"]  # t_lora_step runs without checkpointing

    flops = _flops_section(rig, bench, res, quick) if "flops" in chosen else {}
    result = _result(rig, bench, res, flops, counted, quick, size, warmup, reps)
    result["families"] = {rig.family.name: _rig_info(rig), **others}
    result["note"] = _note(result, cuda, size, cached_note)
    result["total_s"] = round(time.perf_counter() - t_all, 2)
    _log(f"done in {result['total_s']:.1f} s")
    del rig
    bench.release()
    return _jsonable(result)


def _warm_rig(size: str, dev: torch.device, dtype: torch.dtype, family: families.Family, warmup: int, reps: int,
              bench: _Bench) -> _Rig:
    """The rig of ``family``, after one untimed T-LoRA step: a fresh process (or model) pays for page faults,
    allocator growth and kernel/library setup on its first big steps, which would otherwise land on whichever
    measurement comes first."""
    t0 = time.perf_counter()
    rig = _Rig(size, dev, dtype, family=family)
    _log(f"device {dev} ({_device_name(dev)}), dtype {str(dtype).replace('torch.', '')}, size {size}, "
         f"latent {rig.latent_shape}, warm-up {warmup}, timed {reps}; built random-weight {family.rig.label} "
         f"({rig.unet_params / 1e9:.3f} B params), VAE, text encoder in {time.perf_counter() - t0:.1f} s")
    _log("process warm-up ...")
    try:
        step, teardown = rig.train(CAV, T_CAV)()
        step()
        bench.sync()
        teardown()
    except Exception as exc:  # noqa: BLE001 — the measurements record the failure properly
        _log(f"warm-up failed ({type(exc).__name__})")
    bench.release()
    return rig


def _rig_info(rig: _Rig) -> dict:
    """What a family's rig measured on: its UNet, latent and adapters."""
    return {"unet": rig.family.rig.label, "unet_params": rig.unet_params,
            "latent_shape": list(rig.latent_shape),
            "text_shape": list(rig.cond.shape),
            "trainable_params": {"cav": rig.n_params[T_CAV], "cav_s_lora": rig.n_params[S_CAV]},
            "adapted_modules": {"cav": rig.n_modules[T_CAV], "cav_s_lora": rig.n_modules[S_CAV]}}


def _flops_section(rig: _Rig, bench: _Bench, res: dict, quick: bool) -> dict:
    """FLOPs of one cav T-LoRA step, the device's matmul peak, and what they imply."""
    dev, cuda = rig.dev, rig.dev.type == "cuda"
    flops, counted = None, "one cav T-LoRA step (forward + backward, no checkpointing): matmul, conv, attention"
    step_for_flops = res.get("t_lora_step_s")
    _log("counting FLOPs of one cav T-LoRA step (forward + backward) ...")
    for checkpointing in (False, True):  # with checkpointing only if the plain step does not fit (CUDA OOM)
        if checkpointing and (flops is not None or res.get("checkpointing_step_s") is None):
            break
        try:
            bench.release()
            step, teardown = rig.train(CAV, T_CAV, checkpointing=checkpointing)()
            try:
                flops = _count_flops(step, dev)
            finally:
                teardown()
            if checkpointing:
                counted = ("one cav T-LoRA step WITH checkpointing (the plain step failed): forward + recomputed "
                           "forward + backward")
                step_for_flops = res["checkpointing_step_s"]
        except Exception as exc:  # noqa: BLE001
            bench.errors["flops" + ("_checkpointing" if checkpointing else "")] = \
                f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            _log(f"FLOP count FAILED ({type(exc).__name__})")
        finally:
            bench.release()
    paper_flops = flops if tuple(rig.latent_shape) == PAPER_LATENT else None
    if paper_flops is None:
        try:
            size = "full" if rig.unet_params > 1e8 else "tiny"
            paper_flops = _paper_shape_flops(size, PAPER_LATENT, (1,) + tuple(rig.cond.shape[1:]))
        except Exception as exc:  # noqa: BLE001
            bench.errors["paper_shape_flops"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    _log("measuring the device's matmul peak ...")
    if cuda:
        mm_n, mm_trials, mm_reps = (2048, 2, 3) if quick else (8192, 3, 10)
    else:
        mm_n, mm_trials, mm_reps = (256, 2, 2) if quick else (2048, 3, 1)
    try:
        measured_peak = _matmul_peak(dev, rig.dtype, mm_n, mm_trials, mm_reps)
    except Exception as exc:  # noqa: BLE001
        measured_peak = None
        bench.errors["matmul_peak"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    bench.release()
    achieved = flops / step_for_flops if flops and step_for_flops else None
    peaks = {"measured_device": measured_peak, **ASSUMED_PEAKS}

    def limits(f):
        return {k: (f / v if f and v else None) for k, v in peaks.items()}

    return {
        "flops_per_step": flops,
        "flops_counted": counted,
        "achieved_flops": achieved,
        "measured_peak_flops": measured_peak,
        "measured_peak_how": f"{mm_n}^3 matmul in {str(rig.dtype).replace('torch.', '')}, best of "
                             f"{mm_trials}×{mm_reps}",
        "peak_fraction": _ratio(achieved, measured_peak),
        "assumed_peak_flops": dict(ASSUMED_PEAKS),
        "physical_limit_s": limits(flops),
        "paper_shape_latent": list(PAPER_LATENT),
        "paper_shape_flops_per_step": paper_flops,
        "paper_shape_physical_limit_s": limits(paper_flops),
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def _count_keys(counted: dict | None) -> dict:
    """The op-count keys of the JSON: the lean T-LoRA step's at the top, the step before issue 16 beside it."""
    if counted is None:
        return {}
    c, breaks = counted["counts"], counted["breaks"]

    def get(case, key):
        return c.get(case, {}).get(key)

    out = {
        "ops_per_step": get("t_lora_step", "ops"),
        "cast_ops_per_step": get("t_lora_step", "casts"),
        "ops_per_step_plain": get("t_lora_step_plain", "ops"),
        "cast_ops_per_step_plain": get("t_lora_step_plain", "casts"),
        "generation_ops_per_step": get("generation_step", "ops"),
        "generation_cast_ops_per_step": get("generation_step", "casts"),
        "generation_ops_per_step_plain": get("generation_step_plain", "ops"),
        "generation_cast_ops_per_step_plain": get("generation_step_plain", "casts"),
        "animatediff_ops_per_step": get("animatediff_t_lora_step", "ops"),
        "animatediff_cast_ops_per_step": get("animatediff_t_lora_step", "casts"),
        "op_counts": c,
        "op_count_latent": counted["latent"],
        "op_count_dtype": counted["dtype"],
    }
    out["ops_ratio"] = _ratio(out["ops_per_step"], out["ops_per_step_plain"])
    out["cast_ops_ratio"] = _ratio(out["cast_ops_per_step"], out["cast_ops_per_step_plain"])
    if breaks:
        out["graph_breaks"] = {"training": breaks.get("t_lora_step", {}).get("count"),
                               "generation": breaks.get("generation_step", {}).get("count")}
        out["graph_break_reasons"] = {k: v["reasons"] for k, v in breaks.items() if v["reasons"]}
    return out


def _result(rig: _Rig, bench: _Bench, res: dict, flops: dict, counted, quick: bool, size: str, warmup: int,
            reps: int) -> dict:
    cuda = rig.dev.type == "cuda"
    md, md_spatial = res.get("motiondirector_step_s"), res.get("motiondirector_spatial_path_step_s")
    dual = md + md_spatial if md is not None and md_spatial is not None else None
    eager = res.get("t_lora_step_s")
    return {
        "device": rig.dev.type,
        "device_name": _device_name(rig.dev),
        "dtype": str(rig.dtype).replace("torch.", ""),
        "autocast": str(rig.autocast).replace("torch.", "") if rig.autocast else None,
        "size": size,
        "quick": quick,
        "unet_params": rig.unet_params,
        "latent_shape": list(rig.latent_shape),
        "pixel_shape": list(rig.frames.shape),
        "text_tokens": int(rig.ids.shape[1]),
        "warmup_steps": warmup,
        "timed_steps": reps,
        **res,
        "eager_step_s": eager,
        "compiled_speedup": res.get("compiled_speedup", _ratio(eager, res.get("compiled_step_s"))),
        "compiled_generation_speedup": res.get("compiled_generation_speedup", _ratio(
            res.get("generation_step_s"), res.get("compiled_generation_step_s"))),
        "lean_speedup": _ratio(res.get("t_lora_step_plain_s"), eager),
        **_count_keys(counted),
        "step_ratio": _ratio(eager, md),
        "step_ratio_checkpointing": _ratio(res.get("checkpointing_step_s"),
                                           res.get("motiondirector_checkpointing_step_s")),
        "motiondirector_dual_step_s": dual,
        "dual_step_ratio": _ratio(eager, dual),
        "cached_speedup": _ratio(res.get("uncached_step_s"), res.get("cached_step_s")),
        "checkpointing_slowdown": _ratio(res.get("checkpointing_step_s"), res.get("no_checkpointing_step_s")),
        "peak_memory_bytes": bench.peak_memory.get("t_lora_step_checkpointing") if cuda else bench.peak(),
        "peak_memory": dict(bench.peak_memory),
        "peak_memory_kind": ("torch.cuda.max_memory_allocated, reset before each measurement; includes the resident "
                             "weights of UNet, VAE and text encoder" if cuda else
                             "process peak RSS (ru_maxrss) after each measurement: monotonic, whole process"),
        **flops,
        "trainable_params": {"cav": rig.n_params[T_CAV], "motiondirector": rig.n_params[T_MD],
                             "cav_s_lora": rig.n_params[S_CAV], "motiondirector_spatial": rig.n_params[S_MD]},
        "adapted_modules": {"cav": rig.n_modules[T_CAV], "motiondirector": rig.n_modules[T_MD],
                            "cav_s_lora": rig.n_modules[S_CAV], "motiondirector_spatial": rig.n_modules[S_MD]},
        "gradient_checkpointing_method": _checkpointing_method(rig.unet),
        "step_samples_s": bench.samples,
        "errors": bench.errors,
        "torch_version": torch.__version__,
        "total_s": None,
        "note": "",
    }


def _checkpointing_method(unet) -> str:
    method = set_gradient_checkpointing(unet, True)
    set_gradient_checkpointing(unet, False)
    return method


def _note(r: dict, cuda: bool, size: str, cached_note: str) -> str:
    parts = [
        "random weights; cav T-LoRA step = T-LoRA r4 (temporal attn1+attn2 q/k/v/out incl. transformer_in) "
        "trainable + S-LoRA r1 (spatial attn1+attn2) active and frozen, as in stage 2",
        "motiondirector step = temporal LoRA r4 (temporal attn + FFN) trainable + spatial LoRA r1 "
        "(spatial attn1 + FFN) active and frozen; motiondirector_dual_step_s adds its spatial-path step (one frame, "
        "spatial LoRA trainable, temporal LoRA off), which MotionDirector runs every iteration too",
        f"absorber step = temporal layers bypassed, S-LoRA r1 trainable, {r['latent_shape'][2]} single frames, no "
        "textual inversion (with it the text encoder would run with grad every step)",
        "generation step = one UNet call on a CFG batch of 2 + DDIM update, T-LoRA merged into the weights as "
        "cav generate does, no grad",
        f"uncached step = VAE encoder on all frames + text encoder ({r['text_tokens']} random ids) + the T-LoRA "
        f"step; {cached_note}",
        "every training step = diffusion_loss + backward + clip_grad_norm + AdamW; times are medians of synchronised "
        "steps after warm-up",
    ]
    parts.append("lean step (t_lora_step and every other training step) = frozen adapters merged into the base "
                 "weights (restored exactly after), trainable adapter through one addmm per layer with a hand-written "
                 "backward, under autocast on compute-dtype copies of its fp32 master weights, fused AdamW; "
                 "t_lora_step_plain = the step before issue 16 (peft forward for every adapter, fp32 adapters cast "
                 "per layer, for-loop AdamW)")
    if r.get("ops_per_step") is not None:
        parts.append(f"ops_per_step / cast_ops_per_step: ATen ops dispatched by one training step after the first "
                     f"(forward, backward, clip, AdamW), counted with a TorchDispatchMode on a UNet in "
                     f"{r.get('op_count_dtype')} with fp32 adapters under {r.get('op_count_dtype')} autocast, latent "
                     f"{tuple(r.get('op_count_latent') or ())}; casts = _to_copy across dtype/device and copy_/"
                     "_foreach_copy_ between dtypes/devices (cav.bench.opcount)")
    if r.get("graph_breaks") is not None:
        parts.append("graph_breaks: torch._dynamo.explain on the adapted UNet's call inside the step's own "
                     "configuration (training: lean context, grad, autocast; generation: no grad, T-LoRA only)")
    if r.get("compiled_step_s") is not None or "t_lora_step_compiled" in r.get("errors", {}):
        parts.append("compiled step = the lean T-LoRA step with the UNet's forward under torch.compile(fullgraph="
                     "True; CUDA: mode='reduce-overhead'; CPU: inductor layout optimization off), compile time excluded "
                     "(warm-up); compiled_speedup (and compiled_generation_speedup) = median over pairs of "
                     "eager/compiled time, the compiled step and its eager twin alternating in one process; "
                     "eager_step_s = t_lora_step_s")
    if r.get("animatediff_t_lora_step_s") is not None or "animatediff_t_lora_step" in r.get("errors", {}):
        parts.append("animatediff_t_lora_step_s = the cav T-LoRA step on a random-weight UNetMotionModel (SD 1.5 "
                     "UNet + motion adapter v1-5-2 from the shipped configs; families.animatediff): T-LoRA r4 on the "
                     "motion modules' attn1+attn2 q/k/v/out trainable, S-LoRA r1 on the image UNet's attn1+attn2 "
                     "active and frozen, the text condition repeated for every frame as backbone.load passes it")
    if not cuda and size == "full":
        parts.append(f"CPU: latent reduced to {tuple(r['latent_shape'])} (the paper's is {PAPER_LATENT}) so the full "
                     "UNet finishes in minutes; at this size a step is bound by reading the weights, so times "
                     "do not scale with the latent; paper_shape_* FLOPs are counted on meta tensors")
    if size == "tiny":
        parts.append("tiny random model (tests): numbers say nothing about real speed")
    if r["errors"]:
        parts.append("failed: " + ", ".join(f"{k} ({v})" for k, v in r["errors"].items()))
    return "; ".join(parts)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    return obj


# ----------------------------------------------------------------------------------------------- table
def _fmt_s(v) -> str:
    if v is None:
        return "n/a"
    if v < 1e-3:
        return f"{v * 1e6:.1f} µs"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_bytes(v) -> str:
    return "n/a" if v is None else f"{v / 2 ** 30:.2f} GiB"


def _fmt_flops(v, unit="FLOP") -> str:
    if v is None:
        return "n/a"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {prefix}{unit}"
    return f"{v:.0f} {unit}"


def _fmt_n(v) -> str:
    return "n/a" if v is None else f"{v:,}"


def _fmt_x(v) -> str:
    return "n/a" if v is None else f"{v:.3f}×"


def format_table(result: dict) -> str:
    """A readable, aligned text table of the main numbers of ``run_speed``'s result."""
    r = result
    mem = r.get("peak_memory", {})
    rows: list[tuple[str, str, str]] = [
        ("T-LoRA step (cav)", _fmt_s(r.get("t_lora_step_s")), _fmt_bytes(mem.get("t_lora_step"))),
        ("MotionDirector temporal step", _fmt_s(r.get("motiondirector_step_s")),
         _fmt_bytes(mem.get("motiondirector_step"))),
        ("  step ratio cav / MD", _fmt_x(r.get("step_ratio")), ""),
        ("MD spatial-path step (1 frame)", _fmt_s(r.get("motiondirector_spatial_path_step_s")),
         _fmt_bytes(mem.get("motiondirector_spatial_path_step"))),
        ("MD dual step (temporal + spatial)", _fmt_s(r.get("motiondirector_dual_step_s")), ""),
        ("  step ratio cav / MD dual", _fmt_x(r.get("dual_step_ratio")), ""),
        ("T-LoRA step, checkpointing", _fmt_s(r.get("checkpointing_step_s")),
         _fmt_bytes(mem.get("t_lora_step_checkpointing"))),
        ("T-LoRA step, no checkpointing", _fmt_s(r.get("no_checkpointing_step_s")), _fmt_bytes(mem.get("t_lora_step"))),
        ("MD step, checkpointing", _fmt_s(r.get("motiondirector_checkpointing_step_s")),
         _fmt_bytes(mem.get("motiondirector_step_checkpointing"))),
        ("  step ratio cav / MD (ckpt)", _fmt_x(r.get("step_ratio_checkpointing")), ""),
        ("Absorber step (T2I, S-LoRA)", _fmt_s(r.get("absorber_step_s")), _fmt_bytes(mem.get("absorber_step"))),
        ("Generation step (CFG 2)", _fmt_s(r.get("generation_step_s")), _fmt_bytes(mem.get("generation_step"))),
        ("Uncached step (VAE+text+UNet)", _fmt_s(r.get("uncached_step_s")), _fmt_bytes(mem.get("uncached_step"))),
        ("Cached step (UNet only)", _fmt_s(r.get("cached_step_s")),
         _fmt_bytes(mem.get("cached_step", mem.get("t_lora_step")))),
        ("  cached speedup", _fmt_x(r.get("cached_speedup")), ""),
        ("AnimateDiff T-LoRA step (cav)", _fmt_s(r.get("animatediff_t_lora_step_s")),
         _fmt_bytes(mem.get("animatediff_t_lora_step"))),
        ("T-LoRA step before issue 16 (plain)", _fmt_s(r.get("t_lora_step_plain_s")),
         _fmt_bytes(mem.get("t_lora_step_plain"))),
        ("  lean speedup", _fmt_x(r.get("lean_speedup")), ""),
        ("T-LoRA step, compiled", _fmt_s(r.get("compiled_step_s")), _fmt_bytes(mem.get("t_lora_step_compiled"))),
        ("  compiled speedup", _fmt_x(r.get("compiled_speedup")), ""),
        ("Generation step, compiled", _fmt_s(r.get("compiled_generation_step_s")), ""),
        ("Ops per T-LoRA step lean / plain", f"{_fmt_n(r.get('ops_per_step'))} / "
                                            f"{_fmt_n(r.get('ops_per_step_plain'))}", ""),
        ("Casts per T-LoRA step lean / plain", f"{_fmt_n(r.get('cast_ops_per_step'))} / "
                                              f"{_fmt_n(r.get('cast_ops_per_step_plain'))}", ""),
        ("Ops / casts per generation step", f"{_fmt_n(r.get('generation_ops_per_step'))} / "
                                            f"{_fmt_n(r.get('generation_cast_ops_per_step'))}", ""),
        ("  before issue 16 (plain)", f"{_fmt_n(r.get('generation_ops_per_step_plain'))} / "
                                      f"{_fmt_n(r.get('generation_cast_ops_per_step_plain'))}", ""),
        ("Graph breaks training / generation", " / ".join(_fmt_n((r.get("graph_breaks") or {}).get(k))
                                                          for k in ("training", "generation")), ""),
        ("FLOPs per T-LoRA step", _fmt_flops(r.get("flops_per_step")), ""),
        ("Achieved", _fmt_flops(r.get("achieved_flops"), "FLOP/s"), ""),
        ("Measured matmul peak", _fmt_flops(r.get("measured_peak_flops"), "FLOP/s"), ""),
        ("  fraction of peak", "n/a" if r.get("peak_fraction") is None else f"{100 * r['peak_fraction']:.1f} %", ""),
    ]
    for key, v in (r.get("physical_limit_s") or {}).items():
        rows.append((f"Limit at {key}", _fmt_s(v), ""))
    if r.get("paper_shape_flops_per_step") and r.get("latent_shape") != r.get("paper_shape_latent"):
        shape = tuple(r["paper_shape_latent"])
        rows.append((f"FLOPs/step at {shape}", _fmt_flops(r["paper_shape_flops_per_step"]), ""))
        for key, v in (r.get("paper_shape_physical_limit_s") or {}).items():
            if key != "measured_device":
                rows.append((f"  limit at {key}", _fmt_s(v), ""))
    tp = r.get("trainable_params", {})
    rows.append(("Trainable params cav / MD", f"{tp.get('cav', 0):,} / {tp.get('motiondirector', 0):,}", ""))
    rows.append(("Peak memory (headline)", _fmt_bytes(r.get("peak_memory_bytes")), ""))

    head = (f"cav speed benchmark — {r.get('device_name')} [{r.get('device')}], {r.get('dtype')}, "
            f"latent {tuple(r.get('latent_shape', []))}, torch {r.get('torch_version')}")
    w0 = max(len(a) for a, _, _ in rows + [("measurement", "", "")])
    w1 = max(len(b) for _, b, _ in rows + [("", "time / value", "")])
    lines = [head, f"{'measurement':<{w0}}  {'time / value':>{w1}}  peak memory", "-" * (w0 + w1 + 15)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows]
    if r.get("errors"):
        lines.append("failed: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()))
    return "\n".join(lines)


__all__ = ["run_speed", "format_table", "set_gradient_checkpointing"]
