"""Helpers for install.sh: render config files and unit files, wait for /health, print URLs.

install.sh stays in bash for what bash does well (checks, apt, venv, systemctl); the text work is
here so that it can be tested and does not depend on sed quoting. Subcommands (all print to stdout):

    defaults        --template-dir DIR                  shell assignments: DEFAULT_HOST, DEFAULT_PORT,
                                                        KNOWN_BACKENDS ("name:port ..."), ACTIVE_BACKENDS
    render-config   --template-dir DIR --out DIR [--host H] [--port P] [--bus system|user]
                    [--dropin-dir D] [--api-key K] [--backends name[:port],...]
    render-unit     --template FILE --mode system|user --venv V --config-dir C [--rw-path P]...
                    [--unit-name N] [--description D] [--env K=V]... [--exec-start CMD]
    listen          --config-dir DIR                    "HOST PORT API_KEY" of the config (or defaults)
    config-file-dirs --config-dir DIR                   directories of the backends' config_file, one a line
    backend-units   --config-dir DIR --units-dir U      the shipped unit files the backends need, one a line
    wait-health     --url URL [--timeout S]             exit 0 once GET URL/health answers 200
    client-url      --host H --port P                   the URL an OpenAI client (Open WebUI) should use

`defaults` and `render-config` without verification use only the standard library, so install.sh can
call them with the system's python3 before the venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ENTRY_KEY = re.compile(r"^(?P<ind> *)(?P<hash># )?(?P<key>[A-Za-z0-9_.:/@+-]+):\s*(?:#.*)?$")
ACTIVE_KEY_INLINE = re.compile(r"^(?P<ind> *)(?P<key>[A-Za-z0-9_.:/@+-]+):(?P<rest>\s+\S.*)?$")
URL_PORT = re.compile(r"""(?P<pre>url:\s*["']?https?://[^/:"'\s]+:)(?P<port>\d+)""")
URL_ANY = re.compile(r"""url:\s*["']?https?://[^/:"'\s]+(?::(?P<port>\d+))?""")


class RenderError(Exception):
    """The template does not have the shape this installer knows how to edit."""


# --- a tiny line-based view of the shipped YAML templates -------------------------------------------------


@dataclass
class Entry:
    """One entry of a top-level mapping section (a backend or a model), active or commented out."""

    key: str
    start: int  # index of the key line
    end: int  # index one past the last line
    commented: bool
    lines: list[str] = field(default_factory=list)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def section_bounds(lines: list[str], name: str) -> tuple[int, int] | None:
    """(index of the `name:` line, index one past its last line), for an uncommented top-level key."""
    start = None
    for i, line in enumerate(lines):
        if start is None:
            if re.match(rf"^{re.escape(name)}:(\s|$)", line):
                start = i
            continue
        if line.strip() and not line.startswith((" ", "#")):
            return start, i
    return (start, len(lines)) if start is not None else None


def section_entries(lines: list[str], name: str) -> tuple[int, list[Entry]]:
    """The entries of section `name` (indentation of its first entry), commented ones included."""
    bounds = section_bounds(lines, name)
    if bounds is None:
        raise RenderError(f"no top-level `{name}:` section in the template")
    start, end = bounds
    ind = None
    for line in lines[start + 1:end]:
        m = ENTRY_KEY.match(line) or ACTIVE_KEY_INLINE.match(line)
        if m and not line.lstrip().startswith("#") and _indent(line) > 0:
            ind = _indent(line)
            break
    if ind is None:
        ind = 2
    entries: list[Entry] = []
    i = start + 1
    while i < end:
        line = lines[i]
        m = ENTRY_KEY.match(line)
        active_inline = ACTIVE_KEY_INLINE.match(line)
        commented_key = bool(m and m.group("hash") and len(m.group("ind")) == ind)
        active_key = bool(active_inline and _indent(line) == ind and not line.lstrip().startswith("#"))
        if not (commented_key or active_key):
            i += 1
            continue
        key = (m.group("key") if commented_key and m else active_inline.group("key"))  # type: ignore[union-attr]
        j = i + 1
        while j < end:
            body = lines[j]
            if commented_key:
                # "  #   backend: x": the comment mark at the entry's indentation, then deeper content
                if not (body.startswith(" " * ind + "#") and body[ind + 1:ind + 4] == "   "):
                    break
            else:
                if not body.strip() or _indent(body) <= ind:
                    break
            j += 1
        entries.append(Entry(key, i, j, commented_key, lines[i:j]))
        i = j
    return ind, entries


def set_commented(lines: list[str], entry: Entry, ind: int, commented: bool) -> None:
    if entry.commented == commented:
        return
    for k in range(entry.start, entry.end):
        line = lines[k]
        if commented:
            lines[k] = line[:ind] + "# " + line[ind:] if line.strip() else line
        else:
            if line[ind:ind + 2] == "# ":
                lines[k] = line[:ind] + line[ind + 2:]
            elif line[ind:ind + 1] == "#":
                lines[k] = line[:ind] + line[ind + 1:]
    entry.commented = commented


def replace_in_section(lines: list[str], section: str, key: str, value: str) -> bool:
    """Set `key: value` inside the (block or flow style) mapping of a top-level `section`; keep comments."""
    bounds = section_bounds(lines, section)
    if bounds is None:
        return False
    start, end = bounds
    pattern = re.compile(rf"(?P<pre>(?:^\s+|[{{,]\s*){re.escape(key)}:\s*)(?P<val>\"[^\"]*\"|'[^']*'|[^,}}\s#]+)")
    for k in range(start, end):
        line = lines[k]
        if k > start and line.lstrip().startswith("#"):
            continue
        m = pattern.search(line)
        if m:
            lines[k] = line[:m.start("val")] + value + line[m.end("val"):]
            return True
    return False


def set_top_level(lines: list[str], key: str, value: str) -> None:
    for k, line in enumerate(lines):
        m = re.match(rf"^{re.escape(key)}:\s*(?P<val>\"[^\"]*\"|'[^']*'|[^\s#]*)(?P<rest>.*)$", line)
        if m:
            lines[k] = f"{key}: {value}{m.group('rest')}"
            return
    lines.append(f"{key}: {value}")


def yaml_str(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def backend_port(entry: Entry) -> int | None:
    for line in entry.lines:
        m = URL_ANY.search(line)
        if m:
            if m.group("port"):
                return int(m.group("port"))
            return 443 if "https://" in line else 80
    return None


def template_defaults(template_dir: Path) -> dict[str, object]:
    lines = (template_dir / "config.yml").read_text(encoding="utf-8").splitlines()
    host, port = "127.0.0.1", 8002
    bounds = section_bounds(lines, "listen")
    if bounds:
        text = "\n".join(lines[bounds[0]:bounds[1]])
        if m := re.search(r"host:\s*[\"']?([^\s,}\"'#]+)", text):
            host = m.group(1)
        if m := re.search(r"port:\s*(\d+)", text):
            port = int(m.group(1))
    _, entries = section_entries(lines, "backends")
    known = [(e.key, backend_port(e)) for e in entries]
    active = [e.key for e in entries if not e.commented]
    return {"host": host, "port": port, "known": known, "active": active}


def parse_backends(spec: str, known: dict[str, int | None]) -> dict[str, int | None]:
    """"vllm:8000,llamacpp" -> {"vllm": 8000, "llamacpp": None (template default)}."""
    chosen: dict[str, int | None] = {}
    for part in re.split(r"[,\s]+", spec.strip()):
        if not part:
            continue
        name, _, port = part.partition(":")
        if name not in known:
            raise RenderError(f"unknown backend {name!r} in --backends; known: {', '.join(known)}")
        if port:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise RenderError(f"bad port {port!r} for backend {name} in --backends")
            chosen[name] = int(port)
        else:
            chosen[name] = None
    if not chosen:
        raise RenderError("--backends is empty; name at least one backend")
    return chosen


def render_config(template_dir: Path, *, host: str | None = None, port: int | None = None,
                  bus: str | None = None, dropin_dir: str | None = None, api_key: str | None = None,
                  backends: str | None = None) -> tuple[str, str]:
    """The texts of config.yml and models.yml: the templates with only the asked-for values changed."""
    cfg = (template_dir / "config.yml").read_text(encoding="utf-8").splitlines()
    mdl = (template_dir / "models.yml").read_text(encoding="utf-8").splitlines()
    if host is not None and not replace_in_section(cfg, "listen", "host", yaml_str(host)):
        raise RenderError("cannot find listen.host in the config template")
    if port is not None and not replace_in_section(cfg, "listen", "port", str(port)):
        raise RenderError("cannot find listen.port in the config template")
    if bus is not None and not replace_in_section(cfg, "systemd", "bus", bus):
        raise RenderError("cannot find systemd.bus in the config template")
    if dropin_dir is not None and not replace_in_section(cfg, "systemd", "dropin_dir", yaml_str(dropin_dir)):
        raise RenderError("cannot find systemd.dropin_dir in the config template")
    if api_key:
        set_top_level(cfg, "api_key", yaml_str(api_key))

    if backends is not None:
        ind, entries = section_entries(cfg, "backends")
        known = {e.key: backend_port(e) for e in entries}
        chosen = parse_backends(backends, known)
        old_ports: dict[str, int | None] = {}
        for e in entries:
            set_commented(cfg, e, ind, e.key not in chosen)
            new = chosen.get(e.key)
            old_ports[e.key] = known[e.key]
            if new is not None and new != known[e.key]:
                for k in range(e.start, e.end):
                    cfg[k] = URL_PORT.sub(lambda m, p=new: f"{m.group('pre')}{p}", cfg[k])
        # models: the examples of the chosen backends become active, the others commented out; their
        # commands follow the new ports (`--port 8085` -> `--port 9000`)
        mind, mentries = section_entries(mdl, "models")
        for e in mentries:
            model_backend = None
            for line in e.lines:
                if m := re.search(r"backend:\s*[\"']?([A-Za-z0-9_.-]+)", line):
                    model_backend = m.group(1)
                    break
            if model_backend is None:
                continue
            set_commented(mdl, e, mind, model_backend not in chosen)
            new, old = chosen.get(model_backend), old_ports.get(model_backend)
            if new is not None and old is not None and new != old:
                rx = re.compile(rf"(--port[\s,=]+[\"']?){old}(?!\d)")
                for k in range(e.start, e.end):
                    mdl[k] = rx.sub(lambda m, p=new: f"{m.group(1)}{p}", mdl[k])
    return "\n".join(cfg) + "\n", "\n".join(mdl) + "\n"


def verify(config_text: str, models_text: str, out_dir: Path, expect: dict[str, object]) -> None:
    """Parse the result with the router's own validator; RenderError when it is not what was asked."""
    try:
        from router.config import ConfigError, parse_config
    except ImportError:  # no PyYAML in this Python (system python3 before the venv): install.sh checks later
        return
    try:
        config = parse_config(config_text, models_text, out_dir)
    except ConfigError as e:
        raise RenderError(f"the rendered configuration does not validate:\n{e}") from e
    if "host" in expect and config.listen.host != expect["host"]:
        raise RenderError(f"listen.host came out as {config.listen.host!r}")
    if "port" in expect and config.listen.port != expect["port"]:
        raise RenderError(f"listen.port came out as {config.listen.port!r}")
    if "bus" in expect and config.systemd.bus != expect["bus"]:
        raise RenderError(f"systemd.bus came out as {config.systemd.bus!r}")
    if "api_key" in expect and config.api_key != expect["api_key"]:
        raise RenderError("api_key was not written")
    if "backends" in expect and set(config.backends) != set(expect["backends"]):  # type: ignore[arg-type]
        raise RenderError(f"backends came out as {sorted(config.backends)}")


# --- unit files --------------------------------------------------------------------------------------------

NS_BEGIN = "# @namespaced-begin"
NS_END = "# @namespaced-end"


def _under(path: str, roots: tuple[str, ...]) -> bool:
    p = os.path.normpath(path.lstrip("-"))
    return any(p == r or p.startswith(r + "/") for r in roots)


SAFE_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+\Z")


def unit_word(arg: str, *, exec_line: bool = False) -> str:
    """One word of a unit file setting: `%` doubled (specifiers), quoted when it has spaces or quotes;
    in ExecStart= lines `$` is doubled too (variable expansion)."""
    if any(c in arg for c in "\n\r\0"):
        raise RenderError(f"a path with a line break cannot go into a unit file: {arg!r}")
    word = arg.replace("%", "%%")
    if exec_line:
        word = word.replace("$", "$$")
    if SAFE_WORD.match(arg) and "$" not in arg:
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_start(argv: list[str]) -> str:
    return " ".join(unit_word(a, exec_line=True) for a in argv)


def render_router_unit(template: str, *, mode: str, venv: str, config_dir: str, rw_paths: list[str],
                       description: str | None = None, env: list[str] | None = None,
                       exec_python: list[str] | None = None, manager_is_root: bool = True) -> str:
    """llm-router.service for this install: paths substituted, hardening adapted to the manager."""
    out: list[str] = []
    in_ns = False
    rw_written = False
    strip_ns = mode == "user" and not manager_is_root
    private_tmp_ok = not any(_under(p, ("/tmp", "/var/tmp")) for p in [venv, config_dir, *rw_paths])
    for line in template.splitlines():
        if line.strip() == NS_BEGIN:
            in_ns = True
            out.append(line)
            if strip_ns:
                out.append("# (commented out by install.sh --user: a user manager that does not run as root "
                           "cannot set up mount namespaces or drop capabilities without user namespaces)")
            continue
        if line.strip() == NS_END:
            in_ns = False
            out.append(line)
            continue
        program = [exec_python[0], "-m", "router"] if exec_python else [f"{venv}/bin/llm-router"]
        if line.startswith("ExecStart="):
            line = "ExecStart=" + exec_start([*program, "serve", "--config-dir", config_dir])
        elif line.startswith("ExecReload=") and " reload " in line:
            line = "ExecReload=" + exec_start([*program, "reload", "--config-dir", config_dir]) + " --pid $MAINPID"
        elif line.startswith("Environment=LLM_ROUTER_CONFIG_DIR="):
            line = "Environment=" + unit_word(f"LLM_ROUTER_CONFIG_DIR={config_dir}")
        elif line.startswith("Description=") and description:
            line = f"Description={description}"
        elif line.startswith("ReadWritePaths="):
            if rw_written:
                continue
            rw_written = True
            # the given paths, plus the template's optional ones ("-/opt/tabbyAPI": TabbyAPI's default
            # config_file directory, so that enabling the tabby backend later needs no reinstall)
            optional = [w for ln in template.splitlines() if ln.startswith("ReadWritePaths=")
                        for w in ln.split("=", 1)[1].split() if w.startswith("-")]
            fixed = [p for p in [*rw_paths, *optional] if p]
            line = "ReadWritePaths=" + " ".join(unit_word(p) for p in dict.fromkeys(fixed))
            out.append(line if not strip_ns else "#" + line)
            continue
        elif mode == "user":
            if line.startswith(("Wants=network-online.target", "After=network-online.target")):
                line = "After=dbus.socket"
            elif line.startswith("WantedBy=multi-user.target"):
                line = "WantedBy=default.target"
            elif line.startswith("PrivateTmp=") and not private_tmp_ok:
                out.append("# PrivateTmp= left out: this installation keeps files under /tmp")
                continue
        if in_ns and strip_ns and line and not line.startswith("#"):
            line = "#" + line
        out.append(line)
        if line.startswith("Environment=PYTHONUNBUFFERED=") and env:
            out.extend("Environment=" + unit_word(e) for e in env)
    text = "\n".join(out) + "\n"
    if mode == "user" and "DBUS_SESSION_BUS_ADDRESS" not in text:
        # the user manager's own bus; %t is its runtime directory ($XDG_RUNTIME_DIR)
        bus = "Environment=DBUS_SESSION_BUS_ADDRESS=unix:path=%t/bus\n"
        text = text.replace("Environment=PYTHONUNBUFFERED=1\n", "Environment=PYTHONUNBUFFERED=1\n" + bus, 1)
    return text


def render_backend_unit(template: str, *, description: str | None = None, unit_name: str | None = None,
                        original_name: str | None = None) -> str:
    out = []
    for line in template.splitlines():
        if line.startswith("Description=") and description:
            line = f"Description={description}"
        if unit_name and original_name:
            line = line.replace(original_name, unit_name)
        out.append(line)
    return "\n".join(out) + "\n"


def backend_unit_files(units: list[str], shipped: set[str]) -> list[str]:
    """The files of units/ (names in `shipped`) that install.sh installs for backends running `units`:
    each backend's own unit, and beside a plain unit the template of the same engine (llamacpp.service ->
    llamacpp@.service too), so that a backend can become a template later without a re-install. Template
    files are only installed, never started (their instances are the router's)."""
    out: list[str] = []
    for unit in units:
        candidates = [unit]
        if unit.endswith(".service") and "@" not in unit:
            candidates.append(unit[: -len(".service")] + "@.service")
        out += [c for c in candidates if c in shipped and c not in out]
    return out


# --- the running router ---------------------------------------------------------------------------------


def read_listen(config_dir: Path) -> tuple[str, int, str]:
    try:
        from router.config import load_config

        config = load_config(config_dir)
        return config.listen.host, config.listen.port, config.client_keys[0] if config.client_keys else ""
    except Exception:
        return "127.0.0.1", 8002, ""


def local_host(host: str) -> str:
    """Where this machine reaches a router that listens on `host`."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def client_host(host: str) -> str:
    """Where other machines (Open WebUI in a container, another box) reach it."""
    if host in ("0.0.0.0", "::", "", "*"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent, it only picks the route
                return s.getsockname()[0]
        except OSError:
            return socket.gethostname()
    return f"[{host}]" if ":" in host else host


def wait_health(url: str, timeout: float) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as r:
                body = r.read(2000).decode("utf-8", "replace")
                if r.status == 200:
                    return True, body
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() >= deadline:
            return False, last
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router.installer", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("defaults")
    p.add_argument("--template-dir", type=Path, required=True)
    p = sub.add_parser("render-config")
    p.add_argument("--template-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--bus", choices=("system", "user"))
    p.add_argument("--dropin-dir")
    p.add_argument("--api-key")
    p.add_argument("--backends")
    p = sub.add_parser("render-unit")
    p.add_argument("--template", type=Path, required=True)
    p.add_argument("--kind", choices=("router", "backend"), default="router")
    p.add_argument("--mode", choices=("system", "user"), default="system")
    p.add_argument("--venv", default="/opt/llm-router/venv")
    p.add_argument("--config-dir", default="/etc/llm-router")
    p.add_argument("--rw-path", action="append", default=[])
    p.add_argument("--description")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--exec-python", help="run `PYTHON -m router serve` instead of VENV/bin/llm-router")
    p.add_argument("--unit-name")
    p.add_argument("--manager-uid", type=int, default=0)
    p = sub.add_parser("listen")
    p.add_argument("--config-dir", type=Path, required=True)
    p = sub.add_parser("config-file-dirs")
    p.add_argument("--config-dir", type=Path, required=True)
    p = sub.add_parser("backend-units")
    p.add_argument("--config-dir", type=Path, required=True)
    p.add_argument("--units-dir", type=Path, required=True)
    p = sub.add_parser("wait-health")
    p.add_argument("--url", required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("client-url")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    a = ap.parse_args(argv)

    try:
        if a.cmd == "defaults":
            d = template_defaults(a.template_dir)
            known = " ".join(f"{k}:{v or ''}" for k, v in d["known"])  # type: ignore[attr-defined]
            print(f"DEFAULT_HOST={d['host']}\nDEFAULT_PORT={d['port']}\nKNOWN_BACKENDS='{known}'\n"
                  f"ACTIVE_BACKENDS='{','.join(d['active'])}'")  # type: ignore[arg-type]
        elif a.cmd == "render-config":
            config_text, models_text = render_config(
                a.template_dir, host=a.host, port=a.port, bus=a.bus, dropin_dir=a.dropin_dir,
                api_key=a.api_key, backends=a.backends)
            expect: dict[str, object] = {}
            for k in ("host", "port", "bus"):
                if getattr(a, k) is not None:
                    expect[k] = getattr(a, k)
            if a.api_key:
                expect["api_key"] = a.api_key
            if a.backends:
                expect["backends"] = [x.partition(":")[0] for x in re.split(r"[,\s]+", a.backends) if x]
            verify(config_text, models_text, a.out, expect)
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "config.yml").write_text(config_text, encoding="utf-8")
            (a.out / "models.yml").write_text(models_text, encoding="utf-8")
        elif a.cmd == "render-unit":
            template = a.template.read_text(encoding="utf-8")
            if a.kind == "router":
                sys.stdout.write(render_router_unit(
                    template, mode=a.mode, venv=a.venv, config_dir=a.config_dir, rw_paths=a.rw_path,
                    description=a.description, env=a.env,
                    exec_python=[a.exec_python] if a.exec_python else None,
                    manager_is_root=a.manager_uid == 0))
            else:
                sys.stdout.write(render_backend_unit(template, description=a.description,
                                                     unit_name=a.unit_name, original_name=a.template.name))
        elif a.cmd == "listen":
            host, port, key = read_listen(a.config_dir)
            print(host, port, key)
        elif a.cmd == "config-file-dirs":
            from router.config import load_config

            try:
                config = load_config(a.config_dir)
            except Exception:
                return 0
            for d in dict.fromkeys(str(b.config_file.parent) for b in config.backends.values() if b.config_file):
                print(d)
        elif a.cmd == "backend-units":
            from router.config import load_config

            config = load_config(a.config_dir)
            shipped = {f.name for f in a.units_dir.glob("*.service")}
            for name in backend_unit_files([b.unit for b in config.backends.values()], shipped):
                print(name)
        elif a.cmd == "wait-health":
            ok, detail = wait_health(a.url, a.timeout)
            print(detail)
            return 0 if ok else 1
        elif a.cmd == "client-url":
            print(f"http://{client_host(a.host)}:{a.port}/v1")
    except RenderError as e:
        print(f"install: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
