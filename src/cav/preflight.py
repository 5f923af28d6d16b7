"""What a training run checks before any work: the base's shape limits, that a motion adapter fits the image model,
and the prompts' token lengths.

Both are read from the base's small files (configs, tokenizer), never its weights, so a run that cannot work is
refused in a second, before its folder is touched, instead of at the first validation sample after training.
"""

from __future__ import annotations

from pathlib import Path

from . import backbone
from .adapters.textual_inversion import expand, token_names
from .config import TrainConfig
from .errors import CavError
from .prompts import check_prompt


def check_train(cfg: TrainConfig) -> None:
    """Refuse (CavError) a size or frame count the base cannot take and a prompt whose cut drops a textual-inversion
    token; warn of any other prompt cut. Prompts are checked when the base's tokenizer is on this machine."""
    family = backbone.family_of(cfg.base, cfg.motion_adapter or None)
    backbone.check_shape(cfg.base, cfg.data.size, cfg.data.frames, motion_adapter=cfg.motion_adapter or None, family=family)
    check_family_supports(cfg, family)
    expert = backbone.check_experts(cfg.base, cfg.motion.experts or None, family)  # on a one-expert base: refused
    if expert == "both" and cfg.absorbers.s_lora_from:  # an image LoRA file is read into one model
        raise CavError("--s-lora-from with --experts both is not supported: pass --experts high or low, or let stage 1 "
                       "train the S-LoRA on both experts")
    if cfg.motion_adapter:  # e.g. an SD 1.5 motion adapter on an SDXL image model: refused before the folder is touched
        backbone.check_motion_adapter_fits(backbone.read_unet_config(cfg.base),
                                           backbone.read_motion_adapter_config(cfg.motion_adapter), cfg.motion_adapter)
    if not cfg.prompt.strip():
        return
    tokenizer = local_tokenizer(cfg.base, family)
    if tokenizer is None:
        return
    # token rows go into the prompt (Wan's prompt vectors follow it, outside the text)
    ab = cfg.absorbers
    tokens = token_names(ab.ti_token, ab.ti_tokens) if ab.uses_ti and family.condition.textual_inversion else None
    if tokens:
        tokenizer.add_tokens(tokens)  # this copy only: the run's own tokenizer gets them when the stage is built

    def fed(prompt: str) -> str:  # the prompt as the stages feed it to the text encoder
        return expand(prompt, tokens) if tokens else prompt

    check_prompt(tokenizer, fed(cfg.prompt), "--prompt")
    if cfg.absorbers.kind != "none":
        for spatial in (p for p in cfg.spatial_prompt if p.strip()):  # one per clip
            check_prompt(tokenizer, fed(spatial), "--spatial-prompt")
    for prompt in cfg.validation.prompts:  # warned about at the first checkpoint; refused here if a token is lost
        check_prompt(tokenizer, prompt, f"--validation-prompt '{prompt[:40]}'", warn=False)


def check_family_supports(cfg: TrainConfig, family) -> None:
    """Refuse what the base's family cannot do yet, in one line: textual inversion needs a condition with an
    absorber of that kind (``condition.ti``: token rows; Wan: prompt vectors); an image LoRA given as the
    S-LoRA (``--s-lora-from``) needs the row's reader; the placement must exist on the family's model (Wan's ``qk``
    and ``temporal-heads`` are a DiT's), one that measures heads needs one expert, and ``--frame-diff-loss`` an
    objective with a frame-difference term (``Objective.frame_difference_loss``: flow matching, Wan)."""
    if cfg.absorbers.uses_ti and family.condition.ti is None:
        given = " (--ti-from)" if cfg.absorbers.ti_from else ""
        raise CavError(f"textual inversion{given} (--absorbers {cfg.absorbers.kind}) is not supported on {family.what} yet: "
                       "pass --absorbers s-lora (or none)")
    if cfg.absorbers.ti_from:  # a file of the other kind (token rows / prompt vectors): refused before the run folder
        family.condition.ti.check_file(cfg.absorbers.ti_from)
    for kind in ("temporal", "spatial"):  # a placement the family's model has not (e.g. a DiT's temporal convs)
        cfg.lora_config(kind, family)
    if cfg.motion.frame_diff_loss and family.objective.frame_difference_loss is None:
        raise CavError(f"--frame-diff-loss is not supported on {family.what} (its {family.objective.name} objective "
                       "has no frame-difference term; flow-matching bases such as Wan have it): drop "
                       "--frame-diff-loss")
    if family.targets.heads(cfg.motion.placement) and cfg.motion.experts == "both":  # heads are measured in one transformer
        raise CavError(f"--placement {cfg.motion.placement} measures heads in one transformer, not in both experts: pass "
                       "--experts high or low, or another --placement")
    if cfg.absorbers.mode == "video" and (cfg.absorbers.kind == "none" or cfg.absorbers.given):
        raise CavError("--absorber-mode video trains the absorbers on whole clips, but this run trains none ("
                       + ("they are given" if cfg.absorbers.given else "--absorbers none")
                       + "): drop --absorber-mode or train absorbers")
    if cfg.absorbers.s_lora_from and family.image_lora is None:
        raise CavError(f"--s-lora-from is not supported on {family.what} yet: drop it (stage 1 then trains the "
                       "S-LoRA on the clip)")


def local_tokenizer(base: str, family=None):
    """The base's tokenizer (its family's tokenizer class) from its folder or the Hugging Face cache, or None when
    neither has it."""
    import transformers

    source = backbone.resolve_base(base)
    if not Path(source).is_dir() and not backbone.hub_cached(source):
        return None
    family = family or backbone.family_of(base)
    try:
        return getattr(transformers, family.condition.parts[0].tokenizer_class).from_pretrained(
            source, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError):  # an incomplete folder: loading the base reports it
        return None
