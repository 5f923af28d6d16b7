"""Does a toy Wan VAE grown by ``--vae-init`` into more latent channels (``--z-dim``) use its new channels?

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/toywan_vae_channels.py FOLDER OLD_Z

Loads FOLDER's latest VAE (as ``toywan_vae_probe.py`` does), encodes the first 16 training clips and prints, for the
old channels (< OLD_Z) and the new ones: the std of the posterior mode per channel, the mean log-variance, the norm
of ``decoder.conv_in``'s input columns, and how much the decoded clips change (mean absolute, 0..255) when the new
channels of the mode are set to 0. A new channel the decoder does not read changes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toywan_vae_probe import load_vae  # noqa: E402

from cav.toy.wan_base import WanRecipe, render_batch, training_specs  # noqa: E402


@torch.no_grad()
def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    vae, old = load_vae(Path(argv[0])).eval(), int(argv[1])
    recipe = WanRecipe()
    x = render_batch(training_specs(recipe)[:16], recipe.frames, recipe.size)
    post = vae.encode(x).latent_dist
    mode = post.mode()
    cut = mode.clone()
    cut[:, old:] = 0
    change = (vae.decode(mode).sample - vae.decode(cut).sample).abs().mean() * 127.5
    std = mode.std(dim=(0, 2, 3, 4))
    cols = vae.decoder.conv_in.weight.pow(2).sum(dim=(0, 2, 3, 4)).sqrt()
    print(json.dumps({
        "folder": argv[0], "z": mode.shape[1], "old_z": old,
        "mode_std_old_mean": round(float(std[:old].mean()), 3),
        "mode_std_new": [round(float(v), 3) for v in std[old:]],
        "logvar_old_mean": round(float(post.logvar[:, :old].mean()), 2),
        "logvar_new_mean": round(float(post.logvar[:, old:].mean()), 2),
        "decoder_column_norm_old_mean": round(float(cols[:old].mean()), 3),
        "decoder_column_norm_new_mean": round(float(cols[old:].mean()), 3),
        "pixel_change_new_zeroed": round(float(change), 3)}))


if __name__ == "__main__":
    main(sys.argv[1:])
