#!/usr/bin/env bash
# Installs the pinned Synapse (matrix-synapse from PyPI) into a virtualenv for the
# federation tests, once: `$MYELIN_SYNAPSE_VENV`, default
# `$HOME/.cache/myelin-synapse/venv`. Idempotent and safe to run concurrently (an
# flock on `<venv>.lock` serialises installers; the venv is built beside its final
# path and renamed into place, so a half-built venv is never used). Prints the venv's
# path on stdout when done. Used by .ci/run and by complement-tests/src/synapse.rs.
# Needs python3 (3.10+) with the venv module and PyPI access.
set -euo pipefail

SYNAPSE_VERSION="${MYELIN_SYNAPSE_VERSION:-1.163.2}"
VENV="${MYELIN_SYNAPSE_VENV:-$HOME/.cache/myelin-synapse/venv}"
PYTHON="${PYTHON:-python3}"
STAMP_NAME=".myelin-synapse-version"

installed() {
  [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/$STAMP_NAME" 2>/dev/null)" = "$SYNAPSE_VERSION" ]
}

if installed; then
  echo "$VENV"
  exit 0
fi
# A venv this script did not make (say, MYELIN_SYNAPSE_VENV pointing at one made by
# hand): use it if it has the pinned version, and never delete it.
if [ -e "$VENV" ] && [ ! -e "$VENV/$STAMP_NAME" ]; then
  if [ "$("$VENV/bin/python" -c 'import synapse; print(synapse.__version__)' 2>/dev/null)" \
    = "$SYNAPSE_VERSION" ]; then
    echo "$VENV"
    exit 0
  fi
  echo "$VENV exists but has no matrix-synapse==$SYNAPSE_VERSION and was not made by" \
    "$0; remove it or point MYELIN_SYNAPSE_VENV elsewhere" >&2
  exit 1
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
# Someone else may have finished while we waited for the lock.
if installed; then
  echo "$VENV"
  exit 0
fi

start=$(date +%s)
echo "installing matrix-synapse==$SYNAPSE_VERSION into $VENV" >&2
BUILD="$VENV.building"
rm -rf "$BUILD"
# The venv is built at its final path's sibling and renamed; console scripts carry
# the build path in their shebang, so the harness runs `<venv>/bin/python -m ...`.
"$PYTHON" -m venv "$BUILD"
"$BUILD/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$BUILD/bin/python" -m pip install --quiet --disable-pip-version-check \
  "matrix-synapse==$SYNAPSE_VERSION" >&2
"$BUILD/bin/python" -c "import synapse, sys; assert synapse.__version__ == sys.argv[1], synapse.__version__" \
  "$SYNAPSE_VERSION"
echo "$SYNAPSE_VERSION" >"$BUILD/$STAMP_NAME"
rm -rf "$VENV"
mv "$BUILD" "$VENV"
echo "installed matrix-synapse==$SYNAPSE_VERSION in $(( $(date +%s) - start )) s" >&2
echo "$VENV"
