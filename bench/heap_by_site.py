#!/usr/bin/env python3
"""Live heap per session by allocation site, from two heaptrack runs of one process at two fleet
sizes: each site's live bytes at the end (heaptrack_print -F FILE --flamegraph-cost-type
leaked) at LARGE minus at SMALL, divided by LARGE - SMALL sessions. What the process holds
whatever the fleet (runtime, buffers, links) cancels out. A site is named by its DEPTH
(default 8) innermost frames outside the allocation machinery (alloc, RawVec, Box::new,
malloc...): fewer would merge unrelated callers of a shared container (hash maps, B-trees).

Read with care: heaptrack lists the inlined frames of one address innermost first inside an
otherwise outermost-first stack, so a name's frames can be slightly out of order (the bytes
are exact); and a growable container (hash map, slab) grows in doublings, so its share per
session depends on where SMALL and LARGE fall.

Usage: python3 bench/heap_by_site.py SMALL.leaked.txt LARGE.leaked.txt SESSIONS [MIN_BYTES [DEPTH]]
"""
import collections
import re
import sys

SKIP_FILES = {"alloc.rs", "raw_vec.rs", "spec_from_elem.rs", "boxed.rs", "spec_extend.rs", "spec_from_iter.rs",
              "spec_from_iter_nested.rs", "malloc.c", "libheaptrack.cpp", "heaptrack_preload.cpp"}
SKIP_FUNCS = re.compile(r"^(alloc|alloc_zeroed|alloc_impl\w*|allocate\w*|try_allocate_in|with_capacity\w*|"
                        r"finish_grow|grow_\w+|reserve\w*|do_reserve_and_handle|exchange_malloc|from_elem|"
                        r"new_uninit\w*|try_new_uninit\w*|malloc|calloc|realloc|operator new)(<>)?$")

# std's System allocator, by its mangled name.
ALLOCATOR = re.compile(r"^_R.*(aligned_malloc|GlobalAlloc5alloc)")


def frames(stack):
    out = []
    for f in stack.split(";"):
        m = re.match(r"(.*?) \(([^)]*)\)$", f.strip())
        func, file = (m.group(1), m.group(2)) if m else (f.strip(), "")
        if not func or file in SKIP_FILES or SKIP_FUNCS.match(func) or ALLOCATOR.search(func):
            continue
        out.append(f"{func} ({file})" if file else func)
    return out


def sites(path, depth):
    by = collections.Counter()
    for line in open(path, errors="replace"):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if n.isdigit() and int(n):
            by[" < ".join(reversed(frames(stack)[-depth:]))] += int(n)
    return by


def main():
    if len(sys.argv) not in (4, 5, 6):
        sys.exit(__doc__)
    least = float(sys.argv[4]) if len(sys.argv) >= 5 else 48.0
    depth = int(sys.argv[5]) if len(sys.argv) == 6 else 8
    small, large, n = sites(sys.argv[1], depth), sites(sys.argv[2], depth), int(sys.argv[3])
    diff = {k: (large.get(k, 0) - small.get(k, 0)) / n for k in set(large) | set(small)}
    print(f"live heap per session: {sum(diff.values()):,.0f} B "
          f"(({sum(large.values()):,} - {sum(small.values()):,}) B / {n} sessions)")
    rest = 0.0
    for k, v in sorted(diff.items(), key=lambda kv: -kv[1]):
        if v >= least:
            print(f"{v:8,.0f} B  {k[:400]}")
        else:
            rest += v
    print(f"{rest:8,.0f} B  the rest (sites under {least:.0f} B per session each)")


if __name__ == "__main__":
    main()
