#!/usr/bin/env bash
# Install Debian's dataset-fashion-mnist (31 MB: the IDX files of Fashion-MNIST's 60,000 training and 10,000 test
# images) into /usr/share/datasets/fashion-mnist. Idempotent and non-interactive: does nothing when the files are
# already there. Needs root (or passwordless sudo) and a reachable Debian/Ubuntu package mirror.
#
#   scripts/install-fashion-mnist.sh        # exit 0: files present; 1: could not install
set -euo pipefail

DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

present() {
    local f
    for f in "${FILES[@]}"; do
        [[ -s "$DIR/$f.gz" || -s "$DIR/$f" ]] || return 1
    done
}

if present; then
    echo "fashion-mnist: present in $DIR"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "fashion-mnist: apt-get not found; get the four IDX files into \$FASHION_MNIST_DIR (${FILES[*]})" >&2
    exit 1
fi

if [[ "$(id -u)" == "0" ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "fashion-mnist: needs root: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -q --no-install-recommends dataset-fashion-mnist

if present; then
    echo "fashion-mnist: installed in $DIR"
else
    echo "fashion-mnist: dataset-fashion-mnist installed, but the IDX files are not in $DIR (dpkg -L dataset-fashion-mnist)" >&2
    exit 1
fi
