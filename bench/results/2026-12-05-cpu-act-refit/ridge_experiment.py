"""Experiment: act:S on every block linear of SmolLM2, thresholds sequential, with/without a weight refit
to the sparsified inputs."""
import sys, json, time, math
sys.path.insert(0, "/work/main/samples")
import torch, torch.nn as nn, torch.nn.functional as F
import smollm2

S = float(sys.argv[1]) if len(sys.argv) > 1 else 0.4
LAM = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
NB = int(sys.argv[3]) if len(sys.argv) > 3 else 8
torch.manual_seed(0)
model, tok = smollm2.load_model(torch.float32)
model.eval()
ctext, htext = smollm2.split(smollm2.load_text())
calib = smollm2.token_batches(tok, ctext, 1, 128)[:NB]
held = smollm2.token_batches(tok, htext, 1, 128)[:4]
with torch.no_grad():
    dense = [model(ids).logits for ids in held]

def figures():
    with torch.no_grad():
        rows = [smollm2.next_token_figures(model(ids).logits, d, ids) for d, ids in zip(dense, held)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

print("dense", figures(), flush=True)
blocks = model.model.layers
stages = []
for b in blocks:
    a, m = b.self_attn, b.mlp
    stages += [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]]

class Stop(Exception):
    pass

def capture(lin):
    got = []
    def hook(mod, inp):
        got.append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
        raise Stop
    h = lin.register_forward_pre_hook(hook)
    with torch.no_grad():
        for ids in calib:
            try:
                model(ids)
            except Stop:
                pass
    h.remove()
    return torch.cat(got)

orig = {}
def patch(lin, t, w):
    orig.setdefault(lin, lin.forward)
    def fwd(x, lin=lin, t=t, w=w):
        return F.linear(torch.where(x.abs() >= t, x, torch.zeros_like(x)), w, lin.bias)
    lin.forward = fwd

def unpatch_all():
    for lin, f in orig.items():
        lin.forward = f
    orig.clear()

def run(mode):
    t0 = time.time()
    for stage in stages:
        X = capture(stage[0]) if mode != "oneshot" else None
        for lin in stage:
            if mode == "oneshot":
                continue
            t = torch.quantile(X.abs().flatten()[:: max(1, X.numel() // 2_000_000)], S).item()
            W = lin.weight.detach()
            if mode == "refit":
                Xs = torch.where(X.abs() >= t, X, torch.zeros_like(X)).double()
                G = Xs.T @ Xs
                lam = LAM * G.diagonal().mean()
                C = X.double().T @ Xs  # K x K: X^T S
                Wd = W.double()
                Wn = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), (Wd @ C + lam * Wd).T).T
                W = Wn.float()
            patch(lin, t, W)
    res = figures()
    unpatch_all()
    print(mode, S, LAM, NB, json.dumps(res), f"{time.time()-t0:.0f}s", flush=True)

def oneshot():
    # thresholds from dense inputs of every layer
    caps = {}
    hooks = []
    for stage in stages:
        for lin in stage:
            caps[lin] = []
            hooks.append(lin.register_forward_pre_hook(lambda mod, inp: caps[mod].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().flatten()[::7])))
    with torch.no_grad():
        for ids in calib:
            model(ids)
    for h in hooks: h.remove()
    for lin, v in caps.items():
        t = torch.quantile(torch.cat(v)[: 16_000_000], S).item()
        patch(lin, t, lin.weight.detach())
    res = figures(); unpatch_all()
    print("oneshot", S, json.dumps(res), flush=True)

for mode in sys.argv[4].split(",") if len(sys.argv) > 4 else ["oneshot", "sequential", "refit"]:
    oneshot() if mode == "oneshot" else run(mode)
