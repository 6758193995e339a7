"""Forced 2:4 on SmolLM2's MLP layers, recovery full: 8x128 real calibration, plus N self-generated sequences."""
import sys, os, time, json, torch
sys.path.insert(0, "/work/main/samples"); sys.path.insert(0, "/work/main/bench")
import smollm2, sparsec
n_gen = int(sys.argv[1]); temp = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
torch.manual_seed(0)
model, tok = smollm2.load_model(torch.float32)
ctext, htext = smollm2.split(smollm2.load_text())
calib = [(ids,) for ids in smollm2.token_batches(tok, ctext, 1, 128)[:8]]
held = smollm2.token_batches(tok, htext, 1, 128)[:4]
t0 = time.time()
gen = []
if n_gen:
    prompts = torch.cat([c[0][:, :16] for c in calib])  # 8 prompts of 16 tokens
    reps = (n_gen + 7) // 8
    with torch.no_grad():
        for r in range(reps):
            out = model.generate(prompts, max_new_tokens=112, min_new_tokens=112, do_sample=True, temperature=temp, top_k=0, top_p=1.0,
                                 pad_token_id=tok.eos_token_id)
            gen += [(row[None, :128].clone(),) for row in out]
    gen = gen[:n_gen]
print("generated", len(gen), "in", round(time.time() - t0, 1), "s", flush=True)
print(tok.decode(gen[0][0][0][:60]) if gen else "")
with torch.no_grad():
    dense = [model(ids).logits for ids in held]
t0 = time.time()
result = sparsec.optimize(model, calib[0], calibration=calib + gen, fingerprint="cpu", error_budget=1e9, metric="kl",
                          output="logits", recovery="full", plan={"layers": {r"re:.*layers\.\d+\.mlp\..*": "2:4", "_default": "dense"}})
secs = time.time() - t0
with torch.no_grad():
    figs = [smollm2.next_token_figures(result.module(ids).logits, d, ids) for d, ids in zip(dense, held)]
row = {k: sum(f[k] for f in figs) / len(figs) for k in figs[0]}
row.update(n_gen=n_gen, temp=temp, seconds=round(secs, 1))
print(json.dumps(row), flush=True)
print(json.dumps(result.report.to_dict().get("planning", {}).get("recovery", {}).get("distillation", {}), default=str)[:1500])
