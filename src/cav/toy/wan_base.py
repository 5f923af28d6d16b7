"""Train the toy world's Wan base: a text-to-video DiT in the stock ``WanPipeline`` layout, from scratch.

Phase 1 trains the ``AutoencoderKLWan`` on toy clips (and on single frames, which the causal VAE encodes as first
frames, as image mode and an image prompt encode them). Phase 2 trains the ``WanTransformer3DModel`` and the umT5
text encoder jointly with Wan's flow objective (``cav.wan.flow``): video batches of *seen* motions with their full
captions, and every ``image_every``-th step an image-mode batch (every frame of a clip encoded alone and seen alone,
frames folded into the batch, one σ per frame) with the appearance caption or, for a fraction, a caption naming any
motion (``train_base.image_captions``: the held-out words are learnt as appearance-neutral, never their motion).
Captions, held-out motions and the clip sampler are the toy UNet base's (``cav.toy.train_base``, ``toyworld``).

Prompts are encoded exactly as ``WanPipeline`` encodes them (its own ``_get_t5_prompt_embeds``: umT5 output cut at
the prompt's length, zero-padded to ``max_sequence_length``), so the saved folder generates with the stock pipeline
and its default 512 text slots. Training runs the encoder on the longest caption only and collapses the zero slots
into a few whose attention logits carry their log-count (``cav.wan.slots``): the same attention, three times faster.

Seeded and exactly resumable: weights, AdamW state and the data generator's state are saved as safetensors under
``OUT/.train_state/<phase>/`` every ``save_minutes`` and at the end; the learning rates depend on the step only
(the VAE's constant or cosine, the transformer's warm-up then constant), so a run cut by ``--max-seconds`` and
resumed is bit-identical to one run straight through (``tests/test_toy_wan.py``). Phase 1 may start from another
folder's VAE (``vae_init``: a fine-tune), phase 2 from another folder's transformer and text encoder (``init``).
``object_weight`` weighs the flow loss up on the object's latent cells; ``ema`` writes a moving average of the
weights as the model (it never changes the training, so a resume may turn it on). Run it as
``cav toy train-base --family wan --out DIR``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .. import resume as resume_io
from ..backbone import TOY_MODELS
from ..data import toyworld as tw
from ..errors import CavError
from ..io_utils import publish_dir, save_safetensors, write_json
from ..options import option as _f
from ..wan.flow import FlowObjective, transformer_loss
from ..wan.latents import encode_frames, encode_video
from ..wan.tiny import TinyWanSpec, build_tokenizer
from .factory import BASE_WORDS
from .train_base import image_captions


TOY_WAN = "toy-wan"  # the name of the toy Wan (``backbone.TOY_MODELS`` maps it to its folder)
TOY_WAN_DIR = TOY_MODELS[TOY_WAN]


def toy_wan_folder(base) -> Path | None:
    """The ``WanPipeline`` folder ``base`` names (``toy-wan`` or a folder whose ``model_index.json`` is a
    ``WanPipeline``'s), or None for any other base."""
    if str(base) == TOY_WAN:
        if not (TOY_WAN_DIR / "model_index.json").is_file():
            raise CavError(f"the toy Wan is missing from {TOY_WAN_DIR}: train it with "
                           f"`cav toy train-base --family wan --out DIR` and pass --base DIR")
        return TOY_WAN_DIR
    index = Path(base) / "model_index.json"
    try:
        is_wan = index.is_file() and json.loads(index.read_text()).get("_class_name") == "WanPipeline"
    except (OSError, ValueError):
        return None
    return Path(base) if is_wan else None


@dataclass
class ToyWanSpec:
    """Sizes of the toy Wan. The VAE compresses 4× in space (32 px → 8×8 latents; the published 8× would leave
    4×4) and ``temporal`` × in time (1 or 4, measured in the card); patch (1, 1, 1) gives 64 tokens per latent
    frame. ``head_dim`` 32 splits into Wan's RoPE parts t/h/w = 12/10/10."""

    heads: int = _f(4, "transformer attention heads")
    head_dim: int = _f(32, "transformer attention head size (Wan's RoPE splits it t/h/w)")
    layers: int = _f(6, "transformer blocks")
    ffn_dim: int = _f(512, "transformer feed-forward width")
    patch: tuple[int, int, int] = (1, 1, 1)
    text_dim: int = _f(64, "umT5 text encoder width")
    text_layers: int = _f(2, "umT5 text encoder layers")
    text_heads: int = _f(4, "umT5 text encoder heads")
    text_ff: int = _f(128, "umT5 text encoder feed-forward width")
    z_dim: int = _f(16, "VAE latent channels (a --vae-init VAE with fewer is grown to this many, computing the "
                    "same reconstructions)")
    vae_base_dim: int = _f(16, "VAE base width")
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)
    temporal: int = _f(4, "VAE temporal compression (1 or 4; 4 measured better, see the model card)")
    max_length: int = _f(16, "tokens the tokenizer keeps (the longest toy caption is 13 with </s>)", unit="tokens")
    flow_shift: float = _f(3.0, "flow shift of training and of the saved scheduler")


@dataclass
class WanRecipe:
    """The toy Wan's training recipe (``cav toy train-base --family wan`` flags come from these fields)."""

    frames: int = _f(9, "frames per training clip (4k+1 for the VAE's temporal compression 4)", unit="frames")
    size: int = _f(32, "clip height and width", unit="pixels")
    clips: int = _f(20000, "synthetic clips in the data set (the toy UNet's specs, rendered per batch)", unit="clips")
    vae_steps: int = _f(1500, "phase 1: VAE training steps (fixed once phase 2 has started)", unit="steps")
    vae_batch: int = _f(8, "phase 1: clips per VAE step (and one frame of each as a 1-frame video)", unit="clips")
    vae_lr: float = _f(1e-3, "phase 1: VAE learning rate")
    kl_weight: float = _f(1e-6, "phase 1: weight of the VAE's KL term")
    vae_object_weight: float = _f(10.0, "phase 1: extra weight of the object's pixels in the reconstruction loss")
    vae_object_dilate: int = _f(0, "phase 1: grow the weighted object mask by this many pixels (a square max-pool), "
                                "so the errors on both sides of its edge cost the same", unit="pixels")
    vae_edge_weight: float = _f(0.0, "phase 1: weight of an L1 loss on the reconstruction error's differences "
                                "between neighbouring pixels and frames (a blurred edge or a smear spreads one step "
                                "over several), weighed as the pixels are")
    vae_lr_schedule: Literal["constant", "cosine"] = _f(
        "constant", "phase 1: the VAE's learning rate over --vae-steps: constant, or cosine from --vae-lr to 0")
    vae_init: str = _f("", "phase 1: start the VAE from the weights in FOLDER/vae (a toy Wan model or run folder of "
                       "the same sizes, or of fewer --z-dim latent channels: grown, the same function; read at VAE "
                       "step 0 only, a fresh AdamW); empty: random weights",
                       metavar="FOLDER", default_text="random weights")
    steps: int = _f(200000, "phase 2: transformer + text encoder steps, an upper bound: --max-seconds ends the run "
                    "on time", unit="steps")
    batch: int = _f(8, "phase 2: clips per step", unit="clips")
    lr: float = _f(3e-4, "phase 2: transformer learning rate")
    text_lr: float = _f(1e-4, "phase 2: text encoder learning rate")
    warmup: int = _f(200, "phase 2: linear learning-rate warm-up", unit="steps")
    image_every: int = _f(4, "every k-th phase-2 step is an image-mode batch (frames seen alone, appearance "
                          "caption)", unit="steps")
    image_motion_words: float = _f(0.5, "fraction of image-mode captions that name a motion drawn from all of them")
    object_weight: float = _f(0.0, "phase 2: extra weight of the flow loss on the latent cells the object covers "
                              "(its pixel mask max-pooled onto the latent grid, the VAE's frame groups): at 32 px the "
                              "object is a few of a frame's 64 cells, so colour and shape are a sliver of the loss")
    init: str = _f("", "phase 2: start the transformer and text encoder from FOLDER's (a toy Wan model or run folder "
                   "of the same sizes; read at transformer step 0 only, a fresh AdamW); empty: random weights",
                   metavar="FOLDER", default_text="random weights")
    caption_dropout: float = _f(0.1, "fraction of captions dropped (for classifier-free guidance)")
    ema: float = _f(0.0, "phase 2: decay of an exponential moving average of the transformer and text encoder "
                    "weights, which the written model holds (0: the trained weights). It never changes the training, "
                    "so a resume may turn it on or change it (the average starts from that step's weights)")
    max_sequence_length: int = _f(512, "text slots per prompt, zero-padded as WanPipeline pads them", unit="slots")
    seed: int = _f(0, "seed of the data and of every random choice")
    save_minutes: float = _f(10.0, "save the resume state and the model every N minutes", unit="minutes")
    max_seconds: float = _f(7000.0, "stop (and save) before this much time has passed; 0: no limit", unit="s")


def caption_words() -> tuple[str, ...]:
    """Every word a toy caption can use (all colours, shapes, backgrounds and motions), after cav's base words."""
    specs = [tw.ToySpec(s, c, b, m) for s in tw.SHAPES for c in tw.COLOURS for b in tw.BACKGROUNDS for m in tw.MOTIONS]
    return tuple(dict.fromkeys(list(BASE_WORDS) + [w for s in specs for text in tw.caption(s) for w in text.split()]))


def build_components(spec: ToyWanSpec, seed: int = 0) -> dict:
    """Random-weight ``WanPipeline`` components at the toy sizes (seeded)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if spec.temporal not in (1, 4):
        raise CavError(f"temporal compression {spec.temporal} is not supported: use 1 or 4")
    tokenizer = build_tokenizer(TinyWanSpec(max_length=spec.max_length, words=caption_words()))
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=spec.patch, num_attention_heads=spec.heads, attention_head_dim=spec.head_dim,
        in_channels=spec.z_dim, out_channels=spec.z_dim, text_dim=spec.text_dim, freq_dim=64, ffn_dim=spec.ffn_dim,
        num_layers=spec.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    torch.manual_seed(seed + 1)
    downs = len(spec.vae_dim_mult) - 1
    vae = AutoencoderKLWan(
        base_dim=spec.vae_base_dim, z_dim=spec.z_dim, dim_mult=list(spec.vae_dim_mult), num_res_blocks=1,
        temperal_downsample=[spec.temporal == 4] * downs, latents_mean=[0.0] * spec.z_dim,
        latents_std=[1.0] * spec.z_dim, scale_factor_temporal=spec.temporal, scale_factor_spatial=2 ** downs)
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=spec.text_dim, d_kv=spec.text_dim // spec.text_heads, d_ff=spec.text_ff,
        num_layers=spec.text_layers, num_heads=spec.text_heads, relative_attention_num_buckets=16,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, dropout_rate=0.0))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=spec.flow_shift, num_train_timesteps=1000)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def training_specs(recipe: WanRecipe) -> list[tw.ToySpec]:
    """The clips of the toy UNet base's data set (``toyworld.dataset``'s sampler and seed), rendered per batch."""
    return tw.sample_specs(np.random.default_rng(recipe.seed), recipe.clips, tw.SEEN_MOTIONS)


def render_batch(specs: list[tw.ToySpec], frames: int, size: int) -> torch.Tensor:
    """(B, 3, F, H, W) pixels in [-1, 1]."""
    return render_with_masks(specs, frames, size)[0]


def render_with_masks(specs: list[tw.ToySpec], frames: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, F, H, W) pixels in [-1, 1] and the object's exact (B, 1, F, H, W) mask (0/1)."""
    rendered = [tw.render(s, frames, size) for s in specs]
    video = np.stack([r[0] for r in rendered])
    masks = np.stack([r[1]["mask"] for r in rendered])
    return (torch.from_numpy(video).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0),
            torch.from_numpy(masks).float().unsqueeze(1))


def _state_dir(out: Path, phase: str) -> Path:
    return out / ".train_state" / phase


def _save_state(out: Path, phase: str, step: int, modules: dict, optimizer, gen: torch.Generator,
                extra: dict) -> None:
    """Weights being trained + AdamW + generator, published atomically (a kill mid-save keeps the previous one).
    Tensors are cloned: umT5 ties ``shared`` and ``encoder.embed_tokens``, which safetensors refuses to store twice."""
    with publish_dir(_state_dir(out, phase)) as tmp:
        save_safetensors(tmp / "modules.safetensors",
                         {f"{name}.{k}": v.clone() for name, m in modules.items() for k, v in m.state_dict().items()})
        resume_io.save_state(tmp, phase, step, optimizer, gen.get_state())
        write_json(tmp / "progress.json", extra)


def _load_state(out: Path, phase: str, modules: dict, optimizer, gen: torch.Generator) -> tuple[int, dict]:
    from safetensors.torch import load_file

    folder = _state_dir(out, phase)
    if not (folder / "state.json").is_file():
        return 0, {}
    tensors = load_file(str(folder / "modules.safetensors"))
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    step = resume_io.load_state(folder, optimizer, gen)
    progress = folder / "progress.json"
    return step, json.loads(progress.read_text()) if progress.is_file() else {}


def vae_loss(vae, pixels: torch.Tensor, masks: torch.Tensor, recipe: WanRecipe,
             gen: torch.Generator) -> torch.Tensor:
    """MSE + L1 reconstruction of a (B, 3, F, H, W) batch through a posterior sample, plus a small KL.

    The object covers ~8 % of a frame, so an unweighted loss is met by the background alone: the first toy Wan's VAE
    (800 steps) reconstructed the background to 2–3 / 255 and the object not at all (MAE ~100 / 255, colour and
    shape lost), which capped everything the transformer could draw. Object pixels weigh ``1 + object_weight``
    (weights renormalised to mean 1, so the loss keeps its scale). With only the object weighed, a blurry decoder's
    colour bleeding into the background next to the edge is cheap (the second VAE: the scored object 1.4–1.8× its
    true area); ``vae_object_dilate`` px weighs the edge's background side as much as its object side, and
    ``vae_edge_weight`` adds the error of the differences between neighbouring pixels (x, y: sharp edges and
    corners) and frames (t: an object smeared over its positions inside a 4-frame latent)."""
    post = vae.encode(pixels).latent_dist
    rec = vae.decode(post.sample(gen)).sample
    w = 1.0 + recipe.vae_object_weight * dilate_masks(masks, recipe.vae_object_dilate)
    w = w / w.mean()
    loss = (((rec - pixels) ** 2 + (rec - pixels).abs()) * w).mean() + recipe.kl_weight * post.kl().mean()
    if recipe.vae_edge_weight:
        d = rec - pixels
        edge = ((d[..., 1:] - d[..., :-1]).abs() * w[..., 1:]).mean() \
            + ((d[..., 1:, :] - d[..., :-1, :]).abs() * w[..., 1:, :]).mean()
        if d.shape[2] > 1:
            edge = edge + ((d[:, :, 1:] - d[:, :, :-1]).abs() * w[:, :, 1:]).mean()
        loss = loss + recipe.vae_edge_weight * edge
    return loss


def dilate_masks(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """(B, 1, F, H, W) 0/1 masks grown by ``pixels`` in each frame (a (2p+1)² square max-pool; 0: unchanged)."""
    if not pixels:
        return masks
    k = 2 * pixels + 1
    return torch.nn.functional.max_pool3d(masks, (1, k, k), stride=1, padding=(0, pixels, pixels))


def vae_lr(recipe: WanRecipe, step: int) -> float:
    """The VAE's learning rate at 0-based ``step`` (a function of the step only, so resumes are exact)."""
    if recipe.vae_lr_schedule == "cosine":
        return recipe.vae_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, recipe.vae_steps)))
    return recipe.vae_lr


NEW_CHANNEL_LOGVAR = -6.0  # log-variance of a latent channel added by ``expand_latent_channels`` (see there)


def expand_latent_channels(tensors: dict, z_old: int, z_new: int) -> dict:
    """A z-``z_old`` ``AutoencoderKLWan``'s weights grown to ``z_new`` latent channels, computing the same function.

    The encoder's ``conv_out`` and ``quant_conv`` lay their 2z outputs out as [mean(z), logvar(z)]; each half gets
    ``z_new - z_old`` channels after its old ones. The new channels' mean rows are zero (their mode is 0 whatever the
    input); ``quant_conv`` and ``post_quant_conv`` (1×1×1) keep their trained weights on the old channels, pass a new
    channel through unchanged (identity) and mix old and new with zeros; ``decoder.conv_in`` reads the new channels
    through zero columns. So the posterior mode of the old channels and every decoded pixel are those of the small VAE.
    The new logvar rows are constant, ``NEW_CHANNEL_LOGVAR`` (-6, std 0.05): the old channels' noise level (run 3's
    VAE: mean logvar -5.96 on 16 training clips). Logvar 0 would make the KL exactly 0; at -6 a new channel costs
    ~2.5 nats an element, which the trainer's KL weight (1e-6) makes ~1e-3 of a clip's loss, while logvar 0 would put
    noise 20× the old channels' on whatever the encoder learns to write there. Measured in the model card (run 4):
    fine-tuning from this start did not put the new channels to use (the decoder's columns for them stay small and
    their logvar drifts up towards 0)."""
    grown = dict(tensors)
    old = torch.cat([torch.arange(z_old), z_new + torch.arange(z_old)])  # old [mean, logvar] rows in the new layout
    added = torch.cat([torch.arange(z_old, z_new), z_new + torch.arange(z_old, z_new)])
    w, b = tensors["encoder.conv_out.weight"], tensors["encoder.conv_out.bias"]
    grown["encoder.conv_out.weight"] = w.new_zeros((2 * z_new, *w.shape[1:])).index_copy(0, old, w)
    bias = b.new_zeros(2 * z_new).index_copy(0, old, b)
    bias[z_new + z_old:] = NEW_CHANNEL_LOGVAR
    grown["encoder.conv_out.bias"] = bias
    for name, rows, new in (("quant_conv", old, added),
                            ("post_quant_conv", torch.arange(z_old), torch.arange(z_old, z_new))):
        w, b = tensors[f"{name}.weight"], tensors[f"{name}.bias"]
        size = 2 * z_new if name == "quant_conv" else z_new
        full = w.new_zeros((size, size, *w.shape[2:]))
        full[rows.unsqueeze(1), rows.unsqueeze(0)] = w
        full[new, new] = 1.0
        grown[f"{name}.weight"] = full
        grown[f"{name}.bias"] = b.new_zeros(size).index_copy(0, rows, b)
    w = tensors["decoder.conv_in.weight"]
    grown["decoder.conv_in.weight"] = torch.cat([w, w.new_zeros((w.shape[0], z_new - z_old, *w.shape[2:]))], dim=1)
    return grown


def _init_vae_weights(recipe: WanRecipe, vae) -> dict:
    """``recipe.vae_init``'s VAE weights, checked against ``vae``'s parameter names and shapes. A VAE with fewer
    latent channels than ``vae`` (and every other tensor the same) is grown to its size first
    (``expand_latent_channels``: the same reconstructions)."""
    from safetensors.torch import load_file

    folder = Path(recipe.vae_init)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise CavError(f"--vae-init {folder}: no VAE weights at {weights}: pass a toy Wan model or run folder")
    tensors = load_file(str(weights))
    own = vae.state_dict()
    z_new = own["post_quant_conv.weight"].shape[0]
    z_old = tensors["post_quant_conv.weight"].shape[0] if "post_quant_conv.weight" in tensors else z_new
    expandable = {"encoder.conv_out.weight", "encoder.conv_out.bias", "quant_conv.weight", "quant_conv.bias",
                  "post_quant_conv.weight", "post_quant_conv.bias", "decoder.conv_in.weight"} <= set(tensors)
    if z_old < z_new and expandable:
        tensors = expand_latent_channels(tensors, z_old, z_new)
    _check_sizes(f"--vae-init {folder}", "VAE", own, tensors)
    return tensors


def _check_sizes(flag: str, part: str, own: dict, tensors: dict) -> None:
    """Refuse (one line) weights whose tensor names or shapes are not ``own``'s."""
    wrong = sorted(k for k in set(own) | set(tensors)
                   if k not in own or k not in tensors or own[k].shape != tensors[k].shape)
    if wrong:
        raise CavError(f"{flag}: its {part} has other sizes than this run's ({len(wrong)} tensors differ, "
                       f"e.g. {wrong[0]}): pass the sizes it was trained with (its .train_state/run.json)")


def vae_step_batch(specs, recipe: WanRecipe, gen: torch.Generator) -> tuple[tuple, tuple]:
    """(clips, masks), and one random frame of each as a 1-frame video (encoded as a first frame, as image mode
    does) with its mask."""
    idx = torch.randint(0, len(specs), (recipe.vae_batch,), generator=gen)
    clips, masks = render_with_masks([specs[int(i)] for i in idx], recipe.frames, recipe.size)
    fi = torch.randint(0, recipe.frames, (recipe.vae_batch,), generator=gen)
    rows = torch.arange(recipe.vae_batch)
    return (clips, masks), (clips[rows, :, fi].unsqueeze(2), masks[rows, :, fi].unsqueeze(2))


@torch.no_grad()
def latent_stats(vae, specs, recipe: WanRecipe, clips: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean / std of the VAE's clip latents (mode) on the first ``clips`` training clips: Wan's
    ``latents_mean`` / ``latents_std``, which the pipeline undoes before decoding. The std has a floor
    (``latent_std_floor``: a near-constant channel is not divided by ~0)."""
    z = vae.encode(render_batch(specs[:clips], recipe.frames, recipe.size)).latent_dist.mode()
    return z.mean(dim=(0, 2, 3, 4)).tolist(), latent_std_floor(z.std(dim=(0, 2, 3, 4))).tolist()


def latent_std_floor(std: torch.Tensor) -> torch.Tensor:
    """Channel stds with a floor: 1 % of the widest channel's (1e-6 if every channel is constant). A channel that
    hardly varies (one added by ``expand_latent_channels`` that training has not put to use: its mode is ~0 on every
    clip) would otherwise have a std near 0, and ``(z - mean) / std`` would blow its rounding noise up; floored, it
    stays a near-zero channel. Channels above the floor keep their std exactly."""
    return std.clamp(min=max(0.01 * float(std.max()), 1e-6))


@torch.no_grad()
def vae_error(vae, specs, recipe: WanRecipe, clips: int = 16) -> dict:
    """Mean absolute reconstruction error (0..255) of ``clips`` clips through the posterior mode: on the object's
    pixels and on the background's (the object is what the scorer reads and what the first VAE lost)."""
    x, m = render_with_masks(specs[:clips], recipe.frames, recipe.size)
    err = (vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) - x).abs().mean(1, keepdim=True) * 127.5
    return {"vae_recon_mae": round(float(err.mean()), 3),
            "vae_object_mae": round(float((err * m).sum() / m.sum()), 3),
            "vae_background_mae": round(float((err * (1 - m)).sum() / (1 - m).sum()), 3)}


class _Clock:
    """Stops a phase before the invocation's budget and says when a periodic save is due."""

    def __init__(self, max_seconds: float, save_minutes: float):
        self.t0 = self.last_save = time.time()
        self.max_seconds, self.save_seconds = max_seconds, save_minutes * 60
        self.pace = 0.0

    def tick(self, seconds: float) -> None:
        self.pace = seconds if not self.pace else 0.9 * self.pace + 0.1 * seconds

    def out_of_time(self) -> bool:
        return bool(self.max_seconds) and time.time() - self.t0 + self.pace > self.max_seconds

    def save_due(self) -> bool:
        if time.time() - self.last_save >= self.save_seconds:
            self.last_save = time.time()
            return True
        return False


def _prompt_encoder(pipe, recipe: WanRecipe):
    """Captions → (prompt embeddings, slot bias) by the stock pipeline's own function (with gradients for the text
    encoder), the zero-padded slots collapsed into a few biased ones: the same attention as the
    ``max_sequence_length`` slots generation pads to, at a third of the step time (``cav.wan.slots``)."""
    from ..wan import slots

    slots.install(pipe.transformer)
    return lambda texts: slots.short_prompt_embeds(pipe, texts, recipe.max_sequence_length, device=torch.device("cpu"))


def _phase2_batch(specs, recipe: WanRecipe, vae, gen: torch.Generator, image: bool):
    """(latents, captions, loss weights or None): a video batch (clip latents, full captions) or an image-mode batch
    (each frame encoded alone; appearance captions, some naming a motion from all of them). Captions dropped at
    ``caption_dropout``. The weights (``object_weight``): 1 + object_weight on the latent cells the object covers."""
    idx = torch.randint(0, len(specs), (recipe.batch,), generator=gen)
    chosen = [specs[int(i)] for i in idx]
    pixels, masks = render_with_masks(chosen, recipe.frames, recipe.size)
    with torch.no_grad():
        latents = encode_frames(vae, pixels) if image else encode_video(vae, pixels)
    weights = None
    if recipe.object_weight:
        cells = latent_mask(masks, latents.shape[2:], image)
        weights = 1.0 + recipe.object_weight * cells
    if image:
        texts = [tw.caption(s)[1] for s in chosen]
        for k, text in image_captions(chosen, recipe.image_motion_words, gen).items():
            texts[k] = text
    else:
        texts = [tw.caption(s)[0] for s in chosen]
    drop = torch.rand(recipe.batch, generator=gen) < recipe.caption_dropout
    return latents, ["" if d else t for t, d in zip(texts, drop.tolist())], weights


def latent_mask(masks: torch.Tensor, latent_shape, image: bool) -> torch.Tensor:
    """Pixel masks (B, 1, F, H, W) → (B, 1, f, h, w) on the latent grid: a cell is 1 where the object touches any
    pixel of it in any frame the VAE folds into it (frame 0 alone, then groups of F−1 / (f−1); every frame alone
    when ``image``)."""
    f, h, w = latent_shape
    frames = masks.shape[2]
    if image or f == frames:
        groups = [masks[:, :, k:k + 1] for k in range(frames)]
    else:
        step = (frames - 1) // (f - 1)
        groups = [masks[:, :, :1]] + [masks[:, :, 1 + step * k:1 + step * (k + 1)] for k in range(f - 1)]
    pooled = torch.cat([g.amax(dim=2, keepdim=True) for g in groups], dim=2)
    return torch.nn.functional.adaptive_max_pool3d(pooled, (pooled.shape[2], h, w))


def train_wan_base(out: str | Path, recipe: WanRecipe | None = None, spec: ToyWanSpec | None = None,
                   quiet: bool = False, resume: bool = True) -> dict:
    """Train (or resume) the toy Wan in ``out``; write the ``WanPipeline`` folder there at every save and at the
    end. Returns the run's statistics (also in ``out/training_stats.json``). ``resume`` False deletes the state
    saved in ``out`` and starts over."""
    from diffusers import WanPipeline

    recipe, spec = recipe or WanRecipe(), spec or ToyWanSpec()
    if recipe.frames % spec.temporal != 1 % spec.temporal:
        raise CavError(f"--frames {recipe.frames} does not fit a VAE with temporal compression {spec.temporal}: "
                       f"pass 4k+1 frames (e.g. 9)")
    if recipe.vae_object_weight < 0:
        raise CavError(f"--vae-object-weight {recipe.vae_object_weight} is negative: pass 0 (no extra weight) or more")
    if recipe.vae_edge_weight < 0:
        raise CavError(f"--vae-edge-weight {recipe.vae_edge_weight} is negative: pass 0 (no edge loss) or more")
    if recipe.vae_object_dilate < 0:
        raise CavError(f"--vae-object-dilate {recipe.vae_object_dilate} is negative: pass 0 (the exact mask) or more")
    if recipe.vae_lr_schedule not in ("constant", "cosine"):
        raise CavError(f"--vae-lr-schedule {recipe.vae_lr_schedule!r} is not a schedule: pass constant or cosine")
    out = Path(out)
    if not resume:  # asked for: the old run's state (both phases) would not fit the new one
        shutil.rmtree(out / ".train_state", ignore_errors=True)
    _check_same_run(out, recipe, spec)
    comps = build_components(spec, recipe.seed)
    vae, transformer, text_encoder = comps["vae"], comps["transformer"], comps["text_encoder"]
    init = None  # read (and checked) before anything is written; only a run that has not begun its VAE uses it
    if recipe.vae_init and not (_state_dir(out, "vae") / "state.json").is_file():
        init = _init_vae_weights(recipe, vae)
    phase2_init = None  # the same for --init: read and checked before anything is written
    if recipe.init and not (_state_dir(out, "transformer") / "state.json").is_file():
        phase2_init = _init_phase2(recipe.init, {"transformer": transformer, "text_encoder": text_encoder})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / ".train_state" / "run.json", {"recipe": asdict(recipe), "spec": asdict(spec)})
    clock = _Clock(recipe.max_seconds, recipe.save_minutes)
    specs = training_specs(recipe)
    gen = torch.Generator("cpu").manual_seed(recipe.seed)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    # ---- phase 1: the VAE --------------------------------------------------------------------------------
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    step, progress = _load_state(out, "vae", {"vae": vae}, vae_opt, gen)
    if init is not None and step == 0:
        vae.load_state_dict(init)
    vae_log, trained = progress.get("log", []), False
    if step < recipe.vae_steps and (_state_dir(out, "transformer") / "state.json").is_file():
        raise CavError(f"{out}'s transformer phase started on the VAE of step {step}: pass --vae-steps {step} "
                       f"to resume it (a longer VAE needs a new --out)")
    vae.train()
    while step < recipe.vae_steps and not clock.out_of_time():
        t = time.time()
        for group in vae_opt.param_groups:
            group["lr"] = vae_lr(recipe, step)
        clips, frames = vae_step_batch(specs, recipe, gen)
        loss = vae_loss(vae, *clips, recipe, gen) + vae_loss(vae, *frames, recipe, gen)
        loss.backward()
        vae_opt.step()
        vae_opt.zero_grad(set_to_none=True)
        step, trained = step + 1, True
        clock.tick(time.time() - t)
        if step % 50 == 0 or step == 1:
            row = {"step": step, "loss": round(loss.item(), 5)}
            if step % 250 == 0:  # the object's error is the one that matters (vae_loss); no random draw
                row.update(vae_error(vae.eval(), specs, recipe))
                vae.train()
            vae_log.append(row)
            say(f"vae step {step}/{recipe.vae_steps} " + " ".join(f"{k} {v}" for k, v in row.items() if k != "step"))
        if clock.save_due():
            _save_state(out, "vae", step, {"vae": vae}, vae_opt, gen, {"log": vae_log})
    if trained or init is not None:  # also an init used as it is (--vae-steps 0): a resume must not need its folder
        _save_state(out, "vae", step, {"vae": vae}, vae_opt, gen, {"log": vae_log})
    vae.eval().requires_grad_(False)
    if step < recipe.vae_steps:
        return _finish(out, comps, recipe, spec, clock, {"phase": "vae", "vae_step": step, "vae_log": vae_log})
    mean, std = latent_stats(vae, specs, recipe)
    vae.register_to_config(latents_mean=mean, latents_std=std)

    # ---- phase 2: transformer + text encoder ------------------------------------------------------------
    opt = torch.optim.AdamW([{"params": transformer.parameters(), "lr": recipe.lr},
                             {"params": text_encoder.parameters(), "lr": recipe.text_lr}], weight_decay=0.0)
    modules = {"transformer": transformer, "text_encoder": text_encoder}
    step, progress = _load_state(out, "transformer", modules, opt, gen)
    if step == 0 and phase2_init is not None:
        for name, tensors in phase2_init.items():
            modules[name].load_state_dict(tensors)
    log = progress.get("log", [])
    ema, ema_since = _ema_modules(out, modules, recipe.ema, step, progress)
    written = {**comps, **ema}  # the model the folder gets: the average when there is one
    saved_modules = {**modules, **{f"ema.{name}": m for name, m in ema.items()}}  # the average as ema.<module>.*
    save = lambda at: _save_state(out, "transformer", at, saved_modules, opt, gen,  # noqa: E731
                                  {"log": log, "ema_since": ema_since})
    base_lrs, trained = (recipe.lr, recipe.text_lr), False
    pipe = WanPipeline(**comps)
    encode = _prompt_encoder(pipe, recipe)
    objective = FlowObjective(shift=spec.flow_shift)
    transformer.train()
    text_encoder.train()
    while step < recipe.steps and not clock.out_of_time():
        t = time.time()
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * min(1.0, (step + 1) / max(1, recipe.warmup))  # warm-up, then constant
        image = bool(recipe.image_every) and step % recipe.image_every == recipe.image_every - 1
        latents, texts, weights = _phase2_batch(specs, recipe, vae, gen, image)
        embeds, bias = encode(texts)
        loss = transformer_loss(transformer, latents, embeds, objective, generator=gen, image_mode=image,
                                slot_bias=bias, weights=weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ema_update(ema, modules, recipe.ema)
        step, trained = step + 1, True
        clock.tick(time.time() - t)
        if step % 50 == 0 or step == 1:
            log.append({"step": step, "loss": round(loss.item(), 5), "image": image,
                        "seconds": round(time.time() - clock.t0, 1)})
            say(f"transformer step {step} loss {loss.item():.4f} ({'image' if image else 'video'})")
        if clock.save_due():
            save(step)
            _write_model(out, written)
    if trained or (ema and progress.get("ema_since") != ema_since):
        save(step)
    return _finish(out, written, recipe, spec, clock, {"phase": "transformer", "vae_step": recipe.vae_steps,
                                                        **vae_error(vae, specs, recipe),
                                                        "transformer_step": step, "ema": recipe.ema,
                                                        "ema_since": ema_since, "vae_log": vae_log, "log": log})


def _init_phase2(folder: str, modules: dict) -> dict:
    """FOLDER's transformer and text encoder weights, checked against ``modules``' names and shapes."""
    from safetensors.torch import load_file

    found = {}
    files = {"transformer": Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors",
             "text_encoder": Path(folder) / "text_encoder" / "model.safetensors"}
    for name, path in files.items():
        if not path.is_file():
            raise CavError(f"--init {folder}: no {name} weights at {path}: pass a toy Wan model or run folder")
        tensors, own = load_file(str(path)), modules[name].state_dict()
        if name == "text_encoder":  # umT5 ties these; the saved file may hold only one
            for a, b in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight",
                                                                             "shared.weight")):
                if a in own and a not in tensors and b in tensors:
                    tensors[a] = tensors[b]
        _check_sizes(f"--init {folder}", name, own, tensors)
        found[name] = tensors
    return found


def _ema_modules(out: Path, modules: dict, decay: float, step: int, progress: dict) -> tuple[dict, int | None]:
    """({"transformer": copy, "text_encoder": copy} holding the moving average, the step it began) — the saved
    average when the run has one, else the current weights (the average begins now); ({}, None) for ``decay`` 0."""
    if not decay:
        return {}, None
    from safetensors.torch import load_file

    ema = {name: copy.deepcopy(m).requires_grad_(False) for name, m in modules.items()}
    saved = _state_dir(out, "transformer") / "modules.safetensors"
    tensors = load_file(str(saved)) if saved.is_file() and progress.get("ema_since") is not None else {}
    for name, m in ema.items():
        own = {k[len(name) + 5:]: v for k, v in tensors.items() if k.startswith(f"ema.{name}.")}
        if own:
            m.load_state_dict(own)
    return ema, (progress["ema_since"] if tensors else step)


@torch.no_grad()
def _ema_update(ema: dict, modules: dict, decay: float) -> None:
    for name, average in ema.items():
        for a, p in zip(average.parameters(), modules[name].parameters()):
            a.lerp_(p, 1.0 - decay)


def _check_same_run(out: Path, recipe: WanRecipe, spec: ToyWanSpec) -> None:
    """A resume must use the recipe and sizes it started with (only the time budget and save period may change)."""
    saved = out / ".train_state" / "run.json"
    if not saved.is_file():
        return
    old = json.loads(saved.read_text())
    free = {"max_seconds", "save_minutes", "steps", "vae_steps", "ema"}  # ema: the written model, not the training
    if recipe.vae_lr_schedule != "constant":  # the VAE's learning rate depends on --vae-steps then
        free.discard("vae_steps")
    new_recipe = {k: v for k, v in asdict(recipe).items() if k not in free}
    defaults = asdict(WanRecipe())  # a field added since the run began: the run used its default
    old_recipe = {k: v for k, v in {**defaults, **old["recipe"]}.items() if k not in free}
    new_spec = json.loads(json.dumps(asdict(spec)))
    if new_recipe != old_recipe or new_spec != old["spec"]:
        diff = sorted(k for k in set(new_recipe) | set(old_recipe) if new_recipe.get(k) != old_recipe.get(k))
        diff += sorted(k for k in new_spec if new_spec[k] != old["spec"].get(k))
        raise CavError(f"{out} holds a run started with other settings ({', '.join(diff)}): resume it with the "
                       f"settings in {saved}, or pass a new --out")


def _write_model(out: Path, comps: dict) -> None:
    from diffusers import WanPipeline

    backend = getattr(comps["tokenizer"], "_tokenizer", None)
    if backend is not None:  # a fast tokenizer keeps its last call's padding and truncation, and would save them
        backend.no_padding()
        backend.no_truncation()
    WanPipeline(**comps).save_pretrained(out, safe_serialization=True)


def _finish(out: Path, comps: dict, recipe: WanRecipe, spec: ToyWanSpec, clock: _Clock, stats: dict) -> dict:
    for name in ("transformer", "text_encoder", "vae"):
        comps[name].eval()
    _write_model(out, comps)
    stats = {**stats, "seconds_this_run": round(time.time() - clock.t0, 1),
             "params": {k: sum(p.numel() for p in comps[k].parameters())
                        for k in ("transformer", "vae", "text_encoder")},
             "recipe": asdict(recipe), "spec": asdict(spec)}
    write_json(out / "training_stats.json", stats)
    return stats

