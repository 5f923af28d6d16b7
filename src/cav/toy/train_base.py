"""Train the toy world's base T2V model: a real latent T2V model in ModelScope's diffusers layout.

Phase 1 trains the AutoencoderKL on toy frames; phase 2 trains the UNet3D and the text encoder jointly on
videos of the *seen* motions and on single images with the temporal layers bypassed (as ModelScope trains on
images and videos). Held-out motions are never shown, so customizing them is measurable. Seeded and resumable:
state is saved as safetensors every ``save_every`` steps under ``OUT/.train_state/<phase>/``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import resume
from ..accel import tune_backends
from ..backbone import resolve_device
from ..data import toyworld as tw
from ..families import UNET3D
from ..io_utils import publish_dir, save_safetensors, write_json
from ..options import option as _f
from ..trainer import Stage, train_step
from .factory import TinySpec, build_components, build_scheduler, save_model, write_clip_tokenizer

TOY_SPEC = TinySpec(
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    layers_per_block=1,
    attention_head_dim=8,
    norm_num_groups=32,
    cross_attention_dim=64,
    latent_channels=4,
    vae_block_out_channels=(32, 64, 64),
    vae_norm_num_groups=16,
    text_hidden=64,
    text_layers=2,
    text_heads=4,
    max_length=24,
    # v-prediction on a zero-terminal-SNR schedule: with ModelScope's schedule (epsilon, alpha_bar_T = 0.0047) the
    # clean latents leak into x_T, and on 8x8 latents that leak fixes where the object goes, so an epsilon model
    # takes its motion from the noise seed, not the prompt (measured: same seed, four motion words, same track).
    prediction_type="v_prediction",
    zero_snr=True,
    timestep_spacing="trailing",
)


@dataclass
class BaseRecipe:
    """The toy base model's training recipe (`cav toy train-base` flags come from these fields)."""

    frames: int = _f(8, "frames per training clip", unit="frames")
    size: int = _f(32, "clip height and width", unit="pixels")
    clips: int = _f(20000, "synthetic clips rendered for training", unit="clips")
    vae_steps: int = _f(1500, "phase 1: VAE training steps", unit="steps")
    vae_batch: int = _f(128, "phase 1: frames per VAE step", unit="frames")
    vae_lr: float = _f(1e-3, "phase 1: VAE learning rate")
    kl_weight: float = _f(1e-6, "phase 1: weight of the VAE's KL term")
    steps: int = _f(20000, "phase 2: UNet + text encoder steps, an upper bound: --max-seconds ends the run on time",
                    unit="steps")
    batch: int = _f(16, "phase 2: clips per step", unit="clips")
    lr: float = _f(3e-4, "phase 2: UNet learning rate")
    text_lr: float = _f(1e-4, "phase 2: text encoder learning rate")
    image_every: int = _f(4, "every k-th step is an image batch (temporal layers bypassed, appearance prompt)",
                          unit="steps")
    image_motion_words: float = _f(0.5, "fraction of image-batch captions that name a motion drawn from all of them, "
                                   "held-out ones included (a still frame shows no motion, so the words are learnt "
                                   "as appearance-neutral, as a real text encoder knows them)")
    caption_dropout: float = _f(0.1, "fraction of captions dropped (for classifier-free guidance)")
    seed: int = _f(0, "seed of the data and of every random choice")
    save_every: int = _f(500, "save resume state every N steps", unit="steps")
    init_from: str = _f("", "continue from a saved toy model folder (its VAE and scaling factor are kept)")
    max_seconds: float = _f(7000.0, "each invocation ends within this (cosine fitted to it; a resume gets a new "
                            "budget)", unit="seconds")


def _state_dir(out: Path, phase: str) -> Path:
    return out / ".train_state" / phase


def _save_state(out: Path, phase: str, step: int, modules: dict, optimizer, gen: torch.Generator) -> None:
    """Weights of the modules being trained, then the trainer state in ``resume``'s format (one folder per phase,
    published atomically, so a kill mid-save keeps the previous state)."""
    folder = _state_dir(out, phase)
    with publish_dir(folder) as tmp:
        save_safetensors(tmp / "modules.safetensors",
                         {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()})
        resume.save_state(tmp, phase, step, optimizer, gen.get_state())


def _load_state(out: Path, phase: str, modules: dict, optimizer, gen: torch.Generator) -> int:
    from safetensors.torch import load_file

    folder = _state_dir(out, phase)
    if not (folder / "state.json").is_file():
        return 0
    tensors = load_file(str(folder / "modules.safetensors"))
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    return resume.load_state(folder, optimizer, gen)


def image_captions(specs: list, fraction: float, gen: torch.Generator) -> dict[int, str]:
    """Which image-batch rows get a full caption instead of the appearance-only one, and which: a fraction
    ``fraction`` of them name a motion drawn from every motion, held-out ones included. Without it the held-out words,
    and the token positions their longer phrases push the background to, are never trained, and run 3 drew "… moving
    in a spiral on a grey background" brown. A still frame carries no motion, so this teaches the words' appearance
    (none), not the motions."""
    worded = torch.rand(len(specs), generator=gen) < fraction
    motion = torch.randint(0, len(tw.MOTIONS), (len(specs),), generator=gen)
    return {k: tw.caption(dataclasses.replace(specs[k], motion=tw.MOTIONS[int(motion[k])]))[0]
            for k in worded.nonzero().flatten().tolist()}


def _to_pixels(clips_u8: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(clips_u8).to(device).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1.0)


def train_base(out: Path, recipe: BaseRecipe | None = None, device: str = "auto", quiet: bool = False,
               resume: bool = True) -> dict:
    recipe = recipe or BaseRecipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    amp = dev.type == "cuda"
    tune_backends(dev)
    t0 = time.time()
    torch.manual_seed(recipe.seed)
    clips, captions, specs = tw.dataset(recipe.clips, recipe.frames, recipe.size, recipe.seed)
    spatial = [tw.caption(s)[1] for s in specs]
    if recipe.init_from:
        comps = _load_components(Path(recipe.init_from))
        comps["scheduler"] = build_scheduler(TOY_SPEC)  # an older model continues on this recipe's schedule
    else:
        tok_dir = out / "tokenizer"
        write_clip_tokenizer(tok_dir, TOY_SPEC.words + tuple(w for c in captions[:2000] for w in c.split()),
                             TOY_SPEC.max_length)
        comps = build_components(TOY_SPEC, tok_dir, seed=recipe.seed)
    unet, vae, text_encoder, tokenizer, scheduler = (comps[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    for m in (unet, vae, text_encoder):
        m.to(dev).train()
    gen = torch.Generator("cpu").manual_seed(recipe.seed)
    pixels_all = torch.from_numpy(clips)  # uint8 (N, F, H, W, 3) on CPU
    n, f = pixels_all.shape[:2]
    log = []

    # ---- phase 1: VAE on single frames -------------------------------------------------------------------
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    start = _load_state(out, "vae", {"vae": vae}, vae_opt, gen) if resume else 0
    vae_steps = 0 if recipe.init_from else recipe.vae_steps
    bar = tqdm(range(start, vae_steps), initial=start, total=recipe.vae_steps, desc="vae", disable=quiet)
    for step in bar:
        idx = torch.randint(0, n * f, (recipe.vae_batch,), generator=gen)
        x = _to_pixels(pixels_all.view(n * f, 1, *pixels_all.shape[2:])[idx].numpy(), dev)[:, 0]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            post = vae.encode(x).latent_dist
            z = post.sample(generator=None)
            rec = vae.decode(z).sample
        loss = F.mse_loss(rec.float(), x) + F.l1_loss(rec.float(), x) + recipe.kl_weight * post.kl().mean()
        loss.backward()
        vae_opt.step()
        vae_opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % recipe.save_every == 0:
            _save_state(out, "vae", step + 1, {"vae": vae}, vae_opt, gen)
    if vae_steps:
        _save_state(out, "vae", vae_steps, {"vae": vae}, vae_opt, gen)
    vae.eval().requires_grad_(False)

    # latents of every clip, once; scaling factor = 1 / std so latents have unit variance (as SD's 0.18215 does)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        lat = []
        for i in range(0, n, 256):
            x = _to_pixels(clips[i:i + 256], dev).flatten(0, 1)
            lat.append(vae.encode(x).latent_dist.mode().float())
        lat = torch.cat(lat)
    scale = float(vae.config.scaling_factor) if recipe.init_from else float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    lat = (lat * scale).view(n, f, *lat.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()  # (N, C, F, h, w)
    rec_err = _vae_error(vae, clips[:256], dev)

    # ---- phase 2: UNet3D + text encoder on videos (seen motions) and images ---------------------------------
    ids_full = tokenizer(captions, padding="max_length", max_length=TOY_SPEC.max_length, truncation=True, return_tensors="pt").input_ids
    ids_spat = tokenizer(spatial, padding="max_length", max_length=TOY_SPEC.max_length, truncation=True, return_tensors="pt").input_ids
    ids_empty = tokenizer([""], padding="max_length", max_length=TOY_SPEC.max_length, return_tensors="pt").input_ids
    opt = torch.optim.AdamW([{"params": unet.parameters(), "lr": recipe.lr},
                             {"params": text_encoder.parameters(), "lr": recipe.text_lr}], weight_decay=0.0)
    modules = {"unet": unet, "text_encoder": text_encoder}
    start = _load_state(out, "unet", modules, opt, gen) if resume else 0
    warm = 200
    plan = {"total": recipe.steps}  # may shrink once the step time is known, so the cosine ends on time

    def lr_factor(s: int) -> float:
        progress = min(1.0, s / max(1, plan["total"]))
        return min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    for _ in range(start):
        sched.step()
    amp_dtype = torch.bfloat16 if amp else None

    def image_ids(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        ids = ids_spat[idx].clone()
        for k, text in image_captions([specs[int(i)] for i in idx], recipe.image_motion_words, gen).items():
            ids[k] = tokenizer(text, padding="max_length", max_length=TOY_SPEC.max_length, truncation=True,
                               return_tensors="pt").input_ids[0]
        return ids

    def batch(image: bool):
        def draw(gen: torch.Generator):
            idx = torch.randint(0, n, (recipe.batch,), generator=gen)
            if image:  # single frames, temporal layers bypassed (the stage's image mode), appearance caption
                fi = torch.randint(0, f, (recipe.batch,), generator=gen)
                x0, ids = lat[idx, :, fi].unsqueeze(2).to(dev), image_ids(idx, gen)
            else:
                x0, ids = lat[idx].to(dev), ids_full[idx]
            drop = torch.rand(recipe.batch, generator=gen) < recipe.caption_dropout
            ids = torch.where(drop[:, None], ids_empty.expand_as(ids), ids).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):  # the text encoder trains too
                return x0, text_encoder(ids)[0]
        return draw

    groups = opt.param_groups
    # the toy base is a UNet3D (ModelScope layout): that family's objective and image mode
    video_stage = Stage("unet", recipe.steps, groups, batch(False), UNET3D.objective, after_step=[sched.step])
    image_stage = Stage("unet-images", recipe.steps, groups, batch(True), UNET3D.objective, UNET3D.image_mode,
                        after_step=[sched.step])
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="unet", disable=quiet)
    mark, t_mark = start, time.time()
    for step in bar:
        if recipe.max_seconds and step - start >= 50 and (step - start) % 50 == 0:
            # re-fit every 50 steps from the recent pace (the first steps are slow: cuDNN autotuning, caches)
            pace = (time.time() - t_mark) / (step - mark)
            fit = step + int((recipe.max_seconds - (time.time() - t0)) / pace)
            plan["total"] = max(step + 1, min(recipe.steps, fit))
            bar.total = plan["total"]
            mark, t_mark = step, time.time()
        if step >= plan["total"]:
            break
        stage = image_stage if recipe.image_every and step % recipe.image_every == recipe.image_every - 1 else video_stage
        loss = train_step(unet, scheduler, stage, opt, gen, max_grad_norm=1.0, autocast_dtype=amp_dtype, step=step + 1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0:
            log.append({"step": step, "loss": round(loss.item(), 5)})
        if (step + 1) % recipe.save_every == 0:
            _save_state(out, "unet", step + 1, modules, opt, gen)
    unet.eval()
    text_encoder.eval()
    for m in (vae, text_encoder):
        m.to("cpu").float()
    unet.to("cpu").half()  # stored in fp16 to keep the shipped model small; loaded as fp32 on CPU
    save_model(out, {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                     "scheduler": scheduler},
               extra={"tiny_spec": asdict(TOY_SPEC), "recipe": asdict(recipe)})
    stats = {"seconds": round(time.time() - t0, 1), "device": str(dev),
             "device_name": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
             "vae_scaling_factor": scale, "vae_recon_mae": rec_err,
             "unet_steps": plan["total"],
             "unet_params": sum(p.numel() for p in unet.parameters()),
             "vae_params": sum(p.numel() for p in vae.parameters()),
             "text_params": sum(p.numel() for p in text_encoder.parameters()),
             "loss_log": log}
    write_json(out / "training_stats.json", stats)
    return stats


def _load_components(path: Path) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {"unet": UNet3DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae"),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            "scheduler": DDIMScheduler.from_pretrained(path, subfolder="scheduler")}


@torch.no_grad()
def _vae_error(vae, clips_u8: np.ndarray, dev) -> float:
    x = _to_pixels(clips_u8, dev).flatten(0, 1)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
    return float((rec - x).abs().mean() * 127.5)
