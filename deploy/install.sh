#!/usr/bin/env bash
# Install or upgrade netwatch as a service, from this source tree. As root:
#
#   make install                      # or: bash deploy/install.sh
#
# What it does (and on an upgrade, the same again):
#   PREFIX       (/opt/netwatch)        its own venv with netwatch in it, rebuilt in place
#   BINDIR       (/usr/local/bin)       a `netwatch` link to it ("" for none)
#   SYSCONFDIR   (/etc/netwatch)        created if missing; nothing in it is ever overwritten
#   UNITDIR      (/etc/systemd/system)  netwatch.service, paths set to PREFIX and SYSCONFDIR
#   SYSTEMD      (auto)                 auto: as root, create the `netwatch` user, reload
#                                       systemd and restart a running service; no: none of it
# It never touches /var/lib/netwatch (the queue and its key): upgrades keep them.
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX="${PREFIX:-/opt/netwatch}"
BINDIR="${BINDIR-/usr/local/bin}"
SYSCONFDIR="${SYSCONFDIR:-/etc/netwatch}"
UNITDIR="${UNITDIR:-/etc/systemd/system}"
SYSTEMD="${SYSTEMD:-auto}"
PYTHON="${PYTHON:-python3}"
PIP_QUIET="${PIP_QUIET:---quiet}"

say() { printf 'netwatch install: %s\n' "$*"; }

if [ "$SYSTEMD" = auto ] && [ "$(id -u)" != 0 ]; then
	say "not root: installing files only (SYSTEMD=no)"
	SYSTEMD=no
fi

# 1. The venv. Kept across upgrades; pip replaces the netwatch package inside it. The source
#    is copied first so that the build leaves nothing behind in this tree.
if [ ! -x "$PREFIX/bin/python" ]; then
	say "creating the venv in $PREFIX"
	"$PYTHON" -m venv "$PREFIX"
fi
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/LICENSE" "$SRC/netwatch" "$SRC/probes" "$build/"
find "$build" -name __pycache__ -prune -exec rm -rf {} +
say "installing netwatch into $PREFIX"
"$PREFIX/bin/python" -m pip install $PIP_QUIET --disable-pip-version-check --upgrade "$build"
version="$("$PREFIX/bin/netwatch" --version)"

# 2. Example configs and the operator docs, beside the venv.
share="$PREFIX/share/netwatch"
install -d -m 0755 "$share" "$PREFIX/share/doc/netwatch"
install -d -m 0755 "$share/config"
cp -r "$SRC/config/." "$share/config/"
for doc in "$SRC"/docs/*.md "$SRC/README.md" "$SRC"/README.*.md; do
	if [ -f "$doc" ]; then install -m 0644 "$doc" "$PREFIX/share/doc/netwatch/"; fi
done
if [ -d "$SRC/docs/images" ]; then
	install -d -m 0755 "$PREFIX/share/doc/netwatch/images"
	install -m 0644 "$SRC"/docs/images/* "$PREFIX/share/doc/netwatch/images/"
fi

# 3. The command on PATH.
if [ -n "$BINDIR" ]; then
	install -d -m 0755 "$BINDIR"
	ln -sfn "$PREFIX/bin/netwatch" "$BINDIR/netwatch"
fi

# 4. The config directory (never its files: the site's config is the operator's).
install -d -m 0755 "$SYSCONFDIR"

# 5. The unit, with this install's paths.
install -d -m 0755 "$UNITDIR"
sed -e "s#/opt/netwatch#$PREFIX#g" -e "s#/etc/netwatch#$SYSCONFDIR#g" \
	"$SRC/deploy/netwatch.service" >"$UNITDIR/netwatch.service.new"
chmod 0644 "$UNITDIR/netwatch.service.new"
mv "$UNITDIR/netwatch.service.new" "$UNITDIR/netwatch.service"

# 6. The service user, and systemd.
if [ "$SYSTEMD" != no ]; then
	if ! getent passwd netwatch >/dev/null; then
		say "creating the system user netwatch"
		useradd --system --home-dir /var/lib/netwatch --no-create-home \
			--shell /usr/sbin/nologin --user-group netwatch
	fi
	if [ -f "$SYSCONFDIR/netwatch.yaml" ]; then
		chgrp netwatch "$SYSCONFDIR/netwatch.yaml" && chmod 0640 "$SYSCONFDIR/netwatch.yaml"
	fi
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload
		if systemctl is-active --quiet netwatch; then
			say "restarting the running service (the queue and its key are kept)"
			systemctl restart netwatch
		fi
	fi
fi

say "$version installed in $PREFIX"
if [ ! -f "$SYSCONFDIR/netwatch.yaml" ]; then
	cat <<NEXT
next:
  $PREFIX/bin/netwatch init --site SITE-ID --name "SITE NAME" --upstream https://POPDB-API \\
      --district "DISTRICT" --isp ISP -c $SYSCONFDIR/netwatch.yaml
  systemctl enable --now netwatch
  journalctl -u netwatch -f
NEXT
fi
