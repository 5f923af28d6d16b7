"""Eager vs compiled lean T-LoRA step on the CPU, alternating in pairs, wall and process CPU time per step.

    OMP_NUM_THREADS=1 python scripts/compile_pairs.py [full|tiny] [PAIRS] [layout-on]

``layout-on`` compiles with inductor's layout optimization (channels-last convolutions) as ``cav`` did before
``accel.compile_unet`` turned it off on the CPU. Prints each pair and the median eager/compiled ratios (JSON).
``cav bench speed --only t_lora_step_compiled`` measures the same pairs (wall time only).
"""

import json
import statistics
import sys
import time

import torch

from cav.bench import speed as S

size = sys.argv[1] if len(sys.argv) > 1 else "full"
pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
if "layout-on" in sys.argv[3:]:
    S.compile_unet = lambda unet, device: setattr(unet, "forward", torch.compile(
        type(unet).forward.__get__(unet), fullgraph=True))
rig = S._Rig(size, torch.device("cpu"), torch.float32)
step, teardown = rig.train(S.CAV, S.T_CAV, compiled=True)()
t0 = time.perf_counter()
step()
step()
print("compile + 2 warm-up steps", round(time.perf_counter() - t0, 1), "s", flush=True)
step.eager()
out = {"eager": [], "compiled": [], "eager_cpu": [], "compiled_cpu": []}
for i in range(pairs):
    sides = (("eager", step.eager), ("compiled", step))
    for name, fn in sides if i % 2 == 0 else sides[::-1]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        out[name].append(time.perf_counter() - wall)
        out[name + "_cpu"].append(time.process_time() - cpu)
    print(i, {k: round(v[-1], 3) for k, v in out.items()}, flush=True)
out["speedup_wall"] = statistics.median(e / c for e, c in zip(out["eager"], out["compiled"]))
out["speedup_cpu"] = statistics.median(e / c for e, c in zip(out["eager_cpu"], out["compiled_cpu"]))
teardown()
print(json.dumps(out, indent=1))
