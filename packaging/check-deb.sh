#!/usr/bin/env bash
# Checks a built package: unpacked into a throwaway root (dpkg -x), every file a user relies on
# is there and works (the binary runs, the man page renders, the completions parse, the units
# run /usr/bin/filepipe and pass systemd-analyze verify, the config is a conffile), and
# lintian reports no error.
#   packaging/check-deb.sh target/debian/filepipe_VERSION-1_ARCH.deb
set -euo pipefail
deb=${1:?usage: check-deb.sh PACKAGE.deb}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

dpkg -x "$deb" "$root"
fail() { echo "check-deb.sh: $*" >&2; exit 1; }
for f in usr/bin/filepipe etc/filepipe/filepipe.toml usr/share/man/man1/filepipe.1.gz \
  usr/share/bash-completion/completions/filepipe usr/share/zsh/vendor-completions/_filepipe \
  usr/share/fish/vendor_completions.d/filepipe.fish usr/share/doc/filepipe/copyright \
  lib/systemd/system/filepipe.service lib/systemd/system/filepipe@.service \
  lib/systemd/system/filepipe-worker@.service usr/share/doc/filepipe/examples/worker.toml \
  usr/share/doc/filepipe/examples/nats-server.conf usr/share/doc/filepipe/README.systemd.md; do
  [ -s "$root/$f" ] || fail "missing or empty: /$f"
done
# The installed guide names the package's paths: every /usr/... path it gives is there.
readme="$root/usr/share/doc/filepipe/README.systemd.md"
! grep -q '/usr/local/' "$readme" || fail "README.systemd.md names /usr/local paths: $(grep -n /usr/local/ "$readme")"
! grep -q 'sudo systemd/install\.sh\|`install\.sh` creates\|^| `install\.sh`' "$readme" ||
  fail "README.systemd.md tells a packaged install to run install.sh: $(grep -n install.sh "$readme")"
for f in $(grep -o '/usr/share/doc/filepipe/[A-Za-z0-9_./-]*[A-Za-z0-9]' "$readme" | sort -u); do
  [ -e "$root$f" ] || fail "README.systemd.md names $f, which the package does not install"
done
# The installed README.md sends a reader to the installed files, not to the source tree's.
main="$root/usr/share/doc/filepipe/README.md"
[ -s "$main" ] || fail "missing or empty: /usr/share/doc/filepipe/README.md"
grep -q '^> Installed by the Debian package' "$main" || fail "README.md lacks its note on the installed paths"
! grep -q '`systemd/[A-Za-z@.-]*\.\(md\|toml\|conf\|service\)`' "$main" ||
  fail "README.md names source-tree files the package installs elsewhere: $(grep -no '`systemd/[A-Za-z@.-]*`' "$main")"
for f in $(grep -o '/usr/share/doc/filepipe/[A-Za-z0-9_./-]*[A-Za-z0-9]\|/lib/systemd/system/[A-Za-z0-9_.@-]*[a-z]\|/etc/filepipe/filepipe\.toml' "$main" | sort -u); do
  [ -e "$root$f" ] || fail "README.md names $f, which the package does not install"
done
"$root/usr/bin/filepipe" --version
zcat "$root/usr/share/man/man1/filepipe.1.gz" | groff -man -Tutf8 -ww >/dev/null
bash -n "$root/usr/share/bash-completion/completions/filepipe"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/filepipe/filepipe.toml ||
  fail "/etc/filepipe/filepipe.toml is not a conffile"
# The maintainer scripts parse, and the user's creation and the units' stop are there.
for script in postinst prerm postrm; do
  dpkg-deb --ctrl-tarfile "$deb" | tar -xO "./$script" > "$root/$script"
  sh -n "$root/$script" || fail "$script does not parse"
done
grep -q 'adduser --system' "$root/postinst" || fail "postinst does not create the user"
grep -q 'deb-systemd-invoke stop' "$root/prerm" || fail "prerm does not stop the units"
for unit in "$root"/lib/systemd/system/*.service; do
  grep -q '^ExecStart=/usr/bin/filepipe ' "$unit" || fail "$unit does not run /usr/bin/filepipe"
done
if command -v systemd-analyze >/dev/null; then
  # The units as installed: /usr/bin/filepipe is the unpacked binary, bound in by path.
  for unit in "$root"/lib/systemd/system/filepipe.service; do
    sed "s#/usr/bin/filepipe#$root/usr/bin/filepipe#" "$unit" > "$root/check.service"
    out=$(systemd-analyze verify "$root/check.service" 2>&1) || fail "systemd-analyze: $out"
  done
fi
lintian --fail-on error --suppress-tags initial-upload-closes-no-bugs "$deb"
echo "check-deb.sh: $deb: ok"
