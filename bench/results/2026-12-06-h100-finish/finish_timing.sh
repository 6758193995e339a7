# Run while the fused finish existed (commits 1fc9820 to 81d3881, SPARSEC_SPLIT_FINISH=fused); it was removed after this measurement.
export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; cd bench && timeout 230 python3 - <<'PY' 2>&1 | tee $OUT/finish.log
import os, math, torch, json
from kernel_bench import make_packed, time_calls, ROTATE_BYTES, MAX_COPIES
from small_m import path_call
from sparsec.codegen.packed import Packed
dev = torch.device("cuda"); gen = torch.Generator(device=dev).manual_seed(3); dt = torch.bfloat16
print(torch.cuda.get_device_name(), torch.__version__)
rows = []
for N, K in ((14336, 4096), (4096, 14336)):
    for M in (2, 16):
        w = (torch.randn(N, K, generator=gen, device=dev) / math.sqrt(K)).to(dt)
        copies = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / (N * K * 2))))
        ws = [w] + [w.clone() for _ in range(copies - 1)]
        xs = [torch.randn(M, K, generator=gen, device=dev).to(dt) for _ in range(copies)]
        dense = time_calls([lambda x=x, w=w: torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)], dev, 30)
        for spec in ("2:4", "block:64:0.25"):
            one = make_packed(spec, N, K, dt, dev, gen)
            c2 = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / one.nbytes)))
            packs = [one] + [Packed(one.spec, one.shape, {k: v.clone() for k, v in one.tensors().items()}) for _ in range(c2 - 1)]
            xs2 = [torch.randn(M, K, generator=gen, device=dev).to(dt) for _ in range(c2)]
            for fin in ("launch", "fused"):
                os.environ["SPARSEC_SPLIT_FINISH"] = fin
                us = time_calls([path_call(spec, "dot_split", x, p) for x, p in zip(xs2, packs)], dev, 30)
                r = dict(N=N, K=K, M=M, spec=spec, finish=fin, us=us, dense_us=dense, x=dense / us)
                rows.append(r); print(json.dumps(r), flush=True)
json.dump(rows, open(os.environ["OUT"] + "/finish.json", "w"), indent=1)
PY
