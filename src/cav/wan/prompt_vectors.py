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

        path = Path(path)
        if not path.is_file():
            raise CavError(f"prompt vectors '{path}' do not exist: pass the .safetensors file a Wan run saved")
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("kind") != KIND or "vectors" not in fh.keys():
                raise CavError(f"'{path}' is not a cav Wan prompt-vectors file: pass the one a Wan run saved")
            vectors = fh.get_tensor("vectors")
        module = cls(vectors.shape[0], vectors.shape[1])
        with torch.no_grad():
            module.vectors.copy_(vectors)
        return module


__all__ = ["KIND", "prompt_lengths", "PromptVectors"]
