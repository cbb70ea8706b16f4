#!/usr/bin/env bash
# Creates the virtual environment and installs the project into it, after checking the system
# packages it needs. Run as root, it installs missing Debian packages itself.
set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# fairseq2n links the system libsndfile.
REQUIRED_PACKAGES=(libsndfile1)
# The offline TTS engines and the KJV text of tools/synthesize_corpus.py, which rebuilds the
# bundled corpus; its test is skipped without them.
CORPUS_PACKAGES=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts bible-kjv)

if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
    echo "Python 3.10, 3.11 or 3.12 is required (fairseq2n 0.8.1 ships wheels for those only, flashlight-text none for 3.13);" >&2
    echo "'$PYTHON' is $("$PYTHON" --version 2>&1). Install Python 3.12 (on Debian 13: \`uv python install 3.12\` or pyenv)" >&2
    echo "and run: make PYTHON=python3.12 ..." >&2
    exit 1
fi

missing_packages() {
    for package in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
            echo "$package"
        fi
    done
}

mapfile -t missing < <(missing_packages "${REQUIRED_PACKAGES[@]}" "${CORPUS_PACKAGES[@]}")

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "Installing system packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        mapfile -t missing_required < <(missing_packages "${REQUIRED_PACKAGES[@]}")
        if [ ${#missing_required[@]} -gt 0 ]; then
            echo "Missing system packages: ${missing_required[*]}" >&2
            echo "Install them first:  sudo apt-get install -y ${missing_required[*]}" >&2
            exit 1
        fi
        echo "Optional packages for rebuilding the bundled corpus are missing (its test is skipped):" >&2
        echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating the virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi

"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "Installing w2v-knnvq and its dependencies into $VENV (torch is a large download the first time)"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
