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
and its default 512 text slots.

Seeded and exactly resumable: weights, AdamW state and the data generator's state are saved as safetensors under
``OUT/.train_state/<phase>/`` every ``save_minutes`` and at the end; the learning rate depends on the step only
(warm-up, then constant), so a run cut by ``--max-seconds`` and resumed is bit-identical to one run straight
through (``tests/test_toy_wan.py``). Run it as ``python -m cav.toy.wan_base --out DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import resume as resume_io
from ..data import toyworld as tw
from ..errors import CavError
from ..io_utils import publish_dir, save_safetensors, write_json
from ..wan.flow import FlowObjective, transformer_loss
from ..wan.latents import encode_frames, encode_video
from ..wan.tiny import TinyWanSpec, build_tokenizer
from .factory import BASE_WORDS
from .train_base import image_captions


@dataclass
class ToyWanSpec:
    """Sizes of the toy Wan. The VAE compresses 4× in space (32 px → 8×8 latents; the published 8× would leave
    4×4) and ``temporal`` × in time (1 or 4, measured in the card); patch (1, 1, 1) gives 64 tokens per latent
    frame. ``head_dim`` 32 splits into Wan's RoPE parts t/h/w = 12/10/10."""

    heads: int = 4
    head_dim: int = 32
    layers: int = 6
    ffn_dim: int = 512
    patch: tuple[int, int, int] = (1, 1, 1)
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 128
    z_dim: int = 16
    vae_base_dim: int = 16
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)
    temporal: int = 4
    max_length: int = 16  # tokens the tokenizer keeps (the longest toy caption is 13 with </s>)
    flow_shift: float = 3.0


@dataclass
class WanRecipe:
    """The toy Wan's training recipe (``python -m cav.toy.wan_base`` flags come from these fields)."""

    frames: int = 9
    size: int = 32
    clips: int = 20000
    vae_steps: int = 1500
    vae_batch: int = 8
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    steps: int = 200000
    batch: int = 8
    lr: float = 3e-4
    text_lr: float = 1e-4
    warmup: int = 200
    image_every: int = 4
    image_motion_words: float = 0.5
    caption_dropout: float = 0.1
    max_sequence_length: int = 512
    seed: int = 0
    save_minutes: float = 10.0
    max_seconds: float = 7000.0


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
    video = np.stack([tw.render(s, frames, size)[0] for s in specs])
    return torch.from_numpy(video).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


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


def vae_loss(vae, pixels: torch.Tensor, kl_weight: float, gen: torch.Generator) -> torch.Tensor:
    """MSE + L1 reconstruction of a (B, 3, F, H, W) batch through a posterior sample, plus a small KL."""
    post = vae.encode(pixels).latent_dist
    rec = vae.decode(post.sample(gen)).sample
    return F.mse_loss(rec, pixels) + F.l1_loss(rec, pixels) + kl_weight * post.kl().mean()


def vae_step_batch(specs, recipe: WanRecipe, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips, and one random frame of each as a 1-frame video (encoded as a first frame, as image mode does)."""
    idx = torch.randint(0, len(specs), (recipe.vae_batch,), generator=gen)
    clips = render_batch([specs[int(i)] for i in idx], recipe.frames, recipe.size)
    fi = torch.randint(0, recipe.frames, (recipe.vae_batch,), generator=gen)
    return clips, clips[torch.arange(recipe.vae_batch), :, fi].unsqueeze(2)


@torch.no_grad()
def latent_stats(vae, specs, recipe: WanRecipe, clips: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean / std of the VAE's clip latents (mode) on the first ``clips`` training clips: Wan's
    ``latents_mean`` / ``latents_std``, which the pipeline undoes before decoding."""
    z = vae.encode(render_batch(specs[:clips], recipe.frames, recipe.size)).latent_dist.mode()
    return z.mean(dim=(0, 2, 3, 4)).tolist(), z.std(dim=(0, 2, 3, 4)).tolist()


@torch.no_grad()
def vae_error(vae, specs, recipe: WanRecipe, clips: int = 16) -> float:
    """Mean absolute reconstruction error (0..255) of ``clips`` clips through the posterior mode."""
    x = render_batch(specs[:clips], recipe.frames, recipe.size)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return float((rec - x).abs().mean() * 127.5)


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
    """Captions → prompt embeddings by the stock pipeline's own function (with gradients for the text encoder)."""
    return lambda texts: pipe._get_t5_prompt_embeds(texts, max_sequence_length=recipe.max_sequence_length,
                                                    device=torch.device("cpu"), dtype=torch.float32)


def _phase2_batch(specs, recipe: WanRecipe, vae, gen: torch.Generator, image: bool):
    """(latents, captions): a video batch (clip latents, full captions) or an image-mode batch (each frame encoded
    alone; appearance captions, some naming a motion from all of them). Captions dropped at ``caption_dropout``."""
    idx = torch.randint(0, len(specs), (recipe.batch,), generator=gen)
    chosen = [specs[int(i)] for i in idx]
    pixels = render_batch(chosen, recipe.frames, recipe.size)
    with torch.no_grad():
        latents = encode_frames(vae, pixels) if image else encode_video(vae, pixels)
    if image:
        texts = [tw.caption(s)[1] for s in chosen]
        for k, text in image_captions(chosen, recipe.image_motion_words, gen).items():
            texts[k] = text
    else:
        texts = [tw.caption(s)[0] for s in chosen]
    drop = torch.rand(recipe.batch, generator=gen) < recipe.caption_dropout
    return latents, ["" if d else t for t, d in zip(texts, drop.tolist())]


def train_wan_base(out: str | Path, recipe: WanRecipe | None = None, spec: ToyWanSpec | None = None,
                   quiet: bool = False) -> dict:
    """Train (or resume) the toy Wan in ``out``; write the ``WanPipeline`` folder there at every save and at the
    end. Returns the run's statistics (also in ``out/training_stats.json``)."""
    from diffusers import WanPipeline

    recipe, spec = recipe or WanRecipe(), spec or ToyWanSpec()
    if recipe.frames % spec.temporal != 1 % spec.temporal:
        raise CavError(f"--frames {recipe.frames} does not fit a VAE with temporal compression {spec.temporal}: "
                       f"pass 4k+1 frames (e.g. 9)")
    out = Path(out)
    _check_same_run(out, recipe, spec)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / ".train_state" / "run.json", {"recipe": asdict(recipe), "spec": asdict(spec)})
    clock = _Clock(recipe.max_seconds, recipe.save_minutes)
    comps = build_components(spec, recipe.seed)
    vae, transformer, text_encoder = comps["vae"], comps["transformer"], comps["text_encoder"]
    specs = training_specs(recipe)
    gen = torch.Generator("cpu").manual_seed(recipe.seed)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    # ---- phase 1: the VAE --------------------------------------------------------------------------------
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    step, progress = _load_state(out, "vae", {"vae": vae}, vae_opt, gen)
    vae_log, trained = progress.get("log", []), False
    if step < recipe.vae_steps and (_state_dir(out, "transformer") / "state.json").is_file():
        raise CavError(f"{out}'s transformer phase started on the VAE of step {step}: pass --vae-steps {step} "
                       f"to resume it (a longer VAE needs a new --out)")
    vae.train()
    while step < recipe.vae_steps and not clock.out_of_time():
        t = time.time()
        clips, frames = vae_step_batch(specs, recipe, gen)
        loss = vae_loss(vae, clips, recipe.kl_weight, gen) + vae_loss(vae, frames, recipe.kl_weight, gen)
        loss.backward()
        vae_opt.step()
        vae_opt.zero_grad(set_to_none=True)
        step, trained = step + 1, True
        clock.tick(time.time() - t)
        if step % 50 == 0 or step == 1:
            vae_log.append({"step": step, "loss": round(loss.item(), 5)})
            say(f"vae step {step}/{recipe.vae_steps} loss {loss.item():.4f}")
        if clock.save_due():
            _save_state(out, "vae", step, {"vae": vae}, vae_opt, gen, {"log": vae_log})
    if trained:
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
    log = progress.get("log", [])
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
        latents, texts = _phase2_batch(specs, recipe, vae, gen, image)
        loss = transformer_loss(transformer, latents, encode(texts), objective, generator=gen, image_mode=image)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, trained = step + 1, True
        clock.tick(time.time() - t)
        if step % 50 == 0 or step == 1:
            log.append({"step": step, "loss": round(loss.item(), 5), "image": image,
                        "seconds": round(time.time() - clock.t0, 1)})
            say(f"transformer step {step} loss {loss.item():.4f} ({'image' if image else 'video'})")
        if clock.save_due():
            _save_state(out, "transformer", step, modules, opt, gen, {"log": log})
            _write_model(out, comps)
    if trained:
        _save_state(out, "transformer", step, modules, opt, gen, {"log": log})
    return _finish(out, comps, recipe, spec, clock, {"phase": "transformer", "vae_step": recipe.vae_steps,
                                                      "vae_recon_mae": vae_error(vae, specs, recipe),
                                                      "transformer_step": step, "vae_log": vae_log, "log": log})


def _check_same_run(out: Path, recipe: WanRecipe, spec: ToyWanSpec) -> None:
    """A resume must use the recipe and sizes it started with (only the time budget and save period may change)."""
    saved = out / ".train_state" / "run.json"
    if not saved.is_file():
        return
    old = json.loads(saved.read_text())
    free = {"max_seconds", "save_minutes", "steps", "vae_steps"}
    new_recipe = {k: v for k, v in asdict(recipe).items() if k not in free}
    old_recipe = {k: v for k, v in old["recipe"].items() if k not in free}
    new_spec = json.loads(json.dumps(asdict(spec)))
    if new_recipe != old_recipe or new_spec != old["spec"]:
        diff = sorted(k for k in set(new_recipe) | set(old_recipe) if new_recipe.get(k) != old_recipe.get(k))
        diff += sorted(k for k in new_spec if new_spec[k] != old["spec"].get(k))
        raise CavError(f"{out} holds a run started with other settings ({', '.join(diff)}): resume it with the "
                       f"settings in {saved}, or pass a new --out")


def _write_model(out: Path, comps: dict) -> None:
    from diffusers import WanPipeline

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


def quick_check(folder: str | Path, n: int = 16, heldout: int = 8, seed: int = 0, steps: int | None = None,
                guidance: float | None = None, frames: int = 9, max_sequence_length: int = 512) -> dict:
    """A small ``cav toy check-base``: the stock ``WanPipeline`` draws seen- and held-out-motion prompts sampled as
    check-base samples them, scored by the same toy-world scorer (``cav.metrics.toy.score``)."""
    from diffusers import WanPipeline

    from ..metrics import toy as tm
    from .check import TOY_GUIDANCE, TOY_SIZE, TOY_STEPS

    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)
    seen, held = tw.sample_specs(rng, n, tw.SEEN_MOTIONS), tw.sample_specs(rng, heldout, tw.HELDOUT_MOTIONS)

    def score(specs, offset):
        rows = []
        for k, s in enumerate(specs):
            video = pipe(tw.caption(s)[0], num_frames=frames, height=TOY_SIZE, width=TOY_SIZE,
                         num_inference_steps=steps or TOY_STEPS, guidance_scale=guidance or TOY_GUIDANCE,
                         max_sequence_length=max_sequence_length, output_type="np",
                         generator=torch.Generator().manual_seed(seed + offset + k)).frames[0]
            rows.append(tm.score(video, s))
        return rows

    t0 = time.time()
    a, b = score(seen, 0), score(held, 10_000)
    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {"videos": n, "colour_accuracy": mean(a, "colour_ok"), "shape_accuracy": mean(a, "shape_ok"),
            "background_accuracy": mean(a, "background_ok"), "motion_accuracy": mean(a, "motion_ok"),
            "seen_motion_error": mean(a, "motion_error"), "heldout_videos": heldout,
            "heldout_motion_accuracy": mean(b, "motion_ok"), "heldout_motion_error": mean(b, "motion_error"),
            "heldout_appearance_accuracy": float(np.mean([r["colour_ok"] and r["shape_ok"] and r["background_ok"]
                                                          for r in b])),
            "seconds": round(time.time() - t0, 1)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cav.toy.wan_base", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run folder (resumed when it holds .train_state/)")
    p.add_argument("--quiet", action="store_true")
    for cls in (WanRecipe, ToyWanSpec):
        for f in dataclasses.fields(cls):
            if isinstance(f.default, tuple):
                continue
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    recipe = WanRecipe(**{f.name: args[f.name] for f in dataclasses.fields(WanRecipe)})
    spec = ToyWanSpec(**{f.name: args[f.name] for f in dataclasses.fields(ToyWanSpec) if f.name in args})
    try:
        stats = train_wan_base(args["out"], recipe, spec, quiet=args["quiet"])
    except CavError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in stats.items() if k not in ("log", "vae_log", "recipe", "spec")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
