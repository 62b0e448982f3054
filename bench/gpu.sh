#!/usr/bin/env bash
# The device check: what one NVIDIA GPU can tell about this repository in at most 5 minutes of work,
# written as files into OUTDIR (never into the repository), with a table of every section in
# OUTDIR/summary.md (also printed at the end).
#
#   bash bench/gpu.sh OUTDIR                    # on a machine with a CUDA build of torch; python3, no network
#   bash bench/gpu.sh --cpu-smoke OUTDIR        # every section at a tiny size on the CPU (about a minute)
#   bash bench/gpu.sh --only c,e --limit c=200 OUTDIR    # some sections again, one with more time
#
# Sections, most valuable first, each a python3 process under its own time limit (`timeout`), so one
# that fails or hangs is reported as such and the next one runs:
#   a  30 s  device, versions, ceilings: bf16 matmul TFLOP/s, device copy GB/s    bench/gpu_device.py
#   b  90 s  the product's CUDA paths on the shipped miniature: sample.py (plain,  bench/gpu_smoke.py
#            --eta, --compile), train.py 2 steps plain and under torchrun --fsdp,
#            eval.harness on a two-question local task
#   c 110 s  the sampler at 8 x 2048 with Mistral-7B layers: s/step, phases,       bench/gpu_sampler.py
#            eager / compiled / guided, the released loop, 32 layers x 100 steps vs the paper's 77 s
#   d  25 s  which attention kernel each kind of SDPA call gets                    bench/gpu_attention.py
#   e  45 s  training MFU at L = 2048, self-conditioning on and off, 2 depths       bench/gpu_train.py
# Files in OUTDIR: summary.md; per section X: X.md (tables), X.json (figures), X.headline, X.log
# (its output and errors); b-logs/ (each run of section b). Scratch (run folders, compile caches)
# goes to a temporary folder that is removed at the end.
# Section b's training data: out/gpu-data of the repository when present (made by
# `python bench/gpu_data.py out/gpu-data` and carried to the device), else made in the scratch folder.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
usage() { sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
fail() { echo "gpu.sh: error: $*" >&2; exit 2; }

declare -A limit=([a]=30 [b]=90 [c]=110 [d]=25 [e]=45)
declare -A script=([a]=gpu_device [b]=gpu_smoke [c]=gpu_sampler [d]=gpu_attention [e]=gpu_train)
declare -A name=([a]=a-device [b]=b-smoke [c]=c-sampler [d]=d-attention [e]=e-train)
smoke=() only=abcde out=
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) smoke=(--cpu-smoke) ;;
        --only) [ $# -ge 2 ] || fail "--only needs section letters, e.g. --only a,c"
                only=${2//,/}; shift
                [[ "$only" =~ ^[a-e]+$ ]] || fail "--only $only: sections are the letters a to e" ;;
        --limit) [[ "${2:-}" =~ ^([a-e])=([0-9]+)$ ]] || fail "--limit wants X=SECONDS, X one of a to e"
                 limit[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *) [ -z "$out" ] || fail "one OUTDIR only (got $out and $1)"; out=$1 ;;
    esac
    shift
done
[ -n "$out" ] || fail "give the folder for the results: bash bench/gpu.sh [--cpu-smoke] OUTDIR"
out=$(realpath -m "$out")
case "$out/" in
    "$repo"/*) fail "OUTDIR $out is inside the repository: give a folder outside it (on the device: \$OUT)" ;;
esac
mkdir -p "$out" || fail "cannot make $out"
command -v python3 >/dev/null || fail "no python3 on PATH"

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || fail "cannot make a scratch folder"
trap 'rm -rf "$work"' EXIT
# nothing written into the repository: no bytecode, compile caches in the scratch folder; no network
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR="$work/inductor" TRITON_CACHE_DIR="$work/triton" HF_HOME="$work/hf"
cd "$work" || exit 2
rm -f "$out/status.tsv"

data="$repo/out/gpu-data"
if [ ! -f "$data/meta.json" ] && [[ "$only" == *b* ]]; then
    data="$work/data"
    python3 "$repo/bench/gpu_data.py" "$data" >"$out/data.log" 2>&1 ||
        echo "gpu.sh: could not make $data (see data.log)" >&2
fi
declare -A extra=([b]="--work $work --data $data")

section() {  # section X: runs X's script under its limit; appends its status to status.tsv
    local x=$1 t0=$SECONDS rc status
    echo "gpu.sh: section ${name[$x]} (limit ${limit[$x]} s)" >&2
    # shellcheck disable=SC2086  # extra[b] is two flag pairs
    timeout -k 10 "${limit[$x]}" python3 "$repo/bench/${script[$x]}.py" --out "$out" "${smoke[@]}" \
        --budget $((limit[$x] > 20 ? limit[$x] - 8 : limit[$x] * 2 / 3)) ${extra[$x]:-} >"$out/${name[$x]}.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMED OUT at ${limit[$x]} s" ;;
        1) status="FAILED (a part failed)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$x" "$status" $((SECONDS - t0)) >>"$out/status.tsv"
}

for x in a b c d e; do
    [[ "$only" == *$x* ]] && section "$x"
done

{
    device=$(cut -d: -f1 "$out/a-device.headline" 2>/dev/null || echo "unknown (section a did not run)")
    echo "# Device check: $device"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)," \
         "bash bench/gpu.sh ${smoke[*]}${smoke[*]:+ }(sections $only)"
    echo
    echo "| section | status | seconds | result | files |"
    echo "| --- | --- | --- | --- | --- |"
    while IFS=$'\t' read -r x status seconds; do
        head=$(head -n1 "$out/${name[$x]}.headline" 2>/dev/null || echo "(no result line: see ${name[$x]}.log)")
        echo "| ${name[$x]} | $status | $seconds | ${head//|//} | ${name[$x]}.md, ${name[$x]}.log |"
    done <"$out/status.tsv"
} >"$out/summary.md"
cat "$out/summary.md"
