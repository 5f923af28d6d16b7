"""Text alignment: CLIPScore x 100 between a prompt and the frames of a video.

``score`` = mean over frames of ``100 * cos(image embedding, text embedding)``, in [-100, 100]. Unlike the original
CLIPScore (``max(cos, 0)``, rescaled by 2.5) nothing is clamped or rescaled: the number is the plain cosine x 100,
as the Customize-A-Video paper reports it (typically 20-35 for real CLIP ViT-L/14 models).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cav.errors import CavError
from cav.prompts import check_prompts

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
_BATCH = 16  # frames per forward pass


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object (projected embedding in ``pooler_output``); older ones a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """A CLIP model + tokenizer + image processor from a local folder or a Hugging Face hub id.

    With ``local_only`` a hub id is looked up in the Hugging Face cache only (nothing is downloaded).
    """

    def __init__(self, path_or_id: str, device: str = "cpu", local_only: bool = False):
        import transformers
        from transformers import CLIPModel, CLIPTokenizer

        # the default CLIPImageProcessor needs torchvision; the Pillow one gives the same pixels
        processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
        local = Path(path_or_id).expanduser()
        source = str(local) if local.exists() else str(path_or_id)
        try:
            kw = {"local_files_only": True} if local_only or local.exists() else {}
            self.model = CLIPModel.from_pretrained(source, **kw).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(source, **kw)
            self.processor = processor.from_pretrained(source, **kw)
        except (OSError, ValueError) as e:  # missing files, bad repo id, no network
            where = "" if local.exists() else " (not a local folder, nor in the Hugging Face cache)"
            msg = f"CLIP weights not found at '{path_or_id}'{where}: pass --clip PATH to a local CLIP folder (how to get one: docs/METRICS.md#clip)"
            raise CavError(msg) from e
        self.device = torch.device(device)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.tokenizer.model_max_length = min(self.tokenizer.model_max_length, self.max_length)
        self.reported: set[str] = set()  # prompts already warned about (cut to the text tower's length)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """(D,) unit-norm text embedding."""
        check_prompts(self.tokenizer, [prompt], "the CLIP prompt", reported=self.reported)  # a cut prompt is scored
        tok = self.tokenizer([prompt], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        emb = _features(self.model.get_text_features(**tok.to(self.device)))[0]
        return emb / emb.norm()

    @torch.no_grad()
    def image_embeddings(self, video: np.ndarray) -> torch.Tensor:
        """(F, D) unit-norm embeddings of the frames of a uint8 (F, H, W, 3) video."""
        v = np.asarray(video)
        if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8 or len(v) == 0:
            raise CavError(f"video has shape {v.shape}, dtype {v.dtype}: pass a uint8 (frames, height, width, 3) array")
        out = []
        for s in range(0, len(v), _BATCH):
            pixels = self.processor(images=list(v[s : s + _BATCH]), return_tensors="pt")["pixel_values"]
            out.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    def frame_scores(self, video: np.ndarray, prompt: str) -> np.ndarray:
        """(F,) 100 x cosine per frame."""
        return (100.0 * self.image_embeddings(video) @ self.text_embedding(prompt)).double().cpu().numpy()

    def score(self, video: np.ndarray, prompt: str) -> float:
        """Mean over frames of 100 x cos(image, text), in [-100, 100]."""
        return float(self.frame_scores(video, prompt).mean())
