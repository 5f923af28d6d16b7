"""Installed from a wheel (no checkout, no editable install), cav finds its recipes and its toy model."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_runs(tmp_path):
    # build from a copy, so the checkout gets no build/ or egg-info
    src = tmp_path / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src], check=True)
    (wheel,) = (tmp_path / "dist").glob("cav-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", site, wheel], check=True)

    # -S: no site-packages .pth files, so an editable cav elsewhere cannot be picked up; the dependencies come
    # from this interpreter's site-packages, after the installed wheel
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]),
           "OMP_NUM_THREADS": "1"}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    def run(*args):
        proc = subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    where = run("-c", "import cav, cav.config as c; print(cav.__file__); print(c.recipe_path('toy'))").split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    out = run("-m", "cav.cli", "train", "--dry-run", "--recipe", "toy", "--prompt", "a red circle")
    assert "t_lora" in out and "base toy" in out
    out = run("-c", "from cav.toy.demo import RECIPE; from cav.config import TrainConfig, load_recipe, recipe_names;"
                    "cfg = TrainConfig.from_dict({**load_recipe(RECIPE), 'prompt': 'x'});"
                    "from cav.bench.ablation import load_settings; s = load_settings('ablation/toy', quick=True);"
                    "print(RECIPE, cfg.motion.steps, len(s['rows']), *recipe_names())")
    assert Path(out.split()[0]).is_relative_to(site)
    assert out.split()[1:3] == ["300", "7"]
    assert set(out.split()[3:]) >= {"ablation/toy", "modelscope", "toy", "zeroscope"}
    # the toy Wan ships: its WanPipeline folder, not its resume state, within the 25 MB
    out = run("-c", "from cav.backbone import resolve_base; print(resolve_base('toy-wan'))")
    wan = Path(out.strip())
    assert wan.is_relative_to(site) and (wan / "model_index.json").is_file() and not (wan / ".train_state").exists()
    assert sum(f.stat().st_size for f in wan.rglob("*") if f.is_file()) <= 25 * 2**20
