"""Peak memory of a Wan training step, estimated for ``--dry-run`` from the configs alone (no weights).

Parts (bytes; ``estimate`` returns each and the peak):
- ``weights``: the transformer(s) resident in the compute dtype (bf16 on a GPU, fp32 on a CPU; the modules diffusers
  keeps in fp32 at 4 bytes). A14B: both experts are loaded (samples use both). ``--offload-frozen`` (block swap,
  ``offload.py``): the blocks live on the CPU; on the device every expert's non-block parts and two blocks of the
  expert the step runs (a step's timestep selects one expert). The swap is made at load, with the blocks loaded
  onto the CPU, and stays for the whole run: no phase has every block on the device (``run_phases``).
- ``trainable_params``: the sum over the adapters that train at once (the T-LoRA stage: its LoRA on each trained
  expert).
- ``lora``: each trainable parameter in fp32 with its gradient and AdamW's two states (4 × 4 bytes).
- ``vae``: the VAE's weights in the compute dtype (kept for validation decodes; its encode of the clip runs once
  before training and its activations are not modelled here).
- ``text_encoder``: umT5 runs once per text at the start of the run, its outputs are cached (``embeddings``: one
  (512, D) row block per text, ``prompts``) and it is released (``cav.textcache``), so it is in no step's parts
  (``train_peak``) and in one phase only, the first (``run_phases``: ``text_encoding``).
- ``activations``: what autograd saves for one forward + backward, from a model *measured* on real forward +
  backward passes (``measure_activations``: bytes of the distinct non-parameter tensors saved, through
  ``torch.autograd.graph.saved_tensors_hooks``, in the step's mixed precision: bf16 weights, fp32 LoRA, bf16
  autocast, on the CPU) and fitted as

      saved = blocks · (tokens · (A·width + B·ffn_dim) + C·text_len·width) + D·tokens·width      (bytes)

  (``ACTIVATION_FIT``: ``scripts/wan_memory_fit.py``, which also reports how well it predicts a larger model it was
  not fitted on). With gradient checkpointing each block keeps only its input (tokens · width in the compute dtype,
  measured) plus the inputs all blocks share (RoPE cos/sin in fp32, the prompt, the time projection), and the
  backward recomputes one block at a time, so: blocks · tokens · width · bytes + shared + one block's activations +
  the non-block part (composed from measured parts; tests/test_wan_plan_memory.py checks it on a tiny step).

Saved tensors are not all of a step's memory: ``measure_peak`` (``torch.profiler``'s allocations on the CPU, transient
buffers and gradients included) measured the true step peak 6-8 % above the model on the held-out sizes, with and
without checkpointing (``scripts/wan_memory_fit.py`` prints both).
Not modelled: the CUDA context and allocator fragmentation (add ~1-2 GB on a GPU), the VAE's encode / decode
activations, the optimizer's temporary buffers. GPU figures were not measured (no device lent to this task).
"""

from __future__ import annotations

import torch

# bytes per element of a fitted saved tensor (A, B, C, D of the module doc), for the step's mixed precision (bf16
# weights, fp32 LoRA, bf16 autocast): ``scripts/wan_memory_fit.py`` prints them
ACTIVATION_FIT = {"A": 45.612, "B": 2.0, "C": 6.031, "D": 4.214}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAMW_BYTES = 16  # fp32 weight + gradient + exp_avg + exp_avg_sq
GIB = 2 ** 30


def tokens(transformer_config: dict, vae_config: dict, frames: int, height: int, width: int) -> int:
    """Transformer tokens of one clip: latent frames (4k+1 → k+1) × latent height / patch × latent width / patch."""
    t = int(vae_config.get("scale_factor_temporal", 4))
    s = int(vae_config.get("scale_factor_spatial", 8))
    pt, ph, pw = transformer_config["patch_size"]
    return ((frames - 1) // t + 1) // pt * (height // s // ph) * (width // s // pw)


def _width(cfg: dict) -> int:
    return cfg["num_attention_heads"] * cfg["attention_head_dim"]


def block_activation_bytes(cfg: dict, n_tokens: int, text_len: int, fit: dict | None = None) -> float:
    fit = fit or ACTIVATION_FIT
    return n_tokens * (fit["A"] * _width(cfg) + fit["B"] * cfg["ffn_dim"]) + fit["C"] * text_len * _width(cfg)


def activation_bytes(cfg: dict, n_tokens: int, text_len: int = 512, checkpointing: bool = False,
                     dtype_bytes: int = 2, fit: dict | None = None) -> float:
    """Saved activations of one forward + backward of one expert (module doc's model)."""
    fit = fit or ACTIVATION_FIT
    block = block_activation_bytes(cfg, n_tokens, text_len, fit)
    outside = fit["D"] * n_tokens * _width(cfg)
    if checkpointing:  # + the inputs all checkpointed blocks share: RoPE cos/sin (fp32), prompt, time projection
        shared = (n_tokens * cfg["attention_head_dim"] * 2 * 4 + text_len * _width(cfg) * dtype_bytes
                  + 6 * _width(cfg) * 4)
        return cfg["num_layers"] * n_tokens * _width(cfg) * dtype_bytes + block + outside + shared
    return cfg["num_layers"] * block + outside


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _kept_fp32(name: str, model) -> bool:
    """diffusers' rule for ``from_pretrained(torch_dtype=...)``: a parameter under a module named in the model's
    ``_keep_in_fp32_modules`` (Wan: rope, time_embedder, scale_shift_table, norm1-3) stays fp32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") for k in keep)


def weight_bytes(model, dtype: str) -> int:
    """Bytes of ``model``'s parameters loaded in ``dtype`` as ``from_pretrained(torch_dtype=...)`` loads them."""
    return sum(p.numel() * (4 if _kept_fp32(n, model) else DTYPE_BYTES[dtype]) for n, p in model.named_parameters())


def to_compute_dtype(model, dtype: torch.dtype):
    """Cast a model built in code as ``from_pretrained(torch_dtype=dtype)`` would load it (fp32 modules kept)."""
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if _kept_fp32(name, model) else dtype)
    for prefix, module in model.named_modules():
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[key] = b.to(torch.float32 if _kept_fp32(f"{prefix}.{key}", model) else dtype)
    return model


def estimate(transformer_config: dict, vae_config: dict, text_encoder_config: dict, *, frames: int, height: int,
             width: int, trainable_params: int, n_experts: int = 1, dtype: str = "bf16",
             checkpointing: bool = False, offload_frozen: bool = False, prompts: int = 1,
             text_len: int = 512, absorber_trainable_params: int = 0, absorber_batch: int = 0,
             merged_params: int = 0, sample_merged_params: int = 0) -> dict:
    """The parts of the training peak (module doc), in bytes and GiB, for the dry run to print. ``bytes`` are the
    T-LoRA stage's (the whole clip, ``trainable_params``); with ``absorber_batch`` (frames per absorber step) the
    absorber stage is sized too (image mode: that many 1-frame videos at the full size, since patch crops are resized
    back, training ``absorber_trainable_params``) and ``train_peak`` is the larger of the two stages (a step's parts
    alone). ``peak`` is the largest of the run's phases (``run_phases``: what the run really has on the device at load
    and in stage 1, in stage 2, at checkpoints; ``phases`` holds each one's parts), with ``merged_params`` /
    ``sample_merged_params`` the base parameters ``lean.FrozenMerge`` copies while the S-LoRA is folded under the
    T-LoRA's steps / while the T-LoRA is folded for validation samples."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .shipped import _accepted

    nbytes = DTYPE_BYTES[dtype]
    with torch.device("meta"):
        transformer = WanTransformer3DModel.from_config(transformer_config)
        vae = AutoencoderKLWan(**_accepted(AutoencoderKLWan, vae_config))
        encoder = UMT5EncoderModel(UMT5Config(**{k: v for k, v in text_encoder_config.items()
                                                 if not k.startswith("_")}))
    per_expert = weight_bytes(transformer, dtype)
    if offload_frozen:  # every expert's non-block parts, and two blocks of the one expert a step runs
        blocks = [sum(p.numel() * (4 if _kept_fp32(f"blocks.{i}.{n}", transformer) else nbytes)
                      for n, p in b.named_parameters()) for i, b in enumerate(transformer.blocks)]
        resident = n_experts * (per_expert - sum(blocks))  # at load: no block has come in yet
        weights = resident + 2 * max(blocks)
    else:
        weights = resident = n_experts * per_expert
    n_tok = tokens(transformer_config, vae_config, frames, height, width)

    def stage(trainable: int, n_tokens: int, texts: int) -> dict:
        return {"weights": weights, "lora": trainable * ADAMW_BYTES, "vae": _params(vae) * nbytes,
                "embeddings": prompts * text_len * text_encoder_config["d_model"] * nbytes,
                "activations": int(activation_bytes(transformer_config, n_tokens, texts, checkpointing, nbytes))}

    parts = stage(trainable_params, n_tok, text_len)
    train_peak = sum(parts.values())
    extra = {}
    if absorber_batch:
        a_tok = absorber_batch * tokens(transformer_config, vae_config, 1, height, width)
        a_parts = stage(absorber_trainable_params, a_tok, absorber_batch * text_len)
        extra["absorber_stage"] = {"tokens": a_tok, "bytes": a_parts, "total": sum(a_parts.values()),
                                   "gib": round(sum(a_parts.values()) / GIB, 2)}
        train_peak = max(train_peak, extra["absorber_stage"]["total"])
    encode_phase = _params(encoder) * nbytes + parts["embeddings"]
    phases = run_phases(parts, text_encoder=_params(encoder) * nbytes,
                        absorbers=extra["absorber_stage"]["bytes"] if absorber_batch else None,
                        offload_frozen=offload_frozen, merged=merged_params * nbytes,
                        sample_merged=sample_merged_params * nbytes, load_weights=resident)
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals.values())
    return {"tokens": n_tok, "dtype": dtype, "checkpointing": checkpointing, "offload_frozen": offload_frozen,
            "bytes": parts, **extra, "text_encoder": _params(encoder) * nbytes, "encode_phase": encode_phase,
            "train_peak": train_peak, "phases": phases, "peak": peak,
            "gib": {**{k: round(v / GIB, 2) for k, v in parts.items()}, "train_peak": round(train_peak / GIB, 2),
                    "encode_phase": round(encode_phase / GIB, 2),
                    **{k: round(v / GIB, 2) for k, v in totals.items()}, "peak": round(peak / GIB, 2)},
            "not_counted": "CUDA context and fragmentation (~1-2 GB), VAE encode/decode and sampling activations"}


PHASES = ("text_encoding", "stage_1", "stage_2", "checkpoints")


def run_phases(parts: dict, *, text_encoder: int, absorbers: dict | None, offload_frozen: bool, merged: int,
               sample_merged: int, load_weights: int | None = None) -> dict:
    """What is on the device in each phase a run goes through (bytes by part), as ``cav.run`` places it:

    - ``text_encoding``: the load and the run's one encoding of each of its texts (``cav.textcache``: the prompt,
      the spatial prompt, ``""``, the validation prompts; ``embeddings``). ``backbone.load`` puts the VAE and umT5 on
      the device; the denoiser's weights are all there, or with block swap only its non-block parts
      (``load_weights``: no block has come in yet). Then umT5 is released, for the rest of the run.
    - ``stage_1``: the absorber steps: the VAE on the device, no umT5; the denoiser's weights (with block swap its
      non-block parts and two blocks, ``weights``), the absorbers' LoRA state and image-mode activations (none when
      there is no absorber stage: then the phase is the weights, the VAE and the cached encodings).
    - ``stage_2``: the T-LoRA steps. ``--offload-frozen`` moves the VAE to the CPU once the clip is encoded
      (``stages.t_lora_stage``); without it it stays. The frozen S-LoRA is folded into the base weights
      (``lean.FrozenMerge``), which keeps a copy of every base weight it folds into (``merged``): on the device,
      or with block swap on the CPU beside the blocks' home copies.
    - ``checkpoints``: the T-LoRA's checkpoints. The S-LoRA is unfolded, the adapters saved, and validation samples
      drawn from the cached encodings: the VAE back on the device (``accel.on_device``), the T-LoRA's state still
      allocated, the T-LoRA folded for sampling (``sample_merged``, a copy of the base weights it adapts: on the
      device, or with block swap on the CPU). The sampling forward's own activations (no gradients) are not counted.

    With block swap nothing puts every block on the device in any phase (``wan.offload``: the swap is attached at
    load for the whole run and changes frozen weights block by block)."""
    weights, embeddings = parts["weights"], parts["embeddings"]
    kept = lambda n: 0 if offload_frozen else n  # noqa: E731 - FrozenMerge's copies: on the CPU with the swap
    encoding = {"weights": weights if load_weights is None else load_weights, "vae": parts["vae"],
                "text_encoder": text_encoder, "embeddings": embeddings}
    first = {"weights": weights, "vae": parts["vae"], "embeddings": embeddings}
    if absorbers is not None:
        first.update(lora=absorbers["lora"], activations=absorbers["activations"])
    second = {"weights": weights, "lora": parts["lora"], "embeddings": embeddings,
              "activations": parts["activations"], "merged_copies": kept(merged)}
    if not offload_frozen:
        second.update(vae=parts["vae"])
    third = {"weights": weights, "lora": parts["lora"], "embeddings": embeddings, "vae": parts["vae"],
             "merged_copies": kept(sample_merged)}
    return dict(zip(PHASES, (encoding, first, second, third)))


# ------------------------------------------------------------------------------------------- the measurement
def measure_activations(transformer, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                        autocast_dtype: torch.dtype | None = torch.bfloat16, checkpointing: bool = False) -> dict:
    """Bytes autograd saves in one forward of ``transformer`` (its trainable LoRA set up by the caller), split into
    the blocks' part and the rest: distinct storages, parameters excluded (weights are not activations). Runs the
    backward too, so the step is a real one. ``checkpointing``: diffusers' gradient checkpointing is on for the
    step; the checkpoint hides what a block saves (its hooks are innermost), so ``block_inputs`` reports what it
    keeps instead: each block's ``hidden_states`` input."""
    params = {p.untyped_storage().data_ptr() for p in transformer.parameters()}
    saved: dict[int, tuple[int, bool]] = {}
    inside = [False]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in saved:
            saved[ptr] = (t.untyped_storage().nbytes(), inside[0])
        return t

    inputs: dict[int, int] = {}

    def enter(module, args):
        inside[0] = True
        if torch.is_grad_enabled():
            inputs.setdefault(args[0].untyped_storage().data_ptr(), args[0].untyped_storage().nbytes())

    hooks = []
    for block in transformer.blocks:
        hooks.append(block.register_forward_pre_hook(enter))
        hooks.append(block.register_forward_hook(lambda *a: inside.__setitem__(0, False)))
    was = transformer.gradient_checkpointing
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    try:
        with torch.autocast(latents.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = transformer(latents, timestep, context, return_dict=False)[0]
        out.float().square().mean().backward()
    finally:
        for h in hooks:
            h.remove()
        if checkpointing and not was:
            transformer.disable_gradient_checkpointing()
    blocks = sum(n for n, b in saved.values() if b)
    outside = sum(n for n, b in saved.values() if not b)
    return {"blocks": blocks, "outside": outside, "total": blocks + outside,
            "block_inputs": sum(inputs.values()) if checkpointing else 0}


def measure_peak(transformer, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 autocast_dtype: torch.dtype | None = torch.bfloat16, checkpointing: bool = False) -> int:
    """Peak bytes of memory allocated during one forward + backward on the CPU, from ``torch.profiler``'s memory
    events (each op's own allocations at its start, frees as they happen): activations, transient buffers and
    gradients together — the number the activation model should approach from below."""
    from torch.profiler import ProfilerActivity, profile

    was = transformer.gradient_checkpointing
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autocast(latents.device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                out = transformer(latents, timestep, context, return_dict=False)[0]
            out.float().square().mean().backward()
            del out
    finally:
        if checkpointing and not was:
            transformer.disable_gradient_checkpointing()
    events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak


__all__ = ["ACTIVATION_FIT", "DTYPE_BYTES", "ADAMW_BYTES", "PHASES", "tokens", "block_activation_bytes",
           "activation_bytes", "estimate", "run_phases", "measure_activations", "measure_peak", "weight_bytes", "to_compute_dtype"]
