"""Side-by-side summary of two pytest-benchmark runs of one benchmark file, on one machine.

    python bench/before_after.py BEFORE.json AFTER.json "label before" "label after"

Generation entries are reported in ms per token, host-cost entries in µs per call.
"""
import json
import sys


def rows(path):
    out = {}
    for b in json.load(open(path))["benchmarks"]:
        info, stats = b["extra_info"], b["stats"]
        if "new_tokens" in info:
            key, scale = (info["batch"], info["impl"]), 1e3 / info["new_tokens"]
        elif "host" in info:
            key, scale = (info["host"], info["semantics"]), 1e6 / info["calls_per_round"]
        else:
            continue
        out[key] = (stats["median"] * scale, stats["iqr"] * scale, stats["rounds"])
    return out


def main(before, after, label_before, label_after):
    a, b = rows(before), rows(after)
    machine = json.load(open(after))["machine_info"]["cfg_triton"]
    print(f"{machine['name']}, {machine['cores']} cores, torch {machine['torch']}: ms per token "
          "(generation) or µs per call (host cost), median ± IQR (rounds)")
    print(f"case | {label_before} | {label_after} | after / before")
    for key in sorted(set(a) & set(b)):
        (ma, ia, ra), (mb, ib, rb) = a[key], b[key]
        print(f"{key[0]} {key[1]} | {ma:.1f} ± {ia:.1f} ({ra}) | {mb:.1f} ± {ib:.1f} ({rb}) | "
              f"{mb / ma:.2f}x")


if __name__ == "__main__":
    main(*sys.argv[1:5])
