#!/usr/bin/env python3
"""Plots a soak's samples (`wasmbed up --scenario soak --json FILE`) as one SVG: RSS and open
descriptors of every process, and the sessions, over time; events and the warm-up marked.

    python3 docs/bench/soak-plot.py soak.json docs/soak.svg      # needs matplotlib
"""
import json
import sys

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    doc = json.load(open(src))
    samples = doc["samples"]
    t = [s["t_s"] / 60 for s in samples]
    roles = sorted({r for s in samples for r in s["processes"]})
    fig, (rss, fds, ses) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for role in roles:
        xs = [s["t_s"] / 60 for s in samples if role in s["processes"]]
        rss.plot(xs, [s["processes"][role]["rss_kib"] / 1024 for s in samples if role in s["processes"]], label=role)
        fds.plot(xs, [s["processes"][role]["fds"] for s in samples if role in s["processes"]], label=role)
    ses.plot(t, [s["devices_connected"] for s in samples], label="devices on a session (fleet)")
    ses.plot(t, [s["proxy_sessions"] or 0 for s in samples], label="sessions the proxy holds", linestyle="--")
    warm = doc["warm_up_s"] / 60
    for ax in (rss, fds, ses):
        ax.axvspan(0, warm, color="0.92", label="warm-up" if ax is rss else None)
        for e in doc["events"]:
            if e["what"].startswith("kill"):
                ax.axvline(e["t_s"] / 60, color="red", alpha=0.25, linewidth=0.8)
        ax.grid(alpha=0.3)
    rss.set_ylabel("RSS (MiB)")
    fds.set_ylabel("open descriptors")
    ses.set_ylabel("sessions")
    ses.set_xlabel("minutes (red lines: a gateway killed and replaced)")
    rss.legend(loc="upper left", ncol=3, fontsize=8)
    fds.legend(loc="upper left", ncol=3, fontsize=8)
    ses.legend(loc="lower left", fontsize=8)
    rss.set_title(
        f"soak: {doc['devices']} devices, {doc['duration_s'] / 60:.0f} min; "
        f"lost {doc['lost']}, state resets {doc['state_resets']}, moves {doc['moves']:.0f}, churned {doc['churned']}"
    )
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
