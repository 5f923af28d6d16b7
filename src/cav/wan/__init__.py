"""Wan 2.1 / 2.2 mechanisms for cav (issue 23), self-contained until the family table takes Wan as a row.

- ``tiny``: tiny Wan models in the stock diffusers layout (tests);
- ``image_mode``: the DiT as an image model (frames folded into the batch = frame-local attention);
- ``latents``: the VAE, per clip or per frame, with Wan's latent normalisation;
- ``flow``: the flow-matching objective (shifted timesteps, velocity target) and flow inversion;
- ``targets``: LoRA placements over Wan module names, the temporal-heads measurement, named peft adapters;
- ``formats``: diffusers-layout save, the ComfyUI (original Wan names) export incl. the A14B expert pair, and the
  header-only check that a LoRA file fits a base;
- ``prompt_vectors``: textual inversion's analogue (learned vectors in the umT5 output, passed as prompt_embeds);
- ``published``: the shipped transformer configs of the published Wan bases, and size / frame-count checks.
"""
