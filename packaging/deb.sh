#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (metadata in Cargo.toml, [package.metadata.deb]):
#   packaging/deb.sh [--binary PATH]        -> target/debian/filepipe_VERSION-1_ARCH.deb
# The binary is a lean release build (no demos, as install.sh builds it) unless --binary names
# one (CI packages the build its tests used, to check the package without a release build).
# What is generated from it goes to target/deb-assets: the man page and the shell completions
# (from the clap definitions), the units and systemd/README.md with the package's paths
# (/usr/bin, not install.sh's /usr/local/bin), and a Debian changelog entry.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=
while [ $# -gt 0 ]; do
  case $1 in
    --binary) binary=${2:?--binary needs a path}; shift ;;
    --binary=*) binary=${1#*=} ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "deb.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
command -v cargo-deb >/dev/null || {
  echo "deb.sh: cargo-deb is missing: cargo install cargo-deb --locked" >&2
  exit 1
}
if [ -z "$binary" ]; then
  cargo build --locked --release --no-default-features --features cluster
  binary=target/release/filepipe
fi

assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets"
# Stripped here: cargo-deb strips only the binaries it builds itself.
strip --strip-unneeded -o "$assets/filepipe" "$binary"
"$assets/filepipe" man | gzip -9n > "$assets/filepipe.1.gz"
"$assets/filepipe" completions bash > "$assets/filepipe.bash"
"$assets/filepipe" completions zsh > "$assets/_filepipe"
"$assets/filepipe" completions fish > "$assets/filepipe.fish"
for unit in filepipe.service filepipe@.service filepipe-worker@.service; do
  sed 's#/usr/local/bin/filepipe#/usr/bin/filepipe#g' "systemd/$unit" > "$assets/$unit"
done
# systemd/README.md, as installed: with the package's paths, not install.sh's (it told a
# packaged install to copy /usr/local/share/doc/filepipe/worker.toml, which is not there:
# found by a review).
# Its Install section is for a source tree: the package has done that (found by a review).
{
  sed -n '1,/^## Install$/p' systemd/README.md | sed '$d'
  cat <<'PACKAGED'
## Installed by the package

The filepipe package has installed what `systemd/install.sh` installs from a source tree:
`/usr/bin/filepipe`, the units in `/lib/systemd/system/`, the example config as
`/etc/filepipe/filepipe.toml`, the examples in `/usr/share/doc/filepipe/examples/`, and the
system user `filepipe` (made by the package's postinst). It started nothing: go on below.

PACKAGED
  sed -n '/^## Configure/,$p' systemd/README.md
} | sed -e 's#/usr/local/share/doc/filepipe/\(worker\.toml\|nats-server\.conf\)#/usr/share/doc/filepipe/examples/\1#g' \
  -e 's#/usr/local/bin/filepipe#/usr/bin/filepipe#g' \
  -e 's#/usr/local/lib/systemd/system/#/lib/systemd/system/#g' \
  -e 's#static system user `filepipe` that `install.sh` creates#static system user `filepipe` that the package creates#' \
  -e '/^| `install.sh` |/d' -e '/^| `check.sh` |/d' \
  > "$assets/README.systemd.md"
# README.md, as installed: the source tree's names of the files the package installs become the
# installed paths, and a note at the top says so (it sent a packaged install to
# `systemd/README.md`, which is README.systemd.md here: found by a review).
{
  sed -n '1p' README.md
  cat <<'PACKAGED'

> Installed by the Debian package: the package has done what this README's install steps do
> from a source tree (`systemd/install.sh`, `packaging/deb.sh`). filepipe is `/usr/bin/filepipe`,
> its units are in `/lib/systemd/system/`, the service guide is `README.systemd.md` beside this
> file, and the example configs are `/etc/filepipe/filepipe.toml` and `examples/` here. Paths
> such as `tests/` and `bench/` are in the source tree.
PACKAGED
  sed '1d' README.md
} | sed -e 's#`systemd/README\.md`#`README.systemd.md`#g' \
  -e 's#`systemd/\(worker\.toml\|nats-server\.conf\)`#`/usr/share/doc/filepipe/examples/\1`#g' \
  -e 's#`systemd/filepipe\.toml`#`/etc/filepipe/filepipe.toml`#g' \
  -e 's#`systemd/\(filepipe[a-z@-]*\.service\)`#`/lib/systemd/system/\1`#g' \
  -e 's#/usr/local/share/doc/filepipe/\(worker\.toml\|nats-server\.conf\)#/usr/share/doc/filepipe/examples/\1#g' \
  > "$assets/README.md"
gzip -9n < CHANGELOG.md > "$assets/changelog.gz"
# A Debian changelog entry for this version (the project's own, CHANGELOG.md, is changelog.gz),
# dated by the last commit, so the same tree makes the same package.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
when=$(git log -1 --format=%cD 2>/dev/null || date -R)
cat > "$assets/changelog" <<CHANGES
filepipe ($version-1) unstable; urgency=medium

  * Release $version; changes in /usr/share/doc/filepipe/changelog.gz.

 -- filepipe developers <filepipe@users.noreply.github.com>  $when
CHANGES

cargo deb --no-build --no-strip --locked
