import json
import math

import pytest
import torch

from cav.bench.speed import COUNTED, TIMED, format_table, run_speed, set_gradient_checkpointing
from cav.errors import CavError

TIMES = ("t_lora_step_s", "t_lora_step_plain_s", "eager_step_s", "motiondirector_step_s", "absorber_step_s", "generation_step_s", "uncached_step_s",
         "cached_step_s", "checkpointing_step_s", "no_checkpointing_step_s", "motiondirector_spatial_path_step_s",
         "motiondirector_dual_step_s")
POSITIVE = TIMES + ("step_ratio", "cached_speedup", "peak_memory_bytes", "flops_per_step", "achieved_flops",
                    "measured_peak_flops", "peak_fraction", "lean_speedup",
                    "ops_per_step", "cast_ops_per_step", "ops_per_step_plain", "cast_ops_per_step_plain",
                    "generation_ops_per_step", "generation_ops_per_step_plain")
KEYS = POSITIVE + ("device", "device_name", "dtype", "latent_shape", "peak_memory", "physical_limit_s",
                   "trainable_params", "torch_version", "note", "assumed_peak_flops")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops gain nothing from threads, and on a shared 2-core machine a second OpenMP thread that waits for a
    busy core makes every op wait: one thread keeps this module fast under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def result(_one_thread):
    # everything but torch.compile (inductor builds C++ for minutes) and graph breaks (tested below and in
    # test_compile.py)
    return run_speed(device="cpu", size="tiny", quick=True, only=["timing", "counts", "flops"])


def test_keys_and_values(result):
    assert not result["errors"], result["errors"]
    for key in KEYS:
        assert key in result, key
    for key in POSITIVE:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["latent_shape"] == [1, 4, 4, 8, 8]
    assert result["step_ratio"] == pytest.approx(result["t_lora_step_s"] / result["motiondirector_step_s"])
    assert result["cached_speedup"] == pytest.approx(result["uncached_step_s"] / result["cached_step_s"])
    assert result["peak_fraction"] == pytest.approx(result["achieved_flops"] / result["measured_peak_flops"])
    assert result["paper_shape_flops_per_step"] is None  # counted only where the step runs at the paper's latent
    for name, peak in result["physical_limit_s"].items():
        assert math.isfinite(peak) and peak > 0, name
        assert name == "measured_device" or name in result["assumed_peak_flops"]
    assert all(v > 0 for v in result["peak_memory"].values())
    assert result["note"]


def test_motiondirector_trains_more_parameters(result):
    params = result["trainable_params"]
    assert params["motiondirector"] > params["cav"] > 0
    assert result["adapted_modules"]["motiondirector"] > result["adapted_modules"]["cav"]


def test_json_and_table(result):
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    table = format_table(result)
    assert "T-LoRA step (cav)" in table and "MotionDirector" in table and "cached speedup" in table
    lines = table.splitlines()
    assert len(lines) > 10


def test_format_table_with_failed_measurements(result):
    broken = dict(result, t_lora_step_s=None, step_ratio=None, peak_memory={"t_lora_step": None},
                  errors={"t_lora_step": "CUDA out of memory"})
    table = format_table(broken)
    assert "n/a" in table and "CUDA out of memory" in table


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    from diffusers import UNet3DConditionModel

    from cav.adapters import lora
    from cav.bench.speed import TINY_UNET
    from cav.families import UNET3D

    unet = UNet3DConditionModel(**TINY_UNET)
    unet.requires_grad_(False)
    lora.add_lora(unet, "t", lora.lora_config("temporal", "cav", 4, 1.0, UNET3D))
    lora.activate(unet, ["t"], trainable="t")
    params = lora.lora_parameters(unet, "t")
    with torch.no_grad():
        for p in params:  # B = 0 at init would make every A gradient zero
            p.normal_(0, 0.1)
    x, cond = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 32)

    saved = []

    def grads():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = unet(x, torch.tensor([10]), encoder_hidden_states=cond).sample.pow(2).mean()
        loss.backward()
        out = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out

    plain = grads()
    saved_plain, saved[:] = sum(saved), []
    method = set_gradient_checkpointing(unet, True)
    assert method != "off"
    checkpointed = grads()
    assert sum(saved) < saved_plain / 2  # activations inside the blocks are recomputed, not kept
    assert set_gradient_checkpointing(unet, False) == "off"
    assert all("forward" not in b.__dict__ for b in list(unet.down_blocks) + list(unet.up_blocks) + [unet.mid_block])
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in plain)


def test_cases_are_rows_of_one_table(result):
    for case in TIMED:
        if case.group == "timing":
            assert case.key in result, case.key
    assert {c.name for c in COUNTED if c.group == "counts"} <= set(result["op_counts"])
    assert "compiled_step_s" not in result and result["compiled_speedup"] is None  # not selected
    with pytest.raises(CavError, match="unknown benchmark case"):
        run_speed(device="cpu", size="tiny", only=["t_lora_stepp"])


def test_lean_counts_against_the_step_before(result):
    """Counted, not timed: the lean step's ops and casts against the plain (pre-issue-16) step's."""
    assert result["cast_ops_per_step"] <= 0.1 * result["cast_ops_per_step_plain"]
    assert result["ops_per_step"] <= 0.7 * result["ops_per_step_plain"]
    assert result["ops_ratio"] == pytest.approx(result["ops_per_step"] / result["ops_per_step_plain"])
    assert result["generation_cast_ops_per_step"] < result["generation_cast_ops_per_step_plain"]
    assert result["op_count_dtype"] == "bfloat16"
    assert "Ops per T-LoRA step lean / plain" in format_table(result)


@pytest.mark.slow
def test_graph_breaks_are_counted_in_the_steps_own_configuration():
    result = run_speed(device="cpu", size="tiny", quick=True, only=["graph_breaks"])
    assert not result["errors"], result["errors"]
    assert result["graph_breaks"] == {"training": 0, "generation": 0}


def test_animatediff_row_runs_on_its_own_rig(result):
    """The AnimateDiff case is one TIMED row on the family's own rig (tiny AnimateDiff here): its time, op count and
    adapters are reported beside the UNet3D rig's, with the T-LoRA on the motion modules only."""
    from cav.adapters import lora
    from cav.families import ANIMATEDIFF

    assert result["animatediff_t_lora_step_s"] > 0 and result["animatediff_ops_per_step"] > 0
    fam = result["families"]
    assert set(fam) == {"unet3d", "animatediff"}
    assert fam["unet3d"]["unet_params"] == result["unet_params"]
    ad = fam["animatediff"]
    assert ad["latent_shape"] == [1, 4, 4, 8, 8] and ad["text_shape"][0] == 1  # one condition per video (hook)
    unet = ANIMATEDIFF.rig.model("tiny")
    n = lora.add_lora(unet, "t", lora.lora_config("temporal", "cav", 4, 1.0, ANIMATEDIFF))
    assert ad["adapted_modules"]["cav"] == n and ad["trainable_params"]["cav"] == lora.count_parameters(unet, "t")
    assert all("motion_modules" in name for name, m in unet.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert "AnimateDiff T-LoRA step" in format_table(result)


def test_paired_measurement_alternates_and_takes_the_median_ratio(monkeypatch):
    """A compiled case is timed against its eager twin in alternating pairs (so load changes hit both sides); the
    speedup is the median of the per-pair ratios."""
    from cav.bench import speed

    order, now = [], [0.0]
    durations = {"step": 1.0, "eager": 3.0}

    def tick(kind):
        order.append(kind)
        now[0] += durations[kind]

    step = lambda: tick("step")  # noqa: E731
    step.eager = lambda: tick("eager")
    bench = speed._Bench(torch.device("cpu"), warmup=1, reps=4)
    monkeypatch.setattr(speed.time, "perf_counter", lambda: now[0])  # advances only by the fake steps' durations
    result = bench.measure("case", lambda: (step, lambda: None), paired=True)
    assert order == ["step", "eager"] + ["eager", "step", "step", "eager"] * 2  # warm-ups, then alternating pairs
    assert result == 1.0 and bench.paired["case"] == 3.0
    assert bench.samples["case_eager"] == [3.0] * 4


def test_cpu_compile_turns_inductor_layout_optimization_off(monkeypatch):
    """On the CPU the compiled UNet keeps its convolutions' layout (channels-last conversions made the full-size step
    slower than eager: docs/PERFORMANCE.md); on CUDA it uses CUDA graphs instead."""
    from cav import accel

    seen = []
    monkeypatch.setattr(accel.torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    unet = torch.nn.Linear(2, 2)
    accel.compile_unet(unet, torch.device("cpu"))
    accel.compile_unet(unet, torch.device("cuda"))
    accel.compile_unet(unet, torch.device("cpu"), backend="aot_eager")
    assert seen[0]["options"] == {"layout_optimization": False} and seen[0]["mode"] is None
    assert seen[1]["options"] is None and seen[1]["mode"] == "reduce-overhead"
    assert seen[2]["options"] is None and seen[2]["fullgraph"] is True


def test_rig_steps_are_cavs_own_and_leave_the_unet_bare():
    """A rig case builds its stage with the stage builders on the bare UNet (stage 1 adds the S-LoRA, stage 2 the
    T-LoRA, the S-LoRA folded into the weights as cav train does) and takes every adapter off again; a generation step
    samples with sample_videos and returns the time of each denoising step after the first."""
    from peft.tuners.lora import LoraLayer

    from cav.adapters import lora
    from cav.bench.rig import GEN_STEPS, Rig
    from cav.families import UNET3D
    from cav.stages import S_LORA, T_LORA

    rig = Rig(UNET3D, "tiny", "cpu", torch.float32, (1, 4, 4, 8, 8))
    before = {k: v.clone() for k, v in rig.unet.state_dict().items()}
    step, teardown = rig.train()()
    assert lora.adapter_names(rig.unet) == {S_LORA, T_LORA}
    assert any(S_LORA in m.merged_adapters for m in rig.unet.modules() if isinstance(m, LoraLayer))
    assert math.isfinite(step().item())
    teardown()
    assert lora.adapter_names(rig.unet) == set() and rig.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in rig.unet.state_dict().items())  # the merge was undone exactly
    step, teardown = rig.generation()()
    intervals = step()
    teardown()
    assert len(intervals) == GEN_STEPS - 1 and all(t > 0 for t in intervals)
    assert lora.adapter_names(rig.unet) == set()


def test_wan_row_runs_on_its_own_rig():
    """``--only wan``: the cav T-LoRA step on the Wan row's rig (its own VAE, umT5 text side, tokenizer and flow
    scheduler; tiny Wan here), timed, and its ops and casts counted with and without the lean step."""
    from cav.adapters import lora
    from cav.families import WAN

    result = run_speed(device="cpu", size="tiny", quick=True, only=["wan"])
    assert not result["errors"], result["errors"]
    assert result["wan_t_lora_step_s"] > 0 and set(result["families"]) == {"wan"}
    assert result["wan_cast_ops_per_step"] < result["wan_cast_ops_per_step_plain"]
    assert result["wan_ops_per_step"] < result["wan_ops_per_step_plain"]
    wan = result["families"]["wan"]
    assert wan["latent_shape"] == [1, 4, 2, 8, 8]  # the row's 5 frames through Wan's 4× temporal VAE
    assert wan["text_shape"] == [1, 512, 16]  # umT5's padded prompt, as WanPipeline encodes it
    model = WAN.rig.model("tiny")
    n = lora.add_lora(model, "t", lora.lora_config("temporal", "cav", 4, 1.0, WAN))
    assert wan["adapted_modules"]["cav"] == n and wan["trainable_params"]["cav"] == lora.count_parameters(model, "t")
    assert "Wan 2.1 1.3B T-LoRA step" in format_table(result)
