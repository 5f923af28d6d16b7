"""Speed benchmark: what one step of each of cav's phases costs on the full-size ModelScope UNet, side by side.

Everything is measured in one process on random weights (no download): the UNet3D is built from
``assets/modelscope_unet_config.json`` (1.4 B parameters), the VAE and text encoder from ModelScope's sizes.
Measured, each on the same inputs, warm-up steps excluded, median of the timed steps:

1. T-LoRA training step (forward + backward + AdamW, only LoRA trainable), placement ``cav`` vs ``motiondirector``;
2. appearance-absorber step (temporal layers bypassed, S-LoRA trainable, single frames);
3. one denoising step of generation (classifier-free guidance batch of 2, T-LoRA loaded);
4. the T-LoRA step with and without input caches (VAE + text encoder run every step, or not);
5. the T-LoRA step with and without gradient checkpointing;
6. peak memory per measurement; 7. FLOPs per step, achieved FLOP/s and the fraction of a measured matmul peak.

``run_speed`` returns a JSON-serialisable dict; ``format_table`` renders its main numbers.
"""

from __future__ import annotations

import gc
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ..adapters import lora
from ..backbone import Backbone, resolve_device
from ..bypass import temporal_bypass
from ..stages import encode_frames, encode_prompt
from ..accel import set_gradient_checkpointing, tune_backends
from ..trainer import Stage, diffusion_loss, make_optimizer

UNET_CONFIG = Path(__file__).resolve().parent.parent / "assets" / "modelscope_unet_config.json"

# ModelScope text-to-video-ms-1.7b: the VAE is Stable Diffusion's, the text encoder OpenCLIP ViT-H/14's text tower.
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
                scaling_factor=0.18215)
FULL_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
TINY_UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                 up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=8, in_channels=4, out_channels=4, sample_size=8)
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
    from diffusers.utils import logging as diffusers_logging

    with torch.device("meta"):
        module = build()
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # no "modules that should be kept in float32: []" notice
    try:
        module = module.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    module = module.to_empty(device=device)
    _fill_random(module, gen)
    module.requires_grad_(False)
    module.eval()
    return module


def _build_unet(size: str, device, dtype, gen):
    from diffusers import UNet3DConditionModel

    config = json.loads(UNET_CONFIG.read_text()) if size == "full" else dict(TINY_UNET)
    return _materialize(lambda: UNet3DConditionModel.from_config(config), device, dtype, gen)


def _build_vae(size: str, device, dtype, gen):
    from diffusers import AutoencoderKL

    spec = dict(FULL_VAE if size == "full" else TINY_VAE)
    n = len(spec["block_out_channels"])
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    return _materialize(lambda: AutoencoderKL(in_channels=3, out_channels=3, **blocks, **spec), device, dtype, gen)


def _build_text_encoder(size: str, device, dtype, gen):
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = dict(FULL_TEXT if size == "full" else TINY_TEXT)
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

    def measure(self, name: str, make: Callable[[], tuple[Callable[[], None], Callable[[], None]]]) -> float | None:
        """``make()`` → (step, teardown); warm-up, then the median of ``reps`` synchronised steps (None if failed)."""
        self.release()
        t_start = time.perf_counter()
        teardown = None
        result = None
        try:
            step, teardown = make()
            for _ in range(self.warmup):
                step()
            self.sync()
            times = []
            for _ in range(self.reps):
                self.sync()
                t0 = time.perf_counter()
                step()
                self.sync()
                times.append(time.perf_counter() - t0)
            self.samples[name] = [round(t, 6) for t in times]
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
    lora.add_lora(unet, S_CAV, lora.lora_config("spatial", "cav", RANK_S, ALPHA_S), low_cpu_mem_usage=True)
    lora.add_lora(unet, T_CAV, lora.lora_config("temporal", "cav", RANK_T, ALPHA_T), low_cpu_mem_usage=True)
    lora.activate(unet, [S_CAV, T_CAV], trainable=T_CAV)
    latents = torch.empty(latent_shape, device=meta)
    cond = torch.empty(cond_shape, device=meta)
    t = torch.full((latent_shape[0],), 500, device=meta)

    def step():  # diffusion_loss minus its elementwise noising (autocast has no meta device)
        unet(latents, t, encoder_hidden_states=cond).sample.float().pow(2).mean().backward()

    return _count_flops(step, meta)


def run_speed(device: str = "auto", size: str = "full", quick: bool = False) -> dict:
    """Run the benchmark (see module doc); ``size`` is ``full`` (ModelScope sizes) or ``tiny`` (tests)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    t_all = time.perf_counter()
    dev = resolve_device(device)
    tune_backends(dev)  # as training does
    cuda = dev.type == "cuda"
    if cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        dtype = torch.float32
    autocast = dtype if dtype != torch.float32 else None
    latent_shape = TINY_LATENT if size == "tiny" else PAPER_LATENT if cuda else CPU_FULL_LATENT
    if quick:
        warmup, reps = 1, 2
    elif cuda:
        warmup, reps = 2, 6
    else:
        warmup, reps = 1, 3 if size == "tiny" else 2
    bench = _Bench(dev, warmup, reps)
    gen = torch.Generator().manual_seed(SEED)

    _log(f"device {dev} ({_device_name(dev)}), dtype {str(dtype).replace('torch.', '')}, size {size}, "
         f"latent {latent_shape}, warm-up {warmup}, timed {reps}")
    t0 = time.perf_counter()
    unet = _build_unet(size, dev, dtype, gen)
    vae = _build_vae(size, dev, dtype, gen)
    text_encoder = _build_text_encoder(size, dev, dtype, gen)
    unet_params = sum(p.numel() for p in unet.parameters())
    _log(f"built random-weight UNet3D ({unet_params / 1e9:.3f} B params), VAE, text encoder in "
         f"{time.perf_counter() - t0:.1f} s")

    # adapters: cav T-LoRA + S-LoRA; MotionDirector temporal (attn + FFN) + spatial (attn1 + FFN) LoRA
    n_modules = {
        T_CAV: lora.add_lora(unet, T_CAV, lora.lora_config("temporal", "cav", RANK_T, ALPHA_T)),
        S_CAV: lora.add_lora(unet, S_CAV, lora.lora_config("spatial", "cav", RANK_S, ALPHA_S)),
        T_MD: lora.add_lora(unet, T_MD, lora.lora_config("temporal", "motiondirector", RANK_T, ALPHA_T)),
        S_MD: lora.add_lora(unet, S_MD, lora.lora_config("spatial", "motiondirector", RANK_S, ALPHA_S)),
    }
    n_params = {name: lora.count_parameters(unet, name) for name in n_modules}

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon")
    ddim = DDIMScheduler.from_config(scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ddim.set_timesteps(50)

    # inputs: pixel frames, token ids, and the cached latents / text states they give (computed once here)
    _, c, n_frames, h, w = latent_shape
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    frames = (torch.rand(n_frames, 3, h * factor, w * factor, generator=gen) * 2 - 1).to(dev)
    ids = torch.randint(0, text_encoder.config.vocab_size, (1, text_encoder.config.max_position_embeddings),
                        generator=gen).to(dev)
    bb = Backbone(unet, vae, text_encoder, _FixedIds(ids), scheduler, "random", dev, dtype)

    def encode_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        lat = encode_frames(bb, frames).permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, F, h, w) as t_lora_stage
        return lat, encode_prompt(bb, "")

    latents, cond = encode_inputs()
    assert tuple(latents.shape) == tuple(latent_shape), (latents.shape, latent_shape)
    uncond = encode_prompt(bb, "")  # stands in for the negative prompt's states

    # ------------------------------------------------------------------ step factories
    def train_step(active: list[str], trainable: str, lat, cnd, *, bypass=False, uncached=False,
                   checkpointing=False):
        def make():
            lora.activate(unet, active, trainable=trainable)
            set_gradient_checkpointing(unet, checkpointing)
            params = lora.lora_parameters(unet, trainable)
            stage = Stage(trainable, 0, [{"params": params, "lr": 1e-4}], batch=lambda g: (lat, cnd), bypass=bypass)
            optimizer = make_optimizer(stage)
            step_gen = torch.Generator().manual_seed(SEED)  # same noise and timesteps in every measurement

            def step():
                x, y = encode_inputs() if uncached else stage.batch(step_gen)
                loss = diffusion_loss(unet, scheduler, x, y, step_gen, bypass, autocast)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            def teardown():
                optimizer.zero_grad(set_to_none=True)
                optimizer.state.clear()
                set_gradient_checkpointing(unet, False)

            return step, teardown

        return make

    def generation_step():
        def make():
            lora.activate(unet, [T_CAV])  # `cav generate` loads the T-LoRA alone
            set_gradient_checkpointing(unet, False)
            text = torch.cat([uncond, cond])
            t = ddim.timesteps[len(ddim.timesteps) // 2]
            noise_gen = torch.Generator().manual_seed(SEED)
            x0 = torch.randn(latents.shape, generator=noise_gen).to(dev, dtype)

            @torch.no_grad()
            def step():
                x = torch.cat([x0, x0])
                out = unet(x, t, encoder_hidden_states=text).sample
                u, v = out.chunk(2)
                guided = u + 9.0 * (v - u)
                ddim.step(guided, t, x0)

            return step, lambda: None

        return make

    # ------------------------------------------------------------------ measurements
    cav_active, md_active = [S_CAV, T_CAV], [S_MD, T_MD]
    single = latents.permute(2, 1, 0, 3, 4).contiguous()  # (F, C, 1, h, w): F independent images
    cond_single = cond.expand(single.shape[0], -1, -1)
    first_frame = latents[:, :, :1].contiguous()

    # one untimed T-LoRA step first: a fresh process pays for page faults, allocator growth and kernel/library setup
    # on its first big steps, which would otherwise land on whichever measurement comes first
    _log("process warm-up ...")
    try:
        step, teardown = train_step(cav_active, T_CAV, latents, cond)()
        step()
        bench.sync()
        teardown()
    except Exception as exc:  # noqa: BLE001 — the measurements below record the failure properly
        _log(f"warm-up failed ({type(exc).__name__})")
    bench.release()

    res: dict[str, float | None] = {}
    res["t_lora_step_s"] = bench.measure("t_lora_step", train_step(cav_active, T_CAV, latents, cond))
    res["motiondirector_step_s"] = bench.measure("motiondirector_step", train_step(md_active, T_MD, latents, cond))
    res["checkpointing_step_s"] = bench.measure(
        "t_lora_step_checkpointing", train_step(cav_active, T_CAV, latents, cond, checkpointing=True))
    res["motiondirector_checkpointing_step_s"] = bench.measure(
        "motiondirector_step_checkpointing", train_step(md_active, T_MD, latents, cond, checkpointing=True))
    res["motiondirector_spatial_path_step_s"] = bench.measure(
        "motiondirector_spatial_path_step", train_step([S_MD], S_MD, first_frame, cond))
    res["absorber_step_s"] = bench.measure(
        "absorber_step", train_step([S_CAV], S_CAV, single, cond_single, bypass=True))
    res["generation_step_s"] = bench.measure("generation_step", generation_step())
    res["uncached_step_s"] = bench.measure("uncached_step", train_step(cav_active, T_CAV, latents, cond, uncached=True))
    if quick:
        res["cached_step_s"] = res["t_lora_step_s"]  # the very same computation: reuse it where time is short
        cached_note = "cached_step_s is the t_lora_step measurement (identical computation)"
    else:  # measured again right after the uncached step; its spread against t_lora_step shows the timing noise
        res["cached_step_s"] = bench.measure("cached_step", train_step(cav_active, T_CAV, latents, cond))
        cached_note = "cached_step_s measured right after it (the same computation as t_lora_step)"
    res["no_checkpointing_step_s"] = res["t_lora_step_s"]  # t_lora_step runs without checkpointing

    # ------------------------------------------------------------------ FLOPs, peak
    flops, flops_counted = None, "one cav T-LoRA step (forward + backward, no checkpointing): matmul, conv, attention"
    step_for_flops = res["t_lora_step_s"]
    _log("counting FLOPs of one cav T-LoRA step (forward + backward) ...")
    for checkpointing in (False, True):  # with checkpointing only if the plain step does not fit (CUDA OOM)
        if checkpointing and (flops is not None or res["checkpointing_step_s"] is None):
            break
        try:
            bench.release()
            step, teardown = train_step(cav_active, T_CAV, latents, cond, checkpointing=checkpointing)()
            try:
                flops = _count_flops(step, dev)
            finally:
                teardown()
            if checkpointing:
                flops_counted = ("one cav T-LoRA step WITH checkpointing (the plain step failed): forward + "
                                 "recomputed forward + backward")
                step_for_flops = res["checkpointing_step_s"]
        except Exception as exc:  # noqa: BLE001
            bench.errors["flops" + ("_checkpointing" if checkpointing else "")] = \
                f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            _log(f"FLOP count FAILED ({type(exc).__name__})")
        finally:
            bench.release()
    paper_flops = flops if tuple(latent_shape) == PAPER_LATENT else None
    if paper_flops is None:
        try:
            paper_flops = _paper_shape_flops(size, PAPER_LATENT, (1,) + tuple(cond.shape[1:]))
        except Exception as exc:  # noqa: BLE001
            bench.errors["paper_shape_flops"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"

    _log("measuring the device's matmul peak ...")
    if cuda:
        mm_n, mm_trials, mm_reps = (2048, 2, 3) if quick else (8192, 3, 10)
    else:
        mm_n, mm_trials, mm_reps = (256, 2, 2) if quick else (2048, 3, 1)
    try:
        measured_peak = _matmul_peak(dev, dtype, mm_n, mm_trials, mm_reps)
    except Exception as exc:  # noqa: BLE001
        measured_peak = None
        bench.errors["matmul_peak"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    bench.release()

    achieved = flops / step_for_flops if flops and step_for_flops else None
    peaks = {"measured_device": measured_peak, **ASSUMED_PEAKS}

    def limits(f):
        return {k: (f / v if f and v else None) for k, v in peaks.items()}

    def ratio(a, b):
        return a / b if a is not None and b else None

    dual = (res["motiondirector_step_s"] + res["motiondirector_spatial_path_step_s"]
            if res["motiondirector_step_s"] is not None and res["motiondirector_spatial_path_step_s"] is not None
            else None)
    peak_bytes = bench.peak_memory.get("t_lora_step_checkpointing") if cuda else bench.peak()
    result = {
        "device": dev.type,
        "device_name": _device_name(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "autocast": str(autocast).replace("torch.", "") if autocast else None,
        "size": size,
        "quick": quick,
        "unet_params": unet_params,
        "latent_shape": list(latent_shape),
        "pixel_shape": list(frames.shape),
        "text_tokens": int(ids.shape[1]),
        "warmup_steps": warmup,
        "timed_steps": reps,
        **res,
        "step_ratio": ratio(res["t_lora_step_s"], res["motiondirector_step_s"]),
        "step_ratio_checkpointing": ratio(res["checkpointing_step_s"], res["motiondirector_checkpointing_step_s"]),
        "motiondirector_dual_step_s": dual,
        "dual_step_ratio": ratio(res["t_lora_step_s"], dual),
        "cached_speedup": ratio(res["uncached_step_s"], res["cached_step_s"]),
        "checkpointing_slowdown": ratio(res["checkpointing_step_s"], res["no_checkpointing_step_s"]),
        "peak_memory_bytes": peak_bytes,
        "peak_memory": dict(bench.peak_memory),
        "peak_memory_kind": ("torch.cuda.max_memory_allocated, reset before each measurement; includes the resident "
                             "weights of UNet, VAE and text encoder" if cuda else
                             "process peak RSS (ru_maxrss) after each measurement: monotonic, whole process"),
        "flops_per_step": flops,
        "flops_counted": flops_counted,
        "achieved_flops": achieved,
        "measured_peak_flops": measured_peak,
        "measured_peak_how": f"{mm_n}^3 matmul in {str(dtype).replace('torch.', '')}, best of {mm_trials}×{mm_reps}",
        "peak_fraction": ratio(achieved, measured_peak),
        "assumed_peak_flops": dict(ASSUMED_PEAKS),
        "physical_limit_s": limits(flops),
        "paper_shape_latent": list(PAPER_LATENT),
        "paper_shape_flops_per_step": paper_flops,
        "paper_shape_physical_limit_s": limits(paper_flops),
        "trainable_params": {"cav": n_params[T_CAV], "motiondirector": n_params[T_MD],
                             "cav_s_lora": n_params[S_CAV], "motiondirector_spatial": n_params[S_MD]},
        "adapted_modules": {"cav": n_modules[T_CAV], "motiondirector": n_modules[T_MD],
                            "cav_s_lora": n_modules[S_CAV], "motiondirector_spatial": n_modules[S_MD]},
        "gradient_checkpointing_method": _checkpointing_method(unet),
        "step_samples_s": bench.samples,
        "errors": bench.errors,
        "torch_version": torch.__version__,
        "total_s": None,
        "note": "",
    }
    result["note"] = _note(result, cuda, size, cached_note)
    result["total_s"] = round(time.perf_counter() - t_all, 2)
    _log(f"done in {result['total_s']:.1f} s")
    del unet, vae, text_encoder, bb
    bench.release()
    return _jsonable(result)


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
        "generation step = one UNet call on a CFG batch of 2 + DDIM update, T-LoRA active, no grad",
        f"uncached step = VAE encoder on all frames + text encoder ({r['text_tokens']} random ids) + the T-LoRA "
        f"step; {cached_note}",
        "every training step = diffusion_loss + backward + clip_grad_norm + AdamW; times are medians of synchronised "
        "steps after warm-up",
    ]
    if not cuda and size == "full":
        parts.append(f"CPU: latent reduced to {tuple(r['latent_shape'])} (the paper's is {PAPER_LATENT}) so the full "
                     "1.4 B UNet finishes in minutes; at this size a step is bound by reading the weights, so times "
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
