#!/usr/bin/env python3
"""Relay benchmark: engines, router, a minimal relay and a load generator, one run, one side-by-side table.

Starts a private systemd user manager (router/demo/systemd-sandbox.sh; needs root), two bench engines
as its units, llm-router in front of them and bench/relay.py (the yardstick) in front of the first;
then sends the same load straight to the engine ("direct"), through the minimal relay and through
the router, and prints:

  A. engine at full speed (256 tokens): TTFT p50 and chunks/s with 1 and 32 streams, whole answers/s
     with 1 client, and the relay's CPU per 256-token stream;
  B. engine at 50 tokens/s per stream (64 tokens): TTFT p50/p99 and chunks/s at 32 and 256 streams;
  the switch cost (what the router adds to stop + start + the engine's start-up, median), the
  router's RSS over 10,000 requests, and its CPU per request.

Each scenario runs in 3 rounds with the targets taking turns (medians are printed), so that a busy
machine weighs on all of them alike.

    sudo .venv/bin/python bench/run.py            # the full run (~10 minutes)
    sudo .venv/bin/python bench/run.py --smoke    # a few seconds per part: proves it works, no figures worth reading
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SANDBOX = REPO / "router" / "demo" / "systemd-sandbox.sh"
PY = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Scenario:
    key: str
    concurrency: int
    requests: int
    tokens: int
    rate: float = 0.0
    stream: bool = True


FULL = [Scenario("fast-1", 1, 150, 256), Scenario("fast-32", 32, 320, 256),
        Scenario("whole-1", 1, 1500, 256, stream=False),
        Scenario("paced-32", 32, 64, 64, 50.0), Scenario("paced-256", 256, 512, 64, 50.0)]
SMOKE = [Scenario("fast-1", 1, 10, 32), Scenario("fast-32", 8, 16, 32), Scenario("whole-1", 1, 20, 32, stream=False),
         Scenario("paced-32", 8, 8, 8, 200.0), Scenario("paced-256", 16, 16, 8, 200.0)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except OSError:
        return 0


def post(url: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, float]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()
        return int(r.status), time.perf_counter() - t0


def wait_for(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise SystemExit(f"bench: {what} did not happen within {timeout:g}s")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def find_pid(marker: str) -> int:
    """The process whose command line holds `marker` (the router runs behind the sandbox's nsenter)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in a for a in argv) and any(a.endswith(b"python3") or b"python" in a for a in argv[:1]):
            return int(entry.name)
    raise SystemExit(f"bench: no process runs with {marker}")


def load(url: str, s: Scenario, model: str = "bench") -> dict[str, Any]:
    argv = [PY, str(HERE / "load.py"), "--url", url, "-c", str(s.concurrency), "-n", str(s.requests),
            "--tokens", str(s.tokens), "--rate", str(s.rate), "--model", model]
    if not s.stream:
        argv.append("--no-stream")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"bench: the load generator failed against {url}:\n{out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


class Bench:
    def __init__(self, root: Path, smoke: bool, router_src: Path = REPO) -> None:
        self.root = root
        self.smoke = smoke
        self.router_src = router_src  # the checkout whose `router` package runs (another commit, to compare)
        self.sbx = root / "sbx"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports = {name: free_port() for name in ("a", "b", "router", "relay")}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self) -> None:
        subprocess.run([str(SANDBOX), "start", str(self.sbx)], check=True, capture_output=True, timeout=60)
        units = self.sbx / "config" / "systemd" / "user"
        units.mkdir(parents=True, exist_ok=True)
        for name in ("a", "b"):
            (units / f"bench-{name}.service").write_text(
                f"[Service]\nType=exec\nExecStart={PY} {HERE / 'engine.py'} --port {self.ports[name]}\n")
        cfg = self.root / "cfg"
        cfg.mkdir()
        (cfg / "config.yml").write_text(json.dumps({
            "listen": {"host": "127.0.0.1", "port": self.ports["router"]},
            "systemd": {"bus": "user", "dropin_dir": str(units)}, "stats": True,
            # the switch cost is the switch's own: no linger (a policy wait for follow-up requests, 2 s by default)
            **({"switch": {"linger": 0}} if (self.router_src / "router" / "executor.py").exists() else {}),
            "backends": {name: {"unit": f"bench-{name}.service", "url": self.url(name), "health": "/health"}
                         for name in ("a", "b")}}))
        (cfg / "models.yml").write_text(json.dumps({"models": {"bench": {"backend": "a"},
                                                               "bench-b": {"backend": "b"}}}))
        self.router_log = open(self.root / "router.log", "wb")
        self.procs.append(subprocess.Popen(
            [str(SANDBOX), "exec", str(self.sbx), "--", PY, "-m", "router", "serve", "--config-dir", str(cfg)],
            cwd=self.router_src, env={**os.environ, "PYTHONPATH": str(self.router_src)},
            stdout=self.router_log, stderr=subprocess.STDOUT))
        wait_for(lambda: get(self.url("router") + "/health") == 200, 30, "the router's /health")
        self.router_pid = find_pid(str(cfg))
        self.rss_start = rss_mib(self.router_pid)
        self.relay = subprocess.Popen([PY, str(HERE / "relay.py"), "--port", str(self.ports["relay"]),
                                       "--upstream", self.url("a")], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        self.procs.append(self.relay)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([str(SANDBOX), "stop", str(self.sbx)], capture_output=True, timeout=60)

    # --- the parts ----------------------------------------------------------------------------

    def switch_cost(self) -> dict[str, Any]:
        """Engines alone (stop + start + healthy, timed inside the sandbox), then the same through the router."""
        rounds = 3 if self.smoke else 10
        out = subprocess.run([str(SANDBOX), "exec", str(self.sbx), "--", PY, str(HERE / "engine_switch.py"),
                              "bench-a.service", self.url("a"), "bench-b.service", self.url("b"), str(rounds)],
                             cwd=REPO, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        if out.returncode != 0:
            raise SystemExit(f"bench: engine_switch.py failed:\n{out.stderr[-2000:]}")
        engines = json.loads(out.stdout.strip().splitlines()[-1])
        chat = self.url("router") + "/v1/chat/completions"

        def ask(model: str) -> float:
            status, took = post(chat, {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
            if status != 200:
                raise SystemExit(f"bench: the router answered {status} for {model}")
            return took

        ask("bench")  # loads the first model: the round starts from a loaded one, like the engines' own
        switches = [ask("bench-b" if i % 2 == 0 else "bench") for i in range(rounds)]
        if rounds % 2:
            ask("bench")  # the relay parts run on model bench
        plain = statistics.median(ask("bench") for _ in range(20))
        router = statistics.median(switches) - plain
        return {"engines_s": engines["switch_median_s"], "router_s": router,
                "added_ms": (router - engines["switch_median_s"]) * 1000}

    def relay_parts(self, scenarios: list[Scenario]) -> dict[str, dict[str, dict[str, Any]]]:
        """Each scenario in `rounds` short rounds, the three targets taking turns within each, so that the
        machine's ups and downs fall on all three alike; a target's figure is the median of its rounds."""
        results: dict[str, dict[str, dict[str, Any]]] = {}
        pids = {"relay": self.relay.pid, "router": self.router_pid}
        rounds = 1 if self.smoke else 3
        for s in scenarios:
            runs: dict[str, list[dict[str, Any]]] = {"direct": [], "relay": [], "router": []}
            cpu = dict.fromkeys(runs, 0.0)
            for _ in range(rounds):
                for target in runs:
                    url = self.url("a" if target == "direct" else target)
                    cpu0 = cpu_seconds(pids[target]) if target in pids else 0.0
                    runs[target].append(load(url, s))
                    if target in pids:
                        cpu[target] += cpu_seconds(pids[target]) - cpu0
            results[s.key] = {}
            for target, rs in runs.items():
                r = {key: statistics.median(x[key] for x in rs) for key in rs[0]
                     if isinstance(rs[0][key], (int, float)) and not isinstance(rs[0][key], bool)}
                r["errors"] = sum(x["errors"] for x in rs)
                if target in pids:  # warm-up requests count: the router served them too
                    r["cpu_ms_per_req"] = cpu[target] * 1000 / ((s.requests + s.concurrency) * rounds)
                results[s.key][target] = r
                print(f"  {s.key:9} {target:6} " + json.dumps({k: r.get(k) for k in (
                    "ttft_p50_ms", "ttft_p99_ms", "chunks_per_s", "req_per_s", "errors", "cpu_ms_per_req")}),
                      file=sys.stderr, flush=True)
        return results

    def memory(self) -> dict[str, Any]:
        """Router RSS while it relays 10,000 requests (half streamed), sampled every 1,000."""
        total, step = (400, 100) if self.smoke else (10_000, 1_000)
        samples = [(0, rss_mib(self.router_pid))]
        for done in range(step, total + 1, step):
            load(self.url("router"), Scenario("mem", 8, step // 2, 16))
            load(self.url("router"), Scenario("mem", 8, step // 2, 16, stream=False))
            samples.append((done, rss_mib(self.router_pid)))
        return {"start": self.rss_start, "samples": samples}


def pct(part: float | None, whole: float | None) -> str:
    return f"{100 * part / whole:.0f} %" if part and whole else "-"


def plus(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "-"
    return f"{value:.2f} (+{value - base:.2f})" if value != base else f"{value:.2f}"


def tables(res: dict[str, dict[str, dict[str, Any]]], full: bool) -> str:
    lines = ["A. Engine at full speed, 256 tokens" if full else "A. Engine at full speed (smoke: 32 tokens)", "",
             "| target | TTFT p50 ms, 1 stream | chunks/s, 1 stream | TTFT p50 ms, 32 streams | chunks/s, 32 streams "
             "| whole answers/s, 1 client | CPU ms per stream / per whole answer |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    f1, f32, w1 = res["fast-1"], res["fast-32"], res["whole-1"]
    for t in ("direct", "relay", "router"):
        cpu = "-" if t == "direct" else f"{f1[t]['cpu_ms_per_req']:.2f} / {w1[t]['cpu_ms_per_req']:.2f}"
        lines.append(
            f"| {t} | {plus(f1[t]['ttft_p50_ms'], f1['direct']['ttft_p50_ms'])} "
            f"| {f1[t]['chunks_per_s']:,} ({pct(f1[t]['chunks_per_s'], f1['direct']['chunks_per_s'])}) "
            f"| {plus(f32[t]['ttft_p50_ms'], f32['direct']['ttft_p50_ms'])} "
            f"| {f32[t]['chunks_per_s']:,} ({pct(f32[t]['chunks_per_s'], f32['direct']['chunks_per_s'])}) "
            f"| {w1[t]['req_per_s']:,} ({pct(w1[t]['req_per_s'], w1['direct']['req_per_s'])}) | {cpu} |")
    lines += ["", "B. Engine at 50 tokens/s per stream, 64 tokens" if full else "B. Paced engine (smoke)", "",
              "| target | TTFT p50 / p99 ms, 32 streams | chunks/s, 32 streams | TTFT p50 / p99 ms, 256 streams "
              "| chunks/s, 256 streams |", "|---|---:|---:|---:|---:|"]
    p32, p256 = res["paced-32"], res["paced-256"]
    for t in ("direct", "relay", "router"):
        cells = []
        for p in (p32, p256):
            d = p["direct"]
            cells.append(f"{p[t]['ttft_p50_ms']:.1f} (+{p[t]['ttft_p50_ms'] - d['ttft_p50_ms']:.1f}) / "
                         f"{p[t]['ttft_p99_ms']:.1f} (+{p[t]['ttft_p99_ms'] - d['ttft_p99_ms']:.1f})")
            cells.append(f"{p[t]['chunks_per_s']:,} ({pct(p[t]['chunks_per_s'], d['chunks_per_s'])})")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    errors = sum(r.get("errors", 0) for by_target in res.values() for r in by_target.values())
    lines += ["", f"Errors (failed requests, streams without all tokens or without [DONE]): {errors}"]
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load1 = os.getloadavg()[0]
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"load average {load1:.2f} at the end")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny loads: checks that everything runs (CI)")
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    ap.add_argument("--router-src", type=Path, default=REPO,
                    help="run the router from this checkout (e.g. a `git worktree` of an older commit, to compare)")
    a = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("bench: needs root (a private systemd user manager in a mount namespace)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="llm-router-bench-") as tmp:
        bench = Bench(Path(tmp), a.smoke, a.router_src.resolve())
        try:
            bench.start()
            print("bench: switch cost…", file=sys.stderr, flush=True)
            switch = bench.switch_cost()
            print("bench: relay scenarios…", file=sys.stderr, flush=True)
            res = bench.relay_parts(SMOKE if a.smoke else FULL)
            print("bench: memory…", file=sys.stderr, flush=True)
            mem = bench.memory()
        finally:
            bench.stop()
    print(tables(res, not a.smoke))
    print(f"\nSwitch: engines alone {switch['engines_s'] * 1000:.0f} ms (stop + start + healthy, median); "
          f"through the router {switch['router_s'] * 1000:.0f} ms: the router adds {switch['added_ms']:.0f} ms.")
    samples = mem["samples"]
    half = next((rss for n, rss in samples if n >= samples[-1][0] // 2), samples[-1][1])
    print(f"Router RSS: {mem['start']:.1f} MiB at start, {samples[0][1]:.1f} MiB after the relay scenarios; then "
          f"{half:.1f} MiB after {samples[-1][0] // 2:,} more requests, {samples[-1][1]:.1f} MiB after "
          f"{samples[-1][0]:,}.")
    print(f"Router CPU per request: {res['fast-1']['router']['cpu_ms_per_req']:.2f} ms per streamed answer "
          f"({res['fast-1']['router'].get('tokens')} tokens, 1 stream), "
          f"{res['fast-32']['router']['cpu_ms_per_req']:.2f} ms at 32 streams, "
          f"{res['whole-1']['router']['cpu_ms_per_req']:.2f} ms per whole answer.")
    print(f"Machine: {machine()}.")
    if a.json:
        a.json.write_text(json.dumps({"relay": res, "switch": switch, "memory": mem, "machine": machine()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
