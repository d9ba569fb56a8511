#!/usr/bin/env python3
"""Peer benchmark: wasmbed's proxy side by side with HAProxy and NGINX stream, from a clone.

Each proxy runs alone on core 1 (taskset); the load generators (wrk, iperf3) and the backends
(one nginx worker: HTTP and HTTPS; one iperf3 server) share core 0. Runs are interleaved
(proxy order shuffled every round) and each scenario is repeated; the report gives medians.

Cost is what matters, not rates: `core1 µs/unit` is the busy time of core 1 (from /proc/stat,
kernel and softirq included) per MB, request or connection; core 1 runs only the proxy under
test. `of which user mode` is core 1's user-mode time per unit: the proxy's own code (the
rest is the kernel's, mostly the TCP stack's work on the segments every relay must move).
Noise: before every run core 1 must be idle (<5 % busy over 0.5 s, waited for up to 20 s); a run during which core 1's busy time exceeds the proxy process's own CPU time by more
than NOISE (20 % of the run) is repeated once, then marked `*`.

Scenarios:
  bulk1   iperf3, 1 stream, proxied                         MB/s,  µs/MB
  bulk4   iperf3, 4 streams                                  MB/s,  µs/MB
  rr      wrk keep-alive, 32 connections, small responses    req/s, µs/req, p99
  conn    wrk with Connection: close (a TCP connection each) conn/s, µs/conn, p99
  tls     wrk over https through TLS passthrough (SNI read from the ClientHello by every
          proxy), Connection: close, full handshakes (the backend has no session cache or
          tickets)                                            conn/s, µs/conn, p99
  tlsterm wrk over https, TLS terminated by the proxy (the same ECDSA P-256 certificate for
          all three) and plaintext to the backend, Connection: close: a full handshake per
          connection (resumption off on every proxy: wasmbed --no-tls-resumption, HAProxy
          no-tls-tickets and no cache, NGINX no session cache or tickets; wasmbed with
          --raw, its byte-forwarding terminate listener)  conn/s, µs/conn, p99
  tlsbulk wrk over https through the same terminating listeners, keep-alive, 1 MiB
          responses: bulk over TLS (the proxy decrypts and encrypts) MB/s, µs/MB, p99
  mem     9,000 idle sessions held through the proxy         RSS bytes per session

Usage: python3 bench/peer_bench.py [--runs 3] [--seconds 5] [--scenarios bulk1,rr,...]
       [--install] [--out DIR] [--compare OTHER_WASMBED_BIN --proxies wasmbed,wasmbed-b,...]
It builds `target/release/wasmbed` if missing; --install apt-gets haproxy, nginx (with the
stream module), wrk and iperf3 when missing.
"""

import argparse
import json
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

LOAD_CORE, PROXY_CORE = 0, 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WASMBED = os.path.join(REPO, "target", "release", "wasmbed")
NOISE = 0.20
PORTS = {"http": 19131, "tls": 19132, "bulk": 19133, "tlsterm": 19134}
BACKEND = {"http": 19141, "tls": 19142, "bulk": 19143}
BIG = 1 << 20  # bytes of the tlsbulk response
PROXIES = ["wasmbed", "haproxy", "nginx"]
# Also available with --proxies: wasmbed-splice (--splice on), wasmbed-auto (--splice auto,
# the passthrough default), wasmbed-copy (--splice off).


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def core_jiffies(core):
    """(busy, total, user) jiffies of one core, from /proc/stat (user: user + nice)."""
    for line in open("/proc/stat"):
        if line.startswith(f"cpu{core} "):
            f = [int(x) for x in line.split()[1:]]
            idle = f[3] + f[4]
            return sum(f) - idle, sum(f), f[0] + f[1]
    raise RuntimeError(f"no cpu{core} in /proc/stat")


def proc_jiffies(pids):
    """User + system jiffies of processes (and their reaped children)."""
    total = 0
    for pid in pids:
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        f = stat.rsplit(")", 1)[1].split()
        total += sum(int(x) for x in f[11:15])
    return total


def rss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def children(pid):
    """pid and its descendants (nginx master + workers)."""
    out = [pid]
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        kids = []
    for k in kids:
        out.extend(children(int(k)))
    return out


def wait_idle(core, limit=20.0):
    deadline = time.time() + limit
    while True:
        b0, t0, _ = core_jiffies(core)
        time.sleep(0.5)
        b1, t1, _ = core_jiffies(core)
        busy = (b1 - b0) / max(1, t1 - t0)
        if busy < 0.05 or time.time() > deadline:
            return busy


def wait_port(port, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def pinned(core, cmd, **kw):
    return subprocess.Popen(["taskset", "-c", str(core)] + cmd, **kw)


def tools(install):
    missing = [t for t in ["haproxy", "nginx", "wrk", "iperf3", "taskset", "openssl"] if not shutil.which(t)]
    stream = os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so")
    if (missing or not stream) and install:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "haproxy", "nginx", "libnginx-mod-stream", "wrk", "iperf3", "openssl"],
            check=True,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
        missing = [t for t in ["haproxy", "nginx", "wrk", "iperf3"] if not shutil.which(t)]
    if missing or not os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so"):
        sys.exit(f"missing: {missing or ['libnginx-mod-stream']} (run with --install)")
    if not os.path.exists(WASMBED):
        log("building target/release/wasmbed")
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "wasmbed"], cwd=REPO, check=True)


def start_backends(work):
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=bench.test",
         "-addext", "subjectAltName=DNS:bench.test,IP:127.0.0.1"],
        check=True, capture_output=True)
    conf = os.path.join(work, "backend.conf")
    open(conf, "w").write(f"""
worker_processes 1;
worker_rlimit_nofile 40000;
pid {work}/backend.pid;
error_log {work}/backend.err warn;
daemon off;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  keepalive_timeout 600s;
  keepalive_requests 10000000;
  client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp; fastcgi_temp_path {work}/tmp;
  uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
  server {{
    listen 127.0.0.1:{BACKEND['http']};
    location / {{ return 200 "ok\\n"; }}
    location = /big {{ alias {work}/big.bin; }}
  }}
  server {{
    listen 127.0.0.1:{BACKEND['tls']} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_session_cache off; ssl_session_tickets off;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
""")
    os.makedirs(os.path.join(work, "tmp"), exist_ok=True)
    with open(os.path.join(work, "big.bin"), "wb") as f:
        f.write(os.urandom(BIG))
    # nginx's worker (not root) serves it: the file and its directory readable by all.
    os.chmod(os.path.join(work, "big.bin"), 0o644)
    os.chmod(work, 0o755)
    with open(os.path.join(work, "both.pem"), "w") as f:  # HAProxy wants certificate + key
        f.write(open(cert).read() + open(key).read())
    nginx = pinned(LOAD_CORE, ["nginx", "-c", conf, "-e", f"{work}/backend.err"], stderr=subprocess.DEVNULL)
    iperf = pinned(LOAD_CORE, ["iperf3", "-s", "-p", str(BACKEND["bulk"])],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for p in BACKEND.values():
        wait_port(p)
    return [nginx, iperf]


def proxy_commands(work, compare=None):
    """Per proxy: a list of (command, pool) to start, pinned on the proxy core. `compare`: a
    second wasmbed binary, run as proxy `wasmbed-b` with the same arguments."""
    w = []
    for pool in ("http", "bulk"):
        w.append(([WASMBED, "proxy", "--listen", f"127.0.0.1:{PORTS[pool]}", "--admin", "off",
                   "--allow-plain", "--health", "none", "--max-connections", "19000",
                   "--gateway", f"127.0.0.1:{BACKEND[pool]}"], pool))
    w.append(([WASMBED, "proxy", "--listen", f"127.0.0.1:{PORTS['tls']}", "--admin", "off",
               "--health", "none", "--gateway", f"127.0.0.1:{BACKEND['tls']}"], "tls"))
    cert, key, both = (os.path.join(work, f) for f in ("cert.pem", "key.pem", "both.pem"))
    w.append(([WASMBED, "proxy", "--mode", "terminate", "--raw", "--no-tls-resumption",
               "--tls-cert", cert, "--tls-key", key,
               "--listen", f"127.0.0.1:{PORTS['tlsterm']}", "--admin", "off",
               "--health", "none", "--max-connections", "19000",
               "--gateway", f"127.0.0.1:{BACKEND['http']}"], "tlsterm"))
    hap = os.path.join(work, "haproxy.cfg")
    open(hap, "w").write(f"""
global
  nbthread 1
  maxconn 9800
  tune.ssl.cachesize 0
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  balance leastconn
""" + "".join(f"""
frontend f_{pool}
  bind 127.0.0.1:{PORTS[pool]}
  default_backend b_{pool}
backend b_{pool}
  server s1 127.0.0.1:{BACKEND[pool]}
""" for pool in ("http", "bulk")) + f"""
frontend f_tls
  bind 127.0.0.1:{PORTS['tls']}
  tcp-request inspect-delay 5s
  tcp-request content accept if {{ req_ssl_hello_type 1 }}
  use_backend b_tls if {{ req_ssl_sni -m found }}
  default_backend b_tls
backend b_tls
  server s1 127.0.0.1:{BACKEND['tls']}
frontend f_tlsterm
  bind 127.0.0.1:{PORTS['tlsterm']} ssl crt {both} no-tls-tickets
  default_backend b_tlsterm
backend b_tlsterm
  server s1 127.0.0.1:{BACKEND['http']}
""")
    ngx = os.path.join(work, "proxy-nginx.conf")
    open(ngx, "w").write(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
worker_rlimit_nofile 40000;
pid {work}/proxy-nginx.pid;
error_log {work}/proxy-nginx.err warn;
daemon off;
events {{ worker_connections 30000; }}
stream {{
""" + "".join(f"""
  upstream u_{pool} {{ least_conn; server 127.0.0.1:{BACKEND[pool]}; }}
  server {{ listen 127.0.0.1:{PORTS[pool]}; proxy_pass u_{pool}; proxy_timeout 1h; }}
""" for pool in ("http", "bulk")) + f"""
  map $ssl_preread_server_name $tls_upstream {{ default u_tls; }}
  upstream u_tls {{ least_conn; server 127.0.0.1:{BACKEND['tls']}; }}
  server {{ listen 127.0.0.1:{PORTS['tls']}; ssl_preread on; proxy_pass $tls_upstream; proxy_timeout 1h; }}
  upstream u_tlsterm {{ least_conn; server 127.0.0.1:{BACKEND['http']}; }}
  server {{
    listen 127.0.0.1:{PORTS['tlsterm']} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_session_cache off; ssl_session_tickets off;
    proxy_pass u_tlsterm; proxy_timeout 1h;
  }}
}}
""")
    # Splicing is a passthrough option (the terminating listener is refused with it).
    def splicing(mode):
        return [(cmd if "terminate" in cmd else cmd + ["--splice", mode], pool) for cmd, pool in w]
    spliced, auto, copying = splicing("on"), splicing("auto"), splicing("off")
    other = {}
    if compare:
        other["wasmbed-b"] = [([compare] + cmd[1:], pool) for cmd, pool in w]
    return {
        **other,
        "wasmbed": w,
        "wasmbed-splice": spliced,
        "wasmbed-auto": auto,
        "wasmbed-copy": copying,
        "haproxy": [(["haproxy", "-f", hap], "all")],
        "nginx": [(["nginx", "-c", ngx, "-e", f"{work}/proxy-nginx.err"], "all")],
    }


class Running:
    def __init__(self, name, commands):
        self.name = name
        # A port already taken (a proxy left over from an interrupted run) would have the
        # load measured on the wrong process: refuse to start.
        for port in PORTS.values():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                continue
            raise RuntimeError(f"127.0.0.1:{port} is already taken (a proxy left from an earlier run?)")
        self.procs = [pinned(PROXY_CORE, cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=dict(os.environ, WASMBED_LOG="warn")) for cmd, _ in commands]
        try:
            for p in PORTS.values():
                wait_port(p)
            for proc, (cmd, _) in zip(self.procs, commands):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name}: exited at start ({proc.returncode}): {' '.join(cmd)}")
        except BaseException:
            self.stop()
            raise

    def pids(self):
        out = []
        for p in self.procs:
            out.extend(children(p.pid))
        return out

    def stop(self):
        tree = self.pids()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in tree:  # workers that outlive their master
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        deadline = time.time() + 5
        for port in PORTS.values():
            while time.time() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    time.sleep(0.05)
                except OSError:
                    break


def wrk(url, seconds, close):
    cmd = ["taskset", "-c", str(LOAD_CORE), "wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", url]
    if close:
        cmd[5:5] = ["-H", "Connection: close"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 1, "ms": 1000, "s": 1_000_000}[p99.group(2)]
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return reqs, float(p99.group(1)) * scale, (errors.group(1) if errors else "") + (f" non2xx {non2xx.group(1)}" if non2xx else "")


def iperf(streams, seconds):
    out = subprocess.run(["taskset", "-c", str(LOAD_CORE), "iperf3", "-c", "127.0.0.1", "-p", str(PORTS["bulk"]),
                          "-t", str(seconds), "-P", str(streams), "--json"],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    return doc["end"]["sum_received"]["bytes"] / 1e6


def hold_idle(n):
    """n sessions through the proxy's http port: one request each, then idle."""
    socks = []
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", PORTS["http"]))
        s.sendall(req)
        socks.append(s)
    for s in socks:
        s.settimeout(10)
        got = b""
        while b"ok\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("a session closed")
            got += chunk
    return socks


def measure(proxy, running, scenario, seconds):
    """One run: (units, unit name, core-1 µs per unit, p99 µs or None, note, noisy, core-1
    user-mode µs per unit)."""
    hz = os.sysconf("SC_CLK_TCK")
    if scenario == "mem":
        time.sleep(0.3)
        before = rss_bytes(running.pids())
        socks = hold_idle(9000)
        time.sleep(1.0)
        after = rss_bytes(running.pids())
        for s in socks:
            s.close()
        return (9000, "session", (after - before) / 9000, None, "", False, None)
    wait_idle(PROXY_CORE)
    b0, t0, u0 = core_jiffies(PROXY_CORE)
    p0 = proc_jiffies(running.pids())
    start = time.time()
    note, p99 = "", None
    if scenario in ("bulk1", "bulk4"):
        units = iperf(1 if scenario == "bulk1" else 4, seconds)
        unit = "MB"
    elif scenario in ("rr", "conn"):
        units, p99, note = wrk(f"http://127.0.0.1:{PORTS['http']}/", seconds, scenario == "conn")
        unit = "req" if scenario == "rr" else "conn"
    elif scenario == "tls":
        units, p99, note = wrk(f"https://127.0.0.1:{PORTS['tls']}/", seconds, True)
        unit = "conn"
    elif scenario == "tlsterm":
        units, p99, note = wrk(f"https://127.0.0.1:{PORTS['tlsterm']}/", seconds, True)
        unit = "conn"
    elif scenario == "tlsbulk":
        reqs, p99, note = wrk(f"https://127.0.0.1:{PORTS['tlsterm']}/big", seconds, False)
        units, unit = reqs * BIG / 1e6, "MB"
    else:
        raise ValueError(scenario)
    elapsed = time.time() - start
    b1, t1, u1 = core_jiffies(PROXY_CORE)
    p1 = proc_jiffies(running.pids())
    busy_s = (b1 - b0) / hz
    own_s = (p1 - p0) / hz
    noisy = (busy_s - own_s) > NOISE * elapsed and busy_s > own_s * 1.5
    user_us = (u1 - u0) / hz * 1e6 / max(units, 1)
    return (units / elapsed, unit, busy_s * 1e6 / max(units, 1), p99, note.strip(), noisy, user_us)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--scenarios", default="bulk1,bulk4,rr,conn,tls,tlsterm,tlsbulk,mem")
    ap.add_argument("--proxies", default=",".join(PROXIES))
    ap.add_argument("--install", action="store_true")
    ap.add_argument("--compare", metavar="BIN",
                    help="another wasmbed binary (e.g. a build before a change), run as proxy "
                         "`wasmbed-b` with the same arguments; add it to --proxies")
    ap.add_argument("--out", default=os.path.join(REPO, "target", "peer-bench"))
    a = ap.parse_args()
    if os.cpu_count() < 2:
        sys.exit("needs two cores (proxy on core 1, load on core 0)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tools(a.install)
    scenarios = a.scenarios.split(",")
    proxies = a.proxies.split(",")
    work = tempfile.mkdtemp(prefix="peer-bench.")
    backends = start_backends(work)
    commands = proxy_commands(work, a.compare)
    rows = {}  # (scenario, proxy) -> [run tuples]
    try:
        for r in range(a.runs):
            order = proxies[:]
            random.shuffle(order)
            for proxy in order:
                log(f"round {r + 1}/{a.runs}: {proxy}")
                running = Running(proxy, commands[proxy])
                try:
                    for sc in scenarios:
                        run = measure(proxy, running, sc, a.seconds)
                        if run[5]:
                            log(f"  {sc}: noisy, once more")
                            run = measure(proxy, running, sc, a.seconds)
                        rows.setdefault((sc, proxy), []).append(run)
                        what = (f"{run[2]:,.0f} B RSS per idle session" if sc == "mem"
                                else f"{run[0]:.0f} {run[1]}/s, {run[2]:.2f} core-1 µs/{run[1]}")
                        log(f"  {sc}: {what}"
                            + (f", p99 {run[3]:.0f} µs" if run[3] is not None else "")
                            + (f" [{run[4]}]" if run[4] else "") + (" *noisy*" if run[5] else ""))
                finally:
                    running.stop()
    finally:
        for b in backends:
            b.terminate()
            b.wait()
        shutil.rmtree(work, ignore_errors=True)
    report = render(rows, scenarios, proxies, a)
    print(report)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, time.strftime("%Y%m%d-%H%M%S") + ".md")
    open(path, "w").write(report)
    log(f"report: {path}")


def render(rows, scenarios, proxies, a):
    lines = [f"CPU: {cpu_model()}; proxy on core {PROXY_CORE}, load and backends on core {LOAD_CORE}; "
             f"{a.runs} interleaved runs of {a.seconds} s; medians (quiet runs only, where two remain)",
             "",
             "| scenario | proxy | rate | core-1 cost | of which user mode | p99 | wasmbed / better peer (cost) | runs (cost) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for sc in scenarios:
        med = {}
        for p in proxies:
            runs = rows.get((sc, p), [])
            quiet = [x for x in runs if not x[5]]
            use = quiet if len(quiet) >= 2 else runs
            if not use:
                continue
            med[p] = (statistics.median(x[0] for x in use), use[0][1], statistics.median(x[2] for x in use),
                      statistics.median(x[3] for x in use) if use[0][3] is not None else None, runs,
                      statistics.median(x[6] for x in use) if use[0][6] is not None else None)
        peers = [med[p][2] for p in med if not p.startswith("wasmbed")]
        for p, (rate, unit, cost, p99, runs, user) in med.items():
            if sc == "mem":
                rate_s, cost_s = "9,000 idle", f"{cost:,.0f} B/session"
            else:
                rate_s, cost_s = f"{rate:,.0f} {unit}/s", f"{cost:.2f} µs/{unit}"
            ratio = f"{cost / min(peers):.2f}×" if p.startswith("wasmbed") and peers and min(peers) > 0 else ""
            each = ", ".join((f"{x[2]:,.0f}" if sc == "mem" else f"{x[2]:.2f}") + ("*" if x[5] else "") for x in runs)
            user_s = "" if user is None else f"{user:.2f} µs/{unit}"
            lines.append(f"| {sc} | {p} | {rate_s} | {cost_s} | {user_s} | {'' if p99 is None else f'{p99:,.0f} µs'} | {ratio} | {each} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
