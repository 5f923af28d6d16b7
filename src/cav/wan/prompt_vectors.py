"""Textual inversion's analogue for Wan: a few learned vectors in the umT5 encoder's *output*.

Classic textual inversion learns new token embeddings at the encoder's input and backpropagates through the whole
text encoder; umT5-XXL has 5.7 B parameters, so that costs more than the LoRAs it accompanies. Wan's transformer
cross-attends to the encoder's output sequence, zero-padded to 512 tokens and without an attention mask, so extra
context tokens can be written straight into the padding after a prompt's real tokens: the prompt is encoded once
(then the encoder can be freed), and only ``count`` vectors of ``text_dim`` train. The result is passed to a stock
``WanPipeline`` as ``prompt_embeds``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CavError
from ..io_utils import save_safetensors

KIND = "wan_prompt_vectors"


def prompt_lengths(tokenizer, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """Real tokens per prompt (``</s>`` included), as ``WanPipeline`` counts them before zero-padding."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    mask = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_sequence_length,
                     truncation=True, add_special_tokens=True, return_tensors="pt").attention_mask
    return mask.sum(dim=1)


class PromptVectors(torch.nn.Module):
    """``count`` learned context vectors, written after each prompt's real tokens."""

    def __init__(self, count: int, text_dim: int, init_scale: float = 0.1, generator: torch.Generator | None = None):
        super().__init__()
        if count < 1:
            raise CavError(f"prompt vectors: count must be ≥ 1, got {count}: pass --ti-tokens 1 or more")
        self.vectors = torch.nn.Parameter(torch.randn(count, text_dim, generator=generator) * init_scale)

    def forward(self, prompt_embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``prompt_embeds`` (B, L, D) as the pipeline encodes them → the same with the vectors in slots
        ``length … length + count − 1`` of each row (the real tokens are untouched)."""
        count, dim = self.vectors.shape
        if prompt_embeds.shape[-1] != dim:
            raise CavError(f"prompt vectors have width {dim} but this base's text encoder gives "
                           f"{prompt_embeds.shape[-1]}: use vectors trained on this base (or drop --ti-from)")
        if int(lengths.max()) + count > prompt_embeds.shape[1]:
            raise CavError(f"prompt of {int(lengths.max())} tokens + {count} learned vectors exceeds the "
                           f"{prompt_embeds.shape[1]}-token context: shorten the prompt")
        slots = lengths[:, None] + torch.arange(count, device=lengths.device)[None]  # (B, count)
        rows = torch.arange(prompt_embeds.shape[0], device=lengths.device)[:, None].expand_as(slots)
        out = prompt_embeds.clone()
        out[rows, slots] = self.vectors.to(out.dtype).unsqueeze(0).expand(len(lengths), -1, -1)
        return out

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        count, dim = self.vectors.shape
        info = {"kind": KIND, "count": str(count), "text_dim": str(dim), **{k: str(v) for k, v in (meta or {}).items()}}
        return save_safetensors(path, {"vectors": self.vectors.detach().float()}, metadata=info)

    @classmethod
    def load(cls, path: str | Path) -> "PromptVectors":
        from safetensors import safe_open

        path = check_file(path)
        with safe_open(str(path), framework="pt") as fh:
            vectors = fh.get_tensor("vectors")
        module = cls(vectors.shape[0], vectors.shape[1])
        with torch.no_grad():
            module.vectors.copy_(vectors)
        return module


def check_file(path: str | Path) -> Path:
    """``path`` if it is a prompt-vectors file (its header's ``kind``); else one line naming what to pass instead."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CavError(f"prompt vectors '{path}' do not exist: pass the .safetensors file a Wan run saved")
    try:
        with safe_open(str(path), framework="pt") as fh:
            ok = (fh.metadata() or {}).get("kind") == KIND and "vectors" in fh.keys()
    except Exception:
        ok = False
    if not ok:
        raise CavError(f"'{path}' is not a cav Wan prompt-vectors file (a textual-inversion embedding has token rows "
                       f"for a CLIP text encoder): pass the {VectorAbsorber.FILE} a Wan run saved")
    return path


class VectorAbsorber:
    """One clip's prompt vectors as stage 1 trains them and stage 2 holds them frozen: the same face a
    ``TextualInversion`` shows the stages (``expand``, ``encode``, ``trainable``, ``save``, ``load_rows`` …). The
    prompt is encoded once by the frozen umT5 (cached per prompt) and the vectors are written into its padding."""

    FILE = "prompt_vectors.safetensors"  # its name in a run's absorbers/ folder

    def __init__(self, vectors: PromptVectors):
        self.module, self._encoded = vectors, {}

    def expand(self, prompt: str) -> str:
        return prompt  # nothing goes into the text: the vectors follow the prompt's real tokens

    def encode(self, bb, prompt: str, grad: bool = False) -> torch.Tensor:
        """(1, 512, D) condition of ``prompt`` with the vectors after its real tokens."""
        if prompt not in self._encoded:
            lengths = prompt_lengths(bb.tokenizer, [prompt], bb.condition.LENGTH)
            self._encoded[prompt] = (bb.encode_prompt(prompt), lengths.to(bb.device))
        base, lengths = self._encoded[prompt]
        self.module.to(base.device)
        with torch.set_grad_enabled(grad):
            return self.module(base, lengths)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [self.module.vectors.requires_grad_(True)]

    def freeze(self) -> None:
        self.module.vectors.requires_grad_(False)

    def mask_grad(self) -> None:
        """Nothing to mask: every entry of the vectors trains (token rows share a matrix with frozen rows)."""

    def restore_rows(self) -> None:
        """Nothing to restore (see ``mask_grad``)."""

    def save(self, path: Path) -> Path:
        return self.module.save(path)

    def load_rows(self, path: Path) -> None:
        with torch.no_grad():
            self.module.vectors.copy_(PromptVectors.load(path).vectors)


class OutputVectors:
    """The textual-inversion absorber of Wan's umT5 condition (``conditioning.UmT5Condition.ti``): prompt vectors."""

    name = "prompt_vectors"

    def new(self, bb, cfg, index: int = 0) -> VectorAbsorber:
        """Clip ``index``'s ``--ti-tokens`` vectors, drawn from their own generator (seed + index: the run's other
        random draws stay where they are), or the first clip's from ``--ti-from``'s file."""
        if index == 0 and cfg.absorbers.ti_from:
            vectors = _checked(PromptVectors.load(cfg.absorbers.ti_from), bb, cfg.absorbers.ti_from)
        else:
            gen = torch.Generator("cpu").manual_seed(int(cfg.seed) + index)
            vectors = PromptVectors(cfg.absorbers.ti_tokens, _width(bb), generator=gen)
        return VectorAbsorber(vectors.to(bb.device))

    def check_file(self, path: str) -> None:
        """Before the run folder: ``--ti-from`` must be a prompt-vectors file."""
        check_file(path)

    def apply_files(self, bb, files: list[str]) -> None:
        """`cav generate --textual-inversion FILE`: the vectors follow every prompt the sampler encodes."""
        if len(files) > 1:
            raise CavError(f"{len(files)} --textual-inversion files given, but a Wan prompt holds one set of prompt "
                           "vectors: pass one")
        vectors = _checked(PromptVectors.load(files[0]), bb, files[0]).to(bb.device)
        LENGTH = bb.condition.LENGTH

        def edit(cond: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            lengths = prompt_lengths(bb.tokenizer, prompts, LENGTH).to(cond.device)
            with torch.no_grad():
                return vectors(cond, lengths)
        bb.condition_edits.append(edit)

    def plan_row(self, cfg, unet_config: dict, family, index: int | None = None) -> dict:
        """The dry run's row (``prompt_vector_params``, umT5's width from the transformer's ``text_dim``)."""
        width = int(unet_config["text_dim"])
        return {"name": self.name + (f" clip-{index}" if index is not None else ""),
                "trainable_params": prompt_vector_params(cfg.absorbers.ti_tokens, width), "modules": 1,
                "vectors": cfg.absorbers.ti_tokens, "width": width}


def prompt_vector_params(count: int, text_dim: int) -> int:
    """Trainable parameters of ``count`` prompt vectors of width ``text_dim`` (counted on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in PromptVectors(count, text_dim).parameters())


def _width(bb) -> int:
    """umT5's width: its config's, or once a training run released it (``cav.textcache``) the transformer's
    ``text_dim`` (the width its condition embedder reads, so the same number)."""
    if bb.text_encoder is None:
        return int(bb.unet.config.text_dim)
    return int(bb.text_encoder.config.d_model)


def _checked(vectors: PromptVectors, bb, path) -> PromptVectors:
    if vectors.vectors.shape[1] != _width(bb):
        raise CavError(f"prompt vectors '{path}' have width {vectors.vectors.shape[1]} but this base's umT5 gives "
                       f"{_width(bb)}: use vectors trained on this base")
    return vectors


__all__ = ["KIND", "check_file", "prompt_lengths", "PromptVectors", "VectorAbsorber", "OutputVectors"]
