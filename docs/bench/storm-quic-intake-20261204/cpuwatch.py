import os, time, sys
# every 2 s: CPU share (cores) of each wasmbed process, labelled by its role
hz = os.sysconf("SC_CLK_TCK")
prev = {}
while True:
    now = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            cmd = open(f"/proc/{pid}/cmdline","rb").read().split(b"\0")
            if not cmd or b"wasmbed" not in cmd[0].rsplit(b"/",1)[-1]: continue
            role = cmd[1].decode() if len(cmd) > 1 else "?"
            if role == "gateway":
                role = "gw"
            st = open(f"/proc/{pid}/stat").read().rsplit(")",1)[1].split()
            now[pid] = (role, int(st[11]) + int(st[12]))
        except Exception: pass
    t = time.time()
    if prev:
        agg = {}
        for pid,(role,ticks) in now.items():
            if pid in prev[1]:
                agg[role] = agg.get(role,0) + (ticks - prev[1][pid][1]) / hz / (t - prev[0])
        print(f"{t:.0f} " + " ".join(f"{k}={v:.2f}" for k,v in sorted(agg.items())), flush=True)
    prev = (t, now)
    time.sleep(2)
