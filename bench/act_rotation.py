"""Does rotating a layer's inputs before thresholding them help ``act:S``? (LaRoSA's question.)

For every linear layer of SmolLM2-135M's 30 blocks, the calibration inputs X (from the dense
model) give two ways to skip a fraction S of the inputs:

* ``plain``: sparsec's ``act:S``, inputs whose magnitude is under the S-quantile of |X| are zero;
* ``rotated``: the inputs are first turned into the layer's principal axes (Q, the eigenvectors of
  X^T X: y = (x Q)(W Q)^T), and it is the rotated inputs that are thresholded. The best case for
  a rotation: one fitted to each layer's own inputs, its cost at run time ignored (an extra K x K
  product per token unless it can be folded into the layers before);
* ``rotated-gaussian``: as ``rotated``, the threshold taken from the Gram's eigenvalues alone (each
  rotated input a centred Gaussian of its axis' variance), as a planner could without a pass over
  the rotated inputs; every row gives the skip fraction realised on the held-out inputs;
* ``rotated-norm-fed``: the same, only for the layers fed by an RMSNorm (q, k, v, gate, up);
* ``rotated-gate-up``: the same, only for the gate and up projections (where one product with Q,
  shared by the two, costs less than the skipped inputs save);
* ``rotated-gate-up+o-heads``: gate and up as above, and the o projections in a rotation per
  key/value head that folds exactly into v's weight (free at run time);
* ``residual-axes``: the layers fed by an RMSNorm, in one rotation R for the whole model (the
  principal axes of the residual stream's normalised states, pooled over every block, each norm's
  scale g divided out: x = z g, y = (z R)(W diag(g) R)^T). A rotation of the residual stream that
  is folded into the embeddings and the layers writing to it (as SliceGPT and QuaRot do) gives
  exactly these inputs at no cost at run time.

Each is applied to every layer at once and the model read on held-out text: perplexity, KL of the
next-token distribution against the dense model, top-1 agreement; each layer's relative output
error on its held-out inputs (from the dense model); and the fraction of held-out inputs each
threshold actually skips. Compare ways at the same skipped fraction (``--thresholds heldout``): a
rotation fitted to the calibration rows concentrates their energy more than new text's, so a
threshold calibrated on them skips far less than S of new inputs (docs/accuracy.md).

    SPARSEC_MODEL_CACHE=... python bench/act_rotation.py --skips 0.4,0.5 --thresholds heldout --out act_rotation.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples"))
import smollm2  # noqa: E402


def block_linears(model):
    for i, block in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            yield f"model.layers.{i}.{name}", block.get_submodule(name)


def layer_inputs(model, linears, batches):
    """Each layer's inputs over ``batches`` (rows x K, float64), from the dense model."""
    got = {name: [] for name, _ in linears}
    hooks = [lin.register_forward_pre_hook(lambda mod, inp, name=name: got[name].append(
        inp[0].detach().reshape(-1, inp[0].shape[-1]).double())) for name, lin in linears]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in hooks:
        h.remove()
    return {name: torch.cat(rows) for name, rows in got.items()}


def head_rotations(model, X) -> dict:
    """For each o projection, a block-diagonal rotation with one head_dim x head_dim block per key/value
    head: the principal axes of the attention output slices of the query heads that share it. It
    folds exactly into v's weight (P (V Q_g) = (P V) Q_g), so it costs nothing at run time."""
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    out = {}
    for name, x in X.items():
        if not name.endswith("o_proj"):
            continue
        Q = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
        for kv in range(cfg.num_key_value_heads):
            heads = range(kv * group, (kv + 1) * group)
            pooled = sum(x[:, h * d:(h + 1) * d].T @ x[:, h * d:(h + 1) * d] for h in heads)
            axes = torch.linalg.eigh(pooled).eigenvectors
            for h in heads:
                Q[h * d:(h + 1) * d, h * d:(h + 1) * d] = axes
        out[name] = Q
    return out


def norm_scale(model, name: str):
    """The RMSNorm weight g whose output feeds layer ``name`` (q/k/v: the block's input norm, gate/up:
    its post-attention norm), float64; None for the layers fed otherwise (o, down)."""
    parts = name.split(".")
    block = model.model.layers[int(parts[2])]
    leaf = parts[-1]
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return block.input_layernorm.weight.detach().double()
    if leaf in ("gate_proj", "up_proj"):
        return block.post_attention_layernorm.weight.detach().double()
    return None


def gaussian_threshold(variances: torch.Tensor, skip: float) -> float:
    """The t at which inputs of these variances (one per rotated axis), each taken as a centred
    Gaussian, fall under t in magnitude a fraction ``skip`` of the time on average (bisection)."""
    sigma = variances.clamp_min(1e-30).sqrt()
    lo, hi = 0.0, float(sigma.max()) * 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float(torch.erf(mid / (sigma * math.sqrt(2.0))).mean()) < skip:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def threshold(values: torch.Tensor, skip: float) -> float:
    flat = values.abs().flatten()
    flat = flat[:: max(1, flat.numel() // 4_000_000)]
    return float(torch.quantile(flat.float(), skip))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skips", default="0.25,0.4,0.5")
    ap.add_argument("--calibration", default="8x128", help="BATCHESxLENGTH of calibration text")
    ap.add_argument("--heldout", default="4x128")
    ap.add_argument("--modes", default="plain,rotated,rotated-norm-fed,residual-axes")
    ap.add_argument("--thresholds", default="calibration", choices=["calibration", "heldout", "apart"],
                    help="the inputs each threshold is the S-quantile of (the rotations always come from calibration); "
                         "apart: calibration text the rotations were not fitted to (--apart)")
    ap.add_argument("--apart", default="8x128", help="BATCHESxLENGTH of calibration text after --calibration's")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = smollm2.load_model(torch.float32)
    ctext, htext = smollm2.split(smollm2.load_text())
    nc, lc = (int(v) for v in args.calibration.split("x"))
    nh, lh = (int(v) for v in args.heldout.split("x"))
    calib = smollm2.token_batches(tok, ctext, 1, lc)[:nc]
    held = smollm2.token_batches(tok, htext, 1, lh)[:nh]
    na, la = (int(v) for v in args.apart.split("x"))
    apart = smollm2.token_batches(tok, ctext, 1, la)[nc:nc + na] if args.thresholds == "apart" else []
    if args.thresholds == "apart" and len(apart) < na:
        ap.error(f"the calibration text holds {len(apart)} batches after the first {nc}, not {na}")
    linears = list(block_linears(model))
    with torch.no_grad():
        dense = [model(ids).logits for ids in held]
    X = layer_inputs(model, linears, calib)
    Xh = layer_inputs(model, linears, held)
    eig = {name: torch.linalg.eigh(X[name].T @ X[name]) for name, _ in linears}
    rotations = {name: e.eigenvectors for name, e in eig.items()}  # columns: the axes
    # the residual stream's own axes: every norm-fed input with its norm's scale divided out, pooled
    scales = {name: norm_scale(model, name) for name, _ in linears}
    pooled = sum((X[n] / scales[n]).T @ (X[n] / scales[n]) for n, _ in linears if scales[n] is not None)
    residual_axes = torch.linalg.eigh(pooled).eigenvectors
    figs = [smollm2.next_token_figures(d, d, ids) for d, ids in zip(dense, held)]
    heads = head_rotations(model, X)
    # the inputs thresholds are calibrated on: the calibration text, or (``--thresholds heldout``) the
    # held-out text itself, so that every way skips exactly S of the inputs it is judged on
    T = Xh if args.thresholds == "heldout" else layer_inputs(model, linears, apart) if args.thresholds == "apart" else X
    rows = [{"skip": 0.0, "mode": "dense", **{k: sum(r[k] for r in figs) / len(figs) for k in figs[0]},
             "layer_error_mean": 0.0, "layer_error_median": 0.0}]
    print(json.dumps(rows[0]), flush=True)
    for skip in (float(s) for s in args.skips.split(",") if s):
        for mode in (m for m in args.modes.split(",") if m):
            saved, errors, skipped = {}, [], []
            for name, lin in linears:
                W = lin.weight.detach().double()
                gate_up = name.endswith(("gate_proj", "up_proj"))
                by_head = mode == "rotated-gate-up+o-heads" and name.endswith("o_proj")
                rotate = (mode in ("rotated", "rotated-gaussian") or by_head
                          or (mode in ("rotated-norm-fed", "residual-axes") and scales[name] is not None)
                          or (mode in ("rotated-gate-up", "rotated-gate-up+o-heads") and gate_up))
                if rotate:
                    # y = (x Q)(W Q)^T; with the residual stream's axes x = z * g: y = (z R)(W diag(g) R)^T
                    g = scales[name] if mode == "residual-axes" else torch.ones(W.shape[1], dtype=W.dtype)
                    Q = residual_axes if mode == "residual-axes" else heads[name] if by_head else rotations[name]
                    if mode == "rotated-gaussian":  # from the Gram's eigenvalues alone: no pass over rotated inputs
                        t = gaussian_threshold(eig[name].eigenvalues / X[name].shape[0], skip)
                    else:
                        t = threshold((T[name] / g) @ Q, skip)
                    Wq = W * g[None, :] @ Q
                    Wqf, Qf, gf = Wq.float(), Q.float(), g.float()

                    def fwd(x, t=t, Wq=Wqf, Qf=Qf, g=gf, b=lin.bias):
                        xr = (x / g) @ Qf
                        return F.linear(torch.where(xr.abs() >= t, xr, torch.zeros_like(xr)), Wq, b)

                    xr = (Xh[name] / g) @ Q
                    kept = torch.where(xr.abs() >= t, xr, torch.zeros_like(xr))
                    err = ((xr - kept) @ Wq.T).norm() / (Xh[name] @ W.T).norm()
                    skipped.append(float((xr.abs() < t).double().mean()))
                else:
                    t = threshold(T[name], skip)

                    def fwd(x, t=t, w=lin.weight, b=lin.bias):
                        return F.linear(torch.where(x.abs() >= t, x, torch.zeros_like(x)), w, b)

                    xh = Xh[name]
                    err = ((xh - torch.where(xh.abs() >= t, xh, torch.zeros_like(xh))) @ W.T).norm() / (xh @ W.T).norm()
                    skipped.append(float((xh.abs() < t).double().mean()))
                errors.append(float(err))
                saved[lin] = lin.forward
                lin.forward = fwd
            with torch.no_grad():
                figs = [smollm2.next_token_figures(model(ids).logits, d, ids) for d, ids in zip(dense, held)]
            for lin, f in saved.items():
                lin.forward = f
            row = {"skip": skip, "mode": mode, **{k: sum(r[k] for r in figs) / len(figs) for k in figs[0]},
                   "layer_error_mean": sum(errors) / len(errors),
                   "layer_error_median": sorted(errors)[len(errors) // 2],
                   "heldout_skip_mean": sum(skipped) / len(skipped), "heldout_skip_min": min(skipped),
                   "heldout_skip_max": max(skipped)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "calibration": args.calibration, "heldout": args.heldout,
              "thresholds_from": args.thresholds, "apart": args.apart if args.thresholds == "apart" else None,
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'S':>5} {'mode':>8} {'perplexity':>10} {'KL':>7} {'top-1':>6} {'layer err (mean)':>16}")
    for r in rows:
        print(f"{r['skip']:>5} {r['mode']:>8} {r['perplexity']:>10.2f} {r['kl']:>7.3f} {r['top1_agreement']:>6.1%} "
              f"{r['layer_error_mean']:>16.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
