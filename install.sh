#!/usr/bin/env bash
# install.sh - install llm-router as a systemd service, or try it in one command (--demo).
# Run ./install.sh --help for every option.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi   # `sh install.sh` works too
set -euo pipefail
umask 022

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
SBX_SCRIPT=$REPO/router/demo/systemd-sandbox.sh
ROUTER_UNIT=llm-router.service
DEMO_UNIT=llm-router-demo.service
DEMO_BACKEND_UNIT=llm-router-demo-llamacpp.service
DROPIN_NAME=50-llm-router.conf
MANIFEST_NAME=install-manifest
HEALTH_TIMEOUT=${LLM_ROUTER_HEALTH_TIMEOUT:-60}
START_TIMEOUT=${LLM_ROUTER_START_TIMEOUT:-120}

usage() {
    cat <<'EOF'
Usage: sudo ./install.sh [OPTIONS]          install llm-router as a system service (Debian/Ubuntu)
       ./install.sh --user [OPTIONS]        install it for the current user (systemctl --user)
       ./install.sh --demo [OPTIONS]        try it: two tiny CPU models, nothing downloaded
       ./install.sh --demo --stop           end the demo and remove everything it created
       sudo ./install.sh --uninstall [--purge]

What a system install does: installs the OS packages it needs (python3-venv, python3-gi) with apt,
creates a venv (with system site packages, for gi/pydbus) under the prefix, installs llm-router from
this checkout into it, writes config.yml and models.yml into the config directory only if they do
not exist (otherwise the new defaults go beside them as *.dist), installs llm-router.service and the
backend unit templates (vllm, sglang, llamacpp, tabbyapi: only those named in config.yml), runs
daemon-reload, enables and (re)starts the router, waits for /health and prints the URL to paste
into Open WebUI. Running it again upgrades the code and restarts the router; files you edited are
kept (new versions go beside them as *.dist).

Interactive when stdin is a terminal (asks for the port, listen address, backends and their ports,
and an optional API key, for a new configuration); --yes or no terminal: the flags and defaults.

Options:
  --user              install for the current user: venv in ~/.local/share/llm-router, config in
                      ~/.config/llm-router, units in ~/.config/systemd/user, `systemd.bus: user`
                      (follows $XDG_DATA_HOME / $XDG_CONFIG_HOME). No root needed, but the OS
                      packages must be there and a systemd user manager must run.
  -y, --yes           non-interactive: never ask, use the flags and the defaults
  --port PORT         port the router listens on (default 8002)
  --listen ADDR       address it listens on (default 127.0.0.1; 0.0.0.0 = every interface,
                      then set an API key)
  --backends LIST     the inference engines in use and their ports, comma-separated NAME[:PORT]:
                      llamacpp, vllm, sglang, tabby (default: llamacpp:8085). Their examples in
                      models.yml become active, the others stay commented out.
  --api-key KEY       clients must send "Authorization: Bearer KEY" (default: no key)
  --prefix DIR        where the venv and the install manifest go (default /opt/llm-router;
                      --user: ~/.local/share/llm-router)
  --config-dir DIR    where config.yml and models.yml go (default /etc/llm-router;
                      --user: ~/.config/llm-router)
  --venv DIR          use this existing venv instead of creating one under the prefix; nothing is
                      pip-installed into it, so it must already have llm-router (e.g. a development
                      venv made with `pip install -e .`; with --demo also the `demo` extra). Fast
                      re-installs for tests; --uninstall leaves it alone.
  --python PATH       the Python (3.10 or newer) that builds the venv (default: /usr/bin/python3,
                      the one python3-gi is built for; else python3 on PATH)
  --demo              try it on this machine: a local venv (./.demo/venv, with the `demo` extra),
                      two tiny generated models (tiny-a, tiny-b) on one llama.cpp unit, a router on
                      127.0.0.1:8002, all as units of your systemd user manager, or, when none is
                      reachable (container, CI, PID 1 not systemd), of a private systemd user
                      manager the demo starts itself (that needs root). Prints a curl command and
                      the Open WebUI URL.
  --demo-dir DIR      where the demo keeps its venv, models, config and state (default ./.demo)
  --sandbox           with --demo: always use a private systemd user manager (needs root), even if
                      your own user manager runs; only where systemd is not PID 1
  --stop              with --demo: stop the demo and remove everything it created
  --uninstall         stop and disable the router, remove its units, the backend unit templates
                      install.sh installed (unless you edited them), the router's drop-ins and the
                      venv; keeps the config directory
  --purge             with --uninstall: remove the config directory too
  -h, --help          show this help

Environment: pip honours PIP_INDEX_URL, PIP_FIND_LINKS etc. (offline installs); the router's
dependencies come from PyPI otherwise. LLM_ROUTER_HEALTH_TIMEOUT (default 60 s) bounds the wait
for /health.
EOF
}

# --- output -----------------------------------------------------------------------------------------
if [ -t 1 ]; then BOLD=$'\e[1m'; RED=$'\e[31m'; YEL=$'\e[33m'; GRN=$'\e[32m'; OFF=$'\e[0m'
else BOLD= RED= YEL= GRN= OFF=; fi
say()  { printf '%s==>%s %s\n' "$BOLD" "$OFF" "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf '%swarning:%s %s\n' "$YEL" "$OFF" "$*" >&2; }
die()  { printf '%serror:%s %s\n' "$RED" "$OFF" "$*" >&2; exit 1; }

# --- arguments ----------------------------------------------------------------------------------------
USER_MODE=0 YES=0 DEMO=0 STOP=0 UNINSTALL=0 PURGE=0 SANDBOX=0
PORT= LISTEN= BACKENDS= API_KEY= PREFIX= CONFIG_DIR= VENV= PYTHON= DEMO_DIR=
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
    arg=$1
    case $arg in
        --*=*) set -- "${arg%%=*}" "${arg#*=}" "${@:2}"; continue ;;
    esac
    case $arg in
        -h|--help) usage; exit 0 ;;
        --user) USER_MODE=1 ;;
        -y|--yes) YES=1 ;;
        --port) need "$@"; PORT=$2; shift ;;
        --listen) need "$@"; LISTEN=$2; shift ;;
        --backends) need "$@"; BACKENDS=$2; shift ;;
        --api-key) need "$@"; API_KEY=$2; shift ;;
        --prefix) need "$@"; PREFIX=$2; shift ;;
        --config-dir) need "$@"; CONFIG_DIR=$2; shift ;;
        --venv) need "$@"; VENV=$2; shift ;;
        --python) need "$@"; PYTHON=$2; shift ;;
        --demo) DEMO=1 ;;
        --demo-dir) need "$@"; DEMO_DIR=$2; shift ;;
        --sandbox) SANDBOX=1 ;;
        --stop) STOP=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        *) die "unknown option: $arg (see --help)" ;;
    esac
    shift
done
if [ "$STOP" = 1 ]; then DEMO=1; fi
if [ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ]; then die "--purge only goes with --uninstall"; fi
if [ "$DEMO" = 1 ] && [ "$UNINSTALL" = 1 ]; then die "--demo and --uninstall don't go together (use --demo --stop)"; fi
if [ -n "$PORT" ]; then
    case $PORT in ''|*[!0-9]*) die "--port: '$PORT' is not a port number" ;; esac
    [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "--port: $PORT is not in 1..65535"
fi
case $LISTEN in *[[:space:]]*) die "--listen: '$LISTEN' is not an address" ;; esac
case $API_KEY in *[[:space:]]*) die "--api-key must not contain spaces" ;; esac
if [ -n "$VENV" ]; then VENV=$(cd "$VENV" 2>/dev/null && pwd -P) || die "--venv: no such directory"; fi
# the distribution's Python by default: python3-gi (pydbus's GLib bindings) is built for it, not for a
# pyenv/conda python3 that may come first on PATH
if [ -z "$PYTHON" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
INTERACTIVE=0
if [ "$YES" = 0 ] && [ -t 0 ]; then INTERACTIVE=1; fi

ask() { # VAR "question" DEFAULT
    local answer
    read -r -p "    $2 [$3]: " answer || answer=
    printf -v "$1" '%s' "${answer:-$3}"
}
confirm() { # "question" -> 0 yes
    [ "$INTERACTIVE" = 1 ] || return 0
    local answer
    read -r -p "    $1 [Y/n]: " answer || answer=
    case $answer in [nN]*) return 1 ;; *) return 0 ;; esac
}

# --- checks -------------------------------------------------------------------------------------------
pid1() { ps -o comm= -p 1 2>/dev/null || cat /proc/1/comm 2>/dev/null || echo unknown; }

user_manager_state() { # prints the user manager's state, or nothing when none is reachable
    command -v systemctl >/dev/null || return 0
    [ -n "${XDG_RUNTIME_DIR:-}" ] && [ -S "$XDG_RUNTIME_DIR/systemd/private" ] || return 0
    timeout 10 systemctl --user is-system-running 2>/dev/null || true
}

check_root() {
    [ "$(id -u)" = 0 ] || die "a system install needs root: run \`sudo ./install.sh\`; or install for your user only with \`./install.sh --user\` (or try it: \`./install.sh --demo\`)"
}

check_systemd() {
    command -v systemctl >/dev/null && command -v journalctl >/dev/null \
        || die "systemctl/journalctl not found: llm-router drives its backends as systemd units and needs systemd"
    if [ "$USER_MODE" = 1 ]; then
        local state; state=$(user_manager_state)
        case $state in
            running|degraded|starting|initializing|maintenance) ;;
            *) die "no systemd user manager is reachable (systemctl --user: ${state:-no connection; XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-unset}}). Log in through a systemd session (or run \`loginctl enable-linger $(id -un)\` as root), or install system-wide with \`sudo ./install.sh\`." ;;
        esac
    else
        [ -d /run/systemd/system ] || die "systemd is not running on this host (PID 1 is $(pid1)): llm-router manages backends as systemd units. To try it anyway, run \`./install.sh --demo\`: it brings a private systemd manager."
    fi
}

PY_VERSION=
check_python() { # $1 = interpreter
    command -v "$1" >/dev/null || die "no Python interpreter '$1' found: install Python 3.10 or newer (apt-get install python3), or pass --python PATH"
    PY_VERSION=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
        || die "'$1' does not run as a Python interpreter"
    local major=${PY_VERSION%%.*} minor=${PY_VERSION#*.}
    if [ "$major" -lt 3 ] || { [ "$major" = 3 ] && [ "$minor" -lt 10 ]; }; then
        die "Python $PY_VERSION ($1) is too old: llm-router needs Python 3.10 or newer (Debian 12, Ubuntu 22.04 and later have it); pass a newer one with --python PATH"
    fi
}

MISSING_PKGS=()
find_missing_packages() { # $1 = interpreter; fills MISSING_PKGS
    MISSING_PKGS=()
    local py=$1
    if [ "$VENV_EXTERNAL" = 1 ]; then
        py=$VENV/bin/python
    else
        "$1" -c 'import venv, ensurepip' >/dev/null 2>&1 || MISSING_PKGS+=(python3-venv)
    fi
    "$py" -c 'import gi; gi.require_version("Gio", "2.0"); from gi.repository import Gio' >/dev/null 2>&1 \
        || MISSING_PKGS+=(python3-gi)
    if [ "$DEMO" = 1 ]; then
        # the llama.cpp wheel (xllamacpp) loads GNU OpenMP, which a minimal Debian lacks
        has_library libgomp.so.1 || MISSING_PKGS+=(libgomp1)
        # the demo's units talk to their user manager over the user's D-Bus (dbus.socket of the user manager)
        [ -e /usr/lib/systemd/user/dbus.socket ] || [ -e /lib/systemd/user/dbus.socket ] \
            || MISSING_PKGS+=(dbus-user-session)
    fi
}

has_library() { # SONAME: the dynamic linker finds it
    local ldconfig
    ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
    "$ldconfig" -p 2>/dev/null | grep -q "^[[:space:]]*$1 " && return 0
    [ ! -x "$ldconfig" ] || return 1
    # no ldconfig to ask: look where Debian and others keep libraries
    compgen -G "/usr/lib/*/$1" >/dev/null || compgen -G "/usr/lib64/$1" >/dev/null || compgen -G "/usr/lib/$1" >/dev/null
}

ensure_packages() { # $1 = interpreter
    find_missing_packages "$1"
    [ ${#MISSING_PKGS[@]} -gt 0 ] || return 0
    local what="${MISSING_PKGS[*]}"
    if ! command -v apt-get >/dev/null; then
        die "missing OS packages and no apt-get to install them: install by hand the Python venv module with ensurepip (Debian/Ubuntu: python3-venv), PyGObject for $1 (Debian/Ubuntu: python3-gi; Fedora: python3-gobject; Arch: python-gobject)$([ "$DEMO" = 0 ] || echo ", GNU OpenMP (libgomp1; Fedora: libgomp) and the user D-Bus (dbus-user-session; Fedora: dbus-daemon)"), then run this again. Missing (Debian names): $what"
    fi
    if [ "$(id -u)" != 0 ]; then
        die "missing OS packages: $what. Install them with \`sudo apt-get install $what\`, then run this again."
    fi
    say "Installing OS packages: $what"
    confirm "Install $what with apt-get?" || die "cancelled: install $what, then run this again"
    DEBIAN_FRONTEND=noninteractive apt-get update -q || warn "apt-get update failed; trying the install anyway"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${MISSING_PKGS[@]}" || die "apt-get install $what failed"
    find_missing_packages "$1"
    [ ${#MISSING_PKGS[@]} = 0 ] || die "still missing after apt-get: ${MISSING_PKGS[*]} for $1 (Debian's packages are for /usr/bin/python3: pass --python /usr/bin/python3)"
}

# --- small helpers -----------------------------------------------------------------------------------
TMP=$(mktemp -d)
cleanup_tmp() { rm -rf "$TMP"; }
trap cleanup_tmp EXIT

sha() { sha256sum "$1" | cut -d' ' -f1; }

helper() { # run router.installer with the venv's Python (or the checkout's with the system Python)
    if [ -n "${RUN_PY:-}" ]; then "$RUN_PY" -m router.installer "$@"
    else PYTHONPATH=$REPO "$PYTHON" -m router.installer "$@"; fi
}

# install manifest: one "sha256 path" line per file install.sh put in place
MANIFEST=
manifest_get() { [ -f "$MANIFEST" ] && awk -v p="$1" '$2 == p { print $1 }' "$MANIFEST" | tail -n1 || true; }
manifest_set() {
    mkdir -p "$(dirname "$MANIFEST")"
    touch "$MANIFEST"
    awk -v p="$2" '$2 != p' "$MANIFEST" > "$MANIFEST.tmp"
    echo "$1 $2" >> "$MANIFEST.tmp"
    mv -f "$MANIFEST.tmp" "$MANIFEST"
}
manifest_del() { [ -f "$MANIFEST" ] || return 0; awk -v p="$1" '$2 != p' "$MANIFEST" > "$MANIFEST.tmp"; mv -f "$MANIFEST.tmp" "$MANIFEST"; }

# install_file SRC DEST MODE: put SRC at DEST unless the file there was edited by someone else; then
# keep it and put SRC beside it as DEST.dist
install_file() {
    local src=$1 dest=$2 mode=${3:-0644} new cur rec
    new=$(sha "$src")
    mkdir -p "$(dirname "$dest")"
    if [ ! -e "$dest" ]; then
        install -m "$mode" "$src" "$dest"; manifest_set "$new" "$dest"; note "installed $dest"
        return 0
    fi
    cur=$(sha "$dest"); rec=$(manifest_get "$dest")
    if [ "$cur" = "$new" ]; then
        manifest_set "$new" "$dest"
        if [ -e "$dest.dist" ] && [ -n "$(manifest_get "$dest.dist")" ]; then rm -f "$dest.dist"; manifest_del "$dest.dist"; fi
        note "unchanged $dest"
    elif [ -n "$rec" ] && [ "$cur" = "$rec" ]; then
        install -m "$mode" "$src" "$dest"; manifest_set "$new" "$dest"; note "updated $dest"
    else
        install -m "$mode" "$src" "$dest.dist"; manifest_set "$(sha "$dest.dist")" "$dest.dist"
        note "kept $dest (edited, or not installed by install.sh); the new version is $dest.dist"
    fi
}

# --- paths --------------------------------------------------------------------------------------------
: "${HOME:=$(getent passwd "$(id -u)" | cut -d: -f6)}"
XDG_CONFIG=${XDG_CONFIG_HOME:-$HOME/.config}
XDG_DATA=${XDG_DATA_HOME:-$HOME/.local/share}
set_paths() {
    if [ "$USER_MODE" = 1 ]; then
        PREFIX=${PREFIX:-$XDG_DATA/llm-router}
        CONFIG_DIR=${CONFIG_DIR:-$XDG_CONFIG/llm-router}
        UNIT_DIR=$XDG_CONFIG/systemd/user
        SCTL=(systemctl --user)
        JOURNAL_CMD="journalctl --user-unit=$ROUTER_UNIT"
        BUS=user
    else
        PREFIX=${PREFIX:-/opt/llm-router}
        CONFIG_DIR=${CONFIG_DIR:-/etc/llm-router}
        UNIT_DIR=/etc/systemd/system
        SCTL=(systemctl)
        JOURNAL_CMD="journalctl -u $ROUTER_UNIT"
        BUS=system
    fi
    case $PREFIX in /*) ;; *) PREFIX=$PWD/$PREFIX ;; esac
    case $CONFIG_DIR in /*) ;; *) CONFIG_DIR=$PWD/$CONFIG_DIR ;; esac
    VENV_EXTERNAL=0
    if [ -n "$VENV" ]; then VENV_EXTERNAL=1; else VENV=$PREFIX/venv; fi
    MANIFEST=$PREFIX/$MANIFEST_NAME
    SCTL_HINT="${SCTL[*]}"
}

# --- the venv -----------------------------------------------------------------------------------------
# ensure_venv EXTRA: create/refresh the venv and install this checkout (with extra, e.g. "[demo]")
ensure_venv() {
    local extra=${1:-} need_import="import router, pydbus, yaml, httpx"
    [ -z "$extra" ] || need_import="$need_import, xllamacpp, gguf, numpy"
    if [ "$VENV_EXTERNAL" = 1 ]; then
        [ -x "$VENV/bin/python" ] || die "--venv $VENV: no $VENV/bin/python"
        "$VENV/bin/python" -c "$need_import" 2>/dev/null \
            || die "--venv $VENV lacks llm-router or its dependencies: run $VENV/bin/pip install -e '$REPO$extra' first (--venv installs nothing)"
        say "Using the existing venv $VENV (nothing installed into it)"
        RUN_PY=$VENV/bin/python
        return 0
    fi
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys, gi; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        say "Updating llm-router in $VENV"
    else
        say "Creating the venv $VENV (Python $PY_VERSION, with system site packages for gi)"
        rm -rf "$VENV"
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv --system-site-packages "$VENV" || die "creating the venv $VENV failed"
    fi
    # build from a copy: pip/setuptools would otherwise write build/ and *.egg-info into the checkout
    local src=$TMP/src
    mkdir -p "$src"
    cp -R "$REPO/pyproject.toml" "$REPO/router" "$src/"
    if [ -f "$REPO/README.md" ]; then cp "$REPO/README.md" "$src/"; else echo "llm-router" > "$src/README.md"; fi
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    "$VENV/bin/python" -m pip install --disable-pip-version-check -qq --upgrade "$src$extra" \
        || die "pip install of llm-router into $VENV failed (see above); offline? set PIP_INDEX_URL or PIP_FIND_LINKS"
    # same version number as before: make sure the code is this checkout's
    "$VENV/bin/python" -m pip install --disable-pip-version-check -qq --no-deps --force-reinstall "$src" \
        || die "pip install of llm-router into $VENV failed"
    "$VENV/bin/python" -c "$need_import" || die "the venv $VENV is incomplete (import failed)"
    RUN_PY=$VENV/bin/python
    note "llm-router $("$RUN_PY" -c 'import router; print(router.__version__)') installed in $VENV"
}

# --- health and URLs ----------------------------------------------------------------------------------
wait_router() { # URL UNIT-HINT
    local out
    if out=$("$RUN_PY" -m router.installer wait-health --url "$1" --timeout "$HEALTH_TIMEOUT"); then
        note "GET $1/health: $out"
        return 0
    fi
    printf '%s\n' "$out" >&2
    return 1
}

print_openwebui() { # HOST PORT KEY
    local url key_hint
    url=$("$RUN_PY" -m router.installer client-url --host "$1" --port "$2")
    key_hint=${3:-"anything (the router has no api_key set)"}
    echo
    echo "${GRN}Open WebUI${OFF}: Admin Panel -> Settings -> Connections -> OpenAI API -> add a connection:"
    echo "    URL: $url"
    echo "    Key: $key_hint"
    case $1 in
        127.0.0.1|localhost|::1)
            echo "    (The router listens on $1 only: that works when Open WebUI runs on this host with host"
            echo "     networking. For Open WebUI in a container or elsewhere, set listen.host: 0.0.0.0 and an"
            echo "     api_key in $CONFIG_DIR/config.yml, then use http://<this host>:$2/v1.)" ;;
    esac
}

show_failure() { # UNIT
    echo "---- ${SCTL_HINT} status $1 ----" >&2
    "${SCTL[@]}" --no-pager status "$1" >&2 2>&1 || true
    echo "---- $JOURNAL_CMD (last lines) ----" >&2
    $JOURNAL_CMD --no-pager -n 30 >&2 2>&1 || true
}

# ======================================================================================================
# install
# ======================================================================================================
do_install() {
    [ "$USER_MODE" = 1 ] || check_root
    check_systemd
    if [ "$VENV_EXTERNAL" = 1 ]; then check_python "$VENV/bin/python"; else check_python "$PYTHON"; fi
    ensure_packages "$PYTHON"

    local have_config=0
    [ -e "$CONFIG_DIR/config.yml" ] && have_config=1
    # --- the questions (only for a new configuration) ---
    local DEFAULT_HOST DEFAULT_PORT KNOWN_BACKENDS ACTIVE_BACKENDS
    eval "$(helper defaults --template-dir "$REPO/etc/llm-router")"
    if [ "$have_config" = 1 ]; then
        [ "$INTERACTIVE" = 0 ] || say "$CONFIG_DIR/config.yml exists: keeping it, so no questions about it"
    elif [ "$INTERACTIVE" = 1 ]; then
        say "A few questions for $CONFIG_DIR/config.yml (Enter keeps the default):"
        ask PORT "Port the router listens on" "${PORT:-$DEFAULT_PORT}"
        ask LISTEN "Listen address (127.0.0.1 = this host only, 0.0.0.0 = every interface)" "${LISTEN:-$DEFAULT_HOST}"
        local names="" b default_backends=${BACKENDS:-$ACTIVE_BACKENDS}
        for b in $KNOWN_BACKENDS; do names="$names${names:+, }${b%%:*}"; done
        ask BACKENDS "Backends in use ($names), comma-separated" "$default_backends"
        local spec="" name port dport
        for name in ${BACKENDS//,/ }; do
            name=${name%%:*}
            dport=
            for b in $KNOWN_BACKENDS; do [ "${b%%:*}" != "$name" ] || dport=${b#*:}; done
            port=$(printf '%s\n' "${BACKENDS//,/$'\n'}" | awk -F: -v n="$name" '$1 == n && $2 != "" { print $2 }')
            ask port "Port of $name" "${port:-$dport}"
            spec="$spec${spec:+,}$name:$port"
        done
        BACKENDS=$spec
        local key_default=${API_KEY:-none}
        ask API_KEY "API key clients must send (none = no key)" "$key_default"
        [ "$API_KEY" != none ] || API_KEY=
        case $PORT in ''|*[!0-9]*) die "port '$PORT' is not a number" ;; esac
    fi

    say "Installing llm-router ($([ "$USER_MODE" = 1 ] && echo "for user $(id -un)" || echo system-wide))"
    note "venv: $VENV   config: $CONFIG_DIR   units: $UNIT_DIR"
    mkdir -p "$PREFIX"
    ensure_venv ""

    # --- configuration: only if absent; else the new defaults beside it as *.dist ---
    say "Configuration in $CONFIG_DIR"
    local render=(render-config --template-dir "$REPO/etc/llm-router" --out "$TMP/etc")
    [ -z "$PORT" ] || render+=(--port "$PORT")
    [ -z "$LISTEN" ] || render+=(--host "$LISTEN")
    [ -z "$BACKENDS" ] || render+=(--backends "$BACKENDS")
    [ -z "$API_KEY" ] || render+=(--api-key "$API_KEY")
    [ "$USER_MODE" = 0 ] || render+=(--bus user)
    helper "${render[@]}" || die "could not write the configuration (see above)"
    mkdir -p "$CONFIG_DIR"
    local f mode=0644
    [ -z "$API_KEY" ] || mode=0600
    for f in config.yml models.yml; do
        if [ ! -e "$CONFIG_DIR/$f" ]; then
            install -m "$mode" "$TMP/etc/$f" "$CONFIG_DIR/$f"
            manifest_set "$(sha "$CONFIG_DIR/$f")" "$CONFIG_DIR/$f"
            note "wrote $CONFIG_DIR/$f"
        elif cmp -s "$TMP/etc/$f" "$CONFIG_DIR/$f"; then
            [ ! -e "$CONFIG_DIR/$f.dist" ] || { rm -f "$CONFIG_DIR/$f.dist"; manifest_del "$CONFIG_DIR/$f.dist"; }
            note "kept $CONFIG_DIR/$f (same as the defaults)"
        else
            install -m "$mode" "$TMP/etc/$f" "$CONFIG_DIR/$f.dist"
            manifest_set "$(sha "$CONFIG_DIR/$f.dist")" "$CONFIG_DIR/$f.dist"
            note "kept your $CONFIG_DIR/$f; the new defaults are in $CONFIG_DIR/$f.dist"
            if [ -n "$PORT$LISTEN$BACKENDS$API_KEY" ]; then
                warn "--port/--listen/--backends/--api-key only shape a new configuration: they went into $CONFIG_DIR/$f.dist, not into your $f; edit it and run \`${SCTL_HINT} reload llm-router\`"
            fi
        fi
    done
    local check_out
    if ! check_out=$("$VENV/bin/llm-router" check --config-dir "$CONFIG_DIR" 2>&1); then
        printf '%s\n' "$check_out" >&2
        die "the configuration in $CONFIG_DIR is not valid (above); fix it and run install.sh again. The router was not (re)started."
    fi
    note "$check_out"

    # --- units ---
    say "Units in $UNIT_DIR"
    local rw=() d
    rw+=("$UNIT_DIR" "$CONFIG_DIR")
    while IFS= read -r d; do [ -z "$d" ] || rw+=("-$d"); done < <("$RUN_PY" -m router.installer config-file-dirs --config-dir "$CONFIG_DIR")
    local unit_args=(render-unit --template "$REPO/units/$ROUTER_UNIT" --mode "$BUS" --venv "$VENV"
                     --config-dir "$CONFIG_DIR" --manager-uid "$(id -u)")
    for d in "${rw[@]}"; do unit_args+=("--rw-path=$d"); done
    # ReadWritePaths= must exist when the unit starts
    mkdir -p "$UNIT_DIR"
    "$RUN_PY" -m router.installer "${unit_args[@]}" > "$TMP/$ROUTER_UNIT"
    install_file "$TMP/$ROUTER_UNIT" "$UNIT_DIR/$ROUTER_UNIT"
    # the backends' units (and the template of each engine: llamacpp@.service beside llamacpp.service),
    # installed, never started: the router starts them (a template's instances too)
    local unit
    while IFS= read -r unit; do
        [ -n "$unit" ] || continue
        install_file "$REPO/units/$unit" "$UNIT_DIR/$unit"
    done < <("$RUN_PY" -m router.installer backend-units --config-dir "$CONFIG_DIR" --units-dir "$REPO/units")
    echo "venv $VENV $VENV_EXTERNAL" > "$PREFIX/install-venv"

    # --- start ---
    say "Starting the router"
    "${SCTL[@]}" daemon-reload
    "${SCTL[@]}" enable --quiet "$ROUTER_UNIT" || die "${SCTL_HINT} enable $ROUTER_UNIT failed"
    "${SCTL[@]}" reset-failed "$ROUTER_UNIT" 2>/dev/null || true
    if ! timeout "$START_TIMEOUT" "${SCTL[@]}" restart "$ROUTER_UNIT"; then
        show_failure "$ROUTER_UNIT"
        die "the router did not start (above)"
    fi
    local host port key
    read -r host port key < <("$RUN_PY" -m router.installer listen --config-dir "$CONFIG_DIR") || true
    local local_url
    local_url="http://$(local_host "$host"):$port"
    if ! wait_router "$local_url"; then
        show_failure "$ROUTER_UNIT"
        die "the router started but $local_url/health did not answer within ${HEALTH_TIMEOUT}s"
    fi
    echo
    echo "${GRN}llm-router is running${OFF} ($ROUTER_UNIT, $("${SCTL[@]}" is-active "$ROUTER_UNIT"), enabled at boot)."
    note "models:   $VENV/bin/llm-router models --config-dir $CONFIG_DIR"
    note "config:   edit $CONFIG_DIR/models.yml, then \`${SCTL_HINT} reload llm-router\` (it fails, saying why, if the router refuses the files)"
    note "logs:     $JOURNAL_CMD -f"
    if [ "$USER_MODE" = 1 ] && [ "$(id -u)" != 0 ] && command -v loginctl >/dev/null \
        && [ "$(loginctl show-user "$(id -un)" -p Linger --value 2>/dev/null)" = no ]; then
        note "boot:     your user manager (and the router) runs only while you are logged in; to keep it"
        note "          running after logout and start it at boot: sudo loginctl enable-linger $(id -un)"
    fi
    print_openwebui "$host" "$port" "$key"
}

local_host() {
    case $1 in 0.0.0.0|''|'*') echo 127.0.0.1 ;; ::) echo '[::1]' ;; *:*) echo "[$1]" ;; *) echo "$1" ;; esac
}

# ======================================================================================================
# uninstall
# ======================================================================================================
do_uninstall() {
    [ "$USER_MODE" = 1 ] || check_root
    check_systemd
    say "Uninstalling llm-router ($([ "$USER_MODE" = 1 ] && echo "user $(id -un)" || echo system-wide))"
    local venv_line=() f rec cur
    if [ -f "$PREFIX/install-venv" ]; then read -r -a venv_line < "$PREFIX/install-venv"; fi
    [ -f "$MANIFEST" ] || warn "no install manifest at $MANIFEST: removing only the router unit and the venv"
    "${SCTL[@]}" disable --now "$ROUTER_UNIT" >/dev/null 2>&1 || true
    note "stopped and disabled $ROUTER_UNIT"
    # backend unit templates install.sh put there: stop them, drop the router's drop-in, remove them
    local files=()
    if [ -f "$MANIFEST" ]; then mapfile -t files < <(awk '{ print $2 }' "$MANIFEST"); fi
    local stop_units=() unit i
    for f in "${files[@]}"; do
        case $f in "$UNIT_DIR"/*.service) unit=${f##*/}; [ "$unit" = "$ROUTER_UNIT" ] || stop_units+=("$unit") ;; esac
    done
    # a template (llamacpp@.service) cannot be stopped itself: its instances can (llamacpp@*.service)
    for i in "${!stop_units[@]}"; do
        case ${stop_units[$i]} in *@.service) stop_units[$i]="${stop_units[$i]%@.service}@*.service" ;; esac
    done
    if [ ${#stop_units[@]} -gt 0 ]; then
        "${SCTL[@]}" stop "${stop_units[@]}" >/dev/null 2>&1 || true
        note "stopped ${stop_units[*]}"
    fi
    for f in "${files[@]}"; do
        [ -e "$f" ] || continue
        case $f in
            "$CONFIG_DIR"/config.yml|"$CONFIG_DIR"/models.yml) continue ;;   # the config stays (--purge)
        esac
        rec=$(manifest_get "$f"); cur=$(sha "$f")
        if [ "$cur" = "$rec" ] || [ "$f" = "$UNIT_DIR/$ROUTER_UNIT" ] || [ "${f%.dist}" != "$f" ]; then
            rm -f "$f"; note "removed $f"
        else
            note "kept $f (you edited it)"
        fi
    done
    [ -e "$UNIT_DIR/$ROUTER_UNIT" ] && { rm -f "$UNIT_DIR/$ROUTER_UNIT"; note "removed $UNIT_DIR/$ROUTER_UNIT"; }
    # the drop-ins the router wrote (only its own file name; other drop-ins stay)
    for f in "$UNIT_DIR"/*.service.d/"$DROPIN_NAME"; do
        [ -e "$f" ] || continue
        rm -f "$f"; note "removed $f"
        rmdir "$(dirname "$f")" 2>/dev/null || true
    done
    "${SCTL[@]}" daemon-reload || true
    "${SCTL[@]}" reset-failed "$ROUTER_UNIT" "${stop_units[@]}" >/dev/null 2>&1 || true
    # the venv (unless it was given with --venv) and the prefix
    if [ "${#venv_line[@]}" -ge 3 ] && [ "${venv_line[2]}" = 0 ]; then
        rm -rf "${venv_line[1]}"; note "removed ${venv_line[1]}"
    elif [ "${#venv_line[@]}" = 0 ] && [ -d "$PREFIX/venv" ]; then
        rm -rf "$PREFIX/venv"; note "removed $PREFIX/venv"
    fi
    rm -f "$MANIFEST" "$MANIFEST.tmp" "$PREFIX/install-venv"
    rmdir "$PREFIX" 2>/dev/null && note "removed $PREFIX" || true
    if [ "$PURGE" = 1 ]; then
        rm -rf "$CONFIG_DIR"; note "removed $CONFIG_DIR (--purge)"
    elif [ -d "$CONFIG_DIR" ]; then
        note "kept $CONFIG_DIR (remove it too with --uninstall --purge)"
    fi
    say "llm-router is uninstalled."
}

# ======================================================================================================
# demo
# ======================================================================================================
demo_paths() {
    DEMO_DIR=${DEMO_DIR:-$REPO/.demo}
    case $DEMO_DIR in /*) ;; *) DEMO_DIR=$PWD/$DEMO_DIR ;; esac
    DEMO_DIR=${DEMO_DIR%/}
    DEMO_STATE=$DEMO_DIR/demo.env
    SBX_DIR=$DEMO_DIR/sandbox
}

# what PID 1 makes at boot and a private user manager lacks: the nodes systemd bind-mounts over paths
# it hides (run inside the sandbox's mount namespace, where /run is private)

# dctl ARGS: systemctl --user in the demo's manager
DEMO_MANAGER=
dctl() {
    if [ "$DEMO_MANAGER" = sandbox ]; then timeout "$START_TIMEOUT" "$SBX_SCRIPT" exec "$SBX_DIR" -- systemctl --user --no-pager "$@"
    else timeout "$START_TIMEOUT" systemctl --user --no-pager "$@"; fi
}
djournal() { # ARGS for journalctl
    if [ "$DEMO_MANAGER" = sandbox ]; then "$SBX_SCRIPT" journal "$SBX_DIR" --no-pager "$@"
    else journalctl --no-pager "$@"; fi
}

demo_stop() { # quiet=1: called to clean up after a failed start
    local quiet=${1:-0}
    demo_paths
    if [ ! -e "$DEMO_STATE" ] && [ ! -d "$DEMO_DIR" ]; then
        [ "$quiet" = 1 ] || say "No demo to stop (nothing in $DEMO_DIR)."
        return 0
    fi
    local DEMO_UNIT_DIR= DEMO_VENV_EXTERNAL=1 DEMO_PORT= DEMO_RUNTIME_DIR= DEMO_STARTED_MANAGER=0
    if [ -e "$DEMO_STATE" ]; then
        # shellcheck disable=SC1090
        . "$DEMO_STATE"
    fi
    # the user manager the demo ran in (e.g. root's, from a shell without XDG_RUNTIME_DIR)
    if [ "$DEMO_MANAGER" = user ] && [ -n "$DEMO_RUNTIME_DIR" ] && [ -S "$DEMO_RUNTIME_DIR/systemd/private" ]; then
        export XDG_RUNTIME_DIR=$DEMO_RUNTIME_DIR
    fi
    [ "$quiet" = 1 ] || say "Stopping the demo ($DEMO_DIR)"
    if [ "$DEMO_MANAGER" = sandbox ]; then
        if [ -e "$SBX_DIR/sbx.env" ]; then
            dctl stop "$DEMO_UNIT" "$DEMO_BACKEND_UNIT" >/dev/null 2>&1 || true
            "$SBX_SCRIPT" stop "$SBX_DIR" >/dev/null 2>&1 || warn "stopping the private systemd manager failed"
            note "stopped $DEMO_UNIT, $DEMO_BACKEND_UNIT and the private systemd user manager"
        fi
    elif [ "$DEMO_MANAGER" = user ] && [ -n "$DEMO_UNIT_DIR" ]; then
        dctl stop "$DEMO_UNIT" "$DEMO_BACKEND_UNIT" >/dev/null 2>&1 || true
        rm -rf "$DEMO_UNIT_DIR/$DEMO_UNIT" "$DEMO_UNIT_DIR/$DEMO_UNIT.d" \
               "$DEMO_UNIT_DIR/$DEMO_BACKEND_UNIT" "$DEMO_UNIT_DIR/$DEMO_BACKEND_UNIT.d"
        dctl daemon-reload >/dev/null 2>&1 || true
        dctl reset-failed "$DEMO_UNIT" "$DEMO_BACKEND_UNIT" >/dev/null 2>&1 || true
        note "stopped and removed $DEMO_UNIT and $DEMO_BACKEND_UNIT from your user manager"
        if [ "$DEMO_STARTED_MANAGER" = 1 ]; then
            loginctl disable-linger root || warn "loginctl disable-linger root failed"
            note "loginctl disable-linger root: root's user manager, started for the demo, ends with its last session"
        fi
    fi
    # only what the demo made (an external --venv stays), then the directory if that left it empty
    rm -rf "$DEMO_DIR/models" "$DEMO_DIR/config" "$DEMO_DIR/sandbox" "$DEMO_STATE"
    [ "${DEMO_VENV_EXTERNAL:-1}" != 0 ] || rm -rf "$DEMO_DIR/venv"
    rmdir "$DEMO_DIR" 2>/dev/null || warn "$DEMO_DIR is not empty (files the demo did not make?): left in place"
    [ "$quiet" = 1 ] || say "Demo stopped; $DEMO_DIR removed."
}

manager_up() { case ${1:-} in running|degraded|starting|initializing|maintenance) return 0 ;; *) return 1 ;; esac; }

write_demo_state() { # what --demo --stop needs to undo it (sourced by demo_stop)
    cat > "$DEMO_STATE" <<EOF
DEMO_MANAGER=$DEMO_MANAGER
DEMO_UNIT_DIR='${DEMO_UNIT_DIR:-}'
DEMO_VENV_EXTERNAL=$VENV_EXTERNAL
DEMO_PORT=${DEMO_PORT:-}
DEMO_RUNTIME_DIR='${XDG_RUNTIME_DIR:-}'
DEMO_STARTED_MANAGER=${DEMO_STARTED_MANAGER:-0}
EOF
}

demo_start() {
    demo_paths
    if [ -e "$DEMO_STATE" ]; then
        say "A demo is already set up in $DEMO_DIR: stopping it first"
        demo_stop 1
    fi
    # where do the units run? your user manager; as root on a host whose PID 1 is systemd, root's own
    # (user@0.service, started for the demo); else (a container, CI, PID 1 not systemd) a private one
    local state why
    state=$(user_manager_state)
    DEMO_STARTED_MANAGER=0
    if [ "$SANDBOX" = 1 ]; then
        [ "$(id -u)" = 0 ] || die "--sandbox starts a private systemd user manager, which needs root: run \`sudo ./install.sh --demo --sandbox\`"
        if [ -d /run/systemd/system ]; then   # sd_booted(): systemd is PID 1
            die "--sandbox is for hosts where systemd is not PID 1: here it is, and the private manager's cgroup would sit outside systemd's tree (beside system.slice). Run \`./install.sh --demo\` without --sandbox: it uses your systemd user manager (or, as root, root's)."
        fi
        DEMO_MANAGER=sandbox why="private systemd user manager: --sandbox"
    elif manager_up "$state"; then
        DEMO_MANAGER=user why="your systemd user manager"
    elif [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ]; then
        DEMO_MANAGER=user why="root's systemd user manager, user@0.service"
    else
        if [ "$(id -u)" != 0 ]; then
            die "no systemd user manager is reachable here (${state:-no connection}), and starting a private one needs root: run \`sudo ./install.sh --demo\` (or log in through a systemd session so that \`systemctl --user\` works)"
        fi
        DEMO_MANAGER=sandbox why="private systemd user manager: PID 1 is $(pid1), not systemd"
    fi
    if [ "$VENV_EXTERNAL" = 1 ]; then check_python "$VENV/bin/python"; else check_python "$PYTHON"; fi
    ensure_packages "$PYTHON"
    if [ "$DEMO_MANAGER" = sandbox ]; then
        local t
        for t in nsenter unshare journalctl busctl; do
            command -v "$t" >/dev/null || die "the private systemd manager needs \`$t\` (apt-get install util-linux systemd)"
        done
        [ -x /lib/systemd/systemd ] || die "the demo needs systemd installed (/lib/systemd/systemd; apt-get install systemd), even if it does not run as PID 1"
    elif ! manager_up "$state"; then
        # root, systemd is PID 1, no user manager reachable (sudo opens no login session): root's own.
        # logind stops a user manager without a session unless the user "lingers": linger while the demo runs.
        if [ "$(loginctl show-user root -p Linger --value 2>/dev/null)" != yes ]; then
            say "Running root's systemd user manager (user@0.service) for the demo: \`loginctl enable-linger root\` until --demo --stop"
            loginctl enable-linger root || die "loginctl enable-linger root failed: run the demo from a user's login shell (\`systemctl --user\` must work)"
            DEMO_STARTED_MANAGER=1
        fi
        timeout "$START_TIMEOUT" systemctl start user@0.service || die "systemctl start user@0.service failed: run the demo from a user's login shell (\`systemctl --user\` must work)"
        export XDG_RUNTIME_DIR=/run/user/0
        state=$(user_manager_state)
        manager_up "$state" || die "root's user manager did not come up (systemctl --user: ${state:-no connection})"
    fi
    if [ "$DEMO_MANAGER" = user ]; then
        # a user manager that was running before dbus-user-session was installed has no user bus yet
        dctl daemon-reload && dctl start dbus.socket || die "the user D-Bus (dbus.socket of your user manager) did not start"
    fi

    say "llm-router demo in $DEMO_DIR ($why)"
    mkdir -p "$DEMO_DIR"
    if [ "$VENV_EXTERNAL" = 0 ]; then VENV=$DEMO_DIR/venv; fi
    write_demo_state
    # cleanup on failure from here on
    trap 'rc=$?; if [ $rc != 0 ]; then demo_failed; fi; cleanup_tmp' EXIT
    ensure_venv "[demo]"

    say "Generating two tiny models (random weights, CPU, nothing downloaded)"
    "$RUN_PY" -m router.demo.tiny_gguf "$DEMO_DIR/models/tiny-a.gguf" --seed 1 | sed 's/^/    /'
    "$RUN_PY" -m router.demo.tiny_gguf "$DEMO_DIR/models/tiny-b.gguf" --seed 2 | sed 's/^/    /'

    local port=${PORT:-8002} backend_port
    "$RUN_PY" -m router.demo.run port-free "$port" \
        || die "port $port is in use (an installed llm-router?): choose another with --port"
    backend_port=$("$RUN_PY" -m router.demo.run free-port --start 8085)
    [ "$backend_port" != "$port" ] || backend_port=$("$RUN_PY" -m router.demo.run free-port --start $((port + 1)))

    if [ "$DEMO_MANAGER" = sandbox ]; then
        say "Starting a private systemd user manager (router/demo/systemd-sandbox.sh)"
        "$SBX_SCRIPT" gc >/dev/null 2>&1 || true
        "$SBX_SCRIPT" start "$SBX_DIR" > "$TMP/sbx.out" || die "the private systemd manager did not start (see above and $SBX_DIR/log/)"
        DEMO_UNIT_DIR=$SBX_DIR/config/systemd/user
    else
        DEMO_UNIT_DIR=$XDG_CONFIG/systemd/user
    fi
    DEMO_PORT=$port
    write_demo_state

    say "Writing the demo config and units"
    "$RUN_PY" -m router.demo.run write-config --dir "$DEMO_DIR/config" --port "$port" \
        --backend-port "$backend_port" --unit "$DEMO_BACKEND_UNIT" --dropin-dir "$DEMO_UNIT_DIR" \
        --python "$RUN_PY" --models-dir "$DEMO_DIR/models"
    "$RUN_PY" -m router check --config-dir "$DEMO_DIR/config" | sed 's/^/    /'
    mkdir -p "$DEMO_UNIT_DIR"
    local uid=0
    [ "$DEMO_MANAGER" = sandbox ] || uid=$(id -u)
    "$RUN_PY" -m router.installer render-unit --template "$REPO/units/$ROUTER_UNIT" --mode user \
        --venv "$VENV" --config-dir "$DEMO_DIR/config" "--rw-path=$DEMO_UNIT_DIR" "--rw-path=$DEMO_DIR/config" \
        --manager-uid "$uid" --description "llm-router demo (./install.sh --demo)" \
        --exec-python "$RUN_PY" > "$DEMO_UNIT_DIR/$DEMO_UNIT"
    sed -i '/^\[Install\]/,$d' "$DEMO_UNIT_DIR/$DEMO_UNIT"    # the demo is never started at boot
    "$RUN_PY" -m router.installer render-unit --kind backend --template "$REPO/units/llamacpp.service" \
        --unit-name "$DEMO_BACKEND_UNIT" --description "llama.cpp server of the llm-router demo" \
        > "$DEMO_UNIT_DIR/$DEMO_BACKEND_UNIT"
    note "$DEMO_UNIT_DIR/$DEMO_UNIT"
    note "$DEMO_UNIT_DIR/$DEMO_BACKEND_UNIT"

    say "Starting $DEMO_UNIT"
    dctl daemon-reload
    dctl start "$DEMO_UNIT" || die "$DEMO_UNIT did not start"
    local url=http://127.0.0.1:$port
    wait_router "$url" || die "the demo router did not answer on $url/health"

    say "Asking one model, then the other: the router switches the llama.cpp unit between them"
    "$RUN_PY" -m router.demo.run try --url "$url" --model tiny-a --model tiny-b \
        || die "the demo requests failed (above)"
    trap cleanup_tmp EXIT

    local sctl_hint="systemctl --user" jhint="journalctl --user-unit=$DEMO_UNIT"
    if [ "$DEMO_MANAGER" = sandbox ]; then
        sctl_hint="$SBX_SCRIPT exec $SBX_DIR -- systemctl --user"
        jhint="$SBX_SCRIPT journal $SBX_DIR --user-unit=$DEMO_UNIT"
    fi
    echo
    echo "${GRN}The llm-router demo is running${OFF} on $url (models tiny-a and tiny-b)."
    echo "Try it: tiny-b is loaded now, so asking tiny-a switches (see the status events in the stream):"
    echo "    curl -sN $url/v1/chat/completions -H 'Content-Type: application/json' \\"
    echo "      -d '{\"model\": \"tiny-a\", \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'"
    echo "    $VENV/bin/llm-router switch tiny-b --url $url     # switch back ahead of time, with progress lines"
    echo "    $VENV/bin/llm-router status --url $url"
    echo "Open WebUI: Admin Panel -> Settings -> Connections -> OpenAI API -> add a connection:"
    echo "    URL: $url/v1     (Open WebUI in Docker: run it with --network=host)"
    echo "    Key: anything"
    echo "Config: $DEMO_DIR/config/models.yml and config.yml; after editing:"
    echo "        $sctl_hint reload $DEMO_UNIT     (fails, saying why, if the router refuses the files)"
    echo "Units:  $sctl_hint status $DEMO_UNIT $DEMO_BACKEND_UNIT"
    echo "Logs:   $jhint     (the model's own: --user-unit=$DEMO_BACKEND_UNIT)"
    echo "Stop:   $0 --demo --stop$( [ "$DEMO_DIR" = "$REPO/.demo" ] || echo " --demo-dir $DEMO_DIR")"
}

demo_failed() {
    echo >&2
    warn "the demo did not come up; what the router logged:"
    djournal --user-unit="$DEMO_UNIT" --user-unit="$DEMO_BACKEND_UNIT" -n 40 >&2 2>/dev/null || true
    warn "cleaning up (./install.sh --demo --stop)"
    demo_stop 1 || true
}

# ======================================================================================================
set_paths
if [ "$DEMO" = 1 ]; then
    if [ "$STOP" = 1 ]; then demo_stop; else demo_start; fi
elif [ "$UNINSTALL" = 1 ]; then
    do_uninstall
else
    do_install
fi
