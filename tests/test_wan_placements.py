"""Wan's placements beyond ``cav`` as `cav train` options (``--placement qk``, ``--placement temporal-heads``) and the
frame-difference loss term (``--frame-diff-loss W``): where each adapter goes is the Wan row's table
(``families.WAN_TARGETS``); the dry run counts what each placement injects; a run records what generate, resume and
export need (the measured heads); a UNet base refuses them in one line before any weight loads."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cav.adapters import lora
from cav.cli import main
from cav.data.video import read_video
from cav.families import UNET3D, WAN
from cav.wan import targets
from cav.wan.tiny import TinyWanSpec, build_transformer, make_tiny_wan

PROMPT = "a red square moving right"
SIZE, FRAMES = WAN.tiny.size, WAN.tiny.frames
TRAIN = ["--frames", str(FRAMES), "--size", str(SIZE), "--steps", "2", "--absorber-steps", "2", "--sample-steps", "2",
         "--absorber-batch", "2", "--checkpoint-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory):
    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


def _one_line_error(code, err, *words):
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert all(w in err for w in words), err


def _video(path):
    return read_video(path, frames=None, size=(SIZE, SIZE))


# ------------------------------------------------------------------------------------------------ refusals
def test_dit_placements_and_frame_diff_loss_are_refused_on_a_unet_base(tiny_model, tiny_video, tmp_path, run_cli):
    """On UNet3D (and any UNet row) qk, temporal-heads and --frame-diff-loss are one line naming the problem and the
    fix, exit 2, before the run folder (or any weight) exists, as motiondirector+tconv on a DiT already is."""
    out = tmp_path / "run"
    base = ["train", tiny_video, "--prompt", PROMPT, "--base", tiny_model, "--out", out, "--steps", "1", "--quiet"]
    for extra, words in ((["--placement", "qk"], ("placement 'qk' does not exist on a UNet3D model",
                                                  "use placement cav, motiondirector or motiondirector+tconv")),
                         (["--placement", "temporal-heads"], ("placement 'temporal-heads' does not exist",
                                                              "use placement cav")),
                         (["--frame-diff-loss", "0.5"], ("--frame-diff-loss is not supported on a UNet3D model",
                                                         "drop --frame-diff-loss"))):
        code, err = run_cli(base + extra)
        _one_line_error(code, err, *words)
        assert not out.exists()
    code, err = run_cli(base + ["--frame-diff-loss", "-1"])
    _one_line_error(code, err, "--frame-diff-loss -1.0 is invalid", "≥ 0")


def test_temporal_heads_needs_one_expert_and_measures_in_its_noise_range(tmp_path, tiny_video, run_cli, monkeypatch):
    """--experts both is refused; on the high-noise expert the heads are measured in the middle of the timesteps
    that expert trains on (875-1000 on A14B: σ = 0.9375), on a one-expert base at σ = 0.5."""
    a14b = make_tiny_wan(tmp_path / "a14b", experts=2)
    code, err = run_cli(["train", tiny_video, "--prompt", PROMPT, "--base", a14b, "--out", tmp_path / "run",
                         "--placement", "temporal-heads", "--experts", "both", *TRAIN])
    _one_line_error(code, err, "--placement temporal-heads measures heads in one transformer",
                    "pass --experts high or low")
    assert not (tmp_path / "run").exists()
    sigmas, real = [], targets.measure_temporal_heads

    def measured(model, inputs, fraction, seed, sigma):
        sigmas.append(sigma)
        return real(model, inputs, fraction, seed, sigma)
    monkeypatch.setattr(targets, "measure_temporal_heads", measured)
    out = tmp_path / "high"
    assert main([str(a) for a in ["train", tiny_video, "--prompt", PROMPT, "--base", a14b, "--out", out,
                                  "--placement", "temporal-heads", "--experts", "high", "--absorbers", "none",
                                  *TRAIN]]) == 0
    assert sigmas == [0.9375]
    meta = json.loads((out / "t_lora" / "cav.json").read_text())
    assert meta["experts"] == "high" and meta["temporal_heads"] == json.loads(
        (out / "temporal_heads.json").read_text())["heads"]


# ------------------------------------------------------------------------------------------------ dry run
def _injected(placement: str) -> dict:
    """What ``cav.wan.targets`` injects for ``placement`` on the tiny transformer (temporal-heads: every head)."""
    model = build_transformer(TinyWanSpec())
    spec = TinyWanSpec()
    heads = {b: list(range(spec.heads)) for b in range(spec.layers)} if placement == "temporal-heads" else None
    targets.add_motion_lora(model, "t", placement, heads=heads)
    return {"trainable_params": lora.count_parameters(model, "t"),
            "modules": sum(1 for m in model.modules() if "t" in getattr(m, "lora_A", {}))}


def test_dry_run_counts_follow_the_placement(wan_model, capsys):
    """`cav train --dry-run` counts the T-LoRA each placement injects (qk: half of cav's modules; temporal-heads:
    cav's count, said to be an upper bound), and the S-LoRA where each placement puts it."""
    rows = {}
    for placement in ("cav", "qk", "temporal-heads", "motiondirector"):
        capsys.readouterr()
        assert main(["train", "--dry-run", "--json", "--base", str(wan_model), "--prompt", PROMPT,
                     "--placement", placement, "--frames", str(FRAMES), "--size", str(SIZE)]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["placement"] == placement
        rows[placement] = {s["name"]: s for s in result["stages"]}
        t = rows[placement]["t_lora"]
        assert {k: t[k] for k in ("trainable_params", "modules")} == _injected(placement), placement
    assert rows["qk"]["t_lora"]["modules"] * 2 == rows["cav"]["t_lora"]["modules"] == 8
    assert rows["qk"]["t_lora"]["trainable_params"] * 2 == rows["cav"]["t_lora"]["trainable_params"]
    assert rows["temporal-heads"]["t_lora"]["upper_bound"] and "upper_bound" not in rows["cav"]["t_lora"]
    assert rows["temporal-heads"]["t_lora"]["heads_share"] == 0.25
    for placement in ("cav", "qk", "temporal-heads"):  # the absorber stays on self- and cross-attention
        assert rows[placement]["s_lora"]["modules"] == 16
    capsys.readouterr()
    assert main(["train", "--dry-run", "--base", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--prompt", PROMPT,
                 "--placement", "qk"]) == 0  # the shipped 1.3B config, offline
    text = capsys.readouterr().out
    assert re.search(r"t_lora\s+737,280 trainable parameters in 60 modules", text), text


# --------------------------------------------------------------------------------------- train → … → export
@pytest.mark.parametrize("placement, extra", [("qk", ["--frame-diff-loss", "0.5"]), ("temporal-heads", [])])
def test_placement_trains_generates_resumes_and_exports(wan_model, tiny_video, tmp_path, capsys, placement, extra):
    run = tmp_path / "run"
    assert main([str(a) for a in ["train", tiny_video, "--prompt", PROMPT, "--base", wan_model, "--out", run,
                                  "--placement", placement, *extra, *TRAIN]]) == 0
    meta = json.loads((run / "t_lora" / "cav.json").read_text())
    assert meta["placement"] == placement
    state = load_file(str(run / "t_lora" / lora.WEIGHTS))
    modules = sorted({k.split(".lora_")[0] for k in state})
    if placement == "qk":
        assert meta["frame_diff_loss"] == 0.5
        assert modules == [f"blocks.{b}.attn1.{p}" for b in (0, 1) for p in ("to_k", "to_q")]
    else:  # the heads measured once, recorded in the run and in the T-LoRA; only their blocks and rows trained
        recorded = json.loads((run / "temporal_heads.json").read_text())
        assert recorded["placement"] == "temporal-heads"
        heads = {int(b): hs for b, hs in recorded["heads"].items()}
        assert meta["temporal_heads"] == recorded["heads"] and len(sum(heads.values(), [])) == 1  # 25% of 4 heads
        assert np.asarray(recorded["mass_across_frames"]).shape == (2, 2)
        assert modules == [f"blocks.{b}.attn1.{p}" for b in sorted(heads) for p in ("to_k", "to_out.0", "to_q",
                                                                                     "to_v")]
        d = TinyWanSpec().head_dim
        for b, hs in heads.items():
            rows = torch.zeros(2 * d, dtype=torch.bool)
            for h in hs:
                rows[h * d:(h + 1) * d] = True
            for p in ("to_q", "to_k", "to_v"):
                up = state[f"blocks.{b}.attn1.{p}.lora_B.weight"]
                assert up[rows].abs().sum() > 0 and up[~rows].abs().sum() == 0
            down = state[f"blocks.{b}.attn1.to_out.0.lora_A.weight"]
            assert down[:, rows].abs().sum() > 0 and down[:, ~rows].abs().sum() == 0
    # generate from a checkpoint = its validation sample
    ckpt, out = run / "checkpoints" / "step-000001", tmp_path / "gen.mp4"
    assert main(["generate", "--prompt", PROMPT, "--adapter", str(ckpt), "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(_video(out), _video(ckpt / "samples" / "sample-0.mp4"))
    # resume from step 1 ends with the same T-LoRA (temporal-heads: the recorded heads, not measured again)
    again = tmp_path / "resumed"
    shutil.copytree(run, again)
    for rel in ("checkpoints/step-000002", "t_lora", "samples"):
        shutil.rmtree(again / rel)
    assert main(["train", str(tiny_video), "--resume", "--out", str(again), "--quiet"]) == 0
    resumed = load_file(str(again / "t_lora" / lora.WEIGHTS))
    assert resumed.keys() == state.keys() and all(torch.equal(resumed[k], state[k]) for k in state)
    # export: ComfyUI's names of exactly the adapted modules
    target = tmp_path / "comfy.safetensors"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "comfyui", "--out", str(target)]) == 0
    exported = {k.split(".lora_")[0].removesuffix(".alpha") for k in load_file(str(target))}
    names = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
    assert exported == {f"diffusion_model.blocks.{m.split('.')[1]}.self_attn.{names[m.split('.attn1.')[1]]}"
                        for m in modules}


# ---------------------------------------------------------------------------------------- frame-difference term
def test_frame_diff_loss_adds_its_weighted_term_and_zero_is_the_plain_loss():
    """``diffusion_loss`` with weight W = the plain loss + W × the MSE of consecutive-frame differences of
    prediction and target (the draws are the same); W = 0 is the plain loss bit for bit; DDPM has no such term."""
    from cav.objectives import DDPM
    from cav.trainer import diffusion_loss
    from cav.wan.flow import frame_difference_mse

    from diffusers import UniPCMultistepScheduler

    model = build_transformer(TinyWanSpec()).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    latents = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))

    def loss(w=None):
        kw = {} if w is None else {"frame_diff": w}
        with torch.no_grad():
            return diffusion_loss(model, scheduler, latents, cond, torch.Generator().manual_seed(2),
                                  objective=WAN.objective, **kw)

    noisy, t, target = WAN.objective.noised(scheduler, latents, torch.Generator().manual_seed(2))
    with torch.no_grad():
        pred = model(noisy, t, encoder_hidden_states=cond).sample
    term = frame_difference_mse(pred, target)
    manual = ((pred.diff(dim=2) - target.diff(dim=2)) ** 2).mean()
    assert torch.allclose(term, manual, rtol=1e-6) and term > 0
    assert torch.equal(loss(0.0), loss())
    torch.testing.assert_close(loss(0.5), loss() + 0.5 * term, rtol=1e-6, atol=1e-7)
    assert DDPM.frame_difference_loss is None and UNET3D.objective is DDPM


def test_frame_diff_loss_reaches_the_run_and_zero_changes_nothing(wan_model, tiny_video, tmp_path):
    """A run with --frame-diff-loss 0 ends with the T-LoRA of a run without the flag, bit for bit; with 0.5 its
    losses and its T-LoRA differ (the term is in the T-LoRA stage's loss, not the absorbers')."""
    runs = {}
    for name, extra in (("none", []), ("zero", ["--frame-diff-loss", "0"]), ("half", ["--frame-diff-loss", "0.5"])):
        out = tmp_path / name
        assert main([str(a) for a in ["train", tiny_video, "--prompt", PROMPT, "--base", wan_model, "--out", out,
                                      "--placement", "qk", *extra, *TRAIN]]) == 0
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        runs[name] = (load_file(str(out / "t_lora" / lora.WEIGHTS)), log)
    (none, log_none), (zero, log_zero), (half, log_half) = runs["none"], runs["zero"], runs["half"]
    assert all(torch.equal(none[k], zero[k]) for k in none) and log_none == [
        {**x, "seconds": y["seconds"]} for x, y in zip(log_zero, log_none)]
    stage = [x["stage"] for x in log_half]
    assert [x["loss"] for x, s in zip(log_half, stage) if s == "absorbers"] == [
        x["loss"] for x, s in zip(log_none, stage) if s == "absorbers"]
    assert all(h["loss"] != n["loss"] for h, n, s in zip(log_half, log_none, stage) if s == "t_lora")
    assert any(not torch.equal(none[k], half[k]) for k in none)
