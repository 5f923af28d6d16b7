"""The speed benchmark's rig: a random-weight ``Backbone`` of a family (``Family.rig``'s model with SD's VAE, the
family's text encoder and a CLIP tokenizer, or with the family's own parts) and step factories made of cav's own
code: the plan ``cav train`` runs (``run.stage_plan``: the stage builders and the frozen S-LoRA's merge policy) +
``trainer.train_step``, and ``sampling.sample_with``. ``make() → (step, teardown)`` builds a case's stage on the
bare UNet as a run does, ``teardown`` takes its adapters off again. ``Bench`` times steps."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

from .. import families, lean
from ..accel import compile_unet, graph_breaks, set_gradient_checkpointing, uncompile_unet
from ..adapters import lora
from ..backbone import Backbone, attach_condition
from ..config import TrainConfig, load_recipe
from ..run import stage_plan
from ..sampling import sample_with
from ..stages import S_LORA, T_LORA, encode_frames, encode_prompt
from ..trainer import make_optimizer, train_step

FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
                scaling_factor=0.18215)  # Stable Diffusion's VAE, which ModelScope and AnimateDiff use
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                scaling_factor=1.0)
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, hidden_act="gelu", projection_dim=32)
PROMPT = "a red circle moving left on a grey background"
SEED = 0
GEN_STEPS = 3  # denoising steps per timed generation call: its 2 step-to-step intervals are the step's samples
RUN_FOLDER = Path("cav-bench-run")  # the plan's output folder: never written (no checkpoint or publish is called)


def log(msg: str) -> None:
    print(f"[cav bench speed] {msg}", file=sys.stderr, flush=True)


def materialize(build: Callable[[], torch.nn.Module], device, dtype) -> torch.nn.Module:
    """``build()`` on ``device`` with the libraries' own random init, in ``dtype``, frozen, in eval mode."""
    with torch.device(device):
        module = build()
    return module.to(dtype).requires_grad_(False).eval()


def clip_parts(family: families.Family, size: str) -> dict:
    """``Family.rig.parts`` of a UNet row: SD's VAE, the family's CLIP text encoder, a CLIP BPE tokenizer that pads to
    the encoder's length, ModelScope's (and SD's) DDPM training schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..toy.factory import BASE_WORDS, write_clip_tokenizer

    text = dict(family.rig.full_text() if size == "full" else TINY_TEXT)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp), BASE_WORDS, text["max_position_embeddings"])
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vae = dict(FULL_VAE if size == "full" else TINY_VAE)
    n = len(vae["block_out_channels"])
    vae.update(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon")
    return {"vae": lambda: AutoencoderKL.from_config(vae), "tokenizer": tokenizer, "scheduler": scheduler,
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**text))}


def random_backbone(family: families.Family, size: str, device, dtype) -> Backbone:
    """A ``Backbone`` of random weights, full size (``Family.rig``) or tiny, as ``backbone.load`` returns one."""
    torch.manual_seed(SEED)
    parts = family.rig.parts(size) if family.rig.parts is not None else clip_parts(family, size)
    unet = materialize(lambda: family.rig.model(size), device, dtype)
    vae, encoder = (materialize(parts[k], device, dtype) for k in ("vae", "text_encoder"))
    bb = Backbone(unet, vae, encoder, parts["tokenizer"], parts["scheduler"], "random", torch.device(device), dtype,
                  family)
    attach_condition(unet, family, bb.vae_factor)
    return bb


def drop_adapters(unet: torch.nn.Module, names) -> None:
    """Take adapters off the UNet (the next case adds its own, as a new run would)."""
    from peft.tuners.lora import LoraLayer

    for m in unet.modules():
        if isinstance(m, LoraLayer):
            for name in names:
                if name in m.lora_A:
                    m.delete_adapter(name)
    for name in names:
        getattr(unet, "peft_config", {}).pop(name, None)


class Rig:
    """A random-weight backbone of ``family``, a random clip at ``latent`` (1, C, F, h, w) and the run's recipe (the
    family's shipped one, S-LoRA absorber: textual inversion would run the text encoder with grad every step)."""

    def __init__(self, family: families.Family, size: str, device, dtype, latent: tuple,
                 autocast: torch.dtype | None = None):
        self.family, self.dev, self.dtype = family, torch.device(device), dtype
        self.bb = bb = random_backbone(family, size, device, dtype)
        self.unet, self.autocast = bb.unet, autocast
        self.unet_params = sum(p.numel() for p in bb.unet.parameters())
        _, _, n, h, w = latent
        n = family.rig.frames or n  # a VAE that takes only some frame counts (Wan: 4k+1): the row's own
        self.latent_shape = (1, bb.unet.config.in_channels, bb.latents.latent_frames(bb.vae.config, n), h, w)
        gen = torch.Generator().manual_seed(SEED)
        self.frames = (torch.rand(n, 3, h * bb.vae_factor, w * bb.vae_factor, generator=gen) * 2 - 1).to(bb.device)
        self.recipe = {**load_recipe(family.recipe), "frames": n, "size": list(self.frames.shape[2:]),
                       "prompt": PROMPT, "absorbers": "s-lora", "seed": SEED}
        self.text_shape = list(encode_prompt(bb, PROMPT).shape)
        self.adapters = {}  # (placement, kind) → (modules adapted, trainable parameters)
        for placement in ("cav", "motiondirector"):
            for kind in ("temporal", "spatial"):
                n_mod = lora.add_lora(bb.unet, "probe", self.cfg(placement).lora_config(kind, family))
                self.adapters[placement, kind] = (n_mod, lora.count_parameters(bb.unet, "probe"))
                drop_adapters(bb.unet, ["probe"])

    def cfg(self, placement: str = "cav", **over) -> TrainConfig:
        return TrainConfig.from_dict({**self.recipe, "placement": placement, **over})

    def train(self, placement: str = "cav", *, absorber=False, spatial_path=False, uncached=False,
              checkpointing=False, compiled=False, plain=False):
        """One ``train_step`` of a stage of the plan ``cav train`` runs on the clip: stage 2 (T-LoRA; stage 1 adds the
        S-LoRA, which the entry's merge policy folds into the weights) or, ``absorber``, stage 1; ``spatial_path``:
        MotionDirector's spatial path (the stage-1 S-LoRA of its placement on the first frame, temporal layers on);
        ``plain``: the same stage without the lean step (no merge, peft forward, fp32 adapters cast per layer,
        for-loop AdamW)."""
        def make():
            bb, cfg = self.bb, self.cfg(placement, cache_inputs=not uncached)
            set_gradient_checkpointing(bb.unet, checkpointing)
            absorbers, t_lora = stage_plan(bb, cfg, RUN_FOLDER, [self.frames], None)
            stage, name, around = absorbers.build(None), S_LORA, contextlib.ExitStack()
            if spatial_path:
                first = encode_frames(bb, self.frames[:1]).unsqueeze(2)  # (1, C, 1, h, w): one frame as a video
                batch = (first, encode_prompt(bb, PROMPT))
                stage = dataclasses.replace(stage, batch=lambda g: batch, image_mode=None)
            elif not absorber:
                stage, name = t_lora.build(None), T_LORA
                if not plain:
                    around.enter_context(t_lora.around_steps())  # the frozen S-LoRA merged, as in `cav train`
            if plain:
                stage.forward_backward_context = contextlib.nullcontext
                optimizer = torch.optim.AdamW(stage.param_groups, weight_decay=0.0)  # make_optimizer before
            else:
                if self.autocast != lean.autocast_dtype(bb.device, bb.dtype):  # counts: the GPU's autocast here
                    lean.use_lean_step(stage, bb.unet, name, self.autocast)
                optimizer = make_optimizer(stage)
            gen = torch.Generator().manual_seed(SEED)  # same noise and timesteps in every measurement

            def step():
                return train_step(bb.unet, bb.scheduler, stage, optimizer, gen, max_grad_norm=cfg.max_grad_norm,
                                  autocast_dtype=self.autocast)

            return self._finish(step, compiled, around, optimizer.state.clear)

        return make

    def generation(self, compiled=False, plain=False):
        """``sampling.sample_with`` as ``cav generate`` runs it (the T-LoRA alone, merged into the weights; guidance
        batch of 2), ``GEN_STEPS`` denoising steps; the step returns the times between successive UNet calls (one
        denoising step each: UNet, guidance, scheduler, the pipeline's loop). ``plain``: the T-LoRA run by peft
        beside the weights, as before issue 16. ``step.sample(n)`` samples with ``n`` steps (op counts)."""
        def make():
            bb, cfg = self.bb, self.cfg()
            set_gradient_checkpointing(bb.unet, False)
            lora.add_lora(bb.unet, T_LORA, cfg.lora_config("temporal", self.family))
            lora.activate(bb.unet, [T_LORA])
            unmerged = mock.patch.object(lean, "live_adapters", lambda unet: []) if plain else contextlib.nullcontext()

            def sample(steps: int):
                with unmerged:
                    sample_with(bb, [PROMPT], cfg.validation, [SEED], steps=steps)

            def step():
                marks = []

                def mark(*_):  # a pre-hook's return value would replace the UNet's inputs: None
                    if bb.device.type == "cuda":
                        torch.cuda.synchronize(bb.device)
                    marks.append(time.perf_counter())

                hook = bb.unet.register_forward_pre_hook(mark)
                try:
                    sample(GEN_STEPS)
                finally:
                    hook.remove()
                return [b - a for a, b in zip(marks, marks[1:])]

            step.sample = sample
            return self._finish(step, compiled, contextlib.ExitStack(), lambda: None)

        return make

    def _finish(self, step, compiled: bool, around: contextlib.ExitStack, clear: Callable[[], None]):
        """(step, teardown); ``compiled``: the UNet compiled, ``step.eager`` the same step with it off for one call
        (what the compiled step is timed against, alternating with it: ``Bench.measure(..., paired=True)``)."""
        unet = self.bb.unet
        if compiled:
            compile_unet(unet, self.dev)
            forward = unet.__dict__["forward"]

            def eager():
                del unet.forward
                try:
                    return step()
                finally:
                    unet.forward = forward

            step.eager = eager

        def teardown():
            clear()
            uncompile_unet(unet)
            around.close()
            set_gradient_checkpointing(unet, False)
            drop_adapters(unet, lora.adapter_names(unet))

        return step, teardown

    def explain(self, make) -> tuple[int, list[str]]:
        """Graph breaks of the UNet call a step makes, traced inside that very call (its stage context, merge, grad
        mode and autocast as they are)."""
        step, teardown = make()
        found = []

        def trace(module, args, kwargs):
            if not found:
                found.append(graph_breaks(module, *args, **kwargs))

        hook = self.unet.register_forward_pre_hook(trace, with_kwargs=True)
        try:
            step()
        finally:
            hook.remove()
            teardown()
        return found[0]


class Bench:
    """Medians of synchronised steps after warm-up; peak memory, samples and failures per measurement."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps
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

    def timed(self, step: Callable) -> float:
        """Seconds of ``step()``; a step that times itself returns its samples (their median is its time)."""
        self.sync()
        t0 = time.perf_counter()
        out = step()
        self.sync()
        return statistics.median(out) if isinstance(out, list) else time.perf_counter() - t0

    def measure(self, name: str, make: Callable, paired: bool = False) -> float | None:
        """``make()`` → (step, teardown); warm-up, then the median of ``reps`` synchronised steps (None if failed).
        ``paired``: the step has an eager twin (``step.eager``); after its warm-up the two alternate (eager first in
        even pairs, second in odd ones), and the median of the per-pair ratios eager/step lands in ``paired``."""
        self.release()
        t_start, teardown, result = time.perf_counter(), None, None
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
            self.fail(name, exc)
            self.peak_memory[name] = None
        finally:
            if teardown is not None:
                with contextlib.suppress(Exception):
                    teardown()
            self.release()
        if result is not None:
            log(f"{name}: {result:.4f} s/step (median of {self.reps}, {time.perf_counter() - t_start:.1f} s total)")
        return result

    def fail(self, name: str, exc: Exception) -> None:
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        self.errors[name] = "CUDA out of memory" if oom else f"{type(exc).__name__}: {first}"
        log(f"{name}: FAILED ({self.errors[name]})")
