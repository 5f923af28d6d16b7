"""Block swap on a tiny Wan (CPU as both devices): same output and LoRA gradients, each block on the compute device
only for its use, at most two blocks there at once."""

import pytest
import torch

from cav.adapters.lora import activate, lora_parameters
from cav.wan import targets
from cav.wan.offload import is_adapter, swap_transformer_blocks
from cav.wan.tiny import TinyWanSpec, build_transformer


def _model(layers=4):
    model = build_transformer(TinyWanSpec(layers=layers), seed=0)
    targets.add_motion_lora(model, "t_lora")
    targets.add_absorber_lora(model, "s_lora")  # frozen here: an adapter weight, it stays on the compute device
    activate(model, ["s_lora", "t_lora"], trainable="t_lora")
    with torch.no_grad():  # LoRAs that do something (lora_B starts at zero)
        for p in lora_parameters(model, "t_lora") + lora_parameters(model, "s_lora"):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def _inputs(spec=TinyWanSpec()):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, spec.z_dim, 3, 4, 4, generator=g), torch.tensor([500.0]),
            torch.randn(1, 6, spec.text_dim, generator=g))


def _step(model, checkpointing=False):
    if checkpointing:
        model.enable_gradient_checkpointing()
    out = model(*_inputs(), return_dict=False)[0]
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class Recorder:
    def __init__(self):
        self.events, self.resident, self.bad = [], set(), []

    def __call__(self, event, i):
        self.events.append((event, i))
        if event == "in":
            self.resident.add(i)
        elif event == "out":
            self.resident.discard(i)
        elif i not in self.resident:
            self.bad.append((event, i))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_gives_the_same_output_and_lora_gradients(checkpointing):
    ref_out, ref_grads = _step(_model(), checkpointing)
    model, rec = _model(), Recorder()
    swap = swap_transformer_blocks(model, "cpu", "cpu", recorder=rec)
    out, grads = _step(model, checkpointing)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    assert rec.bad == []                       # every use happened while the block was in
    assert swap.peak <= 2 and max(len(rec.resident), 0) <= 2
    uses = [i for e, i in rec.events if e == "use"]
    n = len(model.blocks)
    assert uses[:n] == list(range(n))          # forward in order ...
    assert set(uses[n:]) == set(range(n))      # ... then backward needed every block again
    assert uses[n:][0] == n - 1 and uses[-1] == 0
    if checkpointing:  # the checkpoint's recompute reruns each block once, downwards; no weight is unpacked
        assert uses[n:] == list(range(n - 1, -1, -1))
    else:                # each block's saved weights are unpacked (several per block), blocks in descending order
        assert len(uses) > 2 * n and uses[n:] == sorted(uses[n:], reverse=True)
    swap.release_all()
    assert swap.resident == set()
    swap.detach()


def test_weights_are_not_kept_alive_by_autograd():
    """After forward only ≤ 2 blocks' frozen weights sit on the compute device: backward refers to the others by
    reference (their saved weights are packed), so releasing a block really frees its device copy."""
    model, rec = _model(), Recorder()
    swap = swap_transformer_blocks(model, "cpu", "cpu", recorder=rec)
    block_ptrs = {}
    out = model(*_inputs(), return_dict=False)[0]
    for i in range(len(model.blocks)):
        block_ptrs[i] = {p.untyped_storage().data_ptr() for n, p in model.blocks[i].named_parameters()
                         if not p.requires_grad and not is_adapter(n)}
    homes = {s[2].untyped_storage().data_ptr() for slots in swap._slots for s in slots}
    released = [i for i in range(len(model.blocks)) if i not in swap.resident]
    assert released and all(block_ptrs[i] <= homes for i in released)  # released blocks point at their home copy
    out.square().mean().backward()
    swap.detach()


def test_frozen_parameters_land_back_and_lora_never_moves():
    model = _model()
    lora_ids = {n: p.data_ptr() for n, p in model.named_parameters() if is_adapter(n)}  # trainable and frozen
    assert any(not p.requires_grad for n, p in model.named_parameters() if n in lora_ids)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    swap = swap_transformer_blocks(model, "cpu", "cpu")
    _step(model)
    assert {n: p.data_ptr() for n, p in model.named_parameters() if is_adapter(n)} == lora_ids
    swap.detach()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[n]), n
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in lora_ids)


def test_inference_needs_no_hooks_on_saved_tensors():
    model, rec = _model(), Recorder()
    ref = model(*_inputs(), return_dict=False)[0]
    swap = swap_transformer_blocks(model, "cpu", "cpu", recorder=rec)
    with torch.no_grad():
        out = model(*_inputs(), return_dict=False)[0]
    assert torch.equal(out, ref.detach()) and rec.bad == [] and swap.peak <= 2
    swap.detach()


def test_a_failing_forward_leaves_no_hooks_behind():
    model = _model()
    swap = swap_transformer_blocks(model, "cpu", "cpu")

    def fail(*args):
        raise RuntimeError("inside block 1")

    handle = model.blocks[1].ffn.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="inside block 1"):
        model(*_inputs())
    handle.remove()
    assert swap._hooks == [] and not torch._C._autograd._top_saved_tensors_default_hooks(False)
    out, _ = _step(model)  # and the next step works
    assert torch.isfinite(out).all()
    swap.detach()


def test_a_frozen_lora_folds_through_the_swap_block_by_block():
    """``lean.FrozenMerge(..., swaps)``: the S-LoRA folded into the blocks' home copies through ``BlockSwap.edit``
    gives the forward of the unswapped fold, bit for bit; restoring gives the exact base weights back; never more
    than one block on the compute device while folding (``Residency``), and none left there after it."""
    from cav import lean

    ref_model = _model()
    with lean.FrozenMerge(ref_model, ["s_lora"]).merged(), torch.no_grad():
        ref = ref_model(*_inputs(), return_dict=False)[0]
    model = _model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    swap = swap_transformer_blocks(model, "cpu", "cpu")
    folding = lean.FrozenMerge(model, ["s_lora"], {"transformer": swap})
    folding.merge()
    assert swap.residency.peak == 1 and swap.resident == set() and swap.on_device() == set()
    with torch.no_grad():
        out = model(*_inputs(), return_dict=False)[0]
    assert torch.equal(out, ref)
    folding.restore()
    swap.detach()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), base[n]), n
