"""Retrieval search speed, measured side by side in one run: faiss flat vs faiss IVF.

    .venv/bin/python bench/eval_search.py [--gallery 100000] [--queries 5000] [--dim 128] [--k 10]

Prints queries/s for each index and its ratio to faiss flat, and IVF's recall@k of the exact
neighbours (what its speed costs).
"""

import argparse
import time

import torch
import torch.nn.functional as F

from litpipe.scoring.search_index import build_index


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(args.gallery, args.dim, generator=generator), dim=1)
    queries = F.normalize(gallery[:args.queries] + torch.randn(args.queries, args.dim, generator=generator) / args.dim ** 0.5, dim=1)
    print(f"gallery {args.gallery} x {args.dim}, {args.queries} queries, k={args.k}, torch threads {torch.get_num_threads()}")
    exact, rates = None, {}
    for kind in ("flat", "ivf"):
        start = time.perf_counter()
        index = build_index(gallery, kind)
        built = time.perf_counter()
        _, ids = index.search(queries, args.k)
        searched = time.perf_counter()
        rates[kind] = args.queries / (searched - built)
        exact = ids if exact is None else exact
        overlap = sum(len(set(a) & set(b)) for a, b in zip(ids.tolist(), exact.tolist())) / exact.numel()
        print(f"{index.kind:<32} build {built - start:6.2f}s  search {rates[kind]:9.0f} q/s  "
              f"x{rates[kind] / rates['flat']:.2f} vs flat  recall of exact top-{args.k}: {overlap:.3f}")


if __name__ == "__main__":
    main()
