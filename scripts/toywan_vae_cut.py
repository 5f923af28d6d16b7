"""Cut a toy Wan VAE down to its first Z latent channels (the inverse of ``--vae-init`` growing one, run 4's card).

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/toywan_vae_cut.py FOLDER DEST Z

Loads FOLDER's latest VAE (as ``toywan_vae_probe.py`` does), keeps the mean and log-variance rows of channels < Z in
``encoder.conv_out`` and ``quant_conv``, channels < Z of ``post_quant_conv``, and ``decoder.conv_in``'s input columns
< Z, and writes the smaller ``AutoencoderKLWan`` to ``DEST/vae`` (a folder `cav toy train-base --family wan
--vae-init DEST --z-dim Z` starts from). This is exact only where the decoder does not read the dropped channels, so
it prints what the cut costs: the mean and largest absolute change (0..255) of the decoded posterior mode on the
first 16 training clips, cut against uncut.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toywan_vae_probe import load_vae  # noqa: E402

from cav.toy.wan_base import WanRecipe, render_batch, training_specs  # noqa: E402


def cut_latent_channels(tensors: dict, z_old: int, z_new: int) -> dict:
    """``tensors`` of a z-``z_old`` VAE with only its first ``z_new`` latent channels."""
    kept = torch.cat([torch.arange(z_new), z_old + torch.arange(z_new)])  # [mean, logvar] rows of the kept channels
    cut = dict(tensors)
    cut["encoder.conv_out.weight"] = tensors["encoder.conv_out.weight"][kept]
    cut["encoder.conv_out.bias"] = tensors["encoder.conv_out.bias"][kept]
    cut["quant_conv.weight"] = tensors["quant_conv.weight"][kept][:, kept]
    cut["quant_conv.bias"] = tensors["quant_conv.bias"][kept]
    cut["post_quant_conv.weight"] = tensors["post_quant_conv.weight"][:z_new, :z_new]
    cut["post_quant_conv.bias"] = tensors["post_quant_conv.bias"][:z_new]
    cut["decoder.conv_in.weight"] = tensors["decoder.conv_in.weight"][:, :z_new]
    return {k: v.contiguous() for k, v in cut.items()}


@torch.no_grad()
def main(argv: list[str]) -> None:
    from diffusers import AutoencoderKLWan

    torch.set_num_threads(1)
    vae, dest, z_new = load_vae(Path(argv[0])).eval(), Path(argv[1]), int(argv[2])
    z_old = vae.config.z_dim
    if not 0 < z_new < z_old:
        raise SystemExit(f"Z {z_new}: pass fewer latent channels than the VAE's {z_old}")
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    config.update(z_dim=z_new, latents_mean=config["latents_mean"][:z_new], latents_std=config["latents_std"][:z_new])
    small = AutoencoderKLWan.from_config(config).eval()
    small.load_state_dict(cut_latent_channels(vae.state_dict(), z_old, z_new))
    recipe = WanRecipe()
    x = render_batch(training_specs(recipe)[:16], recipe.frames, recipe.size)
    decoded = [v.decode(v.encode(x).latent_dist.mode()).sample.clamp(-1, 1) for v in (vae, small)]
    change = (decoded[0] - decoded[1]).abs() * 127.5
    small.save_pretrained(dest / "vae")
    print(json.dumps({"folder": argv[0], "dest": str(dest), "z_from": z_old, "z_to": z_new,
                      "decoded_change_255": {"mean": round(float(change.mean()), 4),
                                             "max": round(float(change.max()), 4)}}))


if __name__ == "__main__":
    main(sys.argv[1:])
