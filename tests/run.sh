#!/bin/bash
# tests/run.sh - THE test command (README and CI): set up what is missing, lint, run the whole suite.
#
#   bash tests/run.sh [PYTEST ARGS...]        e.g. bash tests/run.sh -k switching -x
#
# On a fresh Debian 12 machine (as root) it:
#   1. installs the Debian packages the project and its integration tests need, only those missing
#      (python3-venv, python3-gi, systemd, dbus-user-session, libgomp1, chromium, ...; `apt-get update` first);
#   2. creates .venv with `/usr/bin/python3 -m venv --system-site-packages` if it does not exist
#      (pydbus needs Debian's python3-gi from the system site-packages);
#   3. runs `pip install -e '.[test,demo]'` unless .venv already has this pyproject.toml installed;
#   4. runs `ruff check`, then `python -m pytest -q -n 2 --dist loadfile "$@"` (LLM_ROUTER_TEST_WORKERS=1
#      for one process; 0 runs everything in this process, e.g. for -s or a debugger).
# Exits non-zero on any failure. Not root: step 1 is skipped, and the integration tests (which need
# a private systemd user manager in a mount namespace) are skipped by pytest with the reason.
# Environment: LLM_ROUTER_TEST_TIMEOUT (s, default 1200) bounds the pytest run as a whole (a guard against a
# hung run: every test has its own pytest-timeout; a fresh 2-core machine takes 9-14 minutes);
# LLM_ROUTER_REQUIRE_SANDBOX=1 turns "skipped: cannot run the systemd sandbox" into a failure, and
# LLM_ROUTER_REQUIRE_PID1=1 the skip of tests/test_pid1.py (no systemd-nspawn here) likewise;
# LLM_ROUTER_NO_CHROMIUM=1 does not install chromium (tests/test_status_page.py's browser test then skips).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd -P)
VENV=$REPO/.venv
STAMP=$VENV/.llm-router-installed
say() { echo "tests/run.sh: $*" >&2; }

# --- 1. Debian packages --------------------------------------------------------------------------
# libgomp1: the llama.cpp wheel (xllamacpp) loads libgomp.so.1, missing on a minimal Debian 12.
# systemd-container, debootstrap: tests/test_pid1.py boots a minimal Debian 12 with systemd as PID 1.
# chromium: tests/test_status_page.py opens the status page in headless Chromium (DevTools protocol);
# without recommends ~36 packages, ~130 MB to fetch: about two minutes on a fresh machine (once).
DEB_PACKAGES=(python3 python3-venv python3-gi systemd dbus dbus-user-session util-linux libgomp1
              systemd-container debootstrap)
[ -n "${LLM_ROUTER_NO_CHROMIUM:-}" ] || DEB_PACKAGES+=(chromium)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing missing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
    else
        say "missing Debian packages (install them as root): ${missing[*]}"
    fi
fi
# journald and the sandboxed manager need a machine id; minimal containers may ship none
if [ "$(id -u)" = 0 ] && [ ! -e /etc/machine-id ] && command -v systemd-machine-id-setup >/dev/null 2>&1; then
    say "no /etc/machine-id: creating one"
    systemd-machine-id-setup >/dev/null
fi

# --- 2. virtualenv -------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
PY=$VENV/bin/python

# --- 3. the project, editable, with its test and demo extras ---------------------------------------
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ] || ! "$PY" -c 'import router' 2>/dev/null; then
    say "pip install -e '.[test,demo]'"
    "$PY" -m pip install -q --disable-pip-version-check -e '.[test,demo]' </dev/null
    echo "$want" > "$STAMP"
fi
# --- 4. lint, then the suite ------------------------------------------------------------------------
say "ruff check"
"$VENV/bin/ruff" check .
say "pytest"
# Four workers (pytest-xdist), each test file on one of them (its own systemd sandbox, fixtures in order):
# most integration tests wait on units and sockets, so on 2 cores four finish in ~9 minutes, two in ~14.
exec timeout --kill-after=30 "${LLM_ROUTER_TEST_TIMEOUT:-1200}" "$PY" -m pytest -q \
    -n "${LLM_ROUTER_TEST_WORKERS:-4}" --dist loadfile "$@"
