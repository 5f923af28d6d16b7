"""Train once with checkpoints; score each checkpoint at several T-LoRA weights on N new appearances (as `cav demo`).

    OMP_NUM_THREADS=1 SPEC_SEED=0 PROMPTS=8 python scripts/demo_sweep.py OUT '{"t_lora_batch": 4, "seed": 1}' 150 0.75,1.0

Env: PROMPTS (new-appearance prompts, default 8), SPEC_SEED (seed that draws them; default the recipe's seed),
REF (shape,colour,background,motion; default the demo's reference), OWN (K > 0: also score the reference's own prompt
with K sampling seeds, "own"), RECIPE (shipped recipe the overrides apply to; default toy). Skips training when OUT/run/checkpoints exists. Prints a BASE line, then one PT line per
(checkpoint, weight): ratio, appearance accuracy and frame leakage over all prompts, ratio and appearance over the first
4 (the demo's), and the own motion error and ratio when OWN is set; a TRAIN line gives the training seconds. Used for every table of docs/DEMO-TUNING.md (session 3: PROMPTS=4 OWN=1,
weight 1).
"""
import sys, json, os, time, torch, numpy as np
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
from pathlib import Path
from cav import api, backbone
from cav.adapters import lora
from cav.config import TrainConfig, load_recipe
from cav.metrics import toy as tm
from cav.data import toyworld as tw
from cav.data.video import write_video
from cav.sampling import sample_videos
from cav.toy.demo import DEFAULT_REFERENCE, score_videos
RECIPE = os.environ.get("RECIPE", "toy")
out = Path(sys.argv[1]); ov = json.loads(sys.argv[2]); every = int(sys.argv[3])
weights = [float(w) for w in sys.argv[4].split(",")]
n = int(os.environ.get("PROMPTS", "8"))
ref = tw.ToySpec(*os.environ["REF"].split(","), scale=0.3) if "REF" in os.environ else DEFAULT_REFERENCE
out.mkdir(parents=True, exist_ok=True)
full, spatial = tw.caption(ref)
cfg = TrainConfig.from_dict({**load_recipe(RECIPE), **ov, "checkpoint_every": every, "prompt": full, "spatial_prompt": spatial})
rv, _ = tw.render(ref, frames=cfg.data.frames, size=cfg.data.size[0])
if not (out / "run" / "checkpoints").exists():
    t0 = time.time()
    api.train(write_video(out / "reference.mp4", rv), cfg, out / "run", overwrite=True, quiet=True)
    print("TRAIN", json.dumps(ov), "seconds", round(time.time() - t0, 1), flush=True)
specs = tw.new_appearances(ref, n, np.random.default_rng(int(os.environ.get("SPEC_SEED", cfg.seed))))
texts = [tw.caption(s)[0] for s in specs]
kw = dict(frames=cfg.data.frames, size=tuple(cfg.data.size), steps=cfg.validation.steps, guidance=cfg.validation.guidance, seeds=[cfg.validation.seed] * n)
bb = backbone.load(cfg.base, cfg.system.device, cfg.system.dtype)
be = score_videos(rv, sample_videos(bb, texts, **kw), specs)[0]
base = np.mean(be); base4 = np.mean(be[:4])
k_own = int(os.environ.get("OWN", "0"))
own_kw = {**kw, "seeds": [cfg.validation.seed + i for i in range(k_own)]}


def own_error() -> float:  # motion error on the reference's own prompt, mean over k_own sampling seeds
    return float(np.mean(score_videos(rv, sample_videos(bb, [full] * k_own, **own_kw), [ref] * k_own)[0]))


own_base = own_error() if k_own else None
print("BASE", json.dumps(ov), round(float(base), 3), "first4", round(float(base4), 3),
      *(["own", round(own_base, 3)] if k_own else []), flush=True)
for ck in sorted((out / "run" / "checkpoints").glob("step-*")):
    name = "c" + ck.name.replace("-", "")
    lora.load_lora(bb.unet, lora.find_adapter_dir(ck, "temporal"), name)
    for w in weights:
        lora.activate(bb.unet, [name], [w])
        vids = sample_videos(bb, texts, **kw)
        errors, follows = score_videos(rv, vids, specs)
        leak = np.mean([tm.frame_leakage(v, ref, sp) for v, sp in zip(vids, specs)])
        own = []
        if k_own:
            e = own_error()
            own = ["| own", round(e, 3), "ratio", round(e / own_base, 3)]
        print("PT", json.dumps(ov), ck.name, "w", w, "ratio", round(float(np.mean(errors) / base), 3),
              "app", round(float(np.mean(follows)), 3), "leak", round(float(leak), 3), "| first4 ratio", round(float(np.mean(errors[:4]) / base4), 3),
              "app", float(np.mean(follows[:4])), *own, flush=True)
    lora.activate(bb.unet, [])
