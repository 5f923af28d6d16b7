"""The measurement scripts the docs quote (scripts/) still run and print what the docs read from them, on tiny models.

scripts/toywan_measure.py (the toy Wan's owner tests it), scripts/ui_screenshot.py (a docs picture: Chromium and a
training run through `cav ui`, which tests/test_ui_browser.py drives the same way) are not run here."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs a script in a fresh interpreter (imports, model loads): ~20-40 s apiece
ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, **env: str) -> str:
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_wan_measure_prints_image_mode_exactness_and_inversion_error():
    out = json.loads(_run("wan_measure.py"))
    for name, diffs in out["image_mode"].items():
        exact = [v for k, v in diffs.items() if k.startswith("vs_") and "full_attention" not in k]
        assert max(exact) < 1e-5 < diffs["vs_full_attention (not equal, for scale)"], name
    errors = [v["relative_l2"] for v in out["flow_inversion_fp32 (x0 ~ N(0,1), shift 3, Euler)"].values()]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01  # more steps, smaller error
    assert out["parameters"]


def test_probe_words_counts_the_prompts_background(tiny_model):
    lines = _run("probe_words.py", str(tiny_model), SEEDS="2", STEPS="2").splitlines()
    assert len(lines) == 6
    assert all(re.match(r"^[0-2] / 2  a \w+ \w+ moving .+ on a \w+ background$", line) for line in lines), lines


def test_demo_sweep_scores_each_checkpoint_and_weight(tiny_model, tmp_path):
    overrides = {"base": str(tiny_model), "steps": 2, "absorber_steps": 1, "absorbers": "s-lora", "frames": 4,
                 "size": [32, 32], "t_lora_batch": 1, "absorber_batch": 2, "sample_steps": 2}
    out = _run("demo_sweep.py", str(tmp_path / "sweep"), json.dumps(overrides), "1", "0.5,1.0", PROMPTS="2")
    kinds = [line.split()[0] for line in out.splitlines()]
    assert kinds == ["TRAIN", "BASE"] + ["PT"] * 4  # 2 checkpoints × 2 weights
    assert all(re.search(r" ratio \d+\.\d+ app [01]\.\d+ leak [01]\.\d+ ", line) for line in out.splitlines()[2:])
