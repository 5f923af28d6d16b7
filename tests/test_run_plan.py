"""The stage plan a run executes (``run.py``): its keys for one and several clips and for given or no absorbers,
what a resume does with each entry, looked up by the key of the run's latest checkpoint, and the builders' stages
carrying their lean step from construction."""

import pytest
import torch

from cav import resume
from cav.config import TrainConfig
from cav.errors import CavError
from cav.resume import StageKey
from cav.run import actions, stage_keys


def _keys(clips=1, **kw):
    return [str(k) for k in stage_keys(TrainConfig.of(prompt="x", **kw), clips)]


def test_plan_keys_for_one_and_several_clips_and_given_or_no_absorbers():
    assert _keys() == ["absorbers/clip-0", "t_lora"]
    assert _keys(2) == ["absorbers/clip-0", "absorbers/clip-1", "t_lora"]
    assert _keys(3, absorbers="ti") == ["absorbers/clip-0", "absorbers/clip-1", "absorbers/clip-2", "t_lora"]
    assert _keys(absorbers="none") == ["t_lora"]
    assert _keys(ti_from="emb.safetensors") == ["absorbers/clip-0", "t_lora"]  # given: published, not trained
    assert _keys(absorbers="s-lora", s_lora_from="image-lora") == ["absorbers/clip-0", "t_lora"]


def test_keys_name_the_checkpoints_they_resume_from():
    assert StageKey("absorbers", 0).checkpoint_name(2) == "absorbers-step-000002"
    assert StageKey("absorbers", 1).checkpoint_name(2) == "absorbers-clip-1-step-000002"
    assert StageKey("t_lora").checkpoint_name(3) == "step-000003"


def test_actions_train_everything_without_a_checkpoint_and_resume_at_its_key():
    keys = stage_keys(TrainConfig.of(prompt="x"), 2)
    assert actions(keys, None) == ["train", "train", "train"]
    assert actions(keys, StageKey("absorbers", 0)) == ["restore", "train", "train"]
    assert actions(keys, StageKey("absorbers", 1)) == ["skip", "restore", "train"]
    assert actions(keys, StageKey("t_lora")) == ["skip", "skip", "restore"]
    with pytest.raises(CavError, match=r"^the run's latest checkpoint is of stage absorbers/clip-2, "):
        actions(keys, StageKey("absorbers", 2))


def test_resume_looks_up_the_key_of_the_furthest_checkpoint(tmp_path):
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w])
    gen = torch.Generator().manual_seed(0)
    for stage, clip, step in [("absorbers", 0, 2), ("absorbers", 1, 1), ("absorbers", 0, 1)]:
        with resume.CheckpointWriter(tmp_path, stage, step, clip) as d:
            resume.save_state(d, stage, step, opt, gen.get_state(), clip_index=clip)
    point = resume.latest(tmp_path)
    assert point.key == StageKey("absorbers", 1) and point.folder.name == "absorbers-clip-1-step-000001"
    assert actions(stage_keys(TrainConfig.of(prompt="x"), 2), point.key) == ["skip", "restore", "train"]
    with resume.CheckpointWriter(tmp_path, "t_lora", 1) as d:
        resume.save_state(d, "t_lora", 1, opt, gen.get_state())
    assert str(resume.latest(tmp_path).key) == "t_lora"


def test_the_builders_give_each_stage_its_lean_step_for_the_adapter_it_trains(tiny_model):
    from cav import backbone, lean
    from cav.stages import absorber_stage, t_lora_stage

    bb = backbone.load(tiny_model, "cpu")
    cfg = TrainConfig.of(prompt="a square", frames=2, size=[32, 32], absorbers="s-lora", spatial_prompt=["a", "b"])
    frames = torch.rand(2, 3, 32, 32) * 2 - 1
    second = absorber_stage(bb, cfg, frames, None, s_lora="s_lora_1", prompt="b")  # the second clip's absorbers
    assert isinstance(second.forward_backward_context, lean.LeanStep)
    assert second.forward_backward_context.fused.name == "s_lora_1"
    assert [g["name"] for g in second.param_groups] == ["s_lora_1"]
    stage = t_lora_stage(bb, cfg, frames, None)
    assert isinstance(stage.forward_backward_context, lean.LeanStep)
    assert stage.forward_backward_context.fused.name == "t_lora" and stage.forward_backward_context.copies is None
