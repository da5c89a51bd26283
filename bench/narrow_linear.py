"""Times `F.linear` against `W @ x.T` at 1-4 rows on this CPU, for SmolLM2's shapes.

    python bench/narrow_linear.py >> bench/results/narrow-linear.txt

The measurement behind `cfg_triton.lm.narrow_linears`: where `F.linear` is slow at 2-3 rows (a 2x
batch at B = 1), generation computes few-row linear layers as `W @ x.T` instead.
"""
import statistics
import time

import torch
import torch.nn.functional as F

import report


def median_ms(fn, calls=25):
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    m = report.machine()
    print(f"## {m['name']}, {m['cores']} cores, torch {m['torch']}, {torch.get_num_threads()} threads")
    print("shape (out x in) | rows | F.linear ms | W @ x.T ms | ratio")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for out_f, in_f in ((49_152, 576), (1_536, 576), (576, 576)):
            weight = torch.randn(out_f, in_f, generator=gen)
            for rows in (1, 2, 3, 4):
                x = torch.randn(rows, in_f, generator=gen)
                a = median_ms(lambda: F.linear(x, weight))  # noqa: B023
                b = median_ms(lambda: (weight @ x.T).T.contiguous())  # noqa: B023
                print(f"{out_f} x {in_f} | {rows} | {a:.3f} | {b:.3f} | {a / b:.2f}")
    print()


if __name__ == "__main__":
    main()
