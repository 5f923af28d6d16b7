"""Diagnose the full-size T-LoRA training step (cav T-LoRA + frozen S-LoRA on the random-weight ModelScope UNet).

    python scripts/profile_step.py base [full|tiny]     # cudnn.benchmark off vs on, issue vs wall time, top kernels
    python scripts/profile_step.py compile [full|tiny]  # torch.compile: first (compiling) step and steady step

Prints the profiler table and one ``RESULT`` JSON line. On a CPU the latent is the small test one.
"""
import sys, time, json, torch
from cav.bench import speed as S
from cav.accel import compile_unet
from cav.adapters import lora
from cav.trainer import diffusion_loss
from diffusers import DDPMScheduler
mode = sys.argv[1]  # base | compile
size = sys.argv[2] if len(sys.argv) > 2 else "full"
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
gen = torch.Generator().manual_seed(0)
unet = S._build_unet(size, dev, dt, gen)
lora.add_lora(unet, "t", lora.lora_config("temporal", "cav", 4, 1.0))
lora.add_lora(unet, "s", lora.lora_config("spatial", "cav", 1, 0.5))
lora.activate(unet, ["t", "s"], trainable="t")
params = lora.lora_parameters(unet, "t")
opt = torch.optim.AdamW(params, lr=1e-4)
shape = S.PAPER_LATENT if size == "full" and dev.type == "cuda" else S.TINY_LATENT
lat = torch.randn(shape, generator=gen).to(dev, dt)
cond = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen).to(dev, dt)
sch = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
g = torch.Generator().manual_seed(0)
def step():
    loss = diffusion_loss(unet, sch, lat, cond, g, False, dt if dt != torch.float32 else None)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
def timeit(n=5, warm=2):
    for _ in range(warm): step()
    sync(); ts = []
    for _ in range(n):
        t = time.perf_counter(); step(); sync(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]
out = {}
if mode == "base":
    torch.backends.cudnn.benchmark = False
    out["step_s_default"] = timeit()
    torch.backends.cudnn.benchmark = True
    out["step_s_cudnn_benchmark"] = timeit()
    # CPU-bound check: time to *issue* a forward without sync vs synced
    with torch.no_grad(), torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
        t_ = torch.tensor([500], device=dev)
        for _ in range(2): unet(lat, t_, encoder_hidden_states=cond)
        sync(); t = time.perf_counter(); unet(lat, t_, encoder_hidden_states=cond); issue = time.perf_counter() - t
        sync(); out["fwd_issue_s"] = issue; out["fwd_total_s"] = time.perf_counter() - t
    from torch.profiler import profile, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2): step()
        sync()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60), flush=True)
    ev = prof.key_averages()
    out["profiled_kernel_gpu_s_per_step"] = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 2e6
else:
    torch.backends.cudnn.benchmark = True
    t = time.perf_counter()
    compile_unet(unet)
    step(); sync(); out["compile_first_step_s"] = time.perf_counter() - t
    out["step_s_compiled"] = timeit()
print("RESULT", mode, json.dumps(out), flush=True)
