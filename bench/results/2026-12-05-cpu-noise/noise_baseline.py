import sys, os, torch, json, copy
sys.path.insert(0, "/work/main/samples")
import smollm2
torch.manual_seed(0)
model, tok = smollm2.load_model(torch.float32)
ctext, htext = smollm2.split(smollm2.load_text())
held = smollm2.token_batches(tok, htext, 1, 128)[:4]
with torch.no_grad():
    dense = [model(ids).logits for ids in held]
def figures(m):
    with torch.no_grad():
        outs = [m(ids).logits for ids in held]
    rows = [smollm2.next_token_figures(o, d, ids) for o, d, ids in zip(outs, dense, held)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
print("dense", figures(model))
for dt in (torch.bfloat16, torch.float16):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "layers." in n and p.dim() == 2: p.copy_(p.to(dt).float())
    print(dt, "weights", figures(m))
for rel in (0.01, 0.03):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "layers." in n and p.dim() == 2: p.add_(torch.randn(p.shape, generator=g) * p.std() * rel)
    print("noise", rel, figures(m))
