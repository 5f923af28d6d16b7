"""--compile: the adapted UNet compiles as one graph (fullgraph=True, no graph break) in the training configuration
(S-LoRA merged, lean T-LoRA forward, grad) and in generation (T-LoRA merged, no grad), with the eager results.

The compiler here is ``aot_eager``: dynamo's capture plus AOT autograd's forward/backward split, which is where graph
breaks and tracing failures live, without inductor's C++ build (minutes per graph on a shared 2-core machine)."""

import sys
from pathlib import Path

import pytest
import torch

from cav import accel, lean
from cav.errors import CavError
from cav.objectives import DDPM
from cav.trainer import Stage

sys.path.insert(0, str(Path(__file__).parent))
from test_lean import S, T, _unet  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(batch=1):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(batch, 4, 3, 8, 8, generator=gen), torch.tensor([10]), torch.randn(batch, 5, 32, generator=gen)


def _train_call(unet, stage):
    x, t, cond = _inputs()
    with stage.forward_backward_context():
        out = unet(x, t, encoder_hidden_states=cond).sample
        out.pow(2).mean().backward()
    grads = [p.grad.clone() for p in stage.param_groups[0]["params"]]
    for p in stage.param_groups[0]["params"]:
        p.grad = None
    return out.detach(), grads


def test_training_step_compiles_as_one_graph_with_eager_results():
    from cav.adapters import lora

    unet = _unet()
    stage = Stage(T, 1, [{"params": lora.lora_parameters(unet, T)}], batch=None, objective=DDPM)
    lean.use_lean_step(stage, unet, T, None)
    with lean.FrozenMerge(unet, [S]).merged():
        eager_out, eager_grads = _train_call(unet, stage)
        accel.compile_unet(unet, torch.device("cpu"), backend="aot_eager")  # fullgraph: a break raises
        try:
            for _ in range(2):  # the second call reuses the graph: the lean forward's patches are stable objects
                out, grads = _train_call(unet, stage)
        finally:
            accel.uncompile_unet(unet)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert "forward" not in unet.__dict__


def test_generation_has_no_graph_break_and_compiles():
    from cav.adapters import lora

    unet = _unet()
    lora.activate(unet, [T])
    x, t, cond = _inputs(batch=2)
    with torch.no_grad(), lean.FrozenMerge(unet, lean.live_adapters(unet)).merged():
        breaks, reasons = accel.graph_breaks(unet, x, t, encoder_hidden_states=cond)
        assert breaks == 0, reasons
        eager = unet(x, t, encoder_hidden_states=cond).sample
        accel.compile_unet(unet, torch.device("cpu"), backend="aot_eager")
        try:
            compiled = unet(x, t, encoder_hidden_states=cond).sample
        finally:
            accel.uncompile_unet(unet)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compile_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert accel.wants_compile("auto", cuda) and not accel.wants_compile("auto", cpu)
    assert accel.wants_compile("on", cpu) and not accel.wants_compile("off", cuda)
    with pytest.raises(CavError, match="--compile"):
        accel.wants_compile("yes", cpu)
