#!/usr/bin/env bash
# CI check of the systemd packaging: the units verify without a single warning, all rate
# 1.0 or better in `systemd-analyze security --offline=true`, the example config is valid
# and writes only where filepipe.service lets it, and the example worker config is valid and
# maps only roots filepipe-worker@.service lets it write.
#
#   systemd/check.sh [BINARY]     BINARY: the built filepipe [default: target/release/filepipe,
#                                 else target/debug/filepipe]
#
# `systemd-analyze verify` insists that ExecStart=/ExecReload= binaries exist. Rather than
# install anything into this machine's /usr/local/bin, the units are verified inside a
# throwaway root (--root=): a copy of this system's unit tree and /bin/kill, our units in
# etc/systemd/system, and the BUILT filepipe copied to usr/local/bin/filepipe, i.e. exactly
# the layout install.sh produces. If no binary was built, a stub stands in (said so loudly)
# and the config check is skipped. Runs as root on Debian; takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXPOSURE=1.0
units=(filepipe.service filepipe@.service filepipe-worker@.service)
fail=0
bad() { echo "FAIL: $*" >&2; fail=1; }

# --- tools ---------------------------------------------------------------------------------
need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
[ -x /bin/kill ] || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
systemd-analyze --version | sed -n 1p

# --- the binary ----------------------------------------------------------------------------
bin=${1:-}
if [ -z "$bin" ]; then
  for b in target/release/filepipe target/debug/filepipe; do
    if [ -x "$b" ]; then bin=$b; break; fi
  done
fi
if [ -n "$bin" ] && [ ! -x "$bin" ]; then
  echo "FAIL: $bin is not an executable" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root/etc/systemd/system" "$root/usr/local/bin" "$root/usr/bin"

# This system's unit tree, so that dependencies (sysinit.target, ...) resolve.
for d in /usr/lib/systemd/system /lib/systemd/system; do
  if [ -d "$d" ] && [ ! -L "$d" ] && [ ! -e "$root$d" ]; then
    mkdir -p "$root$(dirname "$d")"
    cp -a "$d" "$root$d"
  fi
done
[ -e "$root/lib" ] || ln -s usr/lib "$root/lib"
cp /bin/kill "$root/usr/bin/kill"
[ -e "$root/bin" ] || ln -s usr/bin "$root/bin"
cp systemd/filepipe.service systemd/filepipe@.service systemd/filepipe-worker@.service \
  "$root/etc/systemd/system/"
mkdir -p "$root/etc/filepipe"
cp systemd/worker.toml "$root/etc/filepipe/worker-ci.toml"
if [ -n "$bin" ]; then
  cp "$bin" "$root/usr/local/bin/filepipe"
  echo "binary: $bin ($("$bin" --version 2>/dev/null || echo '?'))"
else
  printf '#!/bin/sh\nexit 0\n' >"$root/usr/local/bin/filepipe"
  chmod 755 "$root/usr/local/bin/filepipe"
  echo "NOTE: no built filepipe (target/{release,debug}/filepipe): verify uses a stub binary," \
    "and the example config is not checked. Pass BINARY or build first for the full check."
fi

# --- 1. verify: must print nothing (it warns but still exits 0 on unknown keys) ----------
out=$(systemd-analyze verify --root="$root" filepipe.service filepipe@ci.service \
  filepipe-worker@ci.service 2>&1) || {
  bad "systemd-analyze verify exited non-zero"
}
if [ -n "$out" ]; then
  printf '%s\n' "$out" >&2
  bad "systemd-analyze verify printed warnings (above)"
else
  echo "verify: filepipe.service, filepipe@ci.service, filepipe-worker@ci.service: no warnings"
fi

# --- 1b. no secret on a command line: /proc/PID/cmdline is readable by every user, so the
# worker's queue URL (which may hold a password) reaches it as FILEPIPE_QUEUE in its
# environment, never expanded into ExecStart=.
if grep -E '^ExecStart=.*FILEPIPE_QUEUE' systemd/filepipe-worker@.service >/dev/null; then
  bad "filepipe-worker@.service: ExecStart= puts FILEPIPE_QUEUE (and any password in it) on the command line"
fi
# Nor a URL, nor a --queue flag: the worker reads it from its config file's [worker] table.
if grep -E '^ExecStart=.*(--queue|[a-z]+://)' systemd/filepipe-worker@.service >/dev/null; then
  bad "filepipe-worker@.service: ExecStart= gives the queue on the command line"
fi

# --- 2. security: exposure must be <= 1.0 -------------------------------------------------
# --threshold= counts in tenths of the printed level (systemd scores 0-100 internally; the
# default threshold is 100 = 10.0): --threshold=10 fails any unit above 1.0. The printed
# level is parsed as well, as a second gate with a plain message.
for u in "${units[@]}"; do
  if ! report=$(systemd-analyze security --offline=true --threshold=10 "systemd/$u" 2>&1); then
    printf '%s\n' "$report" | grep -v '✓' >&2
    bad "$u: systemd-analyze security failed, or rated it above --threshold=10 (exposure 1.0)"
    continue
  fi
  score=$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  if [ -z "$score" ]; then
    printf '%s\n' "$report" >&2
    bad "$u: no overall exposure level in the output"
  elif awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
    printf '%s\n' "$report" | grep -v '✓' >&2
    bad "$u: exposure $score is above $MAX_EXPOSURE"
  else
    echo "security: $u: exposure $score (limit $MAX_EXPOSURE)"
    printf '%s\n' "$report" | grep '✗' | sed 's/^/    /'
  fi
done

# --- 3. the example config: every output it names is writable under filepipe.service ------
# Writable: ReadWritePaths=, plus the state and logs directories.
mapfile -t writable < <(
  sed -n 's/^ReadWritePaths=//p' systemd/filepipe.service | tr ' ' '\n' | sed 's/^-//' | grep .
  sed -n 's/^StateDirectory=/\/var\/lib\//p; s/^LogsDirectory=/\/var\/log\//p' systemd/filepipe.service
)
covered() {
  local p=$1 w
  for w in "${writable[@]}"; do
    case "$p/" in "$w"/*) return 0 ;; esac
  done
  return 1
}
# Outputs of the example: gzip out roots (or gzip paths without one), manifests' directories,
# the failure log's directory. A line-based reading, enough for the shipped example.
mapfile -t outputs < <(awk '
  function val(l) { sub(/^[^=]*=[ \t]*"/, "", l); sub(/".*/, "", l); return l }
  function flush() { if (op == "gzip") print (out != "" ? out : path); path = op = out = "" }
  /^[ \t]*#/ { next }
  /^\[\[watch\]\]/ { if (inw) flush(); inw = 1; next }
  /^failure_log[ \t]*=/ { f = val($0); sub(/\/[^\/]*$/, "", f); print f }
  inw && /^path[ \t]*=/ { path = val($0) }
  inw && /^op[ \t]*=/ { op = val($0) }
  inw && /^out[ \t]*=/ { out = val($0) }
  inw && /^manifest[ \t]*=/ { m = val($0); sub(/\/[^\/]*$/, "", m); print m }
  END { if (inw) flush() }
' systemd/filepipe.toml)
[ ${#outputs[@]} -gt 0 ] || bad "found no outputs in systemd/filepipe.toml"
for p in "${outputs[@]}"; do
  if covered "$p"; then
    echo "config: $p is writable (${writable[*]})"
  else
    bad "systemd/filepipe.toml writes under $p, which filepipe.service does not make writable"
  fi
done

# Validate the example with the real binary: its paths moved under a scratch directory
# (check-config needs the watched trees to exist, and creates out roots).
if [ -n "$bin" ]; then
  if "$bin" --help 2>/dev/null | grep check-config >/dev/null; then
    scratch=$work/cfg
    sed -e "s|\"/srv/|\"$scratch/srv/|g" -e "s|\"/var/log/|\"$scratch/var/log/|g" \
      systemd/filepipe.toml >"$work/filepipe.toml"
    mkdir -p "$scratch/srv/incoming/logs" "$scratch/srv/releases" "$scratch/var/log/filepipe" \
      "$scratch/state"
    if msg=$(STATE_DIRECTORY=$scratch/state "$bin" check-config "$work/filepipe.toml" 2>&1); then
      echo "check-config: example config ok (${msg##*: })"
    else
      printf '%s\n' "$msg" >&2
      bad "filepipe check-config rejects systemd/filepipe.toml"
    fi
  else
    echo "NOTE: $bin has no check-config subcommand; example config not validated"
  fi
fi

# --- 4. the example worker config: its roots are writable under filepipe-worker@.service, and
# it is valid (paths moved under a scratch directory, since check-config needs the roots).
mapfile -t worker_writable < <(
  sed -n 's/^ReadWritePaths=//p' systemd/filepipe-worker@.service | tr ' ' '\n' | sed 's/^-//' | grep .
)
mapfile -t worker_roots < <(awk '
  /^[ \t]*#/ { next }
  /^\[/ { roots = ($0 ~ /^\[worker\.(out_)?roots\]/); next }
  roots && /=/ { l = $0; sub(/^[^=]*=[ \t]*"/, "", l); sub(/".*/, "", l); print l }
' systemd/worker.toml)
[ ${#worker_roots[@]} -gt 0 ] || bad "found no roots in systemd/worker.toml"
for p in "${worker_roots[@]}"; do
  ok=0
  for w in "${worker_writable[@]}"; do
    case "$p/" in "$w"/*) ok=1 ;; esac
  done
  if [ "$ok" -eq 1 ]; then
    echo "worker config: $p is writable (${worker_writable[*]})"
  else
    bad "systemd/worker.toml maps $p, which filepipe-worker@.service does not make writable"
  fi
done
if [ -n "$bin" ] && "$bin" --help 2>/dev/null | grep -q '^ *worker'; then
  scratch=$work/wcfg
  sed -e "s|\"/srv/|\"$scratch/srv/|g" -e "s|\"/var/log/|\"$scratch/var/log/|g" \
    systemd/worker.toml >"$work/worker.toml"
  # As installed (install -m 640): a worker file others may change is refused, whatever the umask.
  chmod 600 "$work/worker.toml"
  for p in "${worker_roots[@]}"; do mkdir -p "$scratch$p"; done
  if msg=$("$bin" check-config "$work/worker.toml" 2>&1); then
    echo "check-config: example worker config ok (${msg#*: })"
  else
    printf '%s\n' "$msg" >&2
    bad "filepipe check-config rejects systemd/worker.toml"
  fi
fi

if [ "$fail" -ne 0 ]; then
  echo "systemd check: FAILED" >&2
  exit 1
fi
echo "systemd check: ok"
