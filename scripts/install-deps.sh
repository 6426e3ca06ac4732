#!/usr/bin/env bash
# Installs what building and testing Celer needs on Debian 12, idempotently:
# apt packages (only the missing ones), the Rust toolchain if absent, cargo-nextest.
set -euo pipefail

apt_packages=(build-essential pkg-config fio qemu-utils
  protobuf-compiler libprotobuf-dev etcd-server busybox-static cpio kmod jq xz-utils curl
  e2fsprogs fdisk iproute2 nftables libvirt-clients libxml2-utils libnbd-bin)

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "install-deps: apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  export PATH="$HOME/.cargo/bin:$PATH"
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
