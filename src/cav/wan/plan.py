"""What a Wan run will train, per stage, from the base's transformer config alone (the ``--dry-run`` counts).

The transformer is built on the ``meta`` device (no weights, no memory) and each stage's adapter is injected by the
run's own code (``targets.add_absorber_lora``, ``targets.add_motion_lora``, ``prompt_vectors.PromptVectors``), so the
counts are what peft allocates, not a formula. Stages:

- ``s_lora``: the appearance absorber, rank 1 on attn1 + attn2 of every block (trained in image mode);
- ``prompt_vectors``: textual inversion's analogue, ``count`` vectors of the umT5 width;
- ``t_lora``: the motion LoRA (rank 4) at the run's placement.

A14B (two experts: ``transformer`` = high noise, ``transformer_2`` = low noise): the LoRAs train on the experts
``--experts`` names (default ``high``); each trained expert gets its own absorber, because the absorber must sit
under the motion LoRA it shields, in the same model and noise range. Both experts share one config, so one meta
model is measured and its counts are reported per expert. ``temporal-heads`` chooses its heads on the clip, so a
dry run reports the ``cav`` count as its upper bound (every block adapted; only the chosen heads' rows train).
"""

from __future__ import annotations

import torch

from ..adapters.lora import count_parameters
from . import targets
from ..backbone import chosen_expert
from .checks import expert_components
from .prompt_vectors import prompt_vector_params

S_LORA, T_LORA, PROMPT_VECTORS = "s_lora", "t_lora", "prompt_vectors"


def meta_transformer(transformer_config: dict):
    """A ``WanTransformer3DModel`` with this config and no weights."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel.from_config(transformer_config)


def _lora_model(transformer_config: dict, placement: str):
    """A meta transformer with the run's absorber and motion LoRA injected (peft, as the run injects them)."""
    model = meta_transformer(transformer_config)
    targets.add_absorber_lora(model, S_LORA)
    heads = None
    if placement == "temporal-heads":  # upper bound: every head of every block (the clip chooses fewer)
        heads = {b: list(range(transformer_config["num_attention_heads"])) for b in range(len(model.blocks))}
    targets.add_motion_lora(model, T_LORA, placement, heads=heads)
    return model


def adapted_base_params(transformer_config: dict, placement: str = "cav") -> dict:
    """Per adapter (``s_lora``, ``t_lora``) of one expert: the parameters of the base weights it adapts, which
    ``lean.FrozenMerge`` keeps a copy of while the adapter is folded in (the S-LoRA under the T-LoRA's steps, the
    T-LoRA while validation samples are drawn)."""
    model = _lora_model(transformer_config, placement)
    return {name: sum(m.get_base_layer().weight.numel() for m in model.modules() if name in getattr(m, "lora_A", {}))
            for name in (S_LORA, T_LORA)}


def _lora_rows(transformer_config: dict, placement: str) -> tuple[dict, dict]:
    """(absorber, motion LoRA) counts of one expert: trainable parameters and adapted modules, through peft."""
    model = _lora_model(transformer_config, placement)
    rows = {}
    for name in (S_LORA, T_LORA):
        modules = sum(1 for m in model.modules() if name in getattr(m, "lora_A", {}))
        rows[name] = {"trainable_params": count_parameters(model, name), "modules": modules}
    return rows[S_LORA], rows[T_LORA]


def stages(transformer_config: dict, placement: str = "cav", experts: str | None = None, n_experts: int = 1,
           absorbers: str = "both", prompt_vectors: int = 4, text_dim: int | None = None,
           absorbers_given: bool = False) -> list[dict]:
    """The stages of a Wan run with their trainable parameters and adapted modules (``api.plan``'s ``stages``).
    ``text_dim``: the umT5 width (text encoder ``d_model``; default the transformer's ``text_dim``, the same)."""
    chosen = expert_components(chosen_expert(experts, n_experts), n_experts)
    absorber, motion = _lora_rows(transformer_config, placement)
    tag = (lambda c: {"expert": c}) if n_experts > 1 else (lambda c: {})
    rows = []
    if not absorbers_given and absorbers in ("s-lora", "both"):
        rows += [{"name": S_LORA, **absorber, **tag(c)} for c in chosen]
    if not absorbers_given and absorbers in ("ti", "both"):
        width = int(text_dim or transformer_config["text_dim"])
        rows.append({"name": PROMPT_VECTORS, "trainable_params": prompt_vector_params(prompt_vectors, width),
                     "modules": 1, "vectors": prompt_vectors, "width": width})
    extra = {"upper_bound": "heads are chosen on the clip"} if placement == "temporal-heads" else {}
    rows += [{"name": T_LORA, "placement": placement, **motion, **tag(c), **extra} for c in chosen]
    return rows


def placement_table(transformer_config: dict, prompt_vectors: int = 4) -> dict:
    """Every placement's motion-LoRA count, the absorber's and the prompt vectors' for one expert (README table)."""
    table = {}
    for placement in targets.PLACEMENTS:
        absorber, motion = _lora_rows(transformer_config, placement)
        table[placement] = motion
    table[S_LORA] = absorber
    table[PROMPT_VECTORS] = {"trainable_params": prompt_vector_params(prompt_vectors, transformer_config["text_dim"]),
                             "modules": 1}
    return table


def dry_run(read, *, frames: int, height: int, width: int, placement: str = "cav", experts: str | None = None,
            absorbers: str = "both", prompt_vectors: int = 4, absorbers_given: bool = False, dtype: str = "bf16",
            device: str = "cuda", checkpointing: bool = True, offload_frozen: bool = False,
            lora_files: tuple = (), base: str | None = None, absorber_batch: int = 4, texts: int = 1) -> dict:
    """The Wan part of ``api.plan`` for one base: every weightless check (``checks.check_run``), the stages with
    their counts and the memory estimate. ``read(name)`` returns a JSON file of the base (``model_index.json``,
    ``transformer/config.json``, ``vae/config.json``, ``text_encoder/config.json``), e.g. ``backbone._read_json``
    bound to the resolved base, which finds the shipped files of the published hub ids offline. ``texts``: how many
    texts the run encodes and keeps (``cav.textcache.run_texts``)."""
    from . import checks, memory

    n_experts = checks.experts_of(read("model_index.json"))
    transformer = read("transformer/config.json")
    vae = read("vae/config.json")
    chosen = checks.check_run(transformer, vae, n_experts, frames=frames, height=height, width=width,
                              placement=placement, experts=experts, lora_files=lora_files, base=base)
    encoder = read("text_encoder/config.json")
    rows = stages(transformer, placement, chosen, n_experts, absorbers, prompt_vectors, encoder["d_model"],
                  absorbers_given)
    swap, warning = checks.offload_plan(offload_frozen, device)
    motion = sum(r["trainable_params"] for r in rows if r["name"] == T_LORA)
    absorber = max((r["trainable_params"] for r in rows if r["name"] == S_LORA), default=0) + sum(
        r["trainable_params"] for r in rows if r["name"] == PROMPT_VECTORS)
    base = adapted_base_params(transformer, placement)
    trained = sum(1 for r in rows if r["name"] == T_LORA)  # experts the LoRAs train on (--experts both: two)
    s_lora = any(r["name"] == S_LORA for r in rows) or (absorbers_given and absorbers in ("s-lora", "both"))
    mem = memory.estimate(transformer, vae, encoder, frames=frames, height=height, width=width,
                          trainable_params=motion, n_experts=n_experts, dtype=dtype, checkpointing=checkpointing,
                          offload_frozen=swap, absorber_trainable_params=absorber, prompts=texts,
                          absorber_batch=absorber_batch if absorber else 0,
                          merged_params=trained * base[S_LORA] if s_lora else 0,
                          sample_merged_params=trained * base[T_LORA])
    return {"family": "wan", "experts": chosen, "n_experts": n_experts, "stages": rows,
            "transformer_params": n_experts * sum(p.numel() for p in meta_transformer(transformer).parameters()),
            "memory": mem, **({"warning": warning} if warning else {})}


__all__ = ["S_LORA", "T_LORA", "PROMPT_VECTORS", "meta_transformer", "prompt_vector_params", "stages",
           "placement_table", "dry_run"]


def run_memory(cfg, read) -> dict:
    """The training-memory estimate of a Wan run as ``cfg`` describes it (``api.plan``'s ``memory`` block): on the
    device the run asks for (``auto``: a GPU, where Wan trains), in the dtype it would load there, with its
    checkpointing choice. Every weightless check of ``dry_run`` runs too. ``--offload-frozen`` is block swap on
    Wan (``Family.block_swap``, ``run._load_backbone``), so it is counted when the run asks for it on a GPU; on a CPU
    the run swaps nothing and the estimate says so (``offload_plan``'s warning)."""
    from ..textcache import run_texts

    device = "cuda" if cfg.system.device == "auto" else cfg.system.device
    on_gpu = device.startswith("cuda")
    dtype = {"auto": "bf16" if on_gpu else "fp32", "fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}[cfg.system.dtype]
    checkpointing = _checkpointing(cfg.system.gradient_checkpointing, device)
    h, w = cfg.data.size
    out = dry_run(read, frames=cfg.data.frames, height=h, width=w, placement=cfg.motion.placement,
                  experts=cfg.motion.experts or None,
                  absorbers=cfg.absorbers.kind,
                  prompt_vectors=cfg.absorbers.ti_tokens, absorbers_given=cfg.absorbers.given, dtype=dtype, device=device,
                  checkpointing=checkpointing, offload_frozen=cfg.system.offload_frozen,
                  absorber_batch=cfg.absorbers.batch, texts=len(run_texts(cfg, max(1, len(cfg.spatial_prompt)))))
    return {**out["memory"], "device": device, "dtype": dtype, "checkpointing": checkpointing,
            **({"warning": out["warning"]} if "warning" in out else {})}


def _checkpointing(setting: str, device: str) -> bool:
    """Whether the run would recompute activations: ``accel.wants_checkpointing`` where the device is visible; for
    a GPU this machine does not have, ``auto`` is counted as on (the rule's < 16 GB card, the one to plan for)."""
    import torch

    from ..accel import wants_checkpointing

    if device.startswith("cuda") and not torch.cuda.is_available():
        return setting != "off"
    return wants_checkpointing(setting, torch.device(device))
