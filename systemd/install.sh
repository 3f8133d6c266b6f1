#!/usr/bin/env bash
# Installs filepipe as a systemd service:
#   /usr/local/bin/filepipe                          the binary
#   /usr/local/lib/systemd/system/filepipe.service   the units (--unit-dir to change)
#   /usr/local/lib/systemd/system/filepipe@.service
#   /usr/local/lib/systemd/system/filepipe-worker@.service   (cluster mode's workers)
#   /etc/filepipe/filepipe.toml                      the example config, only if absent
#   /usr/local/share/doc/filepipe/README.md          systemd/README.md
#   /usr/local/share/doc/filepipe/worker.toml        the example worker config
#   /usr/local/share/doc/filepipe/nats-server.conf   the example server config (a user per role)
#   user and group `filepipe`                        a system user, if missing
# It starts nothing: it prints the systemctl commands to run once the config and the unit's
# ReadWritePaths= match (see systemd/README.md). Safe to run again: unchanged files are left
# alone, a changed unit is replaced (the old one kept as NAME.old), the config never is.
#
#   systemd/install.sh [--dry-run] [--binary PATH] [--unit-dir DIR]
#   DESTDIR=/tmp/stage systemd/install.sh        stage into a directory (no user is created)
#
# The binary: --binary PATH, else target/release/filepipe if built, else
# `cargo install --path . --root /usr/local --locked --no-default-features --features cluster`
# (a lean build without the demos, which the service does not use; with cluster mode).
set -euo pipefail
cd "$(dirname "$0")/.."

DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
dry_run=0
binary=
unit_dir=/usr/local/lib/systemd/system

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run | -n) dry_run=1 ;;
    --binary) binary=${2:?--binary needs a path}; shift ;;
    --binary=*) binary=${1#*=} ;;
    --unit-dir) unit_dir=${2:?--unit-dir needs a directory}; shift ;;
    --unit-dir=*) unit_dir=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$DESTDIR" ] && [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (or with DESTDIR=DIR, or --dry-run)" >&2
  exit 1
fi

say() { echo "install.sh: $*"; }
# Runs a command, or only shows it under --dry-run.
run() {
  if [ "$dry_run" -eq 1 ]; then
    echo "+$(printf ' %q' "$@")"
  else
    "$@"
  fi
}

# install_file SRC DEST MODE [keep]: copies SRC to $DESTDIR/DEST unless identical. With
# `keep`, an existing DEST is never touched; otherwise a differing one is saved as DEST.old.
install_file() {
  local src=$1 dest=$DESTDIR$2 mode=$3 keep=${4:-}
  if [ -e "$dest" ]; then
    if cmp -s "$src" "$dest"; then
      say "$2: unchanged"
      return
    elif [ "$keep" = keep ]; then
      say "$2: exists, left as it is (the example is $src)"
      return
    fi
    say "$2: updating (previous saved as $2.old)"
    run cp -p "$dest" "$dest.old"
  else
    say "$2: installing"
  fi
  run install -D -m "$mode" "$src" "$dest"
}

# --- the binary -------------------------------------------------------------------------------
if [ -z "$binary" ] && [ -x target/release/filepipe ]; then
  binary=target/release/filepipe
fi
if [ -n "$binary" ]; then
  [ -x "$binary" ] || { echo "install.sh: $binary is not an executable" >&2; exit 1; }
  install_file "$binary" /usr/local/bin/filepipe 0755
elif command -v cargo >/dev/null; then
  say "/usr/local/bin/filepipe: building with cargo install (no target/release/filepipe)"
  run cargo install --path . --root "$DESTDIR/usr/local" --locked --no-default-features --features cluster --force
else
  echo "install.sh: no target/release/filepipe and no cargo: build first (cargo build --release)" \
    "or pass --binary PATH" >&2
  exit 1
fi

# --- units, example config, docs --------------------------------------------------------------
install_file systemd/filepipe.service "$unit_dir/filepipe.service" 0644
install_file systemd/filepipe@.service "$unit_dir/filepipe@.service" 0644
install_file systemd/filepipe-worker@.service "$unit_dir/filepipe-worker@.service" 0644
install_file systemd/filepipe.toml /etc/filepipe/filepipe.toml 0644 keep
install_file systemd/README.md /usr/local/share/doc/filepipe/README.md 0644
# The worker's example goes with the docs: each worker-NAME.toml is the admin's own (and may
# hold a password: mode 640 root:filepipe).
install_file systemd/worker.toml /usr/local/share/doc/filepipe/worker.toml 0644
# The server's: it goes on the NATS host, its passwords replaced.
install_file systemd/nats-server.conf /usr/local/share/doc/filepipe/nats-server.conf 0644

# --- the service user ---------------------------------------------------------------------------
# A static system user (not DynamicUser=): outputs in shared directories keep a stable owner.
if [ -n "$DESTDIR" ]; then
  say "user filepipe: not created under DESTDIR; the target system needs a system user and" \
    "group 'filepipe' (home /var/lib/filepipe, no login shell) before the service starts"
elif getent passwd filepipe >/dev/null; then
  say "user filepipe: exists"
else
  say "user filepipe: creating (system user, group filepipe, no login)"
  nologin=/usr/sbin/nologin
  [ -x "$nologin" ] || nologin=/sbin/nologin
  [ -x "$nologin" ] || nologin=/bin/false
  if command -v useradd >/dev/null; then
    run useradd --system --user-group --home-dir /var/lib/filepipe --no-create-home \
      --shell "$nologin" --comment "filepipe daemon" filepipe
  else
    run adduser --system --group --home /var/lib/filepipe --no-create-home \
      --shell "$nologin" --gecos "filepipe daemon" filepipe
  fi
fi

# --- a last look, then what to do next -----------------------------------------------------------
if [ -z "$DESTDIR" ] && [ "$dry_run" -eq 0 ] && command -v systemd-analyze >/dev/null; then
  if ! out=$(systemd-analyze verify "$unit_dir/filepipe.service" 2>&1) || [ -n "$out" ]; then
    say "warning: systemd-analyze verify $unit_dir/filepipe.service says:"
    printf '%s\n' "$out"
  fi
fi

rw=$(sed -n 's/^ReadWritePaths=//p' systemd/filepipe.service)
cat <<EOF

Next:
  1. Edit /etc/filepipe/filepipe.toml, then: filepipe check-config /etc/filepipe/filepipe.toml
  2. Let the service write your outputs. The unit allows: ReadWritePaths=$rw
     (the example config's). For other paths: systemctl edit filepipe, and add
         [Service]
         ReadWritePaths=
         ReadWritePaths=/your/out/root /dir/of/your/manifest
     They must exist (or the start fails with 226/NAMESPACE) and be writable by user
     filepipe: new ones with  install -d -o filepipe -g filepipe DIR...,
     shared ones with e.g.    setfacl -m u:filepipe:rwx,d:u:filepipe:rwx DIR
  3. systemctl daemon-reload && systemctl enable --now filepipe
  Then: systemctl status filepipe; journalctl -u filepipe -f;
        filepipe status --state /var/lib/filepipe
  More: ${DESTDIR}/usr/local/share/doc/filepipe/README.md
EOF
