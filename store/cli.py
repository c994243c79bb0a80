"""`litpipe cache ls|du|show|verify|export|rm|gc`: look after the caches under the config's store.root."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from litpipe.store.maintenance import orphans, remove_orphans, verify
from litpipe.config import add_config_args, config_from_args
from litpipe.errors import UserError
from litpipe.store.cache import EmbeddingCache, list_caches


def register(commands) -> None:
    cache = commands.add_parser("cache", help="list, show, verify or remove embedding caches (store.root)",
                                description="Manage the embedding caches under store.root of the config.")
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    ls = actions.add_parser("ls", help="list caches: id, state, encoder, dataset, rows, errors, size, shared parts",
                            description="List every cache under store.root, oldest first: encoder (model, pretrained, "
                            "weights sha256 prefix), dataset, rows, skipped samples, bytes, parts whose data file "
                            "another cache names too, created.")
    add_config_args(ls)
    ls.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    ls.set_defaults(func=_ls)

    du = actions.add_parser("du", help="what each encoder's caches hold, and what removing each would free",
                            description="Sum rows and bytes per encoder fingerprint; per cache, the bytes `cache rm` frees.")
    add_config_args(du)
    du.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    du.set_defaults(func=_du)

    show = actions.add_parser("show", help="print one cache's manifest readably",
                              description="Print a cache's manifest: fingerprints, shards, errors.")
    show.add_argument("cache", help="cache id (or unique prefix) under store.root, or a cache URL")
    add_config_args(show)
    show.add_argument("--json", action="store_true", help="print the raw manifest JSON instead")
    show.set_defaults(func=_show)

    verify = actions.add_parser("verify", help="re-read every shard and report problems (exit 1 if any)",
                                description="Check checksums, row counts, dims, duplicate keys, NaN/inf and orphaned files.")
    verify.add_argument("cache", help="cache id (or unique prefix) under store.root, or a cache URL")
    add_config_args(verify)
    verify.set_defaults(func=_verify)

    export = actions.add_parser("export", help="write a cache in a layout other tools read (npy: clip-retrieval, "
                                "autofaiss, embedding-reader; arrow: LanceDB, Hugging Face datasets)",
                                description="Write a complete cache as clip-retrieval's img_emb/*.npy + metadata/*.parquet "
                                "(--format npy) or as Parquet with a fixed_size_list<float32> `embedding` column "
                                "(--format arrow), shard by shard in bounded memory.")
    export.add_argument("cache", help="cache id (or unique prefix) under store.root, or a cache URL")
    add_config_args(export)
    export.add_argument("--format", required=True, choices=("npy", "arrow"), help="the layout to write")
    export.add_argument("--out", required=True, help="output folder (any fsspec URL)")
    export.add_argument("--dtype", choices=("float16", "float32"),
                        help="npy only: default float16 (clip-retrieval's), or the stored dtype with --raw")
    export.add_argument("--raw", action="store_true",
                        help="npy only: the cache's vectors as they are, not L2-normalised (clip-retrieval normalises)")
    export.set_defaults(func=_export)
    _register_removal(actions)


def _register_removal(actions) -> None:
    """`cache rm` and `cache gc`: what deletes files, kept apart from what only reads."""
    rm = actions.add_parser("rm", help="delete a cache and the data files no other cache names (or with --orphans "
                            "only its orphaned data files)",
                            description="Delete a cache: its manifest first, then its records, then the data files no "
                            "other cache names (caches adopt each other's shards); --orphans: only the data files no "
                            "commit record names.")
    rm.add_argument("cache", help="cache id (or unique prefix) under store.root, or a cache URL")
    add_config_args(rm)
    rm.add_argument("--orphans", action="store_true", help="delete only orphaned data files, keep the cache")
    rm.add_argument("--part", metavar="PART", help="take only this committed part out (its name, as errors and "
                    "`cache show` give it), so the next `litpipe precompute` embeds it again")
    rm.add_argument("--dry-run", action="store_true", help="print what would be deleted and kept, delete nothing")
    rm.set_defaults(func=_rm)

    gc = actions.add_parser("gc", help="delete files left by a removal cut short, that no cache names",
                            description="Delete the files of folders under store.root that hold no cache manifest "
                            "(a `cache rm` that was killed) and that no cache names.")
    add_config_args(gc)
    gc.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    gc.set_defaults(func=_gc)


def _open(args: argparse.Namespace) -> EmbeddingCache:
    return EmbeddingCache.open(args.cache, root=config_from_args(args).store.root)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _describe_encoder(encoder: dict) -> str:
    """model (pretrained) sha:prefix output d=D, from `catalogue.describe`'s encoder entry."""
    pretrained = str(encoder.get("pretrained") or "")
    pretrained = f"file {pretrained[:15]}" if pretrained.startswith("sha256:") else pretrained
    return (f"{encoder['model']}" + (f" ({pretrained})" if pretrained else "")
            + f" sha:{encoder['weights_sha256'][:8]} {encoder.get('output') or ''} d={encoder.get('dim')}")


def _ls(args: argparse.Namespace) -> int:
    from litpipe.store.catalogue import describe

    root = config_from_args(args).store.root
    entries = describe(list_caches(root))
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print(f"no caches under {root}")
        return 0
    print(f"{'ID':16}  {'STATE':8}  {'ROWS':>10}  {'ERRORS':>6}  {'SIZE':>9}  {'SHARED':>9}  {'CREATED':19}  ENCODER  |  DATASET")
    for e in entries:
        print(f"{e['id']:16}  {e['state']:8}  {e['rows']:>10,}  {e['errors']:>6,}  {_size(e['disk_bytes']):>9}  "
              f"{e['parts_shared']:>4}/{e['parts']:<4}  {e['created'][:19]:19}  {_describe_encoder(e['encoder'])}  |  "
              f"{e['dataset'] or '-'} ({e['format']}, {e['first_input'] or 'no inputs'}"
              + (f" +{e['inputs'] - 1})" if e["inputs"] > 1 else ")"))
    if any(e["parts_shared"] for e in entries):
        print("SHARED: parts whose data file another cache names too (adopted: same encoder, same input bytes)")
    return 0


def _du(args: argparse.Namespace) -> int:
    from litpipe.store.catalogue import describe, disk_usage

    caches = list_caches(config_from_args(args).store.root)
    groups = disk_usage(describe(caches), caches)
    if args.json:
        print(json.dumps(groups, indent=2))
        return 0
    for g in groups:
        print(f"{_size(g['bytes']):>9}  {g['rows']:>12,} rows  {g['caches']} cache(s)  {_describe_encoder(g['encoder'])}")
        for cache_id, freed in g["rm_frees"].items():
            print(f"{'':11}cache rm {cache_id} frees {_size(freed)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    cache = _open(args)
    m = cache.manifest
    if args.json:
        print(json.dumps({**m, "shards": list(cache.parts())} if cache.complete else m, indent=2))
        return 0
    shards = cache.parts()
    errors = m.get("error_counts") if cache.complete else dict(Counter(e["reason"] for e in cache.errors()))
    print(f"cache {cache.id}  ({'complete' if cache.complete else 'partial: being written or interrupted'})")
    print(f"  url:            {cache.url}")
    print(f"  format version: {m['format_version']} (litpipe {m['litpipe_version']})")
    print(f"  created:        {m['created']}" + (f", completed {m['completed']}" if m.get("completed") else ""))
    print(f"  rows:           {sum(s['rows'] for s in shards):,} in {len(shards)} shard(s), "
          f"{_size(sum(s['bytes'] for s in shards))}, {m['embedding_dtype']} x {cache.dim}")
    print(f"  errors:         {sum(errors.values())}" + "".join(f"\n    {n:>8}  {r}" for r, n in sorted(errors.items())))
    print("  encoder:")
    for key, value in m["encoder"].items():
        print(f"    {key}: {json.dumps(value)}")
    inputs = m["dataset"].get("inputs", [])
    print(f"  dataset: {m['dataset'].get('format')}, options {json.dumps(m['dataset'].get('options'))}")
    print(f"    {len(inputs)} input(s), {_size(sum(i.get('size') or 0 for i in inputs))}")
    for entry in inputs[:5]:
        print(f"    {entry['url']}")
    if len(inputs) > 5:
        print(f"    ... {len(inputs) - 5} more")
    return 0


def _verify(args: argparse.Namespace) -> int:
    cache = _open(args)
    problems = verify(cache)
    for problem in problems:
        print(problem)
    if problems:
        print(f"cache {cache.id}: {len(problems)} problem(s)")
        return 1
    if cache.complete:
        print(f"cache {cache.id}: ok ({len(cache.parts())} parts, {cache.num_rows:,} rows)")
    else:
        print(f"cache {cache.id}: PARTIAL, {len(cache.parts())} part(s) committed so far ({cache.num_rows:,} rows), each "
              "intact; `litpipe precompute` finishes it")
    return 0


def _export(args: argparse.Namespace) -> int:
    from litpipe.store.export import export_cache

    if args.raw and args.format != "npy":
        raise UserError("cache export: --raw is for --format npy (arrow keeps the cache's vectors already)")
    summary = export_cache(_open(args), args.out, args.format, args.dtype, raw=args.raw)
    kind = f"{summary['dtype']}{', L2-normalised' if summary['normalised'] else ''}"
    print(f"exported cache {summary['cache_id']}: {summary['rows']:,} rows x {summary['dim']} ({kind}) "
          f"in {len(summary['files'])} file(s) as {args.format} to {args.out} (export.json records what)")
    return 0


def _rm(args: argparse.Namespace) -> int:
    cache = _open(args)
    if args.part:
        from litpipe.store.sharing import remove_part

        if args.orphans or args.dry_run:
            raise UserError("cache rm: --part takes one part out and goes alone; drop --orphans / --dry-run")

        removed = remove_part(cache, args.part)
        print(f"cache {cache.id}: part {args.part} taken out, the cache is partial; "
              + (f"deleted {removed['deleted']}" if removed["deleted"] else
                 f"its data file stays, cache(s) {', '.join(removed['named_by'])} name it: run `litpipe cache rm ID "
                 f"--part {args.part}` for each")
              + "; `litpipe precompute` embeds it again")
        return 0
    if args.orphans:
        removed = remove_orphans(cache)
        kept = len(orphans(cache))
        print(f"cache {cache.id}: removed {len(removed)} orphaned file(s)" + (
            f"; kept {kept} whose input is not committed yet (a running writer may still commit them)" if kept else ""))
        return 0
    from litpipe.store.sharing import remove_cache

    plan = remove_cache(cache, dry_run=args.dry_run)
    for url in plan["deleted"]:
        print(f"{'would delete' if args.dry_run else 'deleted'} {url}")
    for url in plan["kept"]:
        print(f"kept {url} (another cache names it)")
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} cache {cache.id} ({cache.url}): {len(plan['deleted'])} data file(s) deleted, {len(plan['kept'])} kept")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from litpipe.store.sharing import collect_garbage

    root = config_from_args(args).store.root
    garbage = collect_garbage(root, dry_run=args.dry_run)
    for url in garbage:
        print(f"{'would delete' if args.dry_run else 'deleted'} {url}")
    print(f"{root}: {len(garbage)} file(s) of removed caches {'to delete' if args.dry_run else 'deleted'}")
    return 0
