#!/usr/bin/env bash
# Install the named Debian packages that are not installed yet; with all of them installed it
# changes nothing and asks no package server (so a warm machine never waits on apt).
#   bash scripts/debian-packages.sh prometheus podman ...
set -euo pipefail
missing=()
for pkg in "$@"; do
  if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != "installed" ]; then
    missing+=("$pkg")
  fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0
echo "kubetune: installing Debian packages: ${missing[*]}" >&2
if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo); fi
"${SUDO[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
