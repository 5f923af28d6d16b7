"""One motion from several clips: each clip's own absorbers in stage 1, one T-LoRA over all clips in stage 2."""

import json

import torch
from safetensors.torch import load_file

from cav import backbone
from cav.adapters import lora
from cav.adapters.textual_inversion import TextualInversion
from cav.cli import main
from cav.config import TrainConfig
from cav.data.video import to_tensor
from cav.stages import ClipInputs, encode_frames, encode_prompt, s_lora_name, t_lora_stage

PROMPT = "a square moving right"


def _active(unet) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {a for m in unet.modules() if isinstance(m, BaseTunerLayer) for a in m.active_adapters}


def _train(videos, model, out, *spatial):
    argv = ["train", *videos, "--prompt", PROMPT, "--base", model, "--out", out, "--frames", "3", "--size", "32",
            "--steps", "2", "--absorber-steps", "2", "--sample-steps", "1", "--checkpoint-every", "0",
            "--ti-tokens", "2", "--s-lora-lr", "1e-2", "--ti-lr", "1e-2", "--quiet"]
    for p in spatial:
        argv += ["--spatial-prompt", p]
    return main([str(a) for a in argv])


def test_first_clip_absorbers_are_the_single_clip_ones_and_the_second_has_its_own(tiny_model, tiny_video,
                                                                                   blue_video, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train([tiny_video], tiny_model, one, "a red square") == 0
    assert _train([tiny_video, blue_video], tiny_model, two, "a red square", "a blue square") == 0
    s_one = load_file(str(one / "absorbers" / "s_lora" / "adapter_model.safetensors"))
    s_two = load_file(str(two / "absorbers" / "s_lora" / "adapter_model.safetensors"))
    s_blue = load_file(str(two / "absorbers" / "clip-1" / "s_lora" / "adapter_model.safetensors"))
    assert all(torch.equal(s_one[k], s_two[k]) for k in s_one)  # clip 0 trained on clip 0 only, as alone
    assert any(not torch.equal(s_two[k], s_blue[k]) for k in s_two)
    ti_one = load_file(str(one / "absorbers" / "textual_inversion.safetensors"))["<cav>"]
    assert torch.equal(ti_one, load_file(str(two / "absorbers" / "textual_inversion.safetensors"))["<cav>"])
    assert "<cav2>" in load_file(str(two / "absorbers" / "clip-1" / "textual_inversion.safetensors"))
    meta = json.loads((two / "absorbers" / "clip-1" / "s_lora" / "cav.json").read_text())
    assert meta["prompt"] == "a blue square"
    data = json.loads((two / "data.json").read_text())
    assert [c["clip"] for c in data["clips"]] == [str(tiny_video), str(blue_video)]
    assert (two / "t_lora" / "adapter_model.safetensors").is_file()


def test_each_t_lora_step_uses_its_own_clips_absorbers(tiny_model, tiny_video, blue_video):
    from cav.data.video import read_video

    bb = backbone.load(str(tiny_model), "cpu", "fp32")
    cfg = TrainConfig.of(prompt=PROMPT, base=str(tiny_model), frames=3, size=32, ti_tokens=2, t_lora_batch=1)
    clips = []
    for k, video in enumerate((tiny_video, blue_video)):
        ti = TextualInversion(bb.tokenizer, bb.text_encoder, cfg.absorbers.clip_token(k), 2, "object")
        with torch.no_grad():  # distinct rows per clip, so a prompt with the other clip's tokens differs
            ti.weight[ti.ids] = torch.randn(len(ti.ids), ti.weight.shape[1])
        lora.add_lora(bb.unet, s_lora_name(k), cfg.lora_config("spatial", bb.family))
        clips.append(ClipInputs(to_tensor(read_video(video, frames=3, size=(32, 32))), ti, s_lora_name(k)))
    stage = t_lora_stage(bb, cfg, clips[0].frames, clips[0].ti, clips=clips)
    want = [(encode_frames(bb, c.frames).permute(1, 0, 2, 3).unsqueeze(0), encode_prompt(bb, c.ti.expand(PROMPT)))
            for c in clips]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(10):
        latents, cond = stage.batch(gen)
        k = next(i for i, (lat, _) in enumerate(want) if torch.equal(lat, latents))
        assert torch.equal(cond, want[k][1]), "the prompt carries another clip's TI tokens"
        assert _active(bb.unet) == {s_lora_name(k), "t_lora"}, "another clip's S-LoRA is on"
        seen.add(k)
    assert seen == {0, 1}


def test_dry_run_plan_shows_each_clips_absorbers(tiny_model, tiny_video, blue_video, capsys):
    argv = ["train", str(tiny_video), str(blue_video), "--prompt", PROMPT, "--base", str(tiny_model),
            "--spatial-prompt", "a red square", "--spatial-prompt", "a blue square", "--dry-run", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["clips"] == 2
    assert [(s["name"], s.get("clip")) for s in plan["stages"]] == [
        ("s_lora", 0), ("textual_inversion <cav>", 0), ("s_lora_1", 1), ("textual_inversion <cav2>", 1),
        ("t_lora", None)]
    assert plan["stages"][2]["spatial_prompt"] == "a blue square"


def test_several_clips_need_one_spatial_prompt_each(tiny_model, tiny_video, blue_video, tmp_path, capsys):
    out = tmp_path / "run"
    code = _train([tiny_video, blue_video], tiny_model, out, "a red square")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--spatial-prompt" in err, err
    assert not out.exists()
