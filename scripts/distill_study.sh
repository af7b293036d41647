#!/usr/bin/env bash
# The distillation study: a teacher's outputs cached across GPUs, the student family distilled from the
# cache, and the evaluation table (students vs teacher and vs ground truth), then the speed benchmark.
#   scripts/distill_study.sh [--smoke] TEACHER IMAGES_DIR HELDOUT_DIR [GT_DIR] [key=value ...]
#   e.g. scripts/distill_study.sh runs/cpsam_paper/model.pt data/unlabeled data/heldout data/heldout_masks
# Outputs in runs/distill_study/: cache/, one run folder per student, eval/ (report.md, CSV, plots).
# GPUs: the cache is built by `accelerate launch` over every visible GPU (disjoint images per process);
# set NUM_PROCESSES (default: the number of GPUs, 1 without any). The students then train one after
# another (each one run folder; rerun the script to resume).
# --smoke: the same steps at toy scale on the CPU: cyto_0 on a few crops of ../shared/data, two
# students, a few steps each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
STUDENTS=${STUDENTS:-"cpnet-1-32 cpnet-1-32-64 cpnet-1-32-64-128 cpnet-1-32-64-128-256 fastnet-1-32-64-128-256 fastnet-1-r18"}

if [ "${1:-}" = "--smoke" ]; then
    shift
    out=runs/smoke/distill_study
    rm -rf "$out"
    "$PY" - "$out" <<'PYEOF'
import sys
from pathlib import Path
from eval.study import prepare_data
prepare_data(Path(sys.argv[1]), seed=0)
PYEOF
    data=$out/data
    "$PY" -m cpsam distill cache --teacher cyto_0 --images "$data/unlabeled" --out "$out/cache" --views 1 \
        --verify 1 --quiet
    for s in cpnet-1-32 fastnet-1-32-64; do
        "$PY" -m cpsam distill --student "$s" --out "$out/$s" --size-epochs 1 --quiet \
            kd.cache="$out/cache" schedule.epochs=1 schedule.samples_per_epoch=8 val.every_epochs=1 "$@"
    done
    exec "$PY" -m cpsam distill eval --teacher cyto_0 --student "$out/cpnet-1-32" --student "$out/fastnet-1-32-64" \
        --images "$data/heldout" --gt "$data/heldout_masks" --out "$out/eval" --quiet
fi
if [ $# -lt 3 ]; then
    echo "usage: scripts/distill_study.sh [--smoke] TEACHER IMAGES_DIR HELDOUT_DIR [GT_DIR] [key=value ...]" >&2
    exit 2
fi
teacher=$1 images=$2 heldout=$3; shift 3
gt=()
if [ $# -gt 0 ] && [ -d "$1" ]; then gt=(--gt "$1"); shift; fi
out=runs/distill_study
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
nproc=${NUM_PROCESSES:-$(( gpus > 0 ? gpus : 1 ))}
if [ "$nproc" -gt 1 ]; then
    launch=(accelerate launch --multi_gpu --num_processes "$nproc" -m cpsam)
else
    launch=("$PY" -m cpsam)
fi
"${launch[@]}" distill cache --teacher "$teacher" --images "$images" --out "$out/cache" --views "${VIEWS:-8}"
"$PY" -m cpsam distill cache --teacher "$teacher" --images "$images" --out "$out/cache" --views "${VIEWS:-8}" \
    --verify 8
args=() ckpts=()
for s in $STUDENTS; do
    "$PY" -m cpsam distill --student "$s" --out "$out/$s" kd.cache="$out/cache" "$@"
    args+=(--student "$out/$s/model.pt")
    ckpts+=(--student-checkpoint "$out/$s/model.pt")
done
"$PY" -m cpsam distill eval --teacher "$teacher" "${args[@]}" --images "$heldout" "${gt[@]}" --out "$out/eval"
"$PY" -m benchmarks.bench_students "${ckpts[@]}" --plot "$out/bench_students.png"
