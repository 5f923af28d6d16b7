"""Textual inversion as an appearance absorber: N new tokens whose embedding rows alone are trained.

Tokens follow diffusers' multi-vector convention (``<cav>``, ``<cav>_1``, …, ``<cav>_{N-1}``) and the file holds
``{"<cav>": tensor[N, dim]}``, so ``pipeline.load_textual_inversion(file)`` reads it and expands ``<cav>`` in prompts.
A base with two text encoders (SDXL) gets the tokens in both; its file holds ``{"clip_l": [N, 768], "clip_g":
[N, 1280]}`` (the layout SDXL embeddings are shared in) with the placeholder in the metadata.
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


class _Rows:
    """The new tokens' rows in one text encoder (its tokenizer gets the tokens)."""

    def __init__(self, key: str | None, tokenizer, text_encoder, tokens: list[str], init_word: str):
        self.key, self.tokenizer, self.text_encoder = key, tokenizer, text_encoder
        init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if not init_ids:
            raise CavError(f"--ti-init '{init_word}' gives no token: pass a plain word such as 'object'")
        tokenizer.add_tokens(tokens)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.ids = torch.tensor(tokenizer.convert_tokens_to_ids(tokens))
        weight = self.weight
        with torch.no_grad():
            weight[self.ids] = weight[init_ids[0]].clone()
        self.keep()
        self._mask = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        self._mask[self.ids] = False

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.text_encoder.get_input_embeddings().weight

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def keep(self) -> None:
        """Remember every row as it is now: ``restore`` puts the other tokens' rows back to this."""
        self._frozen_rows = self.weight.detach().clone()

    def set(self, rows: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight[self.ids] = rows.to(self.weight.device, self.weight.dtype)

    def mask_grad(self) -> None:
        if self.weight.grad is not None:
            self.weight.grad[self._mask] = 0

    def restore(self) -> None:
        with torch.no_grad():
            self.weight[self._mask] = self._frozen_rows[self._mask]

    def rows(self) -> torch.Tensor:
        return self.weight.detach()[self.ids].float().cpu().clone()


class TextualInversion:
    """N new tokens in every text encoder of a base (one for SD 1.5 / ModelScope; CLIP-L and OpenCLIP-G for SDXL).

    ``tokenizer``/``text_encoder`` is the first encoder; ``key`` names its rows in the file (None: the one-tensor
    layout ``{placeholder: rows}``) and ``more`` lists further (key, tokenizer, encoder) triples. A file of several
    encoders holds one tensor per key (``clip_l``, ``clip_g``: the layout SDXL embeddings are shared in) and the
    placeholder in its metadata (``token``)."""

    def __init__(self, tokenizer, text_encoder, placeholder: str = "<cav>", n_tokens: int = 4,
                 init_word: str = "object", *, key: str | None = None, more=()):
        self.tokenizer, self.text_encoder, self.placeholder = tokenizer, text_encoder, placeholder
        self.tokens = token_names(placeholder, n_tokens)
        encoders = [(key, tokenizer, text_encoder), *more]
        for _, tok, _ in encoders:  # all checked before any tokenizer changes
            clash = [t for t in self.tokens if t in tok.get_vocab()]
            if clash:
                raise CavError(f"token {clash[0]} is already in the tokenizer: pick another --ti-token")
        self.parts = [_Rows(k, tok, enc, self.tokens, init_word) for k, tok, enc in encoders]
        self.ids = self.parts[0].ids

    @classmethod
    def into(cls, parts, placeholder: str = "<cav>", n_tokens: int = 4,
             init_word: str = "object") -> "TextualInversion":
        """New tokens in each of ``parts``: (file key, tokenizer, text encoder) triples (``Backbone.text_parts``)."""
        (key, tok, enc), *more = parts
        return cls(tok, enc, placeholder, n_tokens, init_word, key=key, more=more)

    @property
    def weight(self) -> torch.nn.Parameter:
        """The first text encoder's embedding matrix."""
        return self.parts[0].weight

    def expand(self, prompt: str) -> str:
        """Put the N tokens into a prompt: replace the placeholder, or prefix them when it is absent."""
        return expand(prompt, self.tokens)

    def trainable(self) -> list[torch.nn.Parameter]:
        for part in self.parts:
            part.weight.requires_grad_(True)
        return [part.weight for part in self.parts]

    def freeze(self) -> None:
        for part in self.parts:
            part.weight.requires_grad_(False)

    def mask_grad(self) -> None:
        """Zero the gradient of every row but the new tokens' (call between backward and step)."""
        for part in self.parts:
            part.mask_grad()

    def restore_rows(self) -> None:
        """Put back every other row bit for bit (call after each optimizer step)."""
        for part in self.parts:
            part.restore()

    def embeddings(self) -> torch.Tensor:
        """The first text encoder's new rows (N, dim)."""
        return self.parts[0].rows()

    def state(self) -> dict[str, torch.Tensor]:
        """What the file holds: ``{placeholder: rows}`` for one encoder, ``{key: rows}`` per encoder for several."""
        return {(part.key or self.placeholder): part.rows() for part in self.parts}

    def load_rows(self, path: Path) -> None:
        """Put saved embeddings (``save``'s file) back into the new tokens' rows."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        for part in self.parts:
            part.set(tensors[part.key or self.placeholder])

    def save(self, path: Path) -> Path:
        keyed = self.parts[0].key is not None
        return save_safetensors(path, self.state(), metadata={"token": self.placeholder} if keyed else None)

    @classmethod
    def from_file(cls, parts, path: Path, placeholder: str | None = "<cav>") -> "TextualInversion":
        """New tokens holding an existing embedding: diffusers ``{token: [N, dim]}`` or A1111 ``emb_params`` for one
        text encoder, ``{clip_l: ..., clip_g: ...}`` (SDXL) for two. ``placeholder`` None: the file's own token."""
        keys = [key for key, _, _ in parts]
        rows = read_embeddings(path, keys)
        for (key, _, enc), r in zip(parts, rows):
            dim = enc.get_input_embeddings().weight.shape[1]
            if r.shape[1] != dim:
                where = f"'{key}' " if key else ""
                raise CavError(f"embedding '{path}' has {r.shape[1]}-dim {where}vectors, but this base's text encoder "
                               f"has {dim}: pass an embedding made for this base's text encoder")
        if len({r.shape[0] for r in rows}) != 1:
            raise CavError(f"embedding '{path}' has a different number of vectors per text encoder "
                           f"({', '.join(str(r.shape[0]) for r in rows)}): pass a consistent SDXL embedding")
        ti = cls.into(parts, placeholder or token_of(path), rows[0].shape[0])
        for part, r in zip(ti.parts, rows):
            part.set(r)
            part.keep()
        return ti


def read_embeddings(path: Path, keys: list[str | None]) -> list[torch.Tensor]:
    """The (N, dim) vectors for each key of a textual-inversion file (``[None]``: its one tensor, any name)."""
    if keys == [None]:
        return [read_embedding(path)]
    tensors = _read(path)
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CavError(f"'{path}' has no {'/'.join(missing)} tensor ({', '.join(sorted(tensors)[:3])}): this base has "
                       f"{len(keys)} text encoders; pass an embedding with the keys {', '.join(keys)} (SDXL style)")
    return [(tensors[k][None] if tensors[k].ndim == 1 else tensors[k]).float() for k in keys]


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CavError(f"textual inversion file '{path}' does not exist: pass a .safetensors embedding")
    if path.suffix != ".safetensors":
        raise CavError(f"textual inversion '{path}' is not a .safetensors file: convert it (pickle files are not loaded)")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CavError(f"could not read textual inversion '{path}' ({type(exc).__name__}): is it safetensors?") from None


def read_embedding(path: Path) -> torch.Tensor:
    """The (N, dim) vectors of a one-tensor safetensors textual-inversion file."""
    tensors = _read(path)
    if len(tensors) != 1:
        raise CavError(f"'{path}' holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:3])}), not one embedding: "
                       "pass a single-text-encoder embedding (SD 1.5 style)")
    rows = next(iter(tensors.values())).float()
    return rows[None] if rows.ndim == 1 else rows


def token_of(path: Path) -> str:
    """The placeholder a several-encoder file was saved with (its ``token`` metadata), else ``<file stem>``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    return meta.get("token") or f"<{Path(path).stem}>"


def placeholder_of(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    if len(keys) != 1:
        raise CavError(f"'{path}' is not a textual-inversion file (expected one key, found {len(keys)})")
    return keys[0]
