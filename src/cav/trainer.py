"""One explicit training loop for a diffusion adapter stage, read top to bottom.

batch (latents, text condition) → noise at a random timestep (the family's objective) → UNet (in the family's image
mode or not) → MSE on the objective's target → backward → clip → step → hooks → log → checkpoint. All randomness
comes from one CPU ``torch.Generator`` so a run is reproducible (and resumable) on any device.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import CavError
from .objectives import Objective


@dataclass
class Stage:
    """Everything one training stage needs; built by ``stages.py``."""

    name: str
    steps: int
    param_groups: list[dict]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # → latents (B,C,F,h,w), cond (B,L,D)
    objective: Objective  # the family's training objective (noising, timestep draws, target)
    # the family's image mode (``Family.image_mode``: a context manager over the model), or None: video mode
    image_mode: Callable[[torch.nn.Module], contextlib.AbstractContextManager] | None = None
    after_backward: list[Callable[[], None]] = field(default_factory=list)
    after_step: list[Callable[[], None]] = field(default_factory=list)
    # checkpoint(step, optimizer, generator_state, interrupted): saves adapters and the state to resume from
    checkpoint: Callable[[int, torch.optim.Optimizer, torch.Tensor, bool], None] | None = None
    checkpoint_every: int = 0
    timesteps: tuple[int, int] | None = None  # [low, high) of the training timesteps (None: the scheduler's all)
    # entered around forward + backward of every step (lean.LeanStep: fused LoRA forward, compute-dtype copies)
    forward_backward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # weight of the objective's frame-difference term in the loss (``--frame-diff-loss``; 0: the plain loss)
    frame_diff_loss: float = 0.0


class NonFiniteLoss(CavError):
    pass


def diffusion_loss(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, gen: torch.Generator,
                   image_mode: Callable | None = None, autocast_dtype: torch.dtype | None = None,
                   timesteps: tuple[int, int] | None = None, *, objective, frame_diff: float = 0.0) -> torch.Tensor:
    """The denoising loss of one batch under ``objective`` (noise and timesteps drawn from ``gen`` on the CPU), the
    model in ``image_mode`` when one is given; with ``frame_diff`` > 0 plus that weight × the objective's
    frame-difference term (``Objective.frame_difference_loss``: the error of what changes between frames)."""
    device = latents.device
    noisy, t, target = objective.noised(scheduler, latents, gen, timesteps)
    mode = image_mode(unet) if image_mode is not None else contextlib.nullcontext()
    with mode, torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
    loss = F.mse_loss(pred.float(), target.float())
    if frame_diff:
        loss = loss + frame_diff * objective.frame_difference_loss(pred, target)
    return loss


def make_optimizer(stage: Stage) -> torch.optim.Optimizer:
    # weight_decay 0: decay would move frozen embedding rows and shrink LoRA weights the paper does not decay.
    # fused: one kernel for all parameters instead of ~6 ops per parameter tensor (hundreds of LoRA matrices)
    params = [p for g in stage.param_groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(stage.param_groups, weight_decay=0.0, fused=fused or None)


def train_step(unet, scheduler, stage: Stage, optimizer: torch.optim.Optimizer, gen: torch.Generator, *,
               max_grad_norm: float = 1.0, autocast_dtype: torch.dtype | None = None, step: int = 0) -> torch.Tensor:
    """One optimisation step of ``stage``: batch → loss → backward → hooks → clip → AdamW → hooks; returns the loss.

    The one training step of cav: ``run_stage``, the speed benchmark and the toy base trainer all call it.
    ``step`` (1-based) only names the step in the error raised on a non-finite loss.
    """
    with stage.forward_backward_context():
        latents, cond = stage.batch(gen)
        loss = diffusion_loss(unet, scheduler, latents, cond, gen, stage.image_mode, autocast_dtype, stage.timesteps,
                              objective=stage.objective, frame_diff=stage.frame_diff_loss)
        if not math.isfinite(loss.item()):
            raise NonFiniteLoss(
                f"loss became {loss.item()} at {stage.name} step {step}: the last good checkpoint is kept; "
                "lower the learning rate (e.g. --t-lora-lr 1e-4) and continue with --resume"
            )
        loss.backward()
    for hook in stage.after_backward:
        hook()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in stage.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for hook in stage.after_step:
        hook()
    return loss.detach()


def run_stage(unet, scheduler, stage: Stage, gen: torch.Generator, log: Callable[[dict], None], *,
              start_step: int = 0, optimizer: torch.optim.Optimizer | None = None, max_grad_norm: float = 1.0,
              autocast_dtype: torch.dtype | None = None, quiet: bool = False) -> torch.optim.Optimizer:
    """Train ``stage`` from ``start_step`` to ``stage.steps``; returns the optimizer (its state is resumable).

    On Ctrl-C the last completed step is checkpointed (with the generator state from before the interrupted
    step, so a resumed run repeats it exactly) and the KeyboardInterrupt goes on to the caller.
    """
    optimizer = optimizer or make_optimizer(stage)
    bar = tqdm(range(start_step, stage.steps), initial=start_step, total=stage.steps, desc=stage.name,
               disable=quiet, dynamic_ncols=True)
    done, gen_state = start_step, gen.get_state()
    try:
        for step in bar:
            t0 = time.perf_counter()
            loss = train_step(unet, scheduler, stage, optimizer, gen, max_grad_norm=max_grad_norm,
                              autocast_dtype=autocast_dtype, step=step + 1)
            done, gen_state, value = step + 1, gen.get_state(), loss.item()
            log({"step": done, "stage": stage.name, "loss": round(value, 6),
                 "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 4)})
            bar.set_postfix(loss=f"{value:.4f}")
            if stage.checkpoint and (done == stage.steps or (stage.checkpoint_every and done % stage.checkpoint_every == 0)):
                stage.checkpoint(done, optimizer, gen_state, False)
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        if stage.checkpoint is not None and done > start_step:
            stage.checkpoint(done, optimizer, gen_state, True)
        raise
    finally:
        bar.close()
    return optimizer


class JsonlLog:
    """Append-only ``log.jsonl``: one line per step, flushed so a killed run keeps its history."""

    def __init__(self, path):
        self.path = path
        self.fh = open(path, "a", buffering=1)

    def __call__(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.fh.close()
