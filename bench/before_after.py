"""Side-by-side summary of pytest-benchmark runs of one benchmark file, before and after a change,
on one machine.

    python bench/before_after.py "label before" "label after" BEFORE.json AFTER.json [BEFORE2.json AFTER2.json ...]

Give several pairs (runs alternated: before, after, before, after) to see how much of a difference
is drift. Generation entries are reported in ms per token, host-cost entries in µs per call. Where
the runs hold transformers' plain `generate` (impl "plain"), a last column divides each ratio by
that control's ratio at the same batch size: the change's effect with the machine's drift taken out.
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


def main(label_before, label_after, *paths):
    if len(paths) < 2 or len(paths) % 2:
        raise SystemExit(__doc__)
    machine = json.load(open(paths[1]))["machine_info"]["cfg_triton"]
    print(f"{machine['name']}, {machine['cores']} cores, torch {machine['torch']}: ms per token "
          "(generation) or µs per call (host cost), median ± IQR (rounds)")
    for n, (before, after) in enumerate(zip(paths[::2], paths[1::2]), 1):
        a, b = rows(before), rows(after)
        print(f"\npair {n}\ncase | {label_before} | {label_after} | after / before | ÷ control")
        for key in sorted(set(a) & set(b)):
            (ma, ia, ra), (mb, ib, rb) = a[key], b[key]
            control = (key[0], "plain")
            drift = b[control][0] / a[control][0] if control in a and control in b else None
            print(f"{key[0]} {key[1]} | {ma:.1f} ± {ia:.1f} ({ra}) | {mb:.1f} ± {ib:.1f} ({rb}) | "
                  f"{mb / ma:.2f}x | " + (f"{mb / ma / drift:.2f}x" if drift else "–"))


if __name__ == "__main__":
    main(*sys.argv[1:])
