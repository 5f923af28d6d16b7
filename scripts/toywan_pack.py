"""Copy a toy Wan run folder (`cav toy train-base --family wan --out RUN`) into the repository's model folder.

    python scripts/toywan_pack.py RUN [DEST]      (DEST: src/cav/toy/wan_model)

Copies the ``WanPipeline`` folder (model_index.json and its five parts), ``training_stats.json`` and the resume state
``.train_state/``; DEST's README.md (the model card) is kept. Once phase 2 has started, the VAE phase's AdamW moments
are dropped (that optimizer is never stepped again; its weights, step and generator state are kept, and the loader
starts an empty optimizer), which keeps the state near 25 MB. Prints the sizes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

PARTS = ("model_index.json", "training_stats.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae")


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def pack(run: Path, dest: Path) -> dict:
    if not (run / "model_index.json").is_file():
        raise SystemExit(f"{run} holds no WanPipeline folder (model_index.json): pass the --out of a toy Wan run")
    for name in PARTS + (".train_state",):
        target = dest / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for name in PARTS:
        source = run / name
        if source.is_dir():
            shutil.copytree(source, dest / name)
        elif source.exists():
            shutil.copy2(source, dest / name)
    shutil.copytree(run / ".train_state", dest / ".train_state")
    vae_state = dest / ".train_state" / "vae" / "state.safetensors"
    if (dest / ".train_state" / "transformer" / "state.json").is_file() and vae_state.is_file():
        save_file({k: v for k, v in load_file(str(vae_state)).items() if not k.startswith("optim.")}, str(vae_state))
    model = sum(size(dest / n) for n in PARTS if (dest / n).exists())
    return {"model_bytes": model, "train_state_bytes": size(dest / ".train_state")}


if __name__ == "__main__":
    print(json.dumps(pack(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "src/cav/toy/wan_model"))))
