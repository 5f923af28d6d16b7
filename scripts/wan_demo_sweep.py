"""The toy Wan's best-recipe search (docs/DEMO-TUNING.md, "Issue 24"): train one run (a shipped recipe + overrides,
checkpoints every E steps), then score every checkpoint × T-LoRA weight × cutoff on new-appearance prompts as `cav
demo` scores them (motion error ratio against the base on the same prompts and seed, appearance accuracy, frame
leakage), over all prompts and over the first 4 (the demo's).

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/wan_demo_sweep.py OUT '{"seed": 0}' 50 0.75,1.0 1.0
    python scripts/wan_demo_sweep.py --mean NAME:OUT1.log,OUT2.log,...    # mean over training seeds of the PT lines

Arguments: OUT OVERRIDES_JSON EVERY WEIGHTS CUTOFFS. A cutoff c < 1 keeps the T-LoRA on for the first round(c × steps)
sampling steps only (then the base finishes). Skips training when OUT/run/checkpoints exists, so a trained run can be
rescored. Env: RECIPE (default toy-wan), PROMPTS (default 8), SPEC_SEED (seed drawing the prompts, default 0: the
demo's 4 first), NEG ("spatial" or "full": the reference's spatial or full prompt as the negative prompt).
Prints BASE (the base's figures, per-prompt appearance and leakage), TRAIN (seconds) and one PT line per
(checkpoint, weight, cutoff). The LoRA is applied unmerged here (the demo merges it): the same up to float rounding.
"""
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch


def mean(args: list[str]) -> None:
    for arg in args:
        name, logs = arg.split(":")
        rows: dict = {}
        for log in logs.split(","):
            for line in open(log):
                m = re.match(r"PT \{.*\} (step-\d+) w ([\d.]+) cut ([\d.]+) ratio ([\d.]+) app ([\d.]+) leak ([\d.]+) "
                             r"\| first4 ratio ([\d.]+) app ([\d.]+) leak ([\d.]+)", line)
                if m:
                    rows.setdefault(m.groups()[:3], []).append([float(x) for x in m.groups()[3:]])
        for (ck, w, c), v in sorted(rows.items()):
            a = np.array(v)
            mu = a.mean(0)
            print(f"{name} {ck} w {w} cut {c} seeds {len(v)} | all ratio {mu[0]:.3f} app {mu[1]:.3f} leak {mu[2]:.3f} "
                  f"| first4 ratio {mu[3]:.3f} app {mu[4]:.3f} leak {mu[5]:.3f} (first4 ratio {a[:, 3].min():.2f}-"
                  f"{a[:, 3].max():.2f}, app {a[:, 4].min():.2f}-{a[:, 4].max():.2f})")


def sweep(argv: list[str]) -> None:
    from cav import api, backbone
    from cav.adapters import lora
    from cav.config import TrainConfig, load_recipe
    from cav.data import toyworld as tw
    from cav.data.video import write_video
    from cav.metrics import toy as tm
    from cav.sampling import fresh_noise, latent_shape
    from cav.toy.demo import DEFAULT_REFERENCE, score_videos

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out, ov, every = Path(argv[0]), json.loads(argv[1]), int(argv[2])
    weights, cutoffs = [float(w) for w in argv[3].split(",")], [float(c) for c in argv[4].split(",")]
    n, ref = int(os.environ.get("PROMPTS", "8")), DEFAULT_REFERENCE
    out.mkdir(parents=True, exist_ok=True)
    full, spatial = tw.caption(ref)
    cfg = TrainConfig.from_dict({**load_recipe(os.environ.get("RECIPE", "toy-wan")), **ov, "checkpoint_every": every,
                                 "prompt": full, "spatial_prompt": spatial})
    rv, _ = tw.render(ref, frames=cfg.data.frames, size=cfg.data.size[0])
    if not (out / "run" / "checkpoints").exists():
        t0 = time.time()
        api.train(write_video(out / "reference.mp4", rv), cfg, out / "run", overwrite=True, quiet=True)
        print("TRAIN", json.dumps(ov), "seconds", round(time.time() - t0, 1), flush=True)
    specs = tw.new_appearances(ref, n, np.random.default_rng(int(os.environ.get("SPEC_SEED", "0"))))
    texts = [tw.caption(s)[0] for s in specs]
    neg = os.environ.get("NEG", "")
    negatives = [{"spatial": spatial, "full": full}[neg]] * n if neg else None
    bb = backbone.load(cfg.base, cfg.system.device, cfg.system.dtype)
    pipe = bb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    steps, (h, w) = cfg.validation.steps, cfg.data.size

    def sample(cut: int | None = None) -> np.ndarray:
        latents = fresh_noise(latent_shape(bb, cfg.data.frames, (h, w)), [cfg.validation.seed] * n)

        def off_after(p, i, t, kw):  # the T-LoRA off from sampling step `cut` on
            if cut is not None and i + 1 == cut:
                lora.activate(bb.unet, [])
            return {}

        with torch.no_grad():
            o = pipe(**bb.prompt_inputs(pipe, texts, cfg.validation.guidance, negatives), num_frames=cfg.data.frames,
                     height=h, width=w, num_inference_steps=steps, guidance_scale=cfg.validation.guidance,
                     latents=latents.to(bb.device, bb.dtype), output_type="np", callback_on_step_end=off_after)
        return (np.clip(np.asarray(o.frames, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)

    def score(videos):
        e, f = score_videos(rv, videos, specs)
        return np.array(e), np.array(f, float), np.array([tm.frame_leakage(v, ref, s) for v, s in zip(videos, specs)])

    lora.activate(bb.unet, [])
    be, bf, bk = score(sample())
    print("BASE", json.dumps(ov), "err", round(be.mean(), 3), "app", bf.mean(), "leak", round(bk.mean(), 3),
          "| first4 err", round(be[:4].mean(), 3), "app", bf[:4].mean(), "leak", round(bk[:4].mean(), 3),
          "per-prompt app", bf.tolist(), "leak", [round(float(x), 2) for x in bk], flush=True)
    for ck in sorted((out / "run" / "checkpoints").glob("step-*")):
        name = "c" + ck.name.replace("-", "")
        lora.load_lora(bb.unet, lora.find_adapter_dir(ck, "temporal"), name)
        for wt in weights:
            for c in cutoffs:
                lora.activate(bb.unet, [name], [wt])
                e, f, k = score(sample(None if c >= 1 else max(1, round(c * steps))))
                lora.activate(bb.unet, [])
                print("PT", json.dumps(ov), ck.name, "w", wt, "cut", c, "ratio", round(e.mean() / be.mean(), 3), "app",
                      f.mean(), "leak", round(k.mean(), 3), "| first4 ratio", round(e[:4].mean() / be[:4].mean(), 3),
                      "app", f[:4].mean(), "leak", round(k[:4].mean(), 3), flush=True)


if __name__ == "__main__":
    mean(sys.argv[2:]) if sys.argv[1:2] == ["--mean"] else sweep(sys.argv[1:])
