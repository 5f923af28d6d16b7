"""Does a base draw the prompt's background when the prompt names a held-out motion? (toy model card, run 4)

    OMP_NUM_THREADS=1 python scripts/probe_words.py BASE [FIRST_SEED]

Samples 6 prompts (4 naming a held-out motion, 2 controls) with 8 seeds each (25 DDIM steps, guidance 6, 8 frames of
32 px) and prints, per prompt, in how many of the 8 videos the classified background is the prompt's. Env SEEDS and
STEPS change the 8 seeds and 25 steps (tests/test_scripts.py runs it small).
"""
import os
import sys

from cav import backbone
from cav.metrics import toy as tm
from cav.sampling import sample_videos

PROMPTS = ["a magenta square moving in a spiral on a grey background",  # the demo's 4th prompt
           "a magenta square moving left on a grey background",  # control: a seen motion
           "a red circle moving in a spiral on a grey background",
           "a white diamond moving in a figure eight on a grey background",
           "a blue triangle moving in a zigzag on a brown background",
           "a magenta square moving in a spiral on a black background"]  # control: another background

base = sys.argv[1] if len(sys.argv) > 1 else "toy"
first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
bb = backbone.load(base, "cpu")
for prompt in PROMPTS:
    seeds = list(range(first, first + int(os.environ.get("SEEDS", "8"))))
    videos = sample_videos(bb, [prompt] * len(seeds), frames=8, size=(32, 32), steps=int(os.environ.get("STEPS", "25")),
                           guidance=6.0, seeds=seeds)
    want = prompt.split(" on a ")[1].split()[0]
    print(f"{sum(tm.classify_background(v) == want for v in videos)} / {len(seeds)}  {prompt}", flush=True)
