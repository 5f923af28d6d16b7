"""The Wan rows of README's bases table and the memory estimates under it, from the shipped configs alone.

Counts: ``cav.wan.plan`` (adapters injected by peft into each base's transformer on the meta device); memory:
``cav.wan.memory.estimate`` for the T-LoRA stage (placement cav, one trained expert), bf16, 81 frames at the
base's native size, batch 1.

Run: ``PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/wan_plan_table.py`` (about 20 s on one core); prints the rows in
README's order and words (tests/test_scripts.py checks that README shows every line it prints).
"""

from __future__ import annotations

from cav.wan import checks, memory, plan, shipped

NAMES = {"wan2.1-t2v-1.3b": "Wan 2.1 T2V 1.3B", "wan2.1-t2v-14b": "Wan 2.1 T2V 14B",
         "wan2.2-ti2v-5b": "Wan 2.2 TI2V-5B",
         "wan2.2-t2v-a14b": "Wan 2.2 T2V-A14B (per trained expert, `--experts high`, `low` or `both`)"}  # README's order
NATIVE = {"wan2.2-ti2v-5b": (704, 1280)}  # the others: 480 × 832 (the 480p setting; 14B / A14B also run 720p)


def n(row) -> str:
    return f"{row['trainable_params']:,} in {row['modules']}"


if __name__ == "__main__":
    memory_rows = []
    order = list(NAMES)
    for hub, (_, name) in sorted(shipped.HUB_BASES.items(), key=lambda item: order.index(item[1][1])):
        t = shipped.read(hub, "transformer/config.json")
        table = plan.placement_table(t)
        motion = "; ".join(f"{p}: {n(table[p])}" for p in ("cav", "qk", "motiondirector"))
        heads = t["num_attention_heads"]
        print(f"| {NAMES[name]} | `--base {hub}` or its folder | wan (`WanTransformer3DModel`, umT5-XXL) | {motion}; "
              f"temporal-heads: ≤ cav ({t['num_layers']} blocks × {heads} heads, chosen on the clip) | "
              f"{n(table['s_lora'])} | {table['prompt_vectors']['trainable_params']:,} (4 × {t['text_dim']} prompt vectors) | `wan` |")
        experts = checks.experts_of(shipped.read(hub, "model_index.json"))
        h, w = NATIVE.get(name, (480, 832))
        cells = []
        for ckpt, off in ((False, False), (True, False), (True, True)):
            est = memory.estimate(t, shipped.read(hub, "vae/config.json"),
                                  shipped.read(hub, "text_encoder/config.json"),
                                  frames=81, height=h, width=w, trainable_params=table["cav"]["trainable_params"],
                                  n_experts=experts, checkpointing=ckpt, offload_frozen=off)
            cells.append(f"{est['gib']['train_peak']:.1f}")
        label = NAMES[name].split(" (")[0] + (" (both experts loaded)" if experts > 1 else "")
        memory_rows.append(f"| {label} | 81 × {h} × {w} ({est['tokens']:,} tokens) | {' | '.join(cells)} | "
                           f"{est['gib']['encode_phase']:.1f} |")
    print()
    print("| base | clip | no checkpointing | checkpointing | checkpointing + block swap (`--offload-frozen`) | umT5 phase |")
    print("|---|---|---|---|---|---|")
    print("\n".join(memory_rows))
