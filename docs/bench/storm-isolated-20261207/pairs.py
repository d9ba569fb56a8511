#!/usr/bin/env python3
"""Pairs the storm runs of a sitting (round i of each build against round i of `noworkers`) and
prints each figure's runs, each pair's difference and its median.
Usage: python3 pairs.py DIR TAG [TAG ...]   (from this directory: pairs.py sitting-a lanes noworkers nw2lanes)"""
import glob
import re
import statistics as st
import sys


def parse(f):
    s = open(f).read()
    line = re.search(r"^over the storm.*$", s, re.M).group(0)
    gw = re.search(r"gateways ([\d.]+) s \[([\d.]+)\] ([\d.]+)k", line)
    return {
        "back (s)": float(re.search(r"the last after ([\d.]+) s", s).group(1)),
        "device p50 (ms)": float(re.search(r"p50 (\d+) ms", s).group(1)),
        "device p99 (ms)": float(re.search(r"p99 (\d+) ms", s).group(1)),
        "proxy CPU (s)": float(re.search(r"proxy ([\d.]+) s", line).group(1)),
        "gateways CPU (s)": float(gw.group(1)),
        "gateways switches (k)": float(gw.group(3)),
        "fleet CPU (s)": float(re.search(r"fleet ([\d.]+) s", line).group(1)),
    }


d, tags = sys.argv[1], sys.argv[2:]
runs = {t: [parse(f) for f in sorted(glob.glob(f"{d}/storm9k-{t}-*.txt"))] for t in tags}
for k in runs[tags[0]][0]:
    print(k)
    for t in tags:
        print(f"  {t}: " + ", ".join(f"{r[k]:g}" for r in runs[t]))
    for t in tags:
        if t == "noworkers":
            continue
        dd = [round(a[k] - b[k], 2) for a, b in zip(runs[t], runs["noworkers"])]
        print(f"  {t} - noworkers: {dd}, median {st.median(dd):+.2f}")
