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

    FILE = "textual_inversion.safetensors"  # its name in a run's absorbers/ folder

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

    def encode(self, bb, prompt: str, grad: bool = False) -> torch.Tensor:
        """The condition of an expanded ``prompt``: the text encoders read the new tokens' rows themselves."""
        return bb.encode_prompt(prompt, grad)

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
        tensors = load_file(str(path))
    except Exception as exc:
        raise CavError(f"could not read textual inversion '{path}' ({type(exc).__name__}): is it safetensors?") from None
    refuse_other_kind(path)
    return tensors


def refuse_other_kind(path: Path) -> None:
    """Token-row files carry no ``kind``; a file that names one (Wan's prompt vectors: ``wan_prompt_vectors``) holds
    vectors for another text condition, which could even have the same width: refused by name."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            kind = (fh.metadata() or {}).get("kind")
    except Exception:  # an unreadable file: its loader reports it
        return
    if kind:
        raise CavError(f"'{path}' holds {kind} (learned vectors of another family's text condition), not "
                       "textual-inversion token rows: use it with the base family it was trained on")


class TokenRows:
    """The textual-inversion absorber of conditions with token rows (CLIP, SDXL): new tokens in the text encoders'
    embeddings (``TextualInversion``). A condition's ``ti`` is what stages, runs and `cav generate` ask for the
    absorber, so no code outside the condition knows which kind a base has."""

    name = "textual_inversion"

    def new(self, bb, cfg, index: int = 0) -> TextualInversion:
        """Clip ``index``'s tokens (the first clip: ``--ti-from``'s embedding when given)."""
        if index == 0 and cfg.absorbers.ti_from:
            return TextualInversion.from_file(bb.text_parts(), Path(cfg.absorbers.ti_from), cfg.absorbers.ti_token)
        token = cfg.absorbers.ti_token if index == 0 else cfg.absorbers.clip_token(index)
        return TextualInversion.into(bb.text_parts(), token, cfg.absorbers.ti_tokens, cfg.absorbers.ti_init)

    def check_file(self, path: str) -> None:
        """Before the run folder: a ``--ti-from`` file of another kind (Wan's prompt vectors) is refused by name; the
        rest of the file is read when the tokens are made."""
        if Path(path).is_file() and Path(path).suffix == ".safetensors":
            refuse_other_kind(Path(path))

    def apply_files(self, bb, files: list[str]) -> None:
        """`cav generate --textual-inversion FILE…`: the tokens of each file into the base's text encoders."""
        for file in files:
            if not Path(file).is_file():
                raise CavError(f"textual inversion file '{file}' does not exist: pass a .safetensors file from "
                               "absorbers/")
            try:
                if len(bb.text_encoders) > 1:  # one tensor per encoder (clip_l, clip_g): diffusers loads one at a time
                    TextualInversion.from_file(bb.text_parts(), Path(file), placeholder=None)
                else:
                    if Path(file).suffix == ".safetensors":
                        refuse_other_kind(Path(file))
                    bb.pipeline().load_textual_inversion(str(file))
            except ValueError as exc:
                raise CavError(f"could not load textual inversion '{file}': {str(exc).splitlines()[0][:160]}") from None

    def plan_row(self, cfg, unet_config: dict, family, index: int | None = None) -> dict:
        """The dry run's row: ``--ti-tokens`` rows over all of the family's text encoders (``index``: clip K of
        several, named by its token)."""
        return {"name": self.name + (f" {cfg.absorbers.clip_token(index)}" if index is not None else ""),
                "trainable_params": cfg.absorbers.ti_tokens * _text_hidden_size(cfg.base, unet_config, family), "modules": 1}


def _text_hidden_size(base: str, unet_config: dict, family) -> int:
    """Width of one TI token over all of the family's text encoders (SDXL: CLIP-L's 768 + OpenCLIP-G's 1280)."""
    import json

    from ..backbone import resolve_base

    resolved = resolve_base(base)
    paths = [Path(resolved) / part.encoder / "config.json" for part in family.condition.parts]
    if all(p.is_file() for p in paths):
        return sum(int(json.loads(p.read_text())["hidden_size"]) for p in paths)
    return int(unet_config["cross_attention_dim"])  # the UNet attends to the text encoders' hidden states


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
