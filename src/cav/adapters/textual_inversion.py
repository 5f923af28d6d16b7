"""Textual inversion as an appearance absorber: N new tokens whose embedding rows alone are trained.

Tokens follow diffusers' multi-vector convention (``<cav>``, ``<cav>_1``, …, ``<cav>_{N-1}``) and the file holds
``{"<cav>": tensor[N, dim]}``, so ``pipeline.load_textual_inversion(file)`` reads it and expands ``<cav>`` in prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CavError
from ..io_utils import save_safetensors


def token_names(placeholder: str, n_tokens: int) -> list[str]:
    """The N token strings of a placeholder (diffusers' multi-vector convention)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, n_tokens)]


def expand(prompt: str, tokens: list[str]) -> str:
    """Replace the placeholder (``tokens[0]``) by all N tokens, or prefix them when the prompt lacks it."""
    joined = " ".join(tokens)
    return prompt.replace(tokens[0], joined) if tokens[0] in prompt else f"{joined} {prompt}"


class TextualInversion:
    def __init__(self, tokenizer, text_encoder, placeholder: str = "<cav>", n_tokens: int = 4, init_word: str = "object"):
        self.tokenizer, self.text_encoder, self.placeholder = tokenizer, text_encoder, placeholder
        self.tokens = token_names(placeholder, n_tokens)
        clash = [t for t in self.tokens if t in tokenizer.get_vocab()]
        if clash:
            raise CavError(f"token {clash[0]} is already in the tokenizer: pick another --ti-token")
        init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if not init_ids:
            raise CavError(f"--ti-init '{init_word}' gives no token: pass a plain word such as 'object'")
        tokenizer.add_tokens(self.tokens)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.ids = torch.tensor(tokenizer.convert_tokens_to_ids(self.tokens))
        weight = self.weight
        with torch.no_grad():
            weight[self.ids] = weight[init_ids[0]].clone()
        self._frozen_rows = weight.detach().clone()
        self._mask = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        self._mask[self.ids] = False

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.text_encoder.get_input_embeddings().weight

    def expand(self, prompt: str) -> str:
        """Put the N tokens into a prompt: replace the placeholder, or prefix them when it is absent."""
        return expand(prompt, self.tokens)

    def trainable(self) -> list[torch.nn.Parameter]:
        self.weight.requires_grad_(True)
        return [self.weight]

    def freeze(self) -> None:
        self.weight.requires_grad_(False)

    def mask_grad(self) -> None:
        """Zero the gradient of every row but the new tokens' (call between backward and step)."""
        if self.weight.grad is not None:
            self.weight.grad[self._mask] = 0

    def restore_rows(self) -> None:
        """Put back every other row bit for bit (call after each optimizer step)."""
        with torch.no_grad():
            self.weight[self._mask] = self._frozen_rows[self._mask]

    def embeddings(self) -> torch.Tensor:
        return self.weight.detach()[self.ids].float().cpu().clone()

    def load_rows(self, path: Path) -> None:
        """Put saved embeddings (``save``'s file) back into the new tokens' rows."""
        from safetensors.torch import load_file

        rows = load_file(str(path))[self.placeholder]
        with torch.no_grad():
            self.weight[self.ids] = rows.to(self.weight.device, self.weight.dtype)

    def save(self, path: Path) -> Path:
        return save_safetensors(path, {self.placeholder: self.embeddings()})

    @classmethod
    def from_file(cls, tokenizer, text_encoder, path: Path, placeholder: str = "<cav>") -> "TextualInversion":
        """New tokens holding an existing embedding (diffusers ``{token: [N, dim]}`` or A1111 ``emb_params``)."""
        rows = read_embedding(path)
        dim = text_encoder.get_input_embeddings().weight.shape[1]
        if rows.shape[1] != dim:
            raise CavError(f"embedding '{path}' has {rows.shape[1]}-dim vectors, but this base's text encoder has "
                           f"{dim}: pass an embedding made for this base's text encoder")
        ti = cls(tokenizer, text_encoder, placeholder, rows.shape[0])
        with torch.no_grad():
            ti.weight[ti.ids] = rows.to(ti.weight.device, ti.weight.dtype)
        ti._frozen_rows = ti.weight.detach().clone()
        return ti


def read_embedding(path: Path) -> torch.Tensor:
    """The (N, dim) vectors of a one-tensor safetensors textual-inversion file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CavError(f"textual inversion file '{path}' does not exist: pass a .safetensors embedding")
    if path.suffix != ".safetensors":
        raise CavError(f"textual inversion '{path}' is not a .safetensors file: convert it (pickle files are not loaded)")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CavError(f"could not read textual inversion '{path}' ({type(exc).__name__}): is it safetensors?") from None
    if len(tensors) != 1:
        raise CavError(f"'{path}' holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:3])}), not one embedding: "
                       "pass a single-text-encoder embedding (SD 1.5 style)")
    rows = next(iter(tensors.values())).float()
    return rows[None] if rows.ndim == 1 else rows


def placeholder_of(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    if len(keys) != 1:
        raise CavError(f"'{path}' is not a textual-inversion file (expected one key, found {len(keys)})")
    return keys[0]
