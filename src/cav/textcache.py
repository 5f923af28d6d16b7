"""The text encoder runs once per prompt, at the start of a run, and then leaves it (issue 23, "Memory").

A condition whose class says ``encode_once`` (Wan's umT5: 10.58 GiB in bf16 on the 14B bases, more than a block-swapped
14B transformer keeps on the device) has every text a training run needs encoded once, before any step: the training
prompt(s), the spatial prompt(s) of the absorbers, the validation prompts, the negative prompt, and ``""`` (guidance's
unconditional branch, prompt dropout, inversion). ``Run.train`` encodes them right after the load (``run_texts``) and
then releases the encoder (``TextCache.release``: the ``Backbone`` drops it, so its memory goes back, on the device
and on the host). From then on every encoding of the run reads the cache:

- training (``Backbone.encode_prompt``, the unconditional condition, the prompt vectors' base encodings) gets the
  family's own condition of each text (``condition.encode`` of that one text, as before);
- sampling (validation samples, inversion: ``Backbone.pipeline_condition``) gets the pair ``WanPipeline.encode_prompt``
  builds, which for one text is the same tensor: the encoder's last hidden states of the real tokens in the compute
  dtype, zeros after them (the pipeline cuts and pads, ``UmT5Condition.encode`` masks: the same values, bit for bit;
  ``tests/test_wan_text_cache.py`` checks it against the pipeline itself). The pipeline then gets ``prompt_embeds``
  and ``negative_prompt_embeds`` instead of texts, which is how ``cav generate`` with prompt vectors already calls it.

A text the run did not encode at its start is a bug of ``run_texts``, reported as such rather than encoded by a
released encoder. `cav generate` is a process of its own: it loads the encoder and keeps the pipeline's encoding.
"""

from __future__ import annotations

import torch

from .errors import CavError


class TextCache:
    """One encoding of each text, by ``bb``'s condition, kept on the compute device in the compute dtype."""

    def __init__(self, bb):
        self.bb, self.rows, self.passes, self.released = bb, {}, 0, False

    def encode(self, texts: list[str]) -> None:
        """Encode each text not encoded yet, one text per encoder pass (the batch of one a sample encodes)."""
        for text in dict.fromkeys(texts):
            if text not in self.rows:
                if self.released:
                    raise CavError(f"internal error: the text {text!r} was not encoded at the start of the run and the "
                                   "text encoder is released: please report this (cav.textcache.run_texts)")
                with torch.no_grad():
                    self.rows[text] = self.bb.condition.encode(self.bb, [text])
                self.passes += 1

    def get(self, text: str) -> torch.Tensor:
        """(1, L, D) condition of ``text`` (encoded now if the encoder is still there)."""
        self.encode([text])
        return self.rows[text]

    def stack(self, texts: list[str]) -> torch.Tensor:
        return torch.cat([self.get(t) for t in texts])

    def pipeline(self, prompts: list[str], device, guidance: bool, negatives: list[str] | None) -> tuple:
        """(condition, unconditional or None) as ``WanPipeline.encode_prompt`` gives them for ``prompts`` (one video
        per prompt): the negatives' (the empty prompt's without them) under guidance."""
        cond = self.stack(list(prompts)).to(device)
        if not guidance:
            return cond, None
        return cond, self.stack(list(negatives) if negatives is not None else [""] * len(prompts)).to(device)

    def release(self) -> None:
        """Drop the text encoder(s) from the backbone: every text of the run is in the cache."""
        for part in self.bb.condition.parts:
            setattr(self.bb, part.encoder, None)
        self.released = True

    def record(self) -> dict:
        """What the run did with its text encoder (``summary.json``'s ``text_encoder``), read from the backbone."""
        present = [getattr(self.bb, p.encoder) for p in self.bb.condition.parts]
        return {"texts": len(self.rows), "encoder_passes": self.passes,
                "released": all(m is None for m in present),
                "devices_at_end": sorted({str(next(m.parameters()).device) for m in present if m is not None})}


def run_texts(cfg, clips: int) -> list[str]:
    """Every text a training run of ``cfg`` on ``clips`` clips encodes: the T-LoRA's prompt (a Wan prompt holds no
    placeholder: prompt vectors follow its tokens), each clip's spatial prompt when the absorbers train, ``""``
    (guidance's unconditional branch, ``--prompt-dropout``, inversion of a validation start), the validation prompts
    and the validation negative prompt."""
    from .runfolder import validation_prompts

    texts = [cfg.prompt]
    if not cfg.absorbers.given and cfg.absorbers.kind != "none":
        texts += [cfg.spatial_prompt_of(k) for k in range(clips)]
    texts += [""] + list(validation_prompts(cfg))
    negative = cfg.validation.sample_config().negative_prompt
    if negative is not None:
        texts.append(negative)
    return list(dict.fromkeys(texts))


__all__ = ["TextCache", "run_texts"]
