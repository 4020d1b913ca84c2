#!/usr/bin/env bash
# Installs the Debian packages tailcoat needs to build and test, skipping
# what is already present. Safe to run repeatedly.
set -euo pipefail
pkgs=(build-essential cmake pkg-config
      libmicrohttpd-dev libmbedtls-dev libsqlite3-dev libpq-dev libjansson-dev
      libsodium-dev libnghttp2-dev libyaml-dev libzstd-dev libcurl4-openssl-dev libb2-dev libgmp-dev
      postgresql sqlite3 curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" != 0 ] && sudo_cmd=sudo
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
