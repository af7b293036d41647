#!/usr/bin/env bash
# The paper's evaluation of one model: the per-dataset table (its channel placement, niter 2000 for
# bacterial sets, per-image means; the human-consensus bound with a second annotator's masks) and the
# invariance benchmark of figure 3 (AP against Poisson noise, blur, downsampling, anisotropy, cell size
# and channel order).
#   scripts/eval_paper.sh [--smoke] MODEL TEST_DIR... [--second-annotator DIR]
#   e.g. scripts/eval_paper.sh runs/cpsam_paper/model.pt data/canonical/cellpose_cyto2_test data/canonical/tissuenet_test
# Outputs in runs/eval_paper/<model name>/{paper,invariance}/.
# --smoke: cyto_0 on two small folders of ../shared/data, three of the six degradations.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if [ "${1:-}" = "--smoke" ]; then
    out=runs/smoke/eval_paper
    "$PY" -m cpsam eval paper --model cyto_0 --data ../shared/data/bact_phase_neurips22 \
        ../shared/data/tissue_multiplex_neurips22 --out "$out/paper" --quiet
    exec "$PY" -m cpsam eval invariance --model cyto_0 --data ../shared/data/tissue_multiplex_neurips22 \
        --channels 2 3 --kinds poisson blur size --out "$out/invariance" --quiet
fi
if [ $# -lt 2 ]; then
    echo "usage: scripts/eval_paper.sh [--smoke] MODEL TEST_DIR... [--second-annotator DIR]" >&2
    exit 2
fi
model=$1; shift
data=() extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --second-annotator) extra+=(--second-annotator "$2"); shift ;;
        *) data+=("$1") ;;
    esac
    shift
done
out=runs/eval_paper/$(basename "${model%.*}")
"$PY" -m cpsam eval paper --model "$model" --data "${data[@]}" --out "$out/paper" "${extra[@]}"
for d in "${data[@]}"; do
    "$PY" -m cpsam eval invariance --model "$model" --data "$d" --out "$out/invariance/$(basename "$d")"
done
