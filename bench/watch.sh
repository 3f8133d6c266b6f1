#!/usr/bin/env bash
# filepipe watch-mode benchmark: publish latency, burst throughput against batch,
# SIGSTOP/SIGCONT catch-up (exactly once), idle CPU and peak memory.
#
# usage: bench/watch.sh [--quick] [FILEPIPE_BIN]
#
#   FILEPIPE_BIN  filepipe binary (default: <repo>/target/release/filepipe)
#   --quick       small sizes, no waiting for a quiet machine: a smoke test of
#                 the harness (well under a minute); its numbers mean little.
#
# Environment:
#   BENCH_DIR     work dir root (default /var/tmp/filepipe-bench; this uses BENCH_DIR/watch,
#                 ~0.5 GB for the full run)
#   LOAD_MAX      wait before each scenario until the 1-minute load is below this (default 0.7)
#   LOAD_WAIT     ... but at most this many seconds (default 180; --quick: 0)
#   FP_JOBS       --jobs for every filepipe call (default: filepipe's own default)
#   SCENARIOS     comma list of latency,burst,sigstop,idle (default: all)
#   STRICT=1      exit 1 if any target FAILs (default: only harness errors make
#                 the exit status non-zero, and then it is 2)
#
# The heavy lifting (load generation, timing) is bench/watch_load.py; its module
# docstring says exactly how each figure is timed.
set -euo pipefail

die() { echo "watch.sh: $*" >&2; exit 2; }
log() { printf '\n==> %s\n' "$*" >&2; }
usage() { sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$SCRIPT_DIR")
LOAD_PY=$SCRIPT_DIR/watch_load.py

QUICK=0
BIN=""
while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) [[ -z $BIN ]] || die "only one FILEPIPE_BIN may be given"; BIN=$1 ;;
    esac
    shift
done
BIN=${BIN:-$REPO_ROOT/target/release/filepipe}
[[ -x $BIN && -f $BIN ]] || die "filepipe binary not found or not executable: $BIN (build it with 'cargo build --release' or pass its path)"
BIN=$(realpath -- "$BIN")
command -v python3 >/dev/null || die "python3 is required"
for tool in cp tar sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is required"
done

BENCH_DIR=${BENCH_DIR:-/var/tmp/filepipe-bench}
BASE=$BENCH_DIR/watch
if ((QUICK)); then
    WORK=$BASE/quick
    LOAD_WAIT=${LOAD_WAIT:-0}
    LAT_FILES=60 BURST_FILES=5000 BURST_DIRS=10 STOP_FILES=2000 IDLE_FILES=1000 IDLE_SECS=3 BATCH_RUNS=1 DROP_RUNS=1
else
    WORK=$BASE/full
    LOAD_WAIT=${LOAD_WAIT:-180}
    LAT_FILES=300 BURST_FILES=100000 BURST_DIRS=100 STOP_FILES=20000 IDLE_FILES=10000 IDLE_SECS=10 BATCH_RUNS=5 DROP_RUNS=5
fi
LOAD_MAX=${LOAD_MAX:-0.7}
SCENARIOS=${SCENARIOS:-latency,burst,sigstop,idle}
RES=$WORK/results
mkdir -p "$WORK" "$RES"
rm -f "$RES"/*.json

COMMON=(--bin "$BIN" --work "$WORK" --load-max "$LOAD_MAX" --load-wait "$LOAD_WAIT")
[[ -z ${FP_JOBS:-} ]] || COMMON+=(--jobs "$FP_JOBS")

STARTED=$SECONDS
HARNESS_ERRORS=0
RESULTS=()

# run NAME SUBCOMMAND ARGS...: one scenario, its JSON in $RES/NAME.json.
run() {
    local name=$1
    shift
    [[ ,$SCENARIOS, == *,"${name%%-*}",* ]] || return 0
    log "$name (load $(cut -d' ' -f1-3 /proc/loadavg))"
    local rc=0
    python3 "$LOAD_PY" "$@" "${COMMON[@]}" >"$RES/$name.json" || rc=$?
    if ((rc != 0)); then
        echo "watch.sh: scenario $name could not run (status $rc); see $RES/$name.json" >&2
        HARNESS_ERRORS=$((HARNESS_ERRORS + 1))
        [[ -s $RES/$name.json ]] || echo "{\"scenario\": \"$name\", \"error\": \"status $rc, no output\"}" >"$RES/$name.json"
    fi
    RESULTS+=("$RES/$name.json")
}

run latency-100 latency --files "$LAT_FILES" --rate 50 --size 16384 --settle 100
run latency-300 latency --files "$LAT_FILES" --rate 50 --size 16384 --settle 300
run burst burst --files "$BURST_FILES" --dirs "$BURST_DIRS" --batch-runs "$BATCH_RUNS" --drop-runs "$DROP_RUNS"
run sigstop sigstop --files "$STOP_FILES" --dirs 20
run idle idle --files "$IDLE_FILES" --seconds "$IDLE_SECS"

((${#RESULTS[@]})) || die "no scenario selected (SCENARIOS=$SCENARIOS)"

# The machine, for the report.
MACHINE=$RES/machine.md
{
    echo "- mode: $( ((QUICK)) && echo quick || echo full), took $((SECONDS - STARTED)) s"
    echo "- filepipe: $BIN ($("$BIN" --version 2>/dev/null || echo '?'))"
    echo "- machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
    echo "- file system of $WORK: $(df -PT "$WORK" | awk 'NR==2 {print $2}'); fs.inotify.max_queued_events $(cat /proc/sys/fs/inotify/max_queued_events)"
    echo "- load average (1/5/15) at the end: $(cut -d' ' -f1-3 /proc/loadavg); before each scenario: see the table (waited for 1-min < $LOAD_MAX, at most ${LOAD_WAIT} s)"
    echo "- raw results: $RES/*.json"
} >"$MACHINE"

FAILS=0
python3 "$LOAD_PY" report "${RESULTS[@]}" --machine "$MACHINE" | tee "$RES/summary.md"
FAILS=$(grep -c '| FAIL |' "$RES/summary.md" || true)

if ((HARNESS_ERRORS)); then
    exit 2
fi
if [[ ${STRICT:-0} == 1 ]] && ((FAILS)); then
    exit 1
fi
exit 0
