"""Wan's training objective and its ODE, as functions: rectified flow with shifted timesteps.

Wan is trained by flow matching on the straight path between data and noise:
``x_σ = (1 − σ)·x₀ + σ·ε`` for σ ∈ [0, 1], and the transformer predicts the velocity ``v = dx/dσ = ε − x₀``
at timestep ``1000·σ``. Training draws σ by drawing u (uniform, or logit-normal as in SD3) and shifting it,
``σ = s·u / (1 + (s − 1)·u)``, which spends more steps at high noise (Wan: s = 3 at 480p, 5 at 720p; the same
formula as ``FlowMatchEulerDiscreteScheduler`` and UniPC's ``flow_shift``).

Sampling integrates the ODE from σ = 1 to 0 (``sample``, Euler: the same update as
``FlowMatchEulerDiscreteScheduler.step``); inversion integrates it from 0 to 1 on the same grid (``invert``),
which is the flow analogue of DDIM inversion: the noise it returns samples back to the given latents up to the
discretisation error (measured in ``tests/test_wan_flow.py`` and the notes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# velocity(latents, timestep (B,) in [0, num_train_timesteps]) → velocity, the shape of latents
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Map σ ∈ [0, 1] to the shifted σ (shift > 1 moves mass towards noise; 0 and 1 stay fixed)."""
    return shift * u / (1 + (shift - 1) * u)


@dataclass(frozen=True)
class FlowObjective:
    """Flow matching as Wan trains it. ``weighting`` is ``uniform`` or ``logit_normal`` (of u, before the shift)."""

    shift: float = 3.0
    num_train_timesteps: int = 1000
    weighting: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {self.shift}")
        if self.weighting not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown timestep weighting '{self.weighting}': use uniform or logit_normal")

    def sample_sigmas(self, batch: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        scheme = "logit_normal" if self.weighting == "logit_normal" else "none"
        u = compute_density_for_timestep_sampling(scheme, batch, self.logit_mean, self.logit_std, None,
                                                  device=device, generator=generator)
        return shift_sigmas(u, self.shift)

    def timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep for each σ."""
        return sigmas * self.num_train_timesteps

    @staticmethod
    def noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """``x_σ`` on the straight path (σ of shape (B,), broadcast over the other dims)."""
        s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        return (1 - s) * latents + s * noise

    @staticmethod
    def target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity the transformer learns to predict."""
        return noise - latents

    def loss(self, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared velocity error, in fp32 whatever the model's dtype; with ``weights`` (broadcast to the
        latents) the weighted mean."""
        if weights is None:
            return torch.nn.functional.mse_loss(prediction.float(), self.target(latents, noise).float())
        error = (prediction.float() - self.target(latents, noise).float()).square()
        weights = weights.float().expand_as(error)
        return (weights * error).sum() / weights.sum()

    def frame_difference_loss(self, prediction: torch.Tensor, latents: torch.Tensor,
                              noise: torch.Tensor) -> torch.Tensor:
        """MSE between consecutive-frame differences of the predicted and the true velocity (B, C, F, H, W): blind to
        any error that is the same in every frame (a static appearance), so it weighs what changes between frames.
        An optional term beside ``loss`` for the motion LoRA."""
        return frame_difference_mse(prediction, self.target(latents, noise))

    def sigma_grid(self, steps: int) -> torch.Tensor:
        """σ from 1 down to 0 for ``steps`` Euler steps (``steps`` + 1 values): the grid of diffusers'
        ``FlowMatchEulerDiscreteScheduler(shift=...)``, so cav's sampler and the stock one step alike."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if steps < 1:
            raise ValueError(f"need at least 1 step, got {steps}")
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        scheduler.set_timesteps(steps)
        return scheduler.sigmas.clone()


def frame_difference_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between consecutive-frame differences of ``prediction`` and ``target`` (B, C, F, H, W), in fp32: an error
    that is the same in every frame (a static appearance) adds nothing, so it weighs what changes between frames."""
    if prediction.shape[2] < 2:
        raise ValueError("a frame-difference loss needs at least 2 latent frames")
    return torch.nn.functional.mse_loss(prediction.float().diff(dim=2), target.float().diff(dim=2))


def transformer_loss(transformer, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     objective: FlowObjective, generator: torch.Generator | None = None,
                     image_mode: bool = False, slot_bias: torch.Tensor | None = None,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """One flow-matching loss of ``transformer`` on clean normalised ``latents`` (B, C, F, H, W).

    ``image_mode``: every frame is its own 1-frame video (frames folded into the batch, the prompt repeated) with
    its own σ, as the absorber trains on unordered frames; otherwise one σ per clip. ``slot_bias`` (B, L): short
    text slots standing for the pipeline's zero-padded ones (``cav.wan.slots``; the transformer installed).
    ``weights`` (B, 1 or C, F, H, W): the loss's weight per latent element (``FlowObjective.loss``)."""
    from contextlib import nullcontext

    if image_mode:
        from .image_mode import fold_frames

        frames = latents.shape[2]
        latents = fold_frames(latents)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(frames, dim=0)
        slot_bias = None if slot_bias is None else slot_bias.repeat_interleave(frames, dim=0)
        weights = None if weights is None else fold_frames(weights)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device="cpu").to(latents.device)
    sigmas = objective.sample_sigmas(latents.shape[0], generator=generator).to(latents.device)
    if slot_bias is None:
        biased = nullcontext()
    else:
        from .slots import slot_bias as biased_slots

        biased = biased_slots(transformer, slot_bias)
    with biased:
        prediction = transformer(hidden_states=objective.noisy(latents, noise, sigmas),
                                 timestep=objective.timesteps(sigmas), encoder_hidden_states=encoder_hidden_states,
                                 return_dict=False)[0]
    return objective.loss(prediction, latents, noise, weights)


def _integrate(velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor, num_train_timesteps: int):
    x = latents
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = (s * num_train_timesteps).expand(x.shape[0]).to(x.device)
        x = x + (s_next - s).to(x.dtype) * velocity(x, t)
    return x


@torch.no_grad()
def sample(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, num_train_timesteps: int = 1000):
    """Euler from ``sigmas[0]`` (noise) down to ``sigmas[-1]`` (data)."""
    return _integrate(velocity, noise, sigmas, num_train_timesteps)


@torch.no_grad()
def invert(velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor, num_train_timesteps: int = 1000):
    """Euler from data up to noise on the reversed grid: ``sample(velocity, invert(velocity, x, σ), σ) ≈ x``."""
    return _integrate(velocity, latents, sigmas.flip(0), num_train_timesteps)


__all__ = ["shift_sigmas", "FlowObjective", "frame_difference_mse", "transformer_loss", "sample", "invert", "Velocity"]
