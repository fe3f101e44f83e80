"""Command line: `llm-router serve|check|reload|models|status|switch|unload`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from router import __version__
from router.config import Config, ConfigError, load_config, resolve_config_dir


def _daemon_url(args: argparse.Namespace, admin: bool = False) -> tuple[str, str | None]:
    """The daemon's URL and API key: --url / --api-key / $LLM_ROUTER_API_KEY, else from config.yml (for
    /admin: its first admin_api_keys entry when set, else its first client key). With files that do not
    validate (a rejected reload) the daemon still serves the previous ones, most likely at the same address."""
    host, port = "127.0.0.1", 8002
    key: str | None = None
    config_dir = resolve_config_dir(args.config_dir)
    try:
        config = load_config(config_dir)
        host, port = config.listen.host, config.listen.port
        keys = (config.admin_api_keys if admin else ()) or config.client_keys
        key = keys[0] if keys else None
    except ConfigError:
        host, port, key = _listen_of_invalid_config(config_dir / "config.yml", host, port)
    except OSError:
        pass  # the defaults will do; the request says if they don't
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if args.url:
        url = args.url.rstrip("/")
    return url, args.api_key or os.environ.get("LLM_ROUTER_API_KEY") or key


def _listen_of_invalid_config(path: Path, host: str, port: int) -> tuple[str, int, str | None]:
    """listen.host, listen.port and api_key of a config that does not validate (after a rejected reload
    the daemon still serves the previous one, most likely at the same address), as far as they read."""
    from router import yamlsafe

    key = None
    try:
        data = yamlsafe.safe_load(path.read_text(encoding="utf-8"))  # bounded: the file may be a YAML bomb
    except Exception:  # unreadable, not YAML, too deep or too big: the defaults will do
        return host, port, key
    if isinstance(data, dict):
        listen = data.get("listen")
        if isinstance(listen, dict):
            new_host, new_port = listen.get("host"), listen.get("port")
            host = new_host if isinstance(new_host, str) else host
            port = new_port if isinstance(new_port, int) else port
        api_key = data.get("api_key")
        key = api_key if isinstance(api_key, str) else None
    return host, port, key


def _client(args: argparse.Namespace, admin: bool = False) -> Any:
    import httpx

    url, key = _daemon_url(args, admin)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(10.0, read=None), trust_env=False)


def _unreachable(args: argparse.Namespace, error: Exception) -> int:
    url, _ = _daemon_url(args)
    print(f"llm-router: cannot reach the daemon at {url}: {error}\n"
          "Is it running? `systemctl status llm-router`; or pass --url.", file=sys.stderr)
    return 3


def _error_text(response: Any) -> str:
    """What went wrong, from an answer of the daemon (or of whatever stands in front of it)."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return json.dumps(body)


def cmd_serve(args: argparse.Namespace) -> int:
    from router import daemon, logs

    logs.setup(args.log_level)
    return daemon.run(resolve_config_dir(args.config_dir))


def cmd_check(args: argparse.Namespace) -> int:
    config_dir = resolve_config_dir(args.config_dir)
    try:
        config = load_config(config_dir)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"{config_dir}: OK, {_count(len(config.models), 'model')} on "
          f"{_count(len(config.backends), 'backend')} ({', '.join(config.backends)}), "
          f"listening on {config.listen.host}:{config.listen.port}")
    for model in config.models.values():  # a program that is not there fails only at load time: say it now
        program = model.command[0] if model.command else None
        if program and program.startswith("/") and not os.access(program, os.X_OK):
            print(f"warning: models.{model.id}.command: {program} is not an executable file on this host "
                  "(the model will fail to load until it is)", file=sys.stderr)
    for warning in _symlink_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _symlink_warnings(config: Config) -> list[str]:
    """Paths the router writes that are symlinks: it refuses them at load time (router/atomicfile.py)."""
    found: list[str] = []
    for backend in config.backends.values():
        if backend.config_file is not None and backend.config_file.is_symlink():
            found.append(f"backends.{backend.name}.config_file: {backend.config_file} is a symbolic link (to "
                         f"{os.readlink(backend.config_file)}); the router never writes through a symlink, so "
                         "loading a model that sets model_name will fail: set config_file to the real path")
    for unit in config.managed_units():
        directory = config.systemd.dropin_dir / f"{unit}.d"
        if directory.is_symlink():
            found.append(f"{directory} is a symbolic link (to {os.readlink(directory)}); the router never writes "
                         f"drop-ins through a symlink, so loading a model with a command or env on {unit} will "
                         "fail: replace the link with a directory")
    return found


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to reload and report its answer (systemd's ExecReload= runs this)."""
    from router import control

    config_dir = resolve_config_dir(args.config_dir)
    try:
        answer = control.request(config_dir, "reload", expect_pid=args.pid, timeout=args.timeout)
    except (control.Untrusted, OSError) as e:
        print(f"llm-router: {e}", file=sys.stderr)
        return 1
    except control.NoDaemon as e:
        if args.pid is None:
            print(f"llm-router: {e}. Is it running? `systemctl status llm-router`", file=sys.stderr)
            return 3
        # an older daemon without the control socket: check here, then the signal it understands
        print(f"llm-router: {e}; checking the files here and sending SIGHUP to {args.pid} instead", file=sys.stderr)
        if cmd_check(args) != 0:
            return 1
        os.kill(args.pid, signal.SIGHUP)
        return 0
    if answer.get("ok"):
        print(f"{config_dir}: reloaded, {_count(answer.get('models', 0), 'model')} on "
              f"{_count(answer.get('backends', 0), 'backend')}")
        for key in answer.get("needs_restart") or []:
            print(f"warning: {key}: changed settings take effect at the next restart "
                  "(`systemctl restart llm-router`)", file=sys.stderr)
        return 0
    if answer.get("error"):
        print(f"llm-router: {answer['error']}", file=sys.stderr)
        return 1
    print("reload REJECTED, the previous configuration keeps serving:", file=sys.stderr)
    for problem in answer.get("problems") or []:
        print(problem, file=sys.stderr)
    return 1


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


class _DaemonError(Exception):
    """The daemon could not be reached or refused the request; `code` is the exit status."""

    def __init__(self, code: int) -> None:
        self.code = code


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One request to the daemon; its JSON body, or _DaemonError after saying what went wrong."""
    import httpx

    try:
        with _client(args, admin=path.startswith("/admin/")) as client:
            r = client.request(method, path, json=body)
    except httpx.HTTPError as e:
        raise _DaemonError(_unreachable(args, e)) from e
    if r.status_code != 200:
        print(f"llm-router: {_error_text(r)}", file=sys.stderr)
        raise _DaemonError(1)
    return r.json()


def cmd_models(args: argparse.Namespace) -> int:
    data = _call(args, "GET", "/v1/models")["data"]
    history = _history(args)
    rows = [(m["id"], m.get("backend", ""), m.get("unit", ""), m.get("state", ""),
             *_history_columns(history.get(m["id"]))) for m in data]
    _table(("MODEL", "BACKEND", "UNIT", "STATE", "REQUESTS", "FAILED", "TOKENS_IN/OUT", "TOK/S", "TTFT", "LOAD"),
           rows)
    return 0


def _history(args: argparse.Namespace) -> dict[str, Any]:
    """Per-model history from the daemon's /history; {} from a daemon without it (the table says -)."""
    import httpx

    try:
        with _client(args) as client:
            r = client.get("/history")
        models = r.json().get("models") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return {}
    return models if isinstance(models, dict) else {}


def _history_columns(h: dict[str, Any] | None) -> tuple[str, ...]:
    """REQUESTS, FAILED, TOKENS_IN/OUT, TOK/S, TTFT, LOAD (typical: the median of recent ones); - where unknown."""
    if not h:
        return ("-",) * 6

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    return (str(h.get("requests", 0)), str(h.get("failed", 0)),
            f"{_short(h.get('prompt_tokens', 0))}/{_short(h.get('completion_tokens', 0))}",
            num(h.get("tok_per_s"), "{:.1f}"), num(h.get("ttft"), "{:.2f}s"), num(h.get("load_seconds"), "{:.0f}s"))


def _short(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def cmd_status(args: argparse.Namespace) -> int:
    status = _call(args, "GET", "/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    models = status.get("models") or {}
    by_state: dict[str, list[str]] = {}
    for model_id, info in models.items():
        by_state.setdefault(info.get("state", ""), []).append(model_id)
    if models:
        print(f"loaded:   {', '.join(by_state.get('loaded', [])) or '(none)'}")
        if by_state.get("sleeping"):
            print(f"sleeping: {', '.join(by_state['sleeping'])}")
        if by_state.get("failed"):
            print(f"failed:   {', '.join(by_state['failed'])}")
    else:
        print(f"active:  {status['active_model'] or '(none)'}")
    switch = status.get("switch")
    if switch:
        print(f"loading: {switch['target'] or '(unload)'} — {switch['phase']}, "
              f"{switch['elapsed']:.0f}s of {switch['load_timeout']:.0f}s")
    last = status.get("last_switch")
    if last:
        outcome = "ok" if last["ok"] else f"FAILED: {last['error']}"
        print(f"last switch: {last['target']} in {last['took']:.1f}s, {outcome}")
    for unit, state in status.get("units", {}).items():
        if isinstance(state, dict):
            print(f"unit {unit}: {state['active_state']} ({state['sub_state']})")
    if status.get("queued"):
        print(f"queued: {status['queued']}")
    reload_error = (status.get("config") or {}).get("reload_error")
    if reload_error:
        print("last reload REJECTED (the previous configuration is serving):")
        for problem in reload_error:
            print(f"  {problem}")
    gpu = status.get("gpu", {})
    print("gpu: " + (", ".join(f"{g['name']} {g['memory_used_mib']}/{g['memory_total_mib']} MiB"
                               for g in gpu.get("gpus", [])) if gpu.get("available")
                     else f"unavailable ({gpu.get('reason')})"))
    return 0


def cmd_switch(args: argparse.Namespace) -> int:
    import httpx

    try:
        with _client(args, admin=True) as client, client.stream("POST", "/admin/load", json={"model": args.model}) as r:
            if r.status_code != 200:
                r.read()
                print(f"llm-router: {_error_text(r)}", file=sys.stderr)
                return 1
            for line in r.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if "status" in event:
                    print(event["status"], flush=True)
                elif event.get("done"):
                    took = event.get("took")
                    print(f"✅ {args.model} is loaded" + (f" (took {took:.1f}s)" if took else " (already)"))
                    return 0
                elif "error" in event:
                    print(f"❌ {event['error'].get('message')}", file=sys.stderr)
                    return 1
    except httpx.HTTPError as e:
        return _unreachable(args, e)
    print("llm-router: the daemon ended the answer early", file=sys.stderr)
    return 1


def cmd_unload(args: argparse.Namespace) -> int:
    body = {"model": args.model} if args.model else None
    units = _call(args, "POST", "/admin/unload", body).get("unloaded", [])
    print("stopped " + ", ".join(units) if units else "nothing was loaded")
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config-dir", help="default: $LLM_ROUTER_CONFIG_DIR, else /etc/llm-router")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", help="the daemon's URL (default: from config.yml's listen)")
    remote.add_argument("--api-key", help="default: $LLM_ROUTER_API_KEY, else config.yml's api_key")

    p = argparse.ArgumentParser(prog="llm-router", description=__doc__)
    p.add_argument("--version", action="version", version=f"llm-router {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", parents=[common], help="run the daemon")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)
    sub.add_parser("check", parents=[common], help="validate config.yml and models.yml").set_defaults(
        func=cmd_check)
    rl = sub.add_parser("reload", parents=[common],
                        help="make the running daemon re-read its files; exit 1 with the problems if it refuses")
    rl.add_argument("--pid", type=int, help="the daemon's PID (systemd's $MAINPID): only that process is asked")
    rl.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer (default 60)")
    rl.set_defaults(func=cmd_reload)
    sub.add_parser("models", parents=[common, remote], help="list models and their state").set_defaults(
        func=cmd_models)
    st = sub.add_parser("status", parents=[common, remote], help="what is loaded, what is loading")
    st.add_argument("--json", action="store_true", help="print the daemon's /status as JSON")
    st.set_defaults(func=cmd_status)
    sw = sub.add_parser("switch", parents=[common, remote], help="load a model now, printing progress")
    sw.add_argument("model")
    sw.set_defaults(func=cmd_switch)
    un = sub.add_parser("unload", parents=[common, remote], help="stop one model, or every loaded model")
    un.add_argument("model", nargs="?", help="the model to unload (default: all of them)")
    un.set_defaults(func=cmd_unload)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config_dir:
        args.config_dir = str(Path(args.config_dir))
    try:
        return int(args.func(args))
    except _DaemonError as e:
        return e.code
