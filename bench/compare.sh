#!/usr/bin/env bash
# filepipe side-by-side benchmark against standard tools.
#
# usage: bench/compare.sh [--quick] [FILEPIPE_BIN]
#
#   FILEPIPE_BIN  filepipe binary (default: <repo>/target/release/filepipe)
#   --quick       tiny corpora and 2 runs: a smoke test of the harness
#                 (well under a minute); its numbers mean nothing.
#
# Environment:
#   BENCH_DIR     where corpora, outputs and results live
#                 (default /var/tmp/filepipe-bench; needs ~4 GB free for the full run)
#   RUNS          timed runs per command (default 5; --quick: 2)
#   FP_ARGS       extra arguments appended to every filepipe invocation
#                 (e.g. FP_ARGS="--jobs 2")
#   STRICT=1      exit 1 if any target FAILs (default: only harness errors
#                 make the exit status non-zero)
#   COLD=1        also run the incremental scenario with the page cache dropped
#                 before every run (needs root; drops the whole machine's cache)
#   ONLY=ID[,ID]  run only these scenarios (the IDs in the report's first column,
#                 e.g. ONLY=gzip_src); the corpora are still all made and warmed
#
# See bench/README.md for what is measured and how to read the report.
set -euo pipefail

die() { echo "compare.sh: $*" >&2; exit 2; }
log() { printf '\n==> %s\n' "$*" >&2; }

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$SCRIPT_DIR")

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

# /var/tmp, not /tmp: /tmp is a tmpfs on many systems (flushes are free there, so the durable
# scenarios would measure nothing of a disk), and where it is not, it is where test suites make
# and remove their trees: on ext4 without a journal, file creation there is slower for minutes
# after (the inode allocator skips inodes freed lately), by the same time per file for every
# tool, which lowers the ratio of the faster one (BENCHMARKS.md, session 48).
BENCH_DIR=${BENCH_DIR:-/var/tmp/filepipe-bench}
if ((QUICK)); then
    BASE=$BENCH_DIR/quick
    RUNS=${RUNS:-2}
else
    BASE=$BENCH_DIR/full
    RUNS=${RUNS:-5}
fi
CORPUS=$BASE/corpus    # read-only inputs (gen_corpus.py output)
WORK=$BASE/work        # outputs, manifests, the peer's copy of text/
RES=$BASE/results      # hyperfine JSON, time -v output, summary.md
read -r -a FP_EXTRA <<<"${FP_ARGS:-}"
FP_EXTRA_STR=${FP_ARGS:+ ${FP_ARGS}}

# ---------------------------------------------------------------------------
# 1. Peers
# ---------------------------------------------------------------------------
install_missing() {
    local pkgs=()
    command -v rhash >/dev/null || pkgs+=(rhash)
    command -v pigz >/dev/null || pkgs+=(pigz)
    command -v hyperfine >/dev/null || pkgs+=(hyperfine)
    [[ -x /usr/bin/time ]] || pkgs+=(time)
    command -v python3 >/dev/null || pkgs+=(python3)
    command -v gzip >/dev/null || pkgs+=(gzip)
    command -v strace >/dev/null || pkgs+=(strace)
    command -v b3sum >/dev/null || pkgs+=(b3sum)
    command -v zstd >/dev/null || pkgs+=(zstd)
    ((${#pkgs[@]})) || return 0
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root or sudo to install: ${pkgs[*]}"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null || die "apt-get not available; install manually: ${pkgs[*]}"
    log "installing missing tools: ${pkgs[*]}"
    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
        "${sudo[@]}" apt-get update -qq
    fi
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"; then
        "${sudo[@]}" apt-get update -qq
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
    fi
}
install_missing

mkdir -p "$CORPUS" "$WORK" "$RES"
rm -f "$RES"/*.json "$RES"/*.tsv "$RES"/fails.txt "$RES"/*.time "$RES"/summary.md

# ---------------------------------------------------------------------------
# 2. Corpora (skipped when already generated), cache warm-up
# ---------------------------------------------------------------------------
log "generating corpora in $CORPUS"
gen_args=("$CORPUS")
((QUICK)) && gen_args+=(--quick)
python3 "$SCRIPT_DIR/gen_corpus.py" "${gen_args[@]}"

if [[ $(df --output=fstype "$CORPUS" | tail -1) == tmpfs ]]; then
    echo "warning: $BASE is on a tmpfs: flushes cost nothing there, so the gzip_src scenario measures no disk (set BENCH_DIR)" >&2
fi
need_kb=$(du -sk "$CORPUS" | cut -f1)
mem_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
if ((need_kb * 2 > mem_kb)); then
    echo "warning: corpora ($((need_kb / 1024)) MiB) + outputs may not fit in page cache ($((mem_kb / 1024)) MiB available); timings will include disk I/O" >&2
fi

# Outputs of earlier runs are moved aside, never deleted between timed runs: on ext4 without
# a journal (this machine's) the inode allocator skips inodes freed in the last 60-300 s,
# looking at each one's inode block, so every file a run created cost more for each file the
# run before had deleted. That taxed both tools per file created, on top of their own work
# (filepipe's text tree took 1.7 s instead of 1.0 s in one session). TRASH is removed at exit.
TRASH=$WORK/trash
mkdir -p "$TRASH"
trap 'rm -rf "$TRASH"' EXIT
aside() { for p in "$@"; do [[ -e $p ]] && mv "$p" "$(mktemp -d -p "$TRASH")"; done; return 0; }
aside "$WORK/text-peer" "$WORK/ztext-peer" "$WORK"/src-* "$WORK"/fp-* "$WORK"/*.gz "$WORK"/*.zst "$WORK"/*.manifest "$WORK"/*.b3
# The peer gzip writes next to its inputs, so it gets its own tree of hard links to text/
# (gzip -f compresses hard-linked files; no inode is created or freed by the copy). So does
# the peer zstd.
cp -al "$CORPUS/text" "$WORK/text-peer"
cp -al "$CORPUS/text" "$WORK/ztext-peer"

log "warming the page cache"
for d in "$CORPUS"/{small,large,text,src,one,onebin,huge} "$WORK/text-peer"; do
    find "$d" -type f -print0 | xargs -0 -n 4096 cat >/dev/null
done

cd "$CORPUS"
NFILES_TEXT=$(find text -type f | wc -l)

# ---------------------------------------------------------------------------
# 3. Helpers
# ---------------------------------------------------------------------------
SPEC=$RES/spec.tsv     # scenario \t title \t index \t name \t target
FACTS=$RES/facts.tsv   # key \t value
HARNESS_ERRORS=0
: >"$SPEC"
: >"$FACTS"
fact() { printf '%s\t%s\n' "$1" "$2" >>"$FACTS"; }

# bench ID TITLE [-p PREPARE]... -- NAME TARGET CMD [NAME TARGET CMD]...
#   The first command is always filepipe (the baseline). TARGET is the
#   minimum peer/filepipe ratio, "base" for filepipe and "ref" for
#   reference-only rows. NAME is what the report (and hyperfine) shows.
#   If the run fails (e.g. filepipe exits non-zero), the peers are still
#   measured on their own (ID.peers.json) so their timings are not lost.
bench() {
    local id=$1 title=$2
    shift 2
    if [[ -n ${ONLY:-} && ",$ONLY," != *",$id,"* ]]; then
        return 0
    fi
    local common=(--warmup 1 --runs "$RUNS" --style basic)
    local prepares=() names=() cmds=()
    while [[ $1 != -- ]]; do
        [[ $1 == -p ]] || die "bench: bad args"
        prepares+=("$2")
        shift 2
    done
    shift
    local i=0
    while (($#)); do
        printf '%s\t%s\t%d\t%s\t%s\n' "$id" "$title" "$i" "$1" "$2" >>"$SPEC"
        names+=("$1")
        cmds+=("$3")
        shift 3
        i=$((i + 1))
    done
    # hf FIRST JSON: run commands FIRST.. (with their prepares)
    hf() {
        local first=$1 json=$2 k
        local args=("${common[@]}" --export-json "$json")
        if ((${#prepares[@]} == 1)); then
            args+=(--prepare "${prepares[0]}")
        elif ((${#prepares[@]} > 1)); then
            for ((k = first; k < ${#cmds[@]}; k++)); do args+=(--prepare "${prepares[k]}"); done
        fi
        for ((k = first; k < ${#cmds[@]}; k++)); do args+=(-n "${names[k]}" "${cmds[k]}"); done
        hyperfine "${args[@]}"
    }
    log "$title"
    if hf 0 "$RES/$id.json"; then
        return 0
    fi
    echo "compare.sh: hyperfine failed for scenario '$id'; measuring the peers alone" >&2
    rm -f "$RES/$id.json"
    HARNESS_ERRORS=$((HARNESS_ERRORS + 1))
    hf 1 "$RES/$id.peers.json" || rm -f "$RES/$id.peers.json"
    return 1
}

gz_bytes() {  # total size of the .gz files under DIR (0 if DIR is missing)
    [[ -d $1 ]] || { echo 0; return; }
    find "$1" -type f -name '*.gz' -printf '%s\n' | awk '{s += $1} END {print s + 0}'
}

zst_bytes() {  # total size of the .zst files under DIR (0 if DIR is missing)
    [[ -d $1 ]] || { echo 0; return; }
    find "$1" -type f -name '*.zst' -printf '%s\n' | awk '{s += $1} END {print s + 0}'
}

# check_zst SRCDIR OUTDIR: every SRCDIR/f must have OUTDIR/f.zst that the real zstd tests and
# decompresses to the same bytes.
check_zst() {
    python3 - "$1" "$2" <<'PY'
import os, subprocess, sys
src, out = sys.argv[1:3]
n = bad = missing = 0
for root, _, files in os.walk(src):
    for name in files:
        rel = os.path.relpath(os.path.join(root, name), src)
        n += 1
        p = os.path.join(out, rel + ".zst")
        if not os.path.exists(p):
            missing += 1
            continue
        d = subprocess.run(["zstd", "-dc", p], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        with open(os.path.join(src, rel), "rb") as f:
            if d.returncode != 0 or f.read() != d.stdout:
                bad += 1
print("OK (%d files)" % n if not (bad or missing)
      else "FAILED (%d files: %d missing, %d differ)" % (n, missing, bad))
PY
}

# check_manifest MANIFEST DIR [TOOL]: filepipe's manifest must hold exactly the
# digest TOOL (default sha256sum) gives of every file under DIR (hashes compared
# as a multiset; paths are not compared because their prefix is filepipe's choice).
check_manifest() {
    local manifest=$1 dir=$2 tool=${3:-sha256sum} want got
    want=$(find "$dir" -type f -print0 | xargs -0 "$tool" | awk '{print $1}' | sort | sha256sum)
    got=$(sed 's/^\\//' "$manifest" | awk '{print $1}' | sort | sha256sum)
    if [[ $want == "$got" ]]; then
        echo "OK ($(wc -l <"$manifest") entries)"
    else
        echo "MISMATCH (manifest has $(wc -l <"$manifest") lines, tree has $(find "$dir" -type f | wc -l) files)"
    fi
}

# check_gz SRCDIR OUTDIR: every SRCDIR/f must have OUTDIR/f.gz that decompresses
# to the same bytes (also accepts OUTDIR/<basename SRCDIR>/f.gz).
check_gz() {
    python3 - "$1" "$2" <<'PY'
import gzip, os, sys
src, out = sys.argv[1:3]
alt = os.path.join(out, os.path.basename(os.path.normpath(src)))
n = bad = missing = 0
for root, _, files in os.walk(src):
    for name in files:
        rel = os.path.relpath(os.path.join(root, name), src)
        n += 1
        for base in (out, alt):
            p = os.path.join(base, rel + ".gz")
            if os.path.exists(p):
                break
        else:
            missing += 1
            continue
        with open(os.path.join(src, rel), "rb") as f, gzip.open(p, "rb") as g:
            if f.read() != g.read():
                bad += 1
print("OK (%d files)" % n if not (bad or missing)
      else "FAILED (%d files: %d missing, %d differ)" % (n, missing, bad))
PY
}

ratio() { python3 -c 'import sys; a, b = map(float, sys.argv[1:]); print("%.3f" % (a / b) if a and b else "n/a")' "$1" "$2"; }

FPN="filepipe"  # display name prefix
W=$WORK

# ---------------------------------------------------------------------------
# 4. Scenarios
# ---------------------------------------------------------------------------
# 4a. SHA-256, many small files
bench sha_small "SHA-256, small-file tree" -p "rm -f $W/small.manifest" -- \
    "$FPN batch small --op sha256 --manifest \$W/small.manifest --quiet$FP_EXTRA_STR" base \
    "$(printf '%q' "$BIN") batch small --op sha256 --manifest $W/small.manifest --quiet$FP_EXTRA_STR" \
    "rhash --sha256 -r small > /dev/null" 1.8 \
    "rhash --sha256 -r small > /dev/null" \
    "find small -type f -print0 | xargs -0 -P2 sha256sum > /dev/null" 3.5 \
    "find small -type f -print0 | xargs -0 -P2 sha256sum > /dev/null" || true
if [[ -s $W/small.manifest ]]; then
    fact "check: sha256 small manifest" "$(check_manifest "$W/small.manifest" small)"
fi

# 4b. SHA-256, a few large files
bench sha_large "SHA-256, large files" -p "rm -f $W/large.manifest" -- \
    "$FPN batch large --op sha256 --manifest \$W/large.manifest --quiet$FP_EXTRA_STR" base \
    "$(printf '%q' "$BIN") batch large --op sha256 --manifest $W/large.manifest --quiet$FP_EXTRA_STR" \
    "rhash --sha256 -r large > /dev/null" 1.8 \
    "rhash --sha256 -r large > /dev/null" || true
if [[ -s $W/large.manifest ]]; then
    fact "check: sha256 large manifest" "$(check_manifest "$W/large.manifest" large)"
fi

# The hashing scenarios remove their manifest before each run: a manifest that already says
# what a run would write is kept, not written again (session 54), and a peer's output goes to
# /dev/null; measured so, each run writes and flushes its manifest whole, as a first run does.
# (The incremental rerun below keeps its manifest, as an unchanged tree's rerun does.)
# 4b'. BLAKE3, many small files: filepipe's workers against b3sum run in parallel batches
# (b3sum hashes one file at a time, each on all threads; its multi-threading only helps large
# files, so xargs -P2 is its fastest way through a tree).
bench b3_small "BLAKE3, small-file tree" -p "rm -f $W/small.b3" -- \
    "$FPN batch small --op blake3 --manifest \$W/small.b3 --quiet$FP_EXTRA_STR" base \
    "$(printf '%q' "$BIN") batch small --op blake3 --manifest $W/small.b3 --quiet$FP_EXTRA_STR" \
    "find small -type f -print0 | xargs -0 -P2 -n256 b3sum > /dev/null" 1.8 \
    "find small -type f -print0 | xargs -0 -P2 -n256 b3sum > /dev/null" || true
if [[ -s $W/small.b3 ]]; then
    fact "check: blake3 small manifest" "$(check_manifest "$W/small.b3" small b3sum)"
fi

# 4b''. BLAKE3, a few large files: b3sum maps each file and hashes it on both threads;
# filepipe reads (a file truncated while mapped would kill it with SIGBUS) and hashes each
# large file's pieces on all threads too.
bench b3_large "BLAKE3, large files" -p "rm -f $W/large.b3" -- \
    "$FPN batch large --op blake3 --manifest \$W/large.b3 --quiet$FP_EXTRA_STR" base \
    "$(printf '%q' "$BIN") batch large --op blake3 --manifest $W/large.b3 --quiet$FP_EXTRA_STR" \
    "b3sum --num-threads 2 large/*" 0.9 \
    "b3sum --num-threads 2 large/* > /dev/null" || true
if [[ -s $W/large.b3 ]]; then
    fact "check: blake3 large manifest" "$(check_manifest "$W/large.b3" large b3sum)"
fi

# 4c. gzip -6, text tree. One prepare per command: filepipe's output dir is
# moved aside before each of its runs; the peer's tree (it writes next to its
# inputs) is moved aside and linked afresh before each of its (see TRASH).
bench gzip_text "gzip -6, text tree" \
    -p "if [ -e $W/fp-text ]; then mv $W/fp-text \$(mktemp -d -p $TRASH); fi" \
    -p "mv $W/text-peer \$(mktemp -d -p $TRASH) && cp -al $CORPUS/text $W/text-peer" -- \
    "$FPN batch text --op gzip --level 6 --out \$W/fp-text --force --quiet$FP_EXTRA_STR" base \
    "$(printf '%q' "$BIN") batch text --op gzip --level 6 --out $W/fp-text --force --quiet$FP_EXTRA_STR" \
    "find text -type f -print0 | xargs -0 -P2 -n64 gzip -6 -k -f" 2.5 \
    "cd $W && find text-peer -type f -print0 | xargs -0 -P2 -n64 gzip -6 -k -f" || true
fp_text=$(gz_bytes "$W/fp-text")
peer_text=$(gz_bytes "$W/text-peer")
fact "size: text filepipe .gz bytes" "$fp_text"
fact "size: text gzip -6 .gz bytes" "$peer_text"
fact "size: text input bytes" "$(du -sb text | cut -f1)"
fact "size: text gz files (filepipe / gzip / inputs)" "$(find "$W/fp-text" -name '*.gz' 2>/dev/null | wc -l) / $(find "$W/text-peer" -name '*.gz' | wc -l) / $NFILES_TEXT"
fact "ratio: text size" "$(ratio "$fp_text" "$peer_text")"
if [[ -d $W/fp-text ]]; then
    fact "check: gzip text round-trip" "$(check_gz text "$W/fp-text")"
fi

# 4c'. gzip -6, a tree of small source files, outputs next to the inputs: what durability costs.
# Each run works on a fresh tree of hard links to src/ (no inode created or freed by the copy),
# made and written out (sync -f) in its prepare, so no run pays for the one before. filepipe's
# other --durability modes are reference rows: their ratio is its default's time over theirs.
NFILES_SRC=$(find src -type f | wc -l)
fresh_src() { echo "if [ -e $W/src-$1 ]; then mv $W/src-$1 \$(mktemp -d -p $TRASH); fi; cp -al $CORPUS/src $W/src-$1 && sync -f $W"; }
bench gzip_src "gzip -6, $NFILES_SRC small source files, outputs beside them" \
    -p "$(fresh_src fp)" -p "$(fresh_src peer)" -p "$(fresh_src fp)" -p "$(fresh_src fp)" -- \
    "$FPN batch src --op gzip (--durability group)" base \
    "$(printf '%q' "$BIN") batch $W/src-fp --op gzip --quiet$FP_EXTRA_STR" \
    "find src -type f -print0 | xargs -0 -P2 -n64 gzip -6 -k -f" 2.5 \
    "find $W/src-peer -type f -print0 | xargs -0 -P2 -n64 gzip -6 -k -f" \
    "$FPN batch src --op gzip --durability file" ref \
    "$(printf '%q' "$BIN") batch $W/src-fp --op gzip --durability file --quiet$FP_EXTRA_STR" \
    "$FPN batch src --op gzip --durability none" ref \
    "$(printf '%q' "$BIN") batch $W/src-fp --op gzip --durability none --quiet$FP_EXTRA_STR" || true
fp_src=$(gz_bytes "$W/src-fp")
peer_src=$(gz_bytes "$W/src-peer")
fact "size: src filepipe .gz bytes" "$fp_src"
fact "size: src gzip -6 .gz bytes" "$peer_src"
fact "ratio: src size" "$(ratio "$fp_src" "$peer_src")"
if [[ -d $W/src-fp ]]; then
    fact "check: gzip src round-trip" "$(python3 - "$W/src-fp" <<'PY'
import gzip, os, sys
n = bad = 0
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        if name.endswith(".gz"):
            continue
        n += 1
        p = os.path.join(root, name)
        try:
            with open(p, "rb") as f, gzip.open(p + ".gz", "rb") as g:
                bad += f.read() != g.read()
        except OSError:
            bad += 1
print("OK (%d files)" % n if not bad else "FAILED (%d of %d files)" % (bad, n))
PY
)"
fi
# Flushes per file in each mode, counted by strace (untimed).
for mode in group file none; do
    eval "$(fresh_src fp)"
    strace -f -c -o "$RES/flushes-$mode.txt" -e trace=fsync,fdatasync,syncfs \
        "$BIN" batch "$W/src-fp" --op gzip --durability "$mode" --quiet "${FP_EXTRA[@]}" || true
    calls=$(awk '$NF ~ /^(fsync|fdatasync|syncfs)$/ {n += $4} END {print n + 0}' "$RES/flushes-$mode.txt")
    fact "flushes per file: --durability $mode" "$(python3 -c "print('%.3f (%d calls)' % ($calls / $NFILES_SRC, $calls))")"
done

# 4d. gzip -6, one large file. Peers write with -c to a file in the work dir
# (same work as -k -f, without touching the corpus).
BIG=$(find one -type f | head -n1)
bench gzip_one "gzip -6, one large text file" -- \
    "$FPN batch one --op gzip --level 6 --out \$W/fp-one --force --quiet$FP_EXTRA_STR" base \
    "$(printf '%q' "$BIN") batch one --op gzip --level 6 --out $W/fp-one --force --quiet$FP_EXTRA_STR" \
    "pigz -p2 -6 -c $BIG > \$W/pigz.gz" 2.0 \
    "pigz -p2 -6 -c $BIG > $W/pigz.gz" \
    "gzip -6 -c $BIG > \$W/gzip.gz" ref \
    "gzip -6 -c $BIG > $W/gzip.gz" || true
# one_file_facts CORPUS INPUT PIGZ_GZ GZIP_GZ: sizes, ratios and the round-trip check of a
# one-file scenario (filepipe's output is under $W/fp-CORPUS).
one_file_facts() {
    local c=$1 input=$2 fp pigz gz
    fp=$(gz_bytes "$W/fp-$c")
    pigz=$(stat -c %s "$3" 2>/dev/null || echo 0)
    gz=$(stat -c %s "$4" 2>/dev/null || echo 0)
    fact "size: $c input bytes" "$(stat -c %s "$input")"
    fact "size: $c filepipe .gz bytes" "$fp"
    fact "size: $c pigz -6 bytes" "$pigz"
    fact "size: $c gzip -6 bytes" "$gz"
    fact "ratio: $c size vs pigz" "$(ratio "$fp" "$pigz")"
    fact "ratio: $c size vs gzip" "$(ratio "$fp" "$gz")"
    if [[ -d $W/fp-$c ]]; then
        fact "check: gzip $c round-trip" "$(check_gz "$c" "$W/fp-$c")"
    fi
}
one_file_facts one "$BIG" "$W/pigz.gz" "$W/gzip.gz"

# 4d'. The same on one large file of machine code (onebin/: the machine's own ELF files), the
# kind of data the issue's per-core figures were measured on ("a 200 MB binary"). gzip -6 is
# run once, untimed, for the size check (it takes ~12 s a run here).
BIGBIN=$(find onebin -type f | head -n1)
bench gzip_onebin "gzip -6, one large binary file" -- \
    "$FPN batch onebin --op gzip --level 6 --out \$W/fp-onebin --force --quiet$FP_EXTRA_STR" base \
    "$(printf '%q' "$BIN") batch onebin --op gzip --level 6 --out $W/fp-onebin --force --quiet$FP_EXTRA_STR" \
    "pigz -p2 -6 -c $BIGBIN > \$W/pigz-bin.gz" 2.0 \
    "pigz -p2 -6 -c $BIGBIN > $W/pigz-bin.gz" || true
gzip -6 -c "$BIGBIN" >"$W/gzip-bin.gz"
one_file_facts onebin "$BIGBIN" "$W/pigz-bin.gz" "$W/gzip-bin.gz"

# 4d''. zstd -3 on the text tree, against zstd -3 on 2 cores (2 processes, each with zstd's
# default of one worker thread beside its I/O), and on one large text file against zstd -T2.
bench zstd_text "zstd -3, text tree" \
    -p "if [ -e $W/fp-ztext ]; then mv $W/fp-ztext \$(mktemp -d -p $TRASH); fi" \
    -p "mv $W/ztext-peer \$(mktemp -d -p $TRASH) && cp -al $CORPUS/text $W/ztext-peer" -- \
    "$FPN batch text --op zstd --level 3 --out \$W/fp-ztext --force --quiet$FP_EXTRA_STR" base \
    "$(printf '%q' "$BIN") batch text --op zstd --level 3 --out $W/fp-ztext --force --quiet$FP_EXTRA_STR" \
    "find text -type f -print0 | xargs -0 -P2 -n64 zstd -3 -q -k -f" 1.3 \
    "cd $W && find ztext-peer -type f -print0 | xargs -0 -P2 -n64 zstd -3 -q -k -f" || true
fp_ztext=$(zst_bytes "$W/fp-ztext")
peer_ztext=$(zst_bytes "$W/ztext-peer")
fact "size: ztext filepipe .zst bytes" "$fp_ztext"
fact "size: ztext zstd -3 .zst bytes" "$peer_ztext"
fact "ratio: ztext size" "$(ratio "$fp_ztext" "$peer_ztext")"
if [[ -d $W/fp-ztext ]]; then
    fact "check: zstd text round-trip" "$(check_zst text "$W/fp-ztext")"
fi
# 4d''. sha256 plus zstd -3 from one read, against zstd -3 alone: both filepipe, both with
# --out (moved aside before each run). The hash rides on the compressor's read, so it may cost
# at most a tenth more time: the target is zstd-alone / both >= 0.91 (issue 19: at most 1.1x).
bench multi_text "sha256 + zstd -3 from one read, text tree" \
    -p "rm -f $W/multi.manifest; if [ -e $W/fp-mtext ]; then mv $W/fp-mtext \$(mktemp -d -p $TRASH); fi" \
    -p "if [ -e $W/fp-ztext1 ]; then mv $W/fp-ztext1 \$(mktemp -d -p $TRASH); fi" -- \
    "$FPN batch text --op sha256,zstd --level 3 --out \$W/fp-mtext --manifest \$W/multi.manifest --force --quiet$FP_EXTRA_STR" base \
    "$(printf '%q' "$BIN") batch text --op sha256,zstd --level 3 --out $W/fp-mtext --manifest $W/multi.manifest --force --quiet$FP_EXTRA_STR" \
    "$FPN batch text --op zstd --level 3 --out \$W/fp-ztext1 --force --quiet$FP_EXTRA_STR" 0.91 \
    "$(printf '%q' "$BIN") batch text --op zstd --level 3 --out $W/fp-ztext1 --force --quiet$FP_EXTRA_STR" || true
if [[ -d $W/fp-mtext ]]; then
    fact "check: sha256+zstd text round-trip" "$(check_zst text "$W/fp-mtext")"
    fact "check: sha256+zstd text manifest" "$(check_manifest "$W/multi.manifest" text)"
fi
bench zstd_one "zstd -3, one large text file" -- \
    "$FPN batch one --op zstd --level 3 --out \$W/fp-zone --force --quiet$FP_EXTRA_STR" base \
    "$(printf '%q' "$BIN") batch one --op zstd --level 3 --out $W/fp-zone --force --quiet$FP_EXTRA_STR" \
    "zstd -T2 -3 -q -c $BIG > \$W/zstd.zst" 1.0 \
    "zstd -T2 -3 -q -c $BIG > $W/zstd.zst" || true
fp_zone=$(zst_bytes "$W/fp-zone")
fact "size: zone filepipe .zst bytes" "$fp_zone"
fact "size: zone zstd -T2 -3 bytes" "$(stat -c %s "$W/zstd.zst" 2>/dev/null || echo 0)"
fact "ratio: zone size" "$(ratio "$fp_zone" "$(stat -c %s "$W/zstd.zst" 2>/dev/null || echo 0)")"
if [[ -d $W/fp-zone ]]; then
    fact "check: zstd one round-trip" "$(check_zst one "$W/fp-zone")"
fi

# 4d''''. An incremental rerun (--state) over the unchanged small-file tree (50,000 files)
# against a full run over the same tree: the rerun stats every file and reads none. The state
# is made by one untimed run first; the rerun still writes the whole manifest, which must be
# byte for byte the full run's.
aside "$W/incr-state"
"$BIN" batch small --op sha256 --state "$W/incr-state" --manifest "$W/incr.manifest" --quiet "${FP_EXTRA[@]}" || true
bench sha_incremental "SHA-256, unchanged small-file tree: incremental rerun vs full run" -- \
    "$FPN batch small --op sha256 --state DIR (rerun, unchanged)" base \
    "$(printf '%q' "$BIN") batch small --op sha256 --state $W/incr-state --manifest $W/incr.manifest --quiet$FP_EXTRA_STR" \
    "$FPN batch small --op sha256 (full run)" 5.0 \
    "$(printf '%q' "$BIN") batch small --op sha256 --manifest $W/full.manifest --quiet$FP_EXTRA_STR" || true
if [[ -s $W/incr.manifest && -s $W/full.manifest ]]; then
    if cmp -s "$W/incr.manifest" "$W/full.manifest"; then
        fact "check: incremental manifest = full run's" "OK ($(wc -l <"$W/incr.manifest") entries)"
    else
        fact "check: incremental manifest = full run's" "DIFFERS"
    fi
fi
# The same from disk (COLD=1): the full run reads every byte, the rerun only the directories,
# inodes and the state, with the walk's stats on several threads.
if [[ ${COLD:-0} == 1 ]]; then
    if [[ -w /proc/sys/vm/drop_caches ]]; then
        DROP='sh -c "sync; echo 3 > /proc/sys/vm/drop_caches"'
        bench sha_incremental_cold "SHA-256, unchanged small-file tree, page cache dropped: incremental rerun vs full run" -p "$DROP" -- \
            "$FPN batch small --op sha256 --state DIR (rerun, unchanged, cold)" base \
            "$(printf '%q' "$BIN") batch small --op sha256 --state $W/incr-state --manifest $W/incr.manifest --quiet$FP_EXTRA_STR" \
            "$FPN batch small --op sha256 (full run, cold)" 5.0 \
            "$(printf '%q' "$BIN") batch small --op sha256 --manifest $W/full.manifest --quiet$FP_EXTRA_STR" || true
        if [[ -s $W/incr.manifest ]] && ! cmp -s "$W/incr.manifest" "$W/full.manifest"; then
            fact "check: incremental manifest = full run's (cold)" "DIFFERS"
        fi
    else
        echo "compare.sh: COLD=1 needs root (to write /proc/sys/vm/drop_caches); cold scenario left out" >&2
    fi
fi

# 4e. Peak RSS on many tiny files (cache is warm: huge/ was read above).
log "peak memory: filepipe batch huge --op sha256 (and rhash for reference)"
NFILES_HUGE=$(find huge -type f | wc -l)
fact "rss: files" "$NFILES_HUGE"
rss_run() {  # rss_run KEY CMD... ; records max RSS (KiB) and wall time
    local key=$1
    shift
    if /usr/bin/time -v -o "$RES/$key.time" "$@" >/dev/null; then
        fact "rss: $key kib" "$(awk -F': ' '/Maximum resident set size/ {print $2}' "$RES/$key.time")"
        fact "rss: $key wall" "$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$RES/$key.time")"
    else
        echo "compare.sh: '$*' failed (see $RES/$key.time)" >&2
        fact "rss: $key kib" "ERROR"
        HARNESS_ERRORS=$((HARNESS_ERRORS + 1))
    fi
}
rss_run filepipe "$BIN" batch huge --op sha256 --manifest "$W/huge.manifest" --quiet "${FP_EXTRA[@]}"
rss_run rhash rhash --sha256 -r huge
if [[ -s $W/huge.manifest ]]; then
    fact "check: sha256 huge manifest" "$(check_manifest "$W/huge.manifest" huge)"
fi

# ---------------------------------------------------------------------------
# 5. Machine and report
# ---------------------------------------------------------------------------
ver() { "$@" 2>&1 | head -n1 || true; }
fact "machine: nproc" "$(nproc)"
fact "machine: cpu" "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
fact "machine: sha_ni" "$(grep -qw sha_ni /proc/cpuinfo && echo yes || echo no)"
fact "machine: kernel" "$(uname -sr)"
fact "machine: memory" "$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
fact "machine: fs" "$(df -T "$BASE" | awk 'NR == 2 {print $2}') ($BASE)"
fact "version: filepipe" "$(ver "$BIN" --version) ($BIN)"
fact "version: hyperfine" "$(ver hyperfine --version)"
fact "version: rhash" "$(ver rhash --version)"
fact "version: pigz" "$(ver pigz --version)"
fact "version: gzip" "$(ver gzip --version)"
fact "version: zstd" "$(ver zstd --version)"
fact "version: sha256sum" "$(ver sha256sum --version)"
fact "version: b3sum" "$(ver b3sum --version)"
fact "mode" "$( ((QUICK)) && echo "quick (tiny corpora; targets NOT meaningful)" || echo full), runs=$RUNS, warmup=1"

python3 - "$RES" >"$RES/summary.md" <<'PY'
import json, os, sys

res = sys.argv[1]
facts = {}
for line in open(os.path.join(res, "facts.tsv")):
    k, _, v = line.rstrip("\n").partition("\t")
    facts[k] = v
spec = []
for line in open(os.path.join(res, "spec.tsv")):
    sid, title, idx, name, target = line.rstrip("\n").split("\t")
    spec.append((sid, title, int(idx), name, target))

fails = []
out = []
w = out.append
w("# filepipe benchmark (%s)" % facts.get("mode", "?"))
w("")
w("| scenario | command | median s | min–max s | ratio (peer / filepipe) | target | result |")
w("|---|---|---:|---:|---:|---|---|")
medians = {}
for sid, title, idx, name, target in spec:
    path = os.path.join(res, sid + ".json")
    ppath = os.path.join(res, sid + ".peers.json")
    results = []
    if os.path.exists(path):
        results = json.load(open(path))["results"]
    elif os.path.exists(ppath):  # filepipe failed; peers measured alone
        results = [None] + json.load(open(ppath))["results"]
    r = results[idx] if idx < len(results) else None
    tgt = {"base": "", "ref": "reference"}.get(target, "≥ %sx" % target)
    if r is None:
        w("| %s | `%s` | ERROR | | | %s | ERROR |" % (title, name, tgt))
        if target not in ("base", "ref"):
            fails.append("%s: %s (no result)" % (title, name))
        continue
    med = r["median"]
    medians[(sid, idx)] = med
    mm = "%.3f–%.3f" % (r["min"], r["max"])
    if target == "base":
        w("| %s | `%s` | %.3f | %s | 1.00 (baseline) | | |" % (title, name, med, mm))
        continue
    base = medians.get((sid, 0))
    if base is None:
        w("| %s | `%s` | %.3f | %s | n/a | %s | %s |"
          % (title, name, med, mm, tgt, "" if target == "ref" else "ERROR (no filepipe result)"))
        if target != "ref":
            fails.append("%s vs %s: no filepipe result" % (title, name))
        continue
    ratio = med / base if base else float("inf")
    if target == "ref":
        w("| %s | `%s` | %.3f | %s | %.2fx | reference | |" % (title, name, med, mm, ratio))
        continue
    ok = ratio >= float(target)
    if not ok:
        fails.append("%s vs %s: %.2fx < %sx" % (title, name, ratio, target))
    w("| %s | `%s` | %.3f | %s | %.2fx | ≥ %sx | %s |"
      % (title, name, med, mm, ratio, target, "PASS" if ok else "FAIL"))

w("")
w("| metric | value | target | result |")
w("|---|---:|---|---|")

def num(key):
    try:
        return float(facts[key])
    except (KeyError, ValueError):
        return None

def mib(n):
    return "%.1f MiB" % (n / 1048576.0)

tr = num("ratio: text size")
if tr is not None and num("size: text filepipe .gz bytes"):
    ok = tr <= 1.04
    if not ok:
        fails.append("text output size ratio %.3f > 1.04" % tr)
    w("| gzip text tree: total output, filepipe / gzip -6 (%s / %s) | %.3f | ≤ 1.04 | %s |"
      % (mib(num("size: text filepipe .gz bytes")), mib(num("size: text gzip -6 .gz bytes")),
         tr, "PASS" if ok else "FAIL"))
else:
    fails.append("text output size: no filepipe output")
    w("| gzip text tree: total output, filepipe / gzip -6 | n/a | ≤ 1.04 | ERROR |")
tin, tgz = num("size: text input bytes"), num("size: text gzip -6 .gz bytes")
if tin and tgz:
    w("| gzip text tree: gzip -6 compression ratio (input / output) | %.2fx | (corpus property) | |" % (tin / tgz))
w("| gzip text tree: .gz files (filepipe / gzip / inputs) | %s | | |"
  % facts.get("size: text gz files (filepipe / gzip / inputs)", "?"))
# The issue: the compressor's output must stay within 4% of gzip -6's.
for corpus, what in (("one", "gzip one text file"), ("onebin", "gzip one binary file")):
    v = num("ratio: %s size vs pigz" % corpus)
    w("| %s: output, filepipe / pigz -p2 -6 | %s | (info) | |" % (what, "%.3f" % v if v is not None else "n/a"))
    v = num("ratio: %s size vs gzip" % corpus)
    if v is not None and num("size: %s filepipe .gz bytes" % corpus):
        ok = v <= 1.04
        if not ok:
            fails.append("%s: output %.3f x gzip -6 > 1.04" % (what, v))
        w("| %s: output, filepipe / gzip -6 | %.3f | ≤ 1.04 | %s |" % (what, v, "PASS" if ok else "FAIL"))
    else:
        fails.append("%s: no output size" % what)
        w("| %s: output, filepipe / gzip -6 | n/a | ≤ 1.04 | ERROR |" % what)
    if num("size: %s input bytes" % corpus):
        w("| %s: sizes (input / filepipe / pigz / gzip) | %s / %s / %s / %s | | |"
          % ((what,) + tuple(mib(num("size: %s %s" % (corpus, k)) or 0) for k in
                             ("input bytes", "filepipe .gz bytes", "pigz -6 bytes", "gzip -6 bytes"))))
# zstd: total output within 1% of the zstd command's, on the tree and on the large file.
for key, what in (("ztext", "zstd text tree: total output, filepipe / zstd -3"),
                  ("zone", "zstd one text file: output, filepipe / zstd -T2 -3")):
    v = num("ratio: %s size" % key)
    if v is not None and num("size: %s filepipe .zst bytes" % key):
        ok = v <= 1.01
        if not ok:
            fails.append("%s: %.4f > 1.01" % (what, v))
        w("| %s | %.4f | ≤ 1.01 | %s |" % (what, v, "PASS" if ok else "FAIL"))
    else:
        fails.append("%s: no output size" % what)
        w("| %s | n/a | ≤ 1.01 | ERROR |" % what)
rss = num("rss: filepipe kib")
nf = facts.get("rss: files", "?")
if rss is not None:
    ok = rss / 1024 < 64
    if not ok:
        fails.append("peak RSS %.1f MiB >= 64 MiB" % (rss / 1024))
    w("| peak RSS, filepipe sha256 over %s files (wall %s) | %.1f MiB | < 64 MiB | %s |"
      % (nf, facts.get("rss: filepipe wall", "?"), rss / 1024, "PASS" if ok else "FAIL"))
else:
    fails.append("peak RSS: no measurement")
    w("| peak RSS, filepipe sha256 over %s files | ERROR | < 64 MiB | ERROR |" % nf)
r2 = num("rss: rhash kib")
if r2 is not None:
    w("| peak RSS, rhash --sha256 -r over %s files (wall %s) | %.1f MiB | (reference) | |"
      % (nf, facts.get("rss: rhash wall", "?"), r2 / 1024))

checks = [(k[len("check: "):], v) for k, v in facts.items() if k.startswith("check: ")]
if checks:
    w("")
    w("Correctness checks (untimed): " + "; ".join("%s: %s" % c for c in checks))
    for name, v in checks:
        if not v.startswith("OK"):
            fails.append("check %s: %s" % (name, v))

w("")
w("Machine: %s CPUs, %s (sha_ni: %s), %s, %s RAM, fs %s"
  % (facts.get("machine: nproc"), facts.get("machine: cpu"), facts.get("machine: sha_ni"),
     facts.get("machine: kernel"), facts.get("machine: memory"), facts.get("machine: fs")))
w("")
w("Tools: " + "; ".join(v for k, v in facts.items() if k.startswith("version: ")))
w("")
w("Commands ran in the corpus dir; `$W` is the work dir. Ratio = peer median / filepipe median (higher is better for filepipe).")
w("")
if fails:
    w("**%d target(s) not met:** %s" % (len(fails), "; ".join(fails)))
else:
    w("**All targets met.**")
print("\n".join(out))
with open(os.path.join(res, "fails.txt"), "w") as f:
    f.write("\n".join(fails) + ("\n" if fails else ""))
PY

log "summary ($RES/summary.md)"
cat "$RES/summary.md"
echo
echo "hyperfine JSON, time -v output and summary.md are in $RES"

if ((HARNESS_ERRORS)); then
    echo "compare.sh: $HARNESS_ERRORS scenario(s) failed to run" >&2
    exit 2
fi
if [[ ${STRICT:-0} == 1 && -s $RES/fails.txt ]]; then
    exit 1
fi
exit 0
