"""Count approximations made again (cache misses) during the SmolLM2 plan, by format and step.
Run from the repository root: RM_OUT=/tmp/x.json [SPARSEC_CACHE_MB=805] python bench/results/2026-12-07-cpu-plancost/remakes.py"""
import sys, os, collections, atexit
sys.argv = ["frontier.py", "--model", "smollm2", "--metric", "kl", "--fingerprint", "cpu", "--tokens", "2x128",
            "--calib-batches", "4", "--budgets", "0.05", "--recovery", "none", "--plan-only", "--out", os.environ["RM_OUT"], "--reports", os.environ["RM_OUT"] + ".rep"]
sys.path.insert(0, "bench")
import sparsec.pipeline as P
misses = collections.Counter()
orig = P._remaker
def remaker(layer, cand, key):
    inner = orig(layer, cand, key)
    def remake():
        if key not in P._APPROXIMATIONS:
            import traceback
            fs=[f.name for f in traceback.extract_stack()]
            where=[n for n in fs if n in ('approximate','_approximate_layer','verify','fit_deferred','measure_alone','measure_current','select','probe_sensitivity','probe_unmeasured','evaluate_current')]
            misses[(cand.fmt, '/'.join(where[-3:]))] += 1
        return inner()
    return remake
P._remaker = remaker
atexit.register(lambda: print("REMADE", sum(misses.values()), sorted(misses.items(), key=lambda kv: -kv[1])[:40], flush=True))
import runpy
runpy.run_path("bench/frontier.py", run_name="__main__")
