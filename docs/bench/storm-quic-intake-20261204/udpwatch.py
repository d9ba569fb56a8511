import time, sys
# every 0.5 s: UDP sockets with a receive queue or drops (local port, rx_queue bytes, drops)
while True:
    t = time.time()
    for f in ("/proc/net/udp", "/proc/net/udp6"):
        for line in open(f).read().splitlines()[1:]:
            p = line.split()
            port = int(p[1].split(":")[-1], 16)
            rx = int(p[4].split(":")[1], 16)
            drops = int(p[-1])
            if rx or drops:
                print(f"{t:.1f} port={port} rxq={rx} drops={drops}", flush=True)
    time.sleep(0.5)
