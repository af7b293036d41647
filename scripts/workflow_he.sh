#!/usr/bin/env bash
# The user's workflow on H&E, end to end (docs/commands/workflow.md, measured in
# docs/results/distillation.md): cyto_0 fine-tuned on the labelled H&E images of ../shared/data, distilled
# on all H&E images as unlabeled data (their masks unused), every model scored on the held-out images.
#   scripts/workflow_he.sh [--smoke] [WORK]   (default WORK=runs/workflow_he; rerun to resume a step)
#   LINKS_ONLY=1 scripts/workflow_he.sh       builds WORK's image folders and stops
# --smoke: the same steps at toy scale (CPM-15 and GBM40 only, one epoch each, one view) in runs/smoke/.
# Held out: the distillation cache's own split of each H&E folder (--val-fraction 0.2 --seed 0), so no
# held-out image is seen by the fine-tuning, the teacher's labelling for training or the student.
# CryoNuSeg (partially annotated) is unlabeled data only: it is neither fine-tuned on nor scored.
# WORK/: pool/ (images only, one sub-folder per source), labelled/ (training images + masks), heldout/
# (images + masks), heldout_img/, teacher/, cache/, student/, seg_{cyto_0,teacher,student}/, evals/, report/,
# times.txt (wall seconds of each step, model loading included).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
SHARED=${SHARED:-../shared/data}
SCORED="he_miccai2015_cpm he_gbm40_emory he_monuseg_train"
UNLABELED_ONLY="he_cryonuseg_wip_partial"
FINETUNE=(log.progress=false); CACHE=(--verify 4); DISTILL=(); QUIET=()
if [ "${1:-}" = "--smoke" ]; then
    shift
    WORK=runs/smoke/workflow_he
    rm -rf "$WORK"
    SCORED="he_miccai2015_cpm he_gbm40_emory"; UNLABELED_ONLY=""; QUIET=(--quiet)
    FINETUNE=(--size-epochs 1 log.progress=false schedule.epochs=2 schedule.samples_per_epoch=8 val.every_epochs=2)
    CACHE=(--views 1 --verify 1 --quiet)
    DISTILL=(--size-epochs 1 --quiet schedule.epochs=1 schedule.samples_per_epoch=8 val.every_epochs=1)
else
    WORK=${1:-runs/workflow_he}
fi
if [ ! -d "$SHARED" ]; then
    echo "workflow_he.sh: $SHARED is absent; nothing to run" >&2
    [ ${#QUIET[@]} -gt 0 ] && exit 0   # the smoke run skips, as the tests do without ../shared
    exit 2
fi
mkdir -p "$WORK"

"$PY" - "$SHARED" "$WORK" "$SCORED" "$UNLABELED_ONLY" <<'PYEOF'
import sys
from pathlib import Path

from distill.pseudo_labels import list_source_images
from train.finetune import split_names

shared, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
scored, unlabeled_only = sys.argv[3].split(), sys.argv[4].split()
for folder in [*scored, *unlabeled_only]:
    (work / "pool" / folder).mkdir(parents=True, exist_ok=True)
    for image in sorted((shared / folder).glob("*_img.tif")):
        link = work / "pool" / folder / image.name
        if not link.exists():
            link.symlink_to(image)
for sub in ("labelled", "heldout", "heldout_img"):
    (work / sub).mkdir(exist_ok=True)
for folder, items in list_source_images(work / "pool").items():
    _, held_out = split_names([item.name for item in items], 0.2, 0)   # the cache's split (pseudo_label)
    if folder not in scored:
        continue
    for item in items:
        image = shared / folder / f"{item.name}_img.tif"
        links = {"heldout": [image, image.with_name(f"{item.name}_masks.tif")], "heldout_img": [image]} \
            if item.name in held_out else {"labelled": [image, image.with_name(f"{item.name}_masks.tif")]}
        for sub, sources in links.items():
            for source in sources:
                if not (work / sub / source.name).exists():
                    (work / sub / source.name).symlink_to(source)
PYEOF
[ -n "${LINKS_ONLY:-}" ] && exit 0

timed() {  # timed NAME COMMAND...: run once (skipped when WORK/NAME.done exists), wall seconds to times.txt
    local name=$1; shift
    [ -f "$WORK/$name.done" ] && return 0
    echo "workflow_he.sh: $name ... (progress: tail -f $WORK/$name.err)" >&2
    local t0; t0=$(date +%s.%N)
    "$@" > "$WORK/$name.log" 2> "$WORK/$name.err" || { echo "workflow_he.sh: $name failed, see $WORK/$name.err" >&2; exit 1; }
    echo "$name $(echo "$(date +%s.%N) - $t0" | bc) s" >> "$WORK/times.txt"
    touch "$WORK/$name.done"
}
timed finetune "$PY" -m cpsam finetune --model cyto_0 --images "$WORK/labelled" --out "$WORK/teacher" \
    --channels 0 0 "${FINETUNE[@]}"
timed cache "$PY" -m cpsam distill cache --teacher "$WORK/teacher" --images "$WORK/pool" --out "$WORK/cache" \
    --channels 0 0 --val-fraction 0.2 --seed 0 "${CACHE[@]}"   # the split the held-out folders above copy
timed distill "$PY" -m cpsam distill --out "$WORK/student" "${DISTILL[@]}" kd.cache="$WORK/cache"
mkdir -p "$WORK/evals"
for model in student teacher cyto_0; do
    spec=$model; [ "$model" = cyto_0 ] || spec=$WORK/$model
    timed "seg_$model" "$PY" -m cpsam segment --model "$spec" --input "$WORK/heldout_img" \
        --output "$WORK/seg_$model" --channels 0 0
    timed "eval_$model" "$PY" -m cpsam eval --pred "$WORK/seg_$model" --gt "$WORK/heldout" \
        --out "$WORK/evals/$model.csv" --quiet
done
timed distill_eval "$PY" -m cpsam distill eval --teacher "$WORK/teacher" --student "$WORK/student" \
    --images "$WORK/cache/data" --split val --channels 0 0 --gt "$SHARED" --out "$WORK/report" "${QUIET[@]}"
cat "$WORK/times.txt"
"$PY" - "$WORK/evals" <<'PYEOF'
import csv
import sys

print("held-out H&E, against the manual masks: model, images, ap@0.5, ap@0.75, manual objects, predicted")
for model in ("cyto_0", "teacher", "student"):
    row = list(csv.DictReader(open(f"{sys.argv[1]}/{model}_summary.csv")))[-1]   # the 'all' row
    print(f"{model:8s} {row['n_images']:>3s} {float(row['ap@0.5']):.3f} {float(row['ap@0.75']):.3f} "
          f"{row['n_true']:>5s} {row['n_pred']:>5s}")
PYEOF
