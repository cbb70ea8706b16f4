#!/usr/bin/env bash
# Creates the virtual environment and installs the project into it, after checking the system
# libraries that fairseq2 needs. Run as root, it installs missing Debian packages itself.
set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
SYSTEM_PACKAGES=(libsndfile1)

missing=()
for package in "${SYSTEM_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "Installing system packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "Missing system packages: ${missing[*]}" >&2
        echo "Install them first:  sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "Python >= 3.10 is required; '$PYTHON' is $("$PYTHON" --version 2>&1). Run: make PYTHON=python3.11 ..." >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating the virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi

"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "Installing w2v-knnvq and its dependencies into $VENV (torch is a large download the first time)"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
