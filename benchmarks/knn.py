"""k-NN evaluation time against bank size, beside the bare matrix products it needs.

    python benchmarks/knn.py [--sizes 10000 100000 1000000] [--queries 10000] [--dim 512]

The floor is the similarity matrix (queries × bank × dim multiply-adds) and a top-k over it; our
`knn_classify` adds voting for two (k, T) settings and chunking. Features are random unit vectors:
the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import report  # noqa: E402
from harness.core.evaluate import knn_classify  # noqa: E402


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 1000000])
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    queries = F.normalize(torch.randn(args.queries, args.dim, device=device, generator=gen), dim=1)
    labels_q = torch.randint(0, 10, (args.queries,), device=device, generator=gen)
    rows = []
    for size in args.sizes:
        bank = F.normalize(torch.randn(size, args.dim, device=device, generator=gen), dim=1)
        labels = torch.randint(0, 10, (size,), device=device, generator=gen)

        def floor(bank=bank) -> None:  # the matrix products and the top-k, nothing else
            for s in range(0, args.queries, args.chunk):
                torch.topk(queries[s:s + args.chunk] @ bank.T, k=min(200, len(bank)), dim=1)

        def ours(bank=bank, labels=labels) -> None:
            knn_classify(bank, labels, queries, labels_q, [(200, 0.1), (20, 0.07)], 10, chunk=args.chunk)

        floor()  # warm-up
        t_floor, t_ours = timed(floor), timed(ours)
        rows.append({"bank": f"{size:,}", "queries": f"{args.queries:,}", "matmul_topk_s": t_floor, "knn_s": t_ours,
                     "ratio": t_ours / t_floor})
        del bank, labels
    report(f"knn: evaluation vs its matrix products ({device.type}, dim {args.dim})", rows,
           ["bank", "queries", "matmul_topk_s", "knn_s", "ratio"],
           notes="Target: k-NN within 2× of its matrix products.")


if __name__ == "__main__":
    main()
