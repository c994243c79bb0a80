"""The fault suite's tally as the Markdown table of docs/reliability.md: `python tests/faults/tally.py runs/faults.jsonl`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict

SITES = ("commit_part", "finalize", "open_or_create", "save_checkpoint", "save_text_tower", "MetricsLog", "fit")


def where(fault: str) -> str:
    """A kill point's label, less its occurrence, as the site it hit: 'finalize: replace manifest.json'."""
    match = re.match(r"SIGKILL (\w+) #\d+ (\S+) (\w+) (\S+) \((\w+)\)", fault)
    if not match:
        return fault
    _, chain, op, path, target = match.groups()
    site = next((f for f in chain.split("<") if any(s in f for s in SITES)), chain.split("<")[0])
    if site == "?":
        site = "TensorBoard's writer thread"
    file = path.rsplit("/", 1)[-1].replace("-p*", "").replace(".tmp-*", " (temporary)")
    return f"SIGKILL{' of the encoder actor only' if target == 'process' else ''} in {site}: {op} {file}"


def main(path: str) -> None:
    rows: dict[tuple, dict] = defaultdict(lambda: {"n": 0, "when": Counter(), "outcomes": Counter(), "lost": Counter()})
    for line in open(path):
        entry = json.loads(line)
        row = rows[(entry["stage"], where(entry["fault"]))]
        row["n"] += entry.get("times", 1)
        if when := re.match(r"SIGKILL (\w+) ", entry["fault"]):
            row["when"][when.group(1)] += 1
        row["outcomes"][entry["outcome"]] += 1
        row["lost"][entry["lost"]] += 1
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    total = sum(r["n"] for r in rows.values())
    print(f"{total} faults injected, measured on commit {commit}\n")
    print("| stage | fault | injected | when (before/after/torn) | what happened | lost |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (stage, fault), row in sorted(rows.items()):
        when = "/".join(str(row["when"][w]) for w in ("before", "after", "torn")) if row["when"] else "-"
        outcomes = "; ".join(f"{o} ({n})" if len(row["outcomes"]) > 1 else o for o, n in row["outcomes"].items())
        print(f"| {stage} | {fault} | {row['n']} | {when} | {outcomes} | {', '.join(row['lost'])} |")


if __name__ == "__main__":
    main(sys.argv[1])
