"""Time pipeline.approximate (no deferral: every family) on SmolLM2, dump every candidate's error."""
import sys, time, os, json, collections
sys.argv = ["frontier.py", "--model", "smollm2", "--metric", "kl", "--fingerprint", "cpu", "--tokens", "2x128",
            "--calib-batches", "4", "--budgets", "0.05", "--recovery", "none", "--plan-only"]
sys.path.insert(0, "bench")
import sparsec.pipeline as P
import torch
orig = P.approximate
def timed(layers, options, defer=False):
    from sparsec.passes import lowrank, monarch
    times = collections.Counter()
    def wrap(mod, name):
        f = getattr(mod, name)
        def g(*a, **k):
            t = time.perf_counter(); r = f(*a, **k); times[name] += time.perf_counter() - t; return r
        setattr(mod, name, g)
    wrap(lowrank.LowRankHandler, "_factors"); wrap(monarch.MonarchHandler, "approximate")
    t = time.perf_counter()
    orig(layers, options, defer=False)
    dt = time.perf_counter() - t
    print(f"APPROXIMATE {dt:.1f} s", dict(times), flush=True)
    out = {l.site.name: [(cd.fmt, cd.predicted_error, cd.rejected_because) for cd in l.candidates if cd.predicted_error == cd.predicted_error] for l in layers}
    json.dump(out, open(os.environ.get("APPROX_OUT"), "w"))
    os._exit(0)
P.approximate = timed
import runpy
runpy.run_path("bench/frontier.py", run_name="__main__")
