"""Wan 2.1 / 2.2 mechanisms for cav (issue 23); ``families.WAN`` is the row that uses them (``wan/family.py``).

- ``tiny``: tiny Wan models in the stock diffusers layout (tests);
- ``image_mode``: the DiT as an image model (frames folded into the batch = frame-local attention);
- ``latents``: the VAE, per clip or per frame, with Wan's latent normalisation;
- ``flow``: the flow-matching objective (shifted timesteps, velocity target) and flow inversion;
- ``targets``: LoRA placements over Wan module names, the temporal-heads measurement, named peft adapters;
- ``formats``: diffusers-layout save, the ComfyUI (original Wan names) export incl. the A14B expert pair, and the
  header-only check that a LoRA file fits a base;
- ``prompt_vectors``: textual inversion's analogue (learned vectors in the umT5 output, passed as prompt_embeds);
- ``published``: the shipped transformer configs of the published Wan bases, and size / frame-count checks;
- ``shipped``: the published bases by hub id offline (model_index, transformer(s), VAE, umT5, scheduler JSON files);
- ``plan``: the dry run's trainable counts per stage (peft on the meta device), per expert;
- ``memory``: the training peak estimate (weights, LoRA + AdamW, VAE, umT5 phase, measured activation model);
- ``offload``: block swap for ``--offload-frozen`` (frozen blocks on the CPU, two at a time on the device);
- ``checks``: bad input refused from configs and file headers before any weight loads.
"""
