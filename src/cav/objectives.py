"""Training objectives: how a family's model is trained and how its noise schedule is walked, one class per kind.

A family names its objective (``families.Family.objective``); the trainer, ``backbone`` (which scheduler a base's
``scheduler/`` is read as, which one samples) and ``sampling`` (inversion, a partial start's noising) ask the
objective and never branch on the family. ``DDPM`` covers UNet3D and AnimateDiff: the model predicts what the
scheduler's ``prediction_type`` says (epsilon, v or the clean sample) at an integer DDPM timestep; sampling and
inversion are DDIM. A flow-matching objective (velocity target, shifted continuous timesteps, flow inversion) is a
second class with the same methods.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    """What a family's objective answers (``DdpmObjective`` is the one implemented)."""

    name: str
    scheduler_class: str  # the diffusers scheduler a base's scheduler/ folder is loaded as

    def noised(self, scheduler, latents: torch.Tensor, gen: torch.Generator,
               timesteps: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def sampler(self, config): ...

    def inverse(self, config): ...

    def add_noise(self, sampler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class DdpmObjective:
    """Denoising diffusion (DDPM noising, DDIM sampling and inversion), as ModelScope and AnimateDiff train."""

    name = "ddpm"
    scheduler_class = "DDPMScheduler"  # what a base's scheduler/ folder is loaded as for training

    def target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model must predict under the scheduler's ``prediction_type``: the noise, v, or the clean latents."""
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return scheduler.get_velocity(latents, noise, t)
        return latents

    def noised(self, scheduler, latents: torch.Tensor, gen: torch.Generator,
               timesteps: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, target) of one training batch; noise, then timesteps, drawn from ``gen`` on the
        CPU. ``timesteps``: [low, high) of the training timesteps (None: the scheduler's all)."""
        device = latents.device
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        total = scheduler.config.num_train_timesteps
        lo, hi = timesteps or (0, total)
        t = torch.randint(lo, min(hi, total), (latents.shape[0],), generator=gen).to(device)
        return scheduler.add_noise(latents, noise, t), t, self.target(scheduler, latents, noise, t)

    def sampler(self, config):
        """The scheduler sampling (and a partial start) walks: DDIM over the base's training schedule."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(config)

    def inverse(self, config):
        """The scheduler inversion walks: DDIM inversion."""
        from diffusers import DDIMInverseScheduler

        return DDIMInverseScheduler.from_config(config)

    def add_noise(self, sampler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean latents forward-noised to the sampler's timestep ``t``."""
        return sampler.add_noise(latents, noise, t)


DDPM = DdpmObjective()
