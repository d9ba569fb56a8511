#!/usr/bin/env python3
"""Syscalls per connection through each proxy (`strace -c -f` attached for a 3 s wrk run with
Connection: close, plain and TLS passthrough), with the backends and configs of
peer_bench.py. strace slows the proxies down: compare the counts, not the rates.

Usage: python3 bench/syscalls_per_connection.py   (needs strace, and what peer_bench needs)
"""
import argparse, os, re, shutil, signal, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_bench as pb


def main():
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    # A closed stdout (`| head`) or a signal must not leave the proxies and backends running:
    # SIGPIPE and SIGTERM become exceptions, and `finally` stops everything started.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp()
    started = []
    try:
        backends = pb.start_backends(work)
        started.extend(backends)
        cmds = pb.proxy_commands(work)
        for proxy in ["wasmbed", "haproxy", "nginx"]:
            for sc, url, close in [("conn", f"http://127.0.0.1:{pb.PORTS['http']}/", True), ("tls", f"https://127.0.0.1:{pb.PORTS['tls']}/", True)]:
                r = pb.Running(proxy, cmds[proxy])
                try:
                    pids = r.pids()
                    out = f"/tmp/strace.{proxy}.{sc}"
                    args = ["strace", "-c", "-f", "-o", out]
                    for p in pids:
                        args += ["-p", str(p)]
                    st = subprocess.Popen(args, stderr=subprocess.DEVNULL)
                    try:
                        time.sleep(1)
                        reqs, p99, note = pb.wrk(url, 3, close)
                    finally:
                        st.terminate(); st.wait()
                finally:
                    r.stop()
                text = open(out).read()
                total = re.search(r"\n\s*100\.00\s+\S+\s+\S+\s+(\d+)", text)
                calls = int(total.group(1)) if total else -1
                top = [l for l in text.splitlines()[2:9]]
                say(f"{proxy} {sc}: {reqs} connections, {calls} syscalls, {calls/reqs:.1f} per connection")
                for l in top:
                    say("    " + l)
    finally:
        for b in started:
            b.terminate(); b.wait()
        shutil.rmtree(work, ignore_errors=True)


def say(line):
    """Prints; a closed stdout loses the line, not the cleanup."""
    try:
        print(line, flush=True)
    except (BrokenPipeError, OSError):
        pass


if __name__ == "__main__":
    main()
