"""Write the JSON files a dry run of a published Wan base reads (``src/cav/assets/wan*_*.json``), offline.

Each file is what diffusers' own Wan conversion (``scripts/convert_wan_to_diffusers.py`` of diffusers, which made
the ``Wan-AI/*-Diffusers`` repositories) saves, rebuilt here from the installed classes on the meta device:

- ``transformer`` (and A14B's ``transformer_2``): ``WanTransformer3DModel.from_config`` of the record in
  ``cav/wan/configs/<name>.json`` (checked by parameter count: tests/test_wan_published.py);
- ``vae``: ``AutoencoderKLWan()``'s defaults are the Wan 2.1 VAE (the conversion builds it so, for 2.1 and for
  A14B); TI2V-5B's Wan 2.2 VAE is the conversion's ``vae22`` settings (``WAN22_VAE`` below);
- ``text_encoder``: ``UMT5EncoderModel`` of google/umt5-xxl's published dimensions (``UMT5_XXL``);
- ``scheduler``: ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  num_train_timesteps=1000, flow_shift=...)`` with the conversion's shift (T2V 3.0, TI2V 5.0);
- ``model_index.json``: ``WanPipeline``'s registered config for the same components (A14B: two experts and
  boundary ratio 0.875; TI2V-5B: ``expand_timesteps``).

Run: ``PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/wan_ship_configs.py`` (rewrites the files; a test checks that
the shipped files equal what this writes).
"""

from __future__ import annotations

import sys

from cav.wan import shipped

if __name__ == "__main__":
    for path in shipped.write_assets():
        print(path)
    sys.exit(0)
