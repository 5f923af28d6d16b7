"""Train the staged method once on a toy reference with checkpoints, then score every checkpoint as `cav demo` does.

    python scripts/demo_curve.py OUT_DIR '{"t_lora_lr": 5e-3, "steps": 600}' CHECKPOINT_EVERY [shape,colour,background,motion]

Prints one ``CURVE`` line: the overrides, the base motion error, and per checkpoint (ratio, appearance accuracy,
"own", the motion error on the reference's own prompt). Used for docs/DEMO-TUNING.md.
"""
import sys, json, torch, numpy as np
torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
from pathlib import Path
from cav import api, backbone
from cav.adapters import lora
from cav.config import TrainConfig, load_recipe
from cav.data import toyworld as tw
from cav.data.video import write_video
from cav.sampling import sample_videos
from cav.toy.demo import DEFAULT_REFERENCE, RECIPE, score_videos
out = Path(sys.argv[1]); ov = json.loads(sys.argv[2]); every = int(sys.argv[3])
ref = tw.ToySpec(*sys.argv[4].split(","), scale=0.3) if len(sys.argv) > 4 else DEFAULT_REFERENCE
out.mkdir(parents=True, exist_ok=True)
full, spatial = tw.caption(ref)
cfg = TrainConfig.from_dict({**load_recipe(RECIPE), **ov, "checkpoint_every": every, "prompt": full, "spatial_prompt": spatial})
rv, _ = tw.render(ref, frames=cfg.frames, size=cfg.size[0])
run = api.train(write_video(out / "reference.mp4", rv), cfg, out / "run", overwrite=True, quiet=True)
specs = tw.new_appearances(ref, 4, np.random.default_rng(cfg.seed))
texts = [tw.caption(s)[0] for s in specs]
kw = dict(frames=cfg.frames, size=tuple(cfg.size), steps=cfg.sample_steps, guidance=cfg.guidance, seeds=[cfg.validation_seed] * 4)
bb = backbone.load(cfg.base, cfg.device, cfg.dtype)
base = np.mean(score_videos(rv, sample_videos(bb, texts, **kw), specs)[0])
res = []
for ck in sorted((out / "run" / "checkpoints").glob("step-*")):
    name = "c" + ck.name.replace("-", "")
    lora.load_lora(bb.unet, lora.find_adapter_dir(ck, "temporal"), name)
    lora.activate(bb.unet, [name])
    vids = sample_videos(bb, texts, **kw)
    own = sample_videos(bb, [full], **{**kw, "seeds": [cfg.validation_seed]})[0]
    lora.activate(bb.unet, [])
    errors, follows = score_videos(rv, vids, specs)
    own_error = score_videos(rv, [own], [ref])[0][0]
    res.append((ck.name, round(float(np.mean(errors) / base), 3), float(np.mean(follows)), "own", round(own_error, 3)))
print("CURVE", json.dumps(ov), sys.argv[4] if len(sys.argv) > 4 else "", "base", round(float(base), 3), res, flush=True)
