"""Training objectives: how a family's model is trained and how its noise schedule is walked, one class per kind.

A family names its objective (``families.Family.objective``); the trainer, ``backbone`` (which scheduler a base's
``scheduler/`` is read as, which one samples) and ``sampling`` (inversion, a partial start's noising) ask the
objective and never branch on the family. ``DDPM`` covers UNet3D and AnimateDiff: the model predicts what the
scheduler's ``prediction_type`` says (epsilon, v or the clean sample) at an integer DDPM timestep; sampling and
inversion are DDIM. ``FLOW`` covers Wan: flow matching (velocity target, shifted continuous timesteps:
``cav.wan.flow``), sampled by the base's own flow scheduler and inverted by Euler steps up the same sigma grid.
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

    def model_timestep(self, t: torch.Tensor, batch: int) -> torch.Tensor: ...

    # (prediction, target) -> the frame-difference term of ``--frame-diff-loss``; None: the objective has none
    frame_difference_loss: object


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

    def model_timestep(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """A schedule's timestep as the model takes it outside its pipeline: as it is (the UNets expand it)."""
        return t

    frame_difference_loss = None  # no frame-difference term (``--frame-diff-loss``) for the UNet rows


class FlowMatchObjective:
    """Flow matching as Wan trains (``cav.wan.flow.FlowObjective``: ``x_σ = (1 − σ)·x₀ + σ·ε``, velocity target
    ``ε − x₀``, σ drawn uniformly then shifted by the base scheduler's ``flow_shift``; timestep ``1000·σ``).

    Sampling uses the base's own scheduler class (Wan: UniPC with flow sigmas), so `cav generate` walks what stock
    ``WanPipeline`` walks; inversion is Euler up that scheduler's own sigma grid (``FlowInverse``), so an inverted
    or forward-noised start lands exactly on a sigma the sampler continues from."""

    name = "flow"
    scheduler_class = "UniPCMultistepScheduler"  # Wan's published scheduler/ (flow sigmas, flow_shift)

    def flow(self, scheduler):
        from .wan.flow import FlowObjective

        return FlowObjective(shift=float(scheduler.config.get("flow_shift", 1.0) or 1.0),
                             num_train_timesteps=int(scheduler.config.num_train_timesteps))

    def noised(self, scheduler, latents: torch.Tensor, gen: torch.Generator,
               timesteps: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps 1000·σ, velocity target); noise, then σ, drawn from ``gen`` on the CPU, one σ per
        batch row (image mode: frames are rows, so one σ per frame). ``timesteps`` [low, high) maps the shifted σ
        linearly into that window of the timestep range."""
        flow = self.flow(scheduler)
        device = latents.device
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        sigmas = flow.sample_sigmas(latents.shape[0], generator=gen)
        if timesteps is not None:
            lo, hi = (min(max(int(x), 0), flow.num_train_timesteps) for x in timesteps)
            sigmas = (lo + (hi - lo) * sigmas) / flow.num_train_timesteps
        sigmas = sigmas.to(device)
        return flow.noisy(latents, noise, sigmas), flow.timesteps(sigmas), flow.target(latents, noise)

    def sampler(self, config):
        """The base's own flow scheduler (what its pipeline samples with)."""
        import diffusers

        return getattr(diffusers, self.scheduler_class).from_config(config)

    def inverse(self, config):
        """Euler inversion up the sampler's sigma grid."""
        return FlowInverse(self.sampler(config))

    def add_noise(self, sampler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean latents on the straight path at the sampler's sigma of timestep ``t`` (its schedule's own, exact)."""
        sigma = sampler.sigmas[_index(sampler.timesteps, t)].to(latents.dtype)
        return (1 - sigma) * latents + sigma * noise

    def model_timestep(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """One timestep per batch row, as ``WanPipeline`` passes it (the transformer takes no scalar)."""
        return t.reshape(-1).expand(batch) if t.numel() == 1 else t

    @staticmethod
    def frame_difference_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The frame-difference term of ``--frame-diff-loss`` (``cav.wan.flow.frame_difference_mse``)."""
        from .wan.flow import frame_difference_mse

        return frame_difference_mse(prediction, target)


def _index(timesteps: torch.Tensor, t: torch.Tensor) -> int:
    return int((timesteps.cpu() == t.reshape(-1)[0].cpu()).nonzero()[0])


class FlowInverse:
    """A scheduler-shaped Euler walk from data up to noise over ``sampler``'s sigma grid (the flow analogue of
    ``DDIMInverseScheduler``; the update of ``cav.wan.flow.invert``): after k of n steps the latents sit at the
    sampler's sigma n − k, i.e. where its schedule step n − k starts."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.sigmas = self.timesteps = None

    def set_timesteps(self, steps: int, device=None) -> None:
        self.sampler.set_timesteps(steps)
        self.sigmas = self.sampler.sigmas.flip(0).float()  # 0 … σ_max
        n = self.sampler.config.num_train_timesteps
        self.timesteps = (self.sigmas[:-1] * n).to(device)

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor):
        from types import SimpleNamespace

        i = _index(self.timesteps, timestep)
        delta = (self.sigmas[i + 1] - self.sigmas[i]).to(sample.dtype)
        return SimpleNamespace(prev_sample=sample + delta * model_output)


DDPM = DdpmObjective()
FLOW = FlowMatchObjective()
