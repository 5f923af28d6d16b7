"""The measurement scripts the docs quote (scripts/) still run and print what the docs read from them, on tiny models
(or, for the Wan tables, on the shipped configs: their output must be what README shows).

Only scripts/ui_screenshot.py (a docs picture: Chromium and a training run through `cav ui`, which
tests/test_ui_browser.py drives the same way) is not run here."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cav.toy.wan_base import ToyWanSpec, WanRecipe, train_wan_base

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



def test_wan_demo_sweep_scores_checkpoints_weights_and_cutoffs_and_averages_seeds(tmp_path):
    overrides = {"steps": 2, "absorber_steps": 1, "sample_steps": 2}  # on the shipped toy Wan, as cav demo
    out = _run("wan_demo_sweep.py", str(tmp_path / "sweep"), json.dumps(overrides), "1", "0.5,1.0", "0.5,1.0",
               PROMPTS="2")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["TRAIN", "BASE"] + ["PT"] * 8  # 2 checkpoints × 2 weights × 2 cuts
    number = r"\d+\.\d+"
    pt = rf" cut (0\.5|1\.0) ratio {number} app [01]\.\d+ leak [01]\.\d+ \| first4 ratio {number} "
    assert all(re.search(pt, line) for line in lines[2:])
    log = tmp_path / "seed.log"
    log.write_text(out)
    means = _run("wan_demo_sweep.py", "--mean", f"twice:{log},{log}").splitlines()
    assert len(means) == 8 and all(" seeds 2 | all ratio " in line for line in means)
    first = next(line for line in lines if line.startswith("PT"))
    ratio = float(re.search(r"ratio (\S+)", first).group(1))
    assert f"all ratio {ratio:.3f}" in means[0]  # the mean of a log with itself is its own figure


def test_wan_prior_probe_adds_base_sampled_clips_to_the_t_lora_batches(tmp_path):
    overrides = {"steps": 1, "absorber_steps": 1, "sample_steps": 2}
    out = _run("wan_prior_probe.py", str(tmp_path / "prior"), json.dumps(overrides), "1", "1.0", "1.0", PROMPTS="1",
               PRIOR_K="2", PRIOR_M="1")
    lines = out.splitlines()
    assert lines[0] == "PRIOR clips 2 per step 1 latents [2, 16, 3, 8, 8]"  # 9 frames × 32 px → 3 × 8 × 8
    assert [line.split()[0] for line in lines[1:]] == ["TRAIN", "BASE", "PT"]


# the smallest toy Wan its layout allows (tests/test_toy_wan.py's SPEC): 2 VAE downsamplings, 1 block
TINY_WAN = ToyWanSpec(heads=2, head_dim=12, layers=1, ffn_dim=16, text_dim=8, text_layers=1, text_heads=2, text_ff=16,
                      z_dim=4, vae_base_dim=4, vae_dim_mult=(1, 1, 1), temporal=4)


def _tiny_wan_recipe(steps: int) -> WanRecipe:
    return WanRecipe(frames=5, size=16, clips=40, vae_steps=2, vae_batch=1, steps=steps, batch=2, warmup=2,
                     image_every=2, max_sequence_length=16, max_seconds=0, save_minutes=1e9)


@pytest.fixture(scope="module")
def tiny_toy_wan(tmp_path_factory):
    """A toy Wan run folder, as `cav toy train-base --family wan --out RUN` leaves it (4 transformer steps)."""
    out = tmp_path_factory.mktemp("toywan") / "run"
    train_wan_base(out, _tiny_wan_recipe(4), TINY_WAN, quiet=True)
    return out


def test_toywan_prompt_probe_measures_each_word_and_the_attention_on_the_prompt(tiny_toy_wan):
    out = json.loads(_run("toywan_prompt_probe.py", str(tiny_toy_wan)))
    assert set(out["velocity_change"]) == {"0.95", "0.7", "0.4"}
    for changes in out["velocity_change"].values():
        assert set(changes) == {"colour", "shape", "motion", "uncond"} and all(v > 0 for v in changes.values())
    assert out["real_text_slots"] == 10  # 9 words + the end token
    assert out["uniform_mass"] == round(10 / 512, 4) and len(out["cross_attention_mass_on_prompt"]) == 1
    assert all(0 < m < 1 for m in out["cross_attention_mass_on_prompt"])


def test_toywan_vae_probe_scores_a_folder_s_reconstructions(tiny_toy_wan):
    out = json.loads(_run("toywan_vae_probe.py", str(tiny_toy_wan), "2"))
    assert out["clips"] == 2 and out["folder"] == str(tiny_toy_wan)
    assert all(0.0 <= out[k] <= 1.0 for k in ("colour_accuracy", "shape_accuracy", "motion_accuracy"))
    for part in ("per_frame_clip", "per_frame_encoded_alone"):
        votes = out[part]["shape_right"]
        assert len(votes) == 9 and all(0 <= v <= 2 for v in votes)  # the probe renders 9-frame clips


def test_toywan_vae_probe_trains_a_vae_for_the_seconds_given():
    out = json.loads(_run("toywan_vae_probe.py", "0.5", "4"))
    assert out["steps"] >= 1 and out["clips"] == 16 and out["vae_recon_mae"] > 0


def test_toywan_measure_prints_the_stock_pipeline_s_frames_and_both_compressions():
    assert json.loads(_run("toywan_measure.py", "frames")) == {
        "asked_frames": 9, "returned_frames": {"temporal_1": 10, "temporal_4": 9}}
    out = json.loads(_run("toywan_measure.py", "0.1"))
    rows = {row["temporal"]: row for row in out["rows"]}
    assert set(rows) == {1, 4} and rows[1]["vae_steps"] >= 1
    assert rows[1]["latent_shape_per_clip"][1] == 9 and rows[4]["latent_shape_per_clip"][1] == 3
    assert rows[1]["tokens_per_clip"] == 3 * rows[4]["tokens_per_clip"]
    zdim = json.loads(_run("toywan_measure.py", "zdim", "1"))
    assert zdim["rounds"] == 1 and set(zdim["transformer_step_seconds"]) == {"z16", "z32"}
    collapsed = json.loads(_run("toywan_measure.py", "slots", "1"))
    assert collapsed["text_slots"] == 512 and set(collapsed["step_seconds"]) == {"padded", "collapsed"}
    assert abs(collapsed["loss"]["padded"] - collapsed["loss"]["collapsed"]) < 1e-5  # the same step


def test_toywan_pack_keeps_the_card_and_the_resume_stays_exact(tiny_toy_wan, tmp_path):
    run, dest = tmp_path / "run", tmp_path / "model"
    shutil.copytree(tiny_toy_wan, run)
    dest.mkdir()
    (dest / "README.md").write_text("the model card\n")
    (dest / "vae").mkdir()
    (dest / "vae" / "stale.bin").write_text("from the run packed before")
    sizes = json.loads(_run("toywan_pack.py", str(run), str(dest)))
    assert (dest / "README.md").read_text() == "the model card\n" and not (dest / "vae" / "stale.bin").exists()
    assert sizes["model_bytes"] > 0 and sizes["train_state_bytes"] > 0
    vae_state = load_file(str(dest / ".train_state" / "vae" / "state.safetensors"))
    assert not any(k.startswith("optim.") for k in vae_state)  # the finished VAE phase's moments are dropped
    # the packed folder resumes as the run itself does
    train_wan_base(run, _tiny_wan_recipe(6), TINY_WAN, quiet=True)
    train_wan_base(dest, _tiny_wan_recipe(6), TINY_WAN, quiet=True)
    for name in ("modules.safetensors", "state.safetensors"):
        a = load_file(str(run / ".train_state" / "transformer" / name))
        b = load_file(str(dest / ".train_state" / "transformer" / name))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name


def test_wan_memory_fit_refits_the_shipped_activation_model():
    from cav.wan import memory

    fit = next(line for line in _run("wan_memory_fit.py").splitlines() if line.startswith("fit "))
    assert json.loads(fit[4:fit.index("}") + 1]) == memory.ACTIVATION_FIT


def test_wan_plan_table_prints_readme_s_wan_rows():
    readme = (ROOT / "README.md").read_text()
    lines = [line for line in _run("wan_plan_table.py").splitlines() if line.strip()]
    assert len(lines) == 4 + 2 + 4  # 4 bases, then the memory table: header, rule, 4 rows
    assert [line for line in lines if line not in readme] == []


def test_wan_ship_configs_rewrites_the_shipped_files_unchanged(tmp_path):
    package = tmp_path / "cav"
    shutil.copytree(ROOT / "src" / "cav", package, ignore=shutil.ignore_patterns("model", "wan_model", "__pycache__"))
    written = _run("wan_ship_configs.py", PYTHONPATH=str(tmp_path)).split()
    assert written and all(Path(w).is_relative_to(package) for w in written)
    for path in written:
        shipped = ROOT / "src" / "cav" / Path(path).relative_to(package)
        assert Path(path).read_text() == shipped.read_text(), shipped


def test_toywan_vae_cut_undoes_a_grown_vae_and_writes_a_loadable_folder(tiny_toy_wan, tmp_path):
    import importlib.util

    import torch
    from diffusers import AutoencoderKLWan

    from cav.toy.wan_base import expand_latent_channels

    spec = importlib.util.spec_from_file_location("toywan_vae_cut", ROOT / "scripts" / "toywan_vae_cut.py")
    cut_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cut_module)
    tensors = load_file(str(tiny_toy_wan / "vae" / "diffusion_pytorch_model.safetensors"))
    back = cut_module.cut_latent_channels(expand_latent_channels(tensors, 4, 6), 6, 4)  # grown, then cut again
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)

    out = json.loads(_run("toywan_vae_cut.py", str(tiny_toy_wan), str(tmp_path / "cut"), "2"))
    assert (out["z_from"], out["z_to"]) == (4, 2) and out["decoded_change_255"]["max"] >= 0
    vae = AutoencoderKLWan.from_pretrained(tmp_path / "cut" / "vae")
    assert vae.config.z_dim == 2 and len(vae.config.latents_std) == 2
    assert vae.post_quant_conv.weight.shape[:2] == (2, 2) and vae.decoder.conv_in.weight.shape[1] == 2


def test_toywan_vae_channels_reports_old_and_new_channels(tiny_toy_wan):
    out = json.loads(_run("toywan_vae_channels.py", str(tiny_toy_wan), "3"))
    assert (out["z"], out["old_z"]) == (4, 3) and len(out["mode_std_new"]) == 1
    assert out["pixel_change_new_zeroed"] >= 0 and out["decoder_column_norm_old_mean"] > 0
