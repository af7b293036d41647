#!/usr/bin/env bash
# The paper's training datasets as canonical folders under data/canonical/ (what
# scripts/configs/cpsam_paper.yaml reads), with `cpsam prep`: datasets with a public URL are
# downloaded (resumable, checksummed) into data/raw/NAME; the others must be placed there by hand
# (`cpsam prep list -v NAME` says where to get them and the layout it expects). Converted datasets
# (index.csv present) are kept; re-running continues where a run stopped.
#   scripts/prepare_paper_datasets.sh [--smoke] [--raw DIR] [--out DIR] [--workers N]
# --smoke: the same steps at toy scale without the network: a synthetic dataset and two real
# folders of ../shared/data converted with the `folder` source, then `cpsam prep info`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RAW=data/raw OUT=data/canonical WORKERS=4 SMOKE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --raw) RAW=$2; shift ;;
        --out) OUT=$2; shift ;;
        --workers) WORKERS=$2; shift ;;
        *) echo "prepare_paper_datasets.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$SMOKE" = 1 ]; then
    OUT=runs/smoke/canonical
    SHARED=../shared/data
    "$PY" -m cpsam prep synth "$OUT/synthetic" --n 4 --size 192 --diameter 24 --seed 0
    for folder in phase_ctc_U373 fluo_nuclei_deepcell2016; do
        if [ -d "$SHARED/$folder" ] && [ ! -f "$OUT/$folder/index.csv" ]; then
            "$PY" -m cpsam prep convert folder --raw "$SHARED/$folder" --out "$OUT/$folder" --split train
        fi
    done
    exec "$PY" -m cpsam prep info "$OUT"/*
fi

# prep name : canonical folder (cpsam_paper.yaml's data.train entries)
DATASETS="cyto2:cellpose_cyto2 nuclei:cellpose_nuclei tissuenet:tissuenet livecell:livecell omnipose:omnipose
yeaz:yeaz deepbacs:deepbacs neurips22:neurips22 monuseg:monuseg monusac:monusac cryonuseg:cryonuseg
nuinsseg:nuinsseg bccd:bccd cpm15:cpm tnbc:tnbc lynsec:lynsec ihc_tma:ihc_tma conic:conic pannuke:pannuke"
missing=()
for pair in $DATASETS; do
    name=${pair%%:*} folder=${pair##*:}
    if [ -f "$OUT/$folder/index.csv" ]; then
        echo "$folder: converted already ($OUT/$folder)"
        continue
    fi
    how=$("$PY" -m cpsam prep list | awk -v n="$name" '$1 == n {print $2}')
    if [ "$how" = download ]; then
        "$PY" -m cpsam prep download "$name" --out "$RAW/$name"
    elif [ ! -d "$RAW/$name" ]; then
        echo "$name: obtain it by hand into $RAW/$name (cpsam prep list -v $name)" >&2
        missing+=("$name")
        continue
    fi
    "$PY" -m cpsam prep convert "$name" --raw "$RAW/$name" --out "$OUT/$folder" --workers "$WORKERS"
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "not converted (place them in $RAW and run again): ${missing[*]}" >&2
    exit 1
fi
"$PY" -m cpsam prep info "$OUT"/*
