#!/usr/bin/env bash
# Fetch the Debian wallpaper packages (real JPEG/PNG photos) for scripts/bench_preprocess.py and the slow
# fidelity test in tests/test_preprocess.py. They are not in git: DIR defaults to bench-data/wallpapers.
# Usage: scripts/get_wallpapers.sh [DIR]
set -euo pipefail

dir="${1:-bench-data/wallpapers}"
packages=(gnome-backgrounds mate-backgrounds)

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod a+rwx "$work"  # apt-get download runs as _apt

cd "$work"
if ! apt-get download "${packages[@]}"; then
    echo "apt-get download failed; run 'apt-get update' first (as root) and retry" >&2
    exit 1
fi
for deb in ./*.deb; do
    dpkg -x "$deb" "$dir"
done

count="$(find "$dir" -type f \( -iname '*.jpg' -o -iname '*.jpeg' \) | wc -l)"
echo "$count JPEGs under $dir"
