#!/usr/bin/env bash
# Everything minigpt2 claims on a GPU, in one command (at most ~8 minutes on one H100/H200):
#
#   bash benchmarks/gpu.sh            # on a CUDA machine
#   bash benchmarks/gpu.sh --dry-run  # the same parts on the CPU with tiny shapes, side by side (CI runs this)
#
# Parts, each under its own `timeout`, each writing its result to a file in $GPU_RESULTS
# (default: a new temporary folder):
#   checks        benchmarks/cuda_checks.py checks: loading, bf16, int8, compiled decoding, training
#   train         bench_train.py 16x1024 bf16 --compile, minigpt2 vs transformers and plain PyTorch (tokens/s, MFU)
#   sample        bench_sample.py batch 1 bf16 --compile, minigpt2 (float and int8) vs transformers
#   distributed   bench_distributed.py, 2 ranks (only with more than one GPU)
#   xl-memory     gpt2-xl, one training step, peak memory without / with activation checkpointing
# Then one table: part | tokens/s | MFU | vs transformers | peak memory | status (ok/timeout/failed).
# Needs torch and transformers only: random weights and tokens, no shared data, no tokenizer files.
set -u

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset MINIGPT2_SHARED_DATA  # the GPU machine has none; the same figures either way
OUT="${GPU_RESULTS:-$(mktemp -d -t minigpt2-gpu-XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"  # GPU images often have python3 only

if [ "$DRY" = 1 ]; then
    DEV=(--device cpu --dtype float32)
    TRAIN=(--shapes 1x32 --steps 1 --warmup 1 --layers 1 --vocab 1024)
    SAMPLE=(--layers 1 --vocab 1024 --new-tokens 4 --rounds 1 --no-cache-tokens 0)
    CHECKS=(--dry-run)
    XL=(--dry-run --preset gpt2-xl --shape 1x32)
    GPUS=1
    T_CHECKS=180 T_TRAIN=180 T_SAMPLE=180 T_DIST=180 T_XL=180
else
    DEV=(--device cuda --dtype bfloat16)
    TRAIN=(--shapes 16x1024 --steps 10 --warmup 3 --compile)
    SAMPLE=(--compile --new-tokens 200 --rounds 3 --no-cache-tokens 0)
    CHECKS=()
    XL=(--preset gpt2-xl --shape 4x1024)
    GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    T_CHECKS=120 T_TRAIN=150 T_SAMPLE=150 T_DIST=120 T_XL=60  # 540 s at most on one GPU
fi
echo "results in $OUT; $GPUS GPU(s); dry run: $DRY"

run_part() {  # run_part NAME SECONDS COMMAND...: log to NAME.log, exit status to NAME.status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$OUT/$name.status"
    tail -n 4 "$OUT/$name.log"
}

part() {  # a GPU measures one part at a time; the dry run's tiny parts go side by side (CI's time)
    if [ "$DRY" = 1 ]; then run_part "$@" & else run_part "$@"; fi
}

part checks "$T_CHECKS" "$PY" benchmarks/cuda_checks.py checks "${CHECKS[@]}" --json-out "$OUT/checks.json"
part train "$T_TRAIN" "$PY" benchmarks/bench_train.py "${DEV[@]}" "${TRAIN[@]}" --json-out "$OUT/train.json"
part sample "$T_SAMPLE" "$PY" benchmarks/bench_sample.py "${DEV[@]}" "${SAMPLE[@]}" --json-out "$OUT/sample.json"
if [ "$GPUS" -gt 1 ]; then
    part distributed "$T_DIST" "$PY" benchmarks/bench_distributed.py --device cuda --ranks 2 --preset gpt2 \
        --shape 16x1024 --dtype bfloat16
else
    echo "skipped: 1 GPU" >"$OUT/distributed.log"
    echo skipped >"$OUT/distributed.status"
fi
part xl-memory "$T_XL" "$PY" benchmarks/cuda_checks.py memory "${XL[@]}" --json-out "$OUT/xl-memory.json"
part xl-memory-ac "$T_XL" "$PY" benchmarks/cuda_checks.py memory "${XL[@]}" --activation-checkpointing \
    --json-out "$OUT/xl-memory-ac.json"
wait

"$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def status(name):
    code = (out / f"{name}.status").read_text().strip() if (out / f"{name}.status").is_file() else "missing"
    return {"0": "ok", "124": "timeout", "137": "timeout", "skipped": "skipped: 1 GPU"}.get(code, f"failed ({code})")


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


rows = []
c = load("checks")
rows.append(("checks", f"{c['passed']}/{c['total']} passed" if c else "-", "-", "-", "-", status("checks")))
t = load("train")
for shape, r in t.get("shapes", {}).items():
    rows.append((f"train {shape} minigpt2", fmt(r["minigpt2"]["tokens_per_s"], ",.0f"),
                 fmt(r["minigpt2"]["mfu"], ".1%"), fmt(r["ratios"]["transformers"], ".2f") + "x", "-", status("train")))
    rows.append((f"train {shape} transformers", fmt(r["transformers"]["tokens_per_s"], ",.0f"),
                 fmt(r["transformers"]["mfu"], ".1%"), "1.00x", "-", status("train")))
    plain = r["plain PyTorch"]
    rows.append((f"train {shape} plain PyTorch", fmt(plain["tokens_per_s"], ",.0f"), fmt(plain["mfu"], ".1%"),
                 fmt(r["ratios"]["transformers"] / r["ratios"]["plain PyTorch"], ".2f") + "x", "-", status("train")))
if not t:
    rows.append(("train", "-", "-", "-", "-", status("train")))
s = load("sample")
for name, rate in s.get("tokens_per_s", {}).items():
    ratio = s["ratio_to_transformers"].get(name, 1.0)
    rows.append((f"sample {name}", fmt(rate, ",.1f"), "-", f"{ratio:.2f}x", "-", status("sample")))
for name, why in s.get("failed", {}).items():
    rows.append((f"sample {name}", "-", "-", "-", "-", "failed: " + why.split("(")[0].strip()[:40]))
if s:
    q = s["int8_quality"]
    rows.append(("sample int8 quality", f"err {q['logits_error']:.2%}", "-", f"top-1 {q['top1_agreement']:.1%}", "-",
                 status("sample")))
else:
    rows.append(("sample", "-", "-", "-", "-", status("sample")))
log = (out / "distributed.log").read_text() if (out / "distributed.log").is_file() else ""
found = re.search(r"(\d+) ranks / 1 rank: ([\d.]+)x", log)
rows.append(("distributed 2 ranks", "-", "-", f"{found.group(2)}x vs 1 rank" if found else "-", "-",
             status("distributed")))
for name, label in (("xl-memory", "gpt2-xl 1 step"), ("xl-memory-ac", "gpt2-xl 1 step, act. ckpt")):
    m = load(name)
    rows.append((label, fmt(m.get("tokens_per_s"), ",.0f"), fmt(m.get("mfu"), ".1%"), "-",
                 fmt(m.get("peak_memory_gib"), ".2f") + " GiB" if m else "-", status(name)))

header = ("part", "tokens/s", "MFU", "vs transformers", "peak memory", "status")
widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
print()
print(line(header))
print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
for r in rows:
    print(line(r))
EOF
