"""Does a toy Wan's transformer use its prompt?

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/toywan_prompt_probe.py FOLDER

For 4 noise latents at sigma 0.95 / 0.7 / 0.4: the relative L2 difference of the predicted velocity between prompts
differing in one word (colour, shape, motion) and between the prompt and "" (the pipeline's 512 zero-padded text
slots, as generation uses them); then, per block, the cross-attention mass that random queries put on the prompt's
real (non-padding) slots (uniform over 512 slots would be 10/512 = 0.02)."""
import sys, torch, numpy as np
from diffusers import WanPipeline

def probe(pipe, L=512, seed=0):
    tr = pipe.transformer.eval()
    enc = lambda t: pipe._get_t5_prompt_embeds(t, max_sequence_length=L, device=torch.device("cpu"), dtype=torch.float32)
    a = "a red circle moving left on a navy background"
    b = "a blue circle moving left on a navy background"
    c = "a red square moving left on a navy background"
    d = "a red circle moving up on a navy background"
    with torch.no_grad():
        ea, eb, ec, ed, e0 = [enc([t]) for t in (a, b, c, d, "")]
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 16, 3, 8, 8, generator=g)
        res = {}
        for s in (0.95, 0.7, 0.4):
            t = torch.full((4,), s * 1000.0)
            v = lambda e: tr(hidden_states=x, timestep=t, encoder_hidden_states=e.expand(4, -1, -1), return_dict=False)[0]
            va, vb, vc, vd, v0 = v(ea), v(eb), v(ec), v(ed), v(e0)
            n = va.norm()
            res[s] = dict(colour=float((va - vb).norm() / n), shape=float((va - vc).norm() / n),
                          motion=float((va - vd).norm() / n), uncond=float((va - v0).norm() / n))
        # cross-attn mass on real tokens, layer 0 and last, at sigma .7
        ntok = int((pipe.tokenizer([a], return_tensors="pt").attention_mask).sum())
        emb = tr.condition_embedder.text_embedder(ea)
        masses = []
        for blk in tr.blocks:
            at = blk.attn2
            k = at.norm_k(at.to_k(emb)).unflatten(2, (at.heads, -1))
            # query: use random unit-ish hidden state through norm2 approx: use to_q of random normal
            q = at.norm_q(at.to_q(torch.randn(1, 64, at.to_q.in_features, generator=g))).unflatten(2, (at.heads, -1))
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
            w = logits.softmax(-1)
            masses.append(round(float(w[..., :ntok].sum(-1).mean()), 4))
        return res, ntok, masses

if __name__ == "__main__":
    pipe = WanPipeline.from_pretrained(sys.argv[1])
    print(probe(pipe))
