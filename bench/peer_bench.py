#!/usr/bin/env python3
"""Peer benchmark: wasmbed's proxy side by side with HAProxy and NGINX stream, from a clone.

Each proxy runs alone on core 1 (taskset); the load generators (h2load, iperf3) and the
backends (one nginx worker: HTTP and HTTPS; one iperf3 server) share core 0. Rounds are
interleaved: in each, every scenario runs for every proxy back to back (proxy order shuffled
each time, a fresh start per run); every proxy gets the same fixed amount of work
per run, offered at the same fixed rate (`--rates`), so the load each one sees is identical and
the cost per unit is compared like for like (a proxy that cannot keep the rate takes longer;
the achieved rate is reported).

Cost is what matters, not rates. Per unit (MB, request or connection):
  core-1 cost     the busy time of core 1 (from /proc/stat, kernel and softirq included);
                  core 1 runs only the proxy under test
  proxy CPU       the proxy's own CPU time (user + system, /proc/PID/stat of the proxy and its
                  children): what the process was charged, whatever else ran on core 1
  proxy user      the proxy's own user-mode time: its code, the rest is the kernel's (mostly
                  the TCP stack's work on the segments every relay must move)
Noise: before every run core 1 must be idle (<5 % busy over 0.5 s, waited for up to 20 s); a
run during which core 1's busy time exceeds the proxy's own CPU time by more than NOISE (20 %
of the run) is repeated once, then marked `*` and left out of the figures if two quiet runs
remain. A run during which core 1's busy time reads below the proxy's own CPU time (by more
than NOISE of the latter, and by more than 5 clock ticks) is marked `†`: with the proxy pinned
to core 1 that cannot be, so the host's accounting disagrees with itself (seen on a VM in bulk
runs, where the proxy's time is mostly the kernel's; one build's user/system split then
disagreed with perf's samples too), and that scenario's core-1 and user-mode verdicts read
"accounting disagrees" instead of a verdict; in the family line its proxy CPU stands for them.
(A core's busy time and a process's user/system split are tick samples; a process's total is
the scheduler's own count of its run time, which Linux scales the samples to: the proxy CPU
column stays right where the samples go wrong, and agreed with perf's count where checked.)

Every ratio (wasmbed against the better peer, and with --compare wasmbed against wasmbed-b)
comes with a 95% interval over the rounds: each round's ratio of the two proxies' costs (runs
of one round share the machine's state of the moment), their geometric mean, and Student's t
interval on their logarithms (a percentile bootstrap over 5 rounds is too narrow: it covers
the true ratio ~83% of the time). An interval that contains 1.0 reads "level": the bench
cannot tell the two apart. The raw runs are saved beside the report (JSON).
With wasmbed-b (--compare), one more line reads all of wasmbed / wasmbed-b's intervals as one
family: "level on every scenario" is a claim about all of them at once, and 15 independent
intervals at 95% each all contain the truth only 46% of the time. Holm's step-down keeps the
chance of any false "apart" in the family at 5% (bench/interval_coverage.py simulates both);
it is the reading for "the two builds cost the same everywhere", and a weak one: at 5 rounds
it sees a true 20% difference in one scenario 8% of the time, where that scenario's own
interval sees it 59%.

Scenarios (default rate):
  bulk1   iperf3, 1 stream, proxied (1,000 MB/s)                      µs/MB
  bulk4   iperf3, 4 streams (1,000 MB/s in all)                         µs/MB
  rr      h2load keep-alive, 32 connections, small responses (40,000 req/s)  µs/req, p99
  conn    h2load, a TCP connection per request (8,000 conn/s)          µs/conn, p99
  tls     h2load over https through TLS passthrough (SNI read from the ClientHello by every
          proxy), a connection per request, full handshakes (the backend has no session cache
          or tickets) (600 conn/s)                                       µs/conn, p99
  tlsterm h2load over https, TLS terminated by the proxy (the same ECDSA P-256 certificate for
          all three) and plaintext to the backend, a connection per request: a full handshake
          each (resumption off on every proxy: wasmbed --no-tls-resumption, HAProxy
          no-tls-tickets and no cache, NGINX no session cache or tickets; wasmbed with --raw,
          its byte-forwarding terminate listener) (1,200 conn/s)        µs/conn, p99
  tlsbulk h2load over https through the same terminating listeners, keep-alive, 4
          connections, 1 MiB responses: bulk over TLS (400 MB/s)        µs/MB, p99
  mem     9,000 idle sessions held through the proxy                     RSS bytes per session
p99 is the per-request latency (request sent to response received) from h2load's log.

Usage: python3 bench/peer_bench.py [--runs 5] [--seconds 5] [--scenarios bulk1,rr,...]
       [--rates conn=8000,tls=600,...] [--install] [--out DIR]
       [--compare OTHER_WASMBED_BIN --proxies wasmbed,wasmbed-b,...]
       [--scenarios conn,tls --proxies wasmbed,floor-tokio,floor-mio,nginx]   (the floors)
It builds `target/release/wasmbed` if missing; --install apt-gets haproxy, nginx (with the
stream module), h2load (nghttp2-client) and iperf3 when missing.
"""

import argparse
import json
import math
import os
import random
import re
import resource
import shutil
import signal
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
# The rate every proxy is offered (units per second), below what the load core sustains here.
RATES = {"bulk1": 1000, "bulk4": 1000, "rr": 40000, "conn": 8000, "tls": 600, "tlsterm": 1200, "tlsbulk": 400}
PORTS = {"http": 19131, "tls": 19132, "bulk": 19133, "tlsterm": 19134}
BACKEND = {"http": 19141, "tls": 19142, "bulk": 19143}
BIG = 1 << 20  # bytes of the tlsbulk response
PROXIES = ["wasmbed", "haproxy", "nginx"]
# Also available with --proxies: wasmbed-splice (--splice on), wasmbed-auto (--splice auto,
# the passthrough default), wasmbed-copy (--splice off); and, for the conn and tls scenarios
# only, the floors (examples/passthrough_floor.rs, built if missing): floor-tokio, the least a
# tokio proxy does per connection, floor-tokio-io, the same on a runtime with no time driver,
# floor-mio, the same steps on a hand-written epoll loop, and floor-tokio-nested and
# floor-tokio-pump, a connection opened on tokio and forwarded by the mio loop's code (on
# tokio's thread, or on a thread of its own).
# Ratios are then also given against them. And nginx-halfclose: NGINX with
# `proxy_half_close on`, which passes a client's end of stream on to the server and waits for
# the server's, as wasmbed does with a device's (NGINX's default closes both sides at once; a
# TLS passthrough connection of the bench ends with the client's close, so the two do the same
# work only with it on). Ratios are also given against it; it is never "the better peer"
# (NGINX's own default is).
FLOOR = os.path.join(REPO, "target", "release", "examples", "passthrough_floor")
FLOORS = ("floor-tokio", "floor-tokio-io", "floor-tokio-nested", "floor-tokio-pump", "floor-mio")
FLOOR_SCENARIOS = ("conn", "tls")


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
    """(user + system, user) jiffies of processes (and their reaped children)."""
    total = user = 0
    for pid in pids:
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        f = stat.rsplit(")", 1)[1].split()
        total += sum(int(x) for x in f[11:15])
        user += int(f[11]) + int(f[13])
    return total, user


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


def tools(install, floors=False):
    missing = [t for t in ["haproxy", "nginx", "h2load", "iperf3", "taskset", "openssl"] if not shutil.which(t)]
    stream = os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so")
    if (missing or not stream) and install:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "haproxy", "nginx", "libnginx-mod-stream", "nghttp2-client", "iperf3",
             "openssl"],
            check=True,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
        missing = [t for t in ["haproxy", "nginx", "h2load", "iperf3"] if not shutil.which(t)]
    if missing or not os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so"):
        sys.exit(f"missing: {missing or ['libnginx-mod-stream']} (run with --install)")
    if not os.path.exists(WASMBED):
        if WASMBED != os.path.join(REPO, "target", "release", "wasmbed"):
            sys.exit(f"{WASMBED}: no such binary")
        log("building target/release/wasmbed")
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "wasmbed"], cwd=REPO, check=True)
    if floors and not os.path.exists(FLOOR):
        log("building target/release/examples/passthrough_floor")
        subprocess.run(["cargo", "build", "--release", "--locked", "--example", "passthrough_floor"], cwd=REPO,
                       check=True)


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


def stop_backends(backends, work):
    """Stops what start_backends started and removes the run's directory."""
    for b in backends:
        b.terminate()
        b.wait()
    shutil.rmtree(work, ignore_errors=True)


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
    ngx_text = (f"""
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
    open(ngx, "w").write(ngx_text)
    # nginx-halfclose: NGINX passing a client's end of stream on to the server and waiting for
    # the server's, as wasmbed does with a device's (NGINX's default closes both at once).
    ngx_hc = os.path.join(work, "proxy-nginx-halfclose.conf")
    open(ngx_hc, "w").write(ngx_text.replace("stream {\n", "stream {\n  proxy_half_close on;\n", 1)
                            .replace("proxy-nginx.pid", "proxy-nginx-halfclose.pid"))
    # Splicing is a passthrough option (the terminating listener is refused with it).
    def splicing(mode):
        return [(cmd if "terminate" in cmd else cmd + ["--splice", mode], pool) for cmd, pool in w]
    spliced, auto, copying = splicing("on"), splicing("auto"), splicing("off")
    other = {}
    if compare:
        other["wasmbed-b"] = [([compare] + cmd[1:], pool) for cmd, pool in w]
    for floor in FLOORS:
        # The floor takes wasmbed's command line (after `proxy`) and uses --listen and --gateway.
        other[floor] = [([FLOOR, floor.removeprefix("floor-")] + cmd[2:], pool) for cmd, pool in w]
    return {
        **other,
        "wasmbed": w,
        "wasmbed-splice": spliced,
        "wasmbed-auto": auto,
        "wasmbed-copy": copying,
        "haproxy": [(["haproxy", "-f", hap], "all")],
        "nginx": [(["nginx", "-c", ngx, "-e", f"{work}/proxy-nginx.err"], "all")],
        "nginx-halfclose": [(["nginx", "-c", ngx_hc, "-e", f"{work}/proxy-nginx.err"], "all")],
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


def prepare_sampling(a, out):
    """What user_sampled.py and user_instructions.py do first with their arguments (`--wasmbed`,
    `--compare`, `--proxies`): check them, make a signal stop everything started (SIGTERM
    becomes an exit, which runs the callers' `finally`), check the tools, make `out`.
    Returns the proxies."""
    global WASMBED
    if a.compare and not os.access(a.compare, os.X_OK):
        sys.exit(f"--compare {a.compare}: not an executable file")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    WASMBED = os.path.abspath(a.wasmbed)
    proxies = a.proxies.split(",")
    tools(False, any(p in FLOORS for p in proxies))
    os.makedirs(out, exist_ok=True)
    return proxies


def ratio_pairs(proxies):
    """The (proxy, base) ratios user_sampled.py and user_instructions.py print: each proxy
    against each base present (NGINX, NGINX with half-close, HAProxy, tokio's floor;
    wasmbed-b only under wasmbed), NGINX's two configurations and HAProxy not against one
    another."""
    bases = [b for b in ("nginx", "nginx-halfclose", "haproxy", "floor-tokio", "wasmbed-b") if b in proxies]
    return [(p, b) for p in proxies for b in bases
            if p != b and not (p.startswith("nginx") and b in ("haproxy", "nginx-halfclose"))
            and (b != "wasmbed-b" or p == "wasmbed")]


def commands_of(work, proxies, compare):
    """proxy_commands for `proxies`, or an exit naming those it does not know."""
    commands = proxy_commands(work, compare and os.path.abspath(compare))
    unknown = [p for p in proxies if p not in commands]
    if unknown:
        sys.exit(f"unknown proxy(ies): {', '.join(unknown)}" + (" (wasmbed-b needs --compare BIN)"
                 if "wasmbed-b" in unknown else ""))
    return commands


def with_threads(commands, threads):
    """`commands` with wasmbed's and wasmbed-b's run with `--threads N` (None: unchanged, one
    thread on the one core the proxy is pinned on)."""
    if threads:
        for p in ("wasmbed", "wasmbed-b"):
            if p in commands:
                commands[p] = [(cmd + ["--threads", str(threads)], pool) for cmd, pool in commands[p]]
    return commands


THREADS_HELP = ("run wasmbed and wasmbed-b with `--threads N` (default: theirs, one thread on the one core "
                "they are pinned on): N session workers, sharing that core")


def h2load(url, work, rate, per_request_connection, connections=32):
    """`work` requests at `rate` per second: (requests done, p99 µs, errors). A connection per
    request: connections opened at the rate, 1/200 s apart in groups; keep-alive: `connections`
    connections, each at rate/connections requests per second."""
    log_file = tempfile.mktemp(prefix="h2load.")
    cmd = ["taskset", "-c", str(LOAD_CORE), "h2load", "--h1", "-t1", "--log-file", log_file]
    if per_request_connection:
        per_period = max(1, round(rate / 200))
        cmd += ["-c", str(work), "-n", str(work), "-r", str(per_period), "--rate-period", "5ms"]
    else:
        cmd += ["-c", str(connections), "-n", str(work), "--rps", str(max(1, rate // connections))]
    try:
        out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
        times = sorted(int(line.split("\t")[2]) for line in open(log_file) if line.count("\t") >= 2)
    finally:
        if os.path.exists(log_file):
            os.remove(log_file)
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    done, ok, failed, errored, timeout = (int(x) for x in m.groups())
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] if times else None
    errors = ", ".join(f"{n} {what}" for n, what in ((done - ok, "non-2xx"), (failed, "failed"), (errored, "errored"),
                                                      (timeout, "timeout")) if n)
    return ok, p99, errors


def iperf(streams, megabytes, rate):
    """`megabytes` through the proxy at `rate` MB/s in all: MB received."""
    per_stream = f"{rate * 8 // streams}M"
    out = subprocess.run(["taskset", "-c", str(LOAD_CORE), "iperf3", "-c", "127.0.0.1", "-p", str(PORTS["bulk"]),
                          "-n", f"{megabytes}M", "-b", per_stream, "-P", str(streams), "--json"],
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


def measure(running, scenario, seconds, rates):
    """One run: a dict of rate, unit, cost (core-1 µs per unit), user (core-1 user-mode µs per
    unit), own and own_user (the proxy's own CPU µs per unit), p99 (µs or None), note, noisy,
    disagrees (core 1 busy for less time than the proxy's own CPU: the accounting is off)."""
    hz = os.sysconf("SC_CLK_TCK")
    if scenario == "mem":
        time.sleep(0.3)
        before = rss_bytes(running.pids())
        socks = hold_idle(9000)
        time.sleep(1.0)
        after = rss_bytes(running.pids())
        for s in socks:
            s.close()
        return dict(rate=9000, unit="session", cost=(after - before) / 9000, user=None, own=None, own_user=None,
                    p99=None, note="", noisy=False, disagrees=False)
    rate = rates[scenario]
    work = rate * seconds
    wait_idle(PROXY_CORE)
    b0, t0, u0 = core_jiffies(PROXY_CORE)
    p0, pu0 = proc_jiffies(running.pids())
    start = time.time()
    note, p99 = "", None
    if scenario in ("bulk1", "bulk4"):
        units = iperf(1 if scenario == "bulk1" else 4, work, rate)
        unit = "MB"
    elif scenario in ("rr", "conn"):
        units, p99, note = h2load(f"http://127.0.0.1:{PORTS['http']}/", work, rate, scenario == "conn")
        unit = "req" if scenario == "rr" else "conn"
    elif scenario == "tls":
        units, p99, note = h2load(f"https://127.0.0.1:{PORTS['tls']}/", work, rate, True)
        unit = "conn"
    elif scenario == "tlsterm":
        units, p99, note = h2load(f"https://127.0.0.1:{PORTS['tlsterm']}/", work, rate, True)
        unit = "conn"
    elif scenario == "tlsbulk":
        mib = max(1, round(work * 1e6 / BIG))
        reqs, p99, note = h2load(f"https://127.0.0.1:{PORTS['tlsterm']}/big", mib, max(4, round(rate * 1e6 / BIG)),
                                 False, connections=4)
        units, unit = reqs * BIG / 1e6, "MB"
    else:
        raise ValueError(scenario)
    elapsed = time.time() - start
    b1, t1, u1 = core_jiffies(PROXY_CORE)
    p1, pu1 = proc_jiffies(running.pids())
    busy_s = (b1 - b0) / hz
    own_s = (p1 - p0) / hz
    per = 1e6 / hz / max(units, 1)
    return dict(rate=units / elapsed, unit=unit, cost=(b1 - b0) * per, user=(u1 - u0) * per, own=(p1 - p0) * per,
                own_user=(pu1 - pu0) * per, p99=p99, note=note.strip(),
                noisy=(busy_s - own_s) > NOISE * elapsed and busy_s > own_s * 1.5,
                disagrees=busy_s < own_s * (1 - NOISE) and (own_s - busy_s) * hz > 5)


def parse_rates(text):
    rates = dict(RATES)
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        if name not in RATES or not value.isdigit() or int(value) <= 0:
            sys.exit(f"--rates: {item!r} is not SCENARIO=POSITIVE_INTEGER with SCENARIO one of {', '.join(RATES)}")
        rates[name] = int(value)
    return rates


def main():
    global WASMBED
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--seconds", type=int, default=5,
                    help="work per run: the scenario's rate times this many seconds (default 5)")
    ap.add_argument("--rates", default="", help="override offered rates, e.g. conn=6000,tls=500 (units per second)")
    ap.add_argument("--scenarios", default="bulk1,bulk4,rr,conn,tls,tlsterm,tlsbulk,mem")
    ap.add_argument("--proxies", default=",".join(PROXIES))
    ap.add_argument("--install", action="store_true")
    ap.add_argument("--wasmbed", metavar="BIN", default=WASMBED,
                    help="the wasmbed binary run as proxy `wasmbed` (default target/release/wasmbed, "
                         "built if missing). For a self-comparison give it and --compare two copies "
                         "made the same way (a binary in target/ read ~10%% cheaper than its cp "
                         "elsewhere in three runs)")
    ap.add_argument("--compare", metavar="BIN",
                    help="another wasmbed binary (e.g. a build before a change), run as proxy "
                         "`wasmbed-b` with the same arguments; add it to --proxies")
    ap.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    ap.add_argument("--out", default=os.path.join(REPO, "target", "peer-bench"))
    a = ap.parse_args()
    if os.cpu_count() < 2:
        sys.exit("needs two cores (proxy on core 1, load on core 0)")
    if a.runs < 1 or a.seconds < 1:
        sys.exit("--runs and --seconds must be at least 1")
    WASMBED = os.path.abspath(a.wasmbed)
    rates = parse_rates(a.rates)
    scenarios = a.scenarios.split(",")
    proxies = a.proxies.split(",")
    unknown = [x for x in scenarios if x not in RATES and x != "mem"]
    if unknown:
        sys.exit(f"unknown scenario(s): {', '.join(unknown)}")
    if "wasmbed-b" in proxies and not a.compare:
        sys.exit("proxy wasmbed-b needs --compare BIN")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    floors = [p for p in proxies if p in FLOORS]
    if floors and not set(scenarios) & set(FLOOR_SCENARIOS):
        sys.exit(f"{', '.join(floors)}: only for the {' and '.join(FLOOR_SCENARIOS)} scenarios")
    tools(a.install, bool(floors))
    work = tempfile.mkdtemp(prefix="peer-bench.")
    backends = start_backends(work)
    commands = with_threads(proxy_commands(work, a.compare), a.threads)
    unknown = [x for x in proxies if x not in commands]
    if unknown:
        sys.exit(f"unknown proxy(ies): {', '.join(unknown)}")
    rows = {}  # (scenario, proxy) -> [run dicts, one per round (with its round number)]
    try:
        # Within a round, each scenario runs for every proxy back to back (a fresh start per
        # run), so that the runs a ratio pairs are seconds apart, not a proxy's whole turn:
        # this shared host drifts by 10-15% within a minute.
        for r in range(a.runs):
            for sc in scenarios:
                # The floors pass bytes through without timeouts or limits: conn and tls only.
                order = [p for p in proxies if p not in FLOORS or sc in FLOOR_SCENARIOS]
                random.shuffle(order)
                for proxy in order:
                    running = Running(proxy, commands[proxy])
                    try:
                        run = measure(running, sc, a.seconds, rates)
                        if run["noisy"]:
                            log(f"  {sc}: noisy, once more")
                            run = measure(running, sc, a.seconds, rates)
                    finally:
                        running.stop()
                    run["round"] = r
                    rows.setdefault((sc, proxy), []).append(run)
                    u = run["unit"]
                    what = (f"{run['cost']:,.0f} B RSS per idle session" if sc == "mem"
                            else f"{run['rate']:.0f} {u}/s, core 1 {run['cost']:.2f} µs/{u}, "
                                 f"proxy {run['own']:.2f} (user {run['own_user']:.2f}) µs/{u}")
                    log(f"round {r + 1}/{a.runs} {proxy} {sc}: {what}"
                        + (f", p99 {run['p99']:.0f} µs" if run["p99"] is not None else "")
                        + (f" [{run['note']}]" if run["note"] else "") + (" *noisy*" if run["noisy"] else "")
                        + (" †core 1 busy for less than the proxy's own CPU" if run["disagrees"] else ""))
    finally:
        stop_backends(backends, work)
    report = render(rows, scenarios, proxies, a, rates)
    print(report)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, time.strftime("%Y%m%d-%H%M%S"))
    open(stem + ".md", "w").write(report)
    json.dump({"cpu": cpu_model(), "args": vars(a), "rates": rates,
               "runs": [dict(scenario=sc, proxy=p, **run) for (sc, p), runs in rows.items() for run in runs]},
              open(stem + ".json", "w"), indent=1)
    log(f"report: {stem}.md (runs: {stem}.json)")


def used(runs):
    """The runs the figures use: the quiet ones, where two remain."""
    quiet = [x for x in runs if not x["noisy"]]
    return quiet if len(quiet) >= 2 else runs


# Student's t, 97.5th percentile, by degrees of freedom (1..30; beyond, 2.0 is close enough).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def log_ratios(a_runs, b_runs, key):
    """The log of a's cost over b's, for each round where both have a figure (the quiet runs,
    as `used` picks them)."""
    a = {x["round"]: x[key] for x in used(a_runs) if x.get(key) is not None}
    b = {x["round"]: x[key] for x in used(b_runs) if x.get(key) is not None}
    return [math.log(a[r] / b[r]) for r in sorted(set(a) & set(b)) if a[r] > 0 and b[r] > 0]


def ratio_interval(a_runs, b_runs, key):
    """The ratio of a's cost to b's and its 95% interval, from the rounds where both ran: each
    round's ratio (the two runs of a round share the machine's state of the moment), their
    geometric mean, and Student's t interval on the log ratios. (A percentile bootstrap over
    5 rounds covers the truth only ~83% of the time; t on log ratios ~95%: docs/performance.md.)"""
    logs = log_ratios(a_runs, b_runs, key)
    if not logs:
        return None
    mean = statistics.mean(logs)
    if len(logs) < 2:
        return math.exp(mean), 0.0, math.inf, 1
    half = T975[min(len(logs) - 1, len(T975)) - 1] * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs)


def incomplete_beta(x, a, b):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz's
    method; the series converges fast on the side of the mean it is used on)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(1.0 - x, b, a)
    tiny = 1e-300
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-13:
            break
    return front * h / a


def t_p_value(t, df):
    """Two-sided p-value of Student's t statistic `t` with `df` degrees of freedom."""
    return incomplete_beta(df / (df + t * t), df / 2, 0.5)


def ratio_p_value(a_runs, b_runs, key):
    """The two-sided p-value of "the two cost the same" from the rounds' log ratios: the test
    `ratio_interval`'s interval is the inverse of (p < 0.05 when the interval leaves out 1.0,
    up to the rounding of its t table). None where it gives no interval (fewer than 2
    rounds); with no spread at all, 1.0 if every round's ratio is 1, else 0.0."""
    logs = log_ratios(a_runs, b_runs, key)
    if len(logs) < 2:
        return None
    mean, spread = statistics.mean(logs), statistics.stdev(logs)
    if spread == 0 or abs(mean) / spread > 1e12:
        return 1.0 if mean == 0 else 0.0
    return t_p_value(mean / (spread / math.sqrt(len(logs))), len(logs) - 1)


def holm(p_values, alpha=0.05):
    """Holm's step-down over a family of tests: for each p-value (in the order given) its
    adjusted p-value and whether it stands apart at family-wise level `alpha` (the chance
    that any of the family reads apart when none differs is at most `alpha`)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return [(q, q < alpha) for q in adjusted]


def family_line(rows, scenarios, a, b):
    """One line on all of a / b's intervals together: with two copies of one build (or a
    build against one that should cost the same) "level on every scenario" is a claim about
    the whole family of intervals, and 15 intervals at 95% each, were they independent, all
    contain the truth only 46% of the time (0.95^15). Holm's step-down keeps the chance of any
    false "apart" at 5%."""
    tests = []
    swapped = []
    for sc in scenarios:
        if (sc, a) not in rows or (sc, b) not in rows:
            continue
        keys = (("cost", "core-1 cost"), ("own_user", "user mode"))
        if disagrees(rows[(sc, a)] + rows[(sc, b)]):
            # The samples are not to be read (†): the scheduler's total stands for them.
            keys = (("own", "proxy CPU"),)
            swapped.append(sc)
        for key, what in keys:
            p = ratio_p_value(rows[(sc, a)], rows[(sc, b)], key)
            if p is not None:
                tests.append((f"{sc} {what}", p))
    if not tests:
        return []
    judged = holm([p for _, p in tests])
    apart = [f"{name} (adjusted p {q:.3f})" for (name, _), (q, out) in zip(tests, judged) if out]
    head = (f"{a} / {b}, all {len(tests)} intervals as one family (Holm's step-down, family-wise 95%"
            + (f"; proxy CPU for {', '.join(swapped)}, whose accounting disagreed†" if swapped else "") + "): ")
    return ["", head + ("**level on every one**" if not apart else "apart on " + ", ".join(apart)) +
            f"; unadjusted, {sum(p < 0.05 for _, p in tests)} of {len(tests)} read apart at 95% each."]


def disagrees(runs):
    """Whether the host's accounting disagreed with itself in any of `runs` (`†`)."""
    return any(x.get("disagrees") for x in runs)


def verdict(ci):
    point, lo, hi, _ = ci
    if lo <= 1.0 <= hi:
        return "level"
    return "lower" if hi < 1.0 else "higher"


def fmt_ci(ci):
    if ci is None:
        return "", ""
    point, lo, hi, n = ci
    return f"{point:.2f}× [{lo:.2f}, {hi:.2f}]", verdict(ci) + ("" if n >= 3 else f" (only {n} rounds)")


def render(rows, scenarios, proxies, a, rates):
    lines = [f"CPU: {cpu_model()}; proxy on core {PROXY_CORE}, load and backends on core {LOAD_CORE}; "
             f"{a.runs} interleaved rounds, each run {a.seconds} s of work at a fixed rate "
             f"({', '.join(f'{k} {v:,}/s' for k, v in rates.items() if k in scenarios)}); "
             "medians of quiet runs (all runs where fewer than two are quiet)",
             "",
             "| scenario | proxy | rate | core-1 cost | proxy CPU | proxy user mode | p99 | runs (core-1 cost) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    best_peer = {}
    for sc in scenarios:
        peer_cost = {}
        for p in proxies:
            runs = rows.get((sc, p), [])
            if not runs:
                continue
            use = used(runs)
            unit = use[0]["unit"]

            def med(key):
                vals = [x[key] for x in use if x[key] is not None]
                return statistics.median(vals) if vals else None
            cost, own, own_user, p99 = med("cost"), med("own"), med("own_user"), med("p99")
            if not p.startswith("wasmbed") and p not in FLOORS and p != "nginx-halfclose":
                peer_cost[p] = statistics.mean(x["cost"] for x in use)
            if sc == "mem":
                rate_s, cost_s = "9,000 idle", f"{cost:,.0f} B/session"
            else:
                rate_s, cost_s = f"{med('rate'):,.0f} {unit}/s", f"{cost:.2f} µs/{unit}"
            own_s = "" if own is None else f"{own:.2f} µs/{unit}"
            user_s = "" if own_user is None else f"{own_user:.2f} µs/{unit}"
            each = ", ".join((f"{x['cost']:,.0f}" if sc == "mem" else f"{x['cost']:.2f}") + ("*" if x["noisy"] else "")
                             + ("†" if x.get("disagrees") else "") for x in runs)
            notes = sorted({x["note"] for x in runs if x["note"]})
            lines.append(f"| {sc} | {p} | {rate_s} | {cost_s} | {own_s} | {user_s} | "
                         f"{'' if p99 is None else f'{p99:,.0f} µs'} | {each}{' [' + '; '.join(notes) + ']' if notes else ''} |")
        if peer_cost:
            best_peer[sc] = min(peer_cost, key=peer_cost.get)
    lines += ["", "Ratios of cost per unit: geometric mean of the rounds' ratios [95% interval, Student's t on their "
              "logs]; \"level\": the interval contains 1.0:", "",
              "| scenario | ratio | core-1 cost | verdict | proxy CPU | verdict | proxy user mode | verdict |",
              "|---|---|---:|---|---:|---|---:|---|"]
    pairs = []
    for p in proxies:
        if p.startswith("wasmbed"):
            pairs.append((p, None))
    if "wasmbed" in proxies and "wasmbed-b" in proxies:
        pairs.append(("wasmbed", "wasmbed-b"))
    # The floors against the better peer, and wasmbed against the tokio floor: how far above
    # what tokio itself costs wasmbed's own work is.
    pairs += [(f, None) for f in FLOORS if f in proxies]
    if "wasmbed" in proxies and "floor-tokio" in proxies:
        pairs.append(("wasmbed", "floor-tokio"))
    if "wasmbed" in proxies and "nginx-halfclose" in proxies:
        pairs.append(("wasmbed", "nginx-halfclose"))
    for sc in scenarios:
        for p, other in pairs:
            other = other or best_peer.get(sc)
            if other is None or (sc, p) not in rows or (sc, other) not in rows:
                continue
            cost_ci, cost_v = fmt_ci(ratio_interval(rows[(sc, p)], rows[(sc, other)], "cost"))
            own_ci, own_v = fmt_ci(ratio_interval(rows[(sc, p)], rows[(sc, other)], "own"))
            user_ci, user_v = fmt_ci(ratio_interval(rows[(sc, p)], rows[(sc, other)], "own_user"))
            if disagrees(rows[(sc, p)] + rows[(sc, other)]):
                cost_v = user_v = "accounting disagrees†"
            lines.append(f"| {sc} | {p} / {other} | {cost_ci} | {cost_v} | {own_ci} | {own_v} | {user_ci} | {user_v} |")
    if any(disagrees(runs) for runs in rows.values()):
        lines += ["", "† In a run marked † core 1 was busy for less time than the proxy's own CPU time, which cannot be "
                  "with the proxy pinned to core 1: this host's accounting disagrees with itself there, so "
                  "neither the core-1 cost nor the user/system split of a scenario with such a run is read "
                  "(its proxy CPU, user and system together, still is); measure its user mode by sampling "
                  "(perf) instead."]
    if "wasmbed" in proxies and "wasmbed-b" in proxies:
        lines += family_line(rows, scenarios, "wasmbed", "wasmbed-b")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
