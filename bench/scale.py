"""The scale rehearsal (#40): precompute over crawl-like WebDataset shards on a real multi-node Ray
cluster on this machine, the store on an S3 protocol server, measured per image and per part.

- `generate`: shards as img2dataset writes them (.jpg, .txt, .json) with small JPEGs of varied
  sizes (the run is bound by the pipeline, not by a ViT), truncated and garbage images, and keys
  repeated from the shard before (a merged crawl). What to expect is written beside them.
- `run`: a head and --nodes worker nodes, each its own `ray start` (own CPUs, object store and
  raylet), moto in its own process for the store, and the job submitted as a user submits it to a
  cluster: `litpipe precompute --set ray.address=HEAD`. Measured: images/s; the driver's peak RSS and
  CPU seconds (its rusage); the peak RSS of each read-task and encoder-actor worker (sampled from
  /proc); object-store spilling (`ray memory --stats-only`); S3 requests per part (moto's request
  log); plan and finalize seconds (the summary); verify's time and memory (`litpipe cache verify`,
  its rusage); workers that crashed ("Fatal Python error" in the job's output). With --node-loss S, one worker node's raylet is killed S seconds in; the run, or a
  rerun, must then finish with every key once and verify clean. With --train-batch B, `litpipe train`
  then runs over the cache (one epoch, or --train-steps N) beside the cluster (data wait per step,
  its rusage), and one epoch of its input path alone (the reader serving vectors and token ids at B)
  gives the rows/s and MB/s the store feeds a trainer.
- `epoch`: one training epoch (`litpipe train`, the demo's text tower) over a cache of --rows rows built
  without images, where the rehearsal's cache cannot travel (the GPU runbook's `--epoch`).

    .venv/bin/python bench/scale.py generate --images 100000 --dir /tmp/litpipe-scale/100k
    .venv/bin/python bench/scale.py run --dir /tmp/litpipe-scale/100k [--nodes 2] [--node-loss 60 [--lose encoder]]
        [--train-batch 65536 [--train-steps 3]] [--json F]
    .venv/bin/python bench/scale.py table F      # the runs in F as docs/benchmarks.md's table, with slopes
    .venv/bin/python bench/scale.py epoch --rows 10000000 --batch 65536 [--gpu]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from moto_s3 import free_port, start_moto

ROOT = Path(__file__).resolve().parents[1]
LITPIPE = [sys.executable, "-m", "litpipe"]
BAD_EVERY, GARBAGE_EVERY, REPEAT_EVERY = 500, 2_000, 1_000  # one sample in N: truncated, garbage, a key of the shard before
TRAIN = {"tower": {"width": 128, "layers": 2, "heads": 4, "context_length": 32}, "chunk_size": 1024,
         "warmup_steps": 2, "log_every": 1}  # the demo's text tower (pipeline.yaml)
TINY_ENCODER = {"model": "litpipe-scale-tiny", "architecture": {
    "embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}


# --- the data ------------------------------------------------------------------------------------

def image_pool(count: int = 256, seed: int = 0) -> list[bytes]:
    """Small JPEGs, 40 to 128 px a side, smooth with noise: 1-5 kB each, as thumbnails of a crawl are."""
    rng, pool = np.random.default_rng(seed), []
    for _ in range(count):
        w, h = rng.integers(40, 129, 2)
        x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
        base = np.stack([x, y, x * y], -1) * rng.uniform(80, 255, 3) + rng.normal(0, 12, (h, w, 3))
        out = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=int(rng.integers(50, 90)))
        pool.append(out.getvalue())
    return pool


def write_shard(path: Path, shard: int, per_shard: int, pool: list[bytes]) -> dict:
    """One tar of `per_shard` samples; its counts of bad samples and of keys repeated from shard - 1."""
    counts = {"samples": per_shard, "bad": 0, "repeated": 0}
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(per_shard):
            n = shard * per_shard + i
            key = f"{n:09d}"
            if shard and i % REPEAT_EVERY == 3:  # the key of a good sample of the shard before, never itself repeated
                key, counts["repeated"] = f"{n - per_shard - 1:09d}", counts["repeated"] + 1
            image = pool[(n * 7919) % len(pool)]
            if i % BAD_EVERY == 11:
                image, counts["bad"] = image[:len(image) // 3], counts["bad"] + 1  # truncated
            elif i % GARBAGE_EVERY == 17:
                image, counts["bad"] = b"<html>404 not found</html>", counts["bad"] + 1
            caption = f"a photo of item {n}, shard {shard}".encode()
            meta = json.dumps({"url": f"https://example.com/{n}.jpg", "key": key}).encode()
            for ext, data in (("jpg", image), ("txt", caption), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)
    return counts


def generate(folder: Path, images: int, per_shard: int) -> dict:
    """The shards of `images` samples under folder/data, and folder/expected.json (skipped where done)."""
    expected_file = folder / "expected.json"
    if expected_file.exists():
        return json.loads(expected_file.read_text())
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pool, shards = image_pool(), -(-images // per_shard)
    totals = {"samples": 0, "bad": 0, "repeated": 0}
    start = time.perf_counter()
    for shard in range(shards):
        counts = write_shard(folder / "data" / f"{shard:05d}.tar", shard, min(per_shard, images - shard * per_shard), pool)
        totals = {k: totals[k] + counts[k] for k in totals}
        if shard % 10 == 9:
            print(f"  {shard + 1}/{shards} shards, {time.perf_counter() - start:.0f} s", flush=True)
    expected = {**totals, "shards": shards, "per_shard": per_shard, "rows": totals["samples"] - totals["bad"] - totals["repeated"],
                "bytes": sum(p.stat().st_size for p in (folder / "data").glob("*.tar"))}
    expected_file.write_text(json.dumps(expected, indent=2))
    return expected


# --- the cluster ---------------------------------------------------------------------------------

class Cluster:
    """A head and worker nodes on this machine, each a `ray start --block` of its own (own raylet,
    object store and ports), so a node can be lost by killing its raylet."""

    def __init__(self, folder: Path, nodes: int, cpus: int, store_bytes: int, env: dict):
        self.folder, self.env, self.nodes, self.logs = folder, env, [], []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.session = None
        try:
            self._start(["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false"], store_bytes, 0)
            self._wait_for(1)
            self.session = os.path.realpath("/tmp/ray/session_latest")  # every process of this cluster names it
            for i in range(1, nodes + 1):  # one at a time: raylets starting together on one machine collide
                self._start([f"--address={self.address}", f"--num-cpus={cpus}"], store_bytes, i)
                self._wait_for(i + 1)
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str], store_bytes: int, index: int) -> None:
        base = 21_000 + 1_000 * index  # every port of a node apart from the others'
        ports = [f"--node-manager-port={base}", f"--object-manager-port={base + 1}", f"--dashboard-agent-listen-port={base + 2}",
                 f"--dashboard-agent-grpc-port={base + 3}", f"--runtime-env-agent-port={base + 4}",
                 f"--metrics-export-port={base + 5}", f"--min-worker-port={base + 100}", f"--max-worker-port={base + 999}"]
        spill = self.folder / f"spill-{index}"
        spill.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / f"node-{index}.log", "w")
        self.logs.append(log)
        process = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args, *ports,
                                    f"--object-store-memory={store_bytes}", f"--object-spilling-directory={spill}",
                                    "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                   start_new_session=True)
        self.nodes.append(process)

    def _wait_for(self, count: int) -> None:
        probe = f"import ray; ray.init(address='{self.address}', log_to_driver=False); print(len([n for n in ray.nodes() if n['Alive']]))"
        for _ in range(120):
            run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=self.env)
            if run.returncode == 0 and run.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not come up with {count} nodes; see {self.folder}/node-*.log")

    def raylet_of(self, index: int) -> int:
        """The pid of worker node `index`'s raylet (a child of its `ray start`)."""
        return next(pid for pid in children(self.nodes[index].pid) if process_name(pid) == "raylet")

    def node_of(self, mark: str) -> int:
        """The worker node one of whose workers runs `mark` (PartEncoder: an encoder actor)."""
        return next(i for i in range(1, len(self.nodes))
                    if any(mark in cmdline(pid) for pid in children(self.raylet_of(i))))

    def memory_stats(self) -> str:
        run = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "memory", "--stats-only", f"--address={self.address}"],
                             capture_output=True, text=True, env=self.env, timeout=120)
        return run.stdout

    def stop(self) -> None:
        """Every process of every node (raylets, GCS, agents, workers) goes; not `ray stop`, which
        would stop every Ray on the machine."""
        pids = [pid for process in self.nodes for pid in (process.pid, *children(process.pid))]
        if self.session:  # agents orphaned by a lost node
            pids += [pid for pid in all_pids() if self.session in cmdline(pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.nodes:
            process.wait()
        for log in self.logs:
            log.close()
        with contextlib.suppress(FileNotFoundError):  # else a later ray.init() on this machine joins the dead head
            os.remove("/tmp/ray/ray_current_cluster")


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc."""
    parents = {}
    for entry in all_pids():
        try:
            parents[entry] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            pass
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def process_name(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


class WorkerSampler(threading.Thread):
    """Every half second, the RSS of each Ray worker process by kind (read task, encoder actor, other):
    anonymous memory sampled, and VmHWM (its lifetime peak, object-store pages it touched included)."""

    KINDS = (("read_parts", "read task"), ("PartEncoder", "encoder actor"))

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[str, dict[str, float]] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.5):
            for pid in all_pids():
                command = cmdline(pid)
                kind = next((name for mark, name in self.KINDS if mark in command), None) if command.startswith("ray::") else None
                try:
                    status = open(f"/proc/{pid}/status").read() if kind else ""
                except OSError:
                    continue
                if kind is None:
                    continue
                fields = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
                          if line.startswith(("VmHWM", "RssAnon"))}
                peak = self.peaks.setdefault(kind, {"rss_anon_mb": 0.0, "vm_hwm_mb": 0.0})
                peak["rss_anon_mb"] = max(peak["rss_anon_mb"], round(fields.get("RssAnon", 0), 1))
                peak["vm_hwm_mb"] = max(peak["vm_hwm_mb"], round(fields.get("VmHWM", 0), 1))


def timed(command: list[str], env: dict, log: Path, rss_every: float = 0) -> dict:
    """Run `command`, its output to `log`; its exit code, wall seconds, peak RSS and CPU seconds (rusage),
    and with `rss_every` its RSS every that many seconds ("rss_mb": [[seconds in, MB], ...])."""
    start, timeline = time.perf_counter(), []
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        # wait4 with WNOHANG, not Popen.poll: poll would reap the process and lose its rusage.
        while not (ended := os.wait4(process.pid, os.WNOHANG if rss_every else 0))[0]:
            with contextlib.suppress(OSError, StopIteration):
                lines = open(f"/proc/{process.pid}/status").read().splitlines()
                kb = int(next(line for line in lines if line.startswith("VmRSS")).split()[1])
                timeline.append([round(time.perf_counter() - start, 1), round(kb / 1024, 1)])
            time.sleep(rss_every)
        _, status, usage = ended
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            **({"rss_mb": timeline} if rss_every else {})}


# --- the rehearsal -------------------------------------------------------------------------------

def requests_in(log: Path) -> int:
    """Requests moto answered: one access-log line each. Its server colours the lines of answers other
    than 200 (206 ranges, 204 deletes, 404s) with terminal escapes before the method, which runs before
    #40's seventh session did not count: their figures were 4-6 requests a part short."""
    return sum(1 for line in open(log, errors="replace")
               if re.search(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|HEAD|DELETE) ', line))


def rehearse(folder: Path, nodes: int, cpus: int, store_mb: int, rows_per_commit: int, node_loss: float | None,
             lose: str = "last", train_batch: int = 0, train_steps: int = 0) -> dict:
    expected = json.loads((folder / "expected.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    config = {"workdir": str(work / "runs"),
              "data": {"train": {"format": "webdataset", "urls": f"{folder}/data/{{00000..{expected['shards'] - 1:05d}}}.tar"}},
              "encoder": TINY_ENCODER, "store": {"root": "s3://scale/store"},
              "precompute": {"batch_size": 1024, "rows_per_commit": rows_per_commit}}
    if train_batch:
        config["train"] = {**TRAIN, "batch_size": train_batch, **({"steps": train_steps} if train_steps else {"epochs": 1})}
    (work / "pipeline.yaml").write_text(json.dumps(config))
    result = {"images": expected["samples"], "shards": expected["shards"], "nodes": nodes, "cpus_per_node": cpus,
              "rows_per_commit": rows_per_commit}
    moto_log = work / "moto.log"
    with open(moto_log, "w") as moto_out, contextlib.ExitStack() as stack:
        moto, endpoint = start_moto(moto_out)
        stack.callback(lambda: (moto.terminate(), moto.wait()))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint, "RAY_DEDUP_LOGS": "0",
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}  # one token: every node and the driver
        subprocess.run([sys.executable, "-c", "import fsspec; fsspec.filesystem('s3').mkdir('scale')"], env=env, check=True)
        cluster = Cluster(work, nodes, cpus, store_mb * 2**20, env)
        stack.callback(cluster.stop)
        command = [*LITPIPE, "-q", "precompute", str(work / "pipeline.yaml"), "--json", "--set", f"ray.address={cluster.address}"]
        sampler = WorkerSampler()
        sampler.start()
        killer = None
        if node_loss is not None:
            def lose_a_node():
                index = cluster.node_of("PartEncoder") if lose == "encoder" else nodes
                pid = cluster.raylet_of(index)
                os.kill(pid, signal.SIGKILL)
                result["node_lost"] = {"after_s": node_loss, "node": index, "which": lose, "raylet_pid": pid}
            killer = threading.Timer(node_loss, lose_a_node)
            killer.start()
        before = requests_in(moto_log)
        result["driver"] = timed(command, env, work / "precompute.log", rss_every=2.0)
        result["requests"] = requests_in(moto_log) - before
        if killer is not None:
            killer.cancel()
        if result["driver"]["rc"] != 0:  # a rerun finishes what the first left
            result["rerun"] = timed(command, env, work / "precompute-rerun.log")
        sampler.stop.set()
        result["workers"] = sampler.peaks
        result["object_store"] = spilled(cluster.memory_stats())
        logs = [work / name for name in ("precompute.log", "precompute-rerun.log") if (work / name).exists()]
        result["worker_crashes"] = sum(log.read_text(errors="replace").count("Fatal Python error") for log in logs)
        summary = read_summary(logs[-1])
        result["summary"] = summary
        if "rerun" not in result:  # the driver's finalize is its last step: its peak before it is the encoding's
            encoding = result["driver"]["seconds"] - summary["seconds"].get("finalize", 0) - 1
            result["driver"]["peak_rss_mb_encoding"] = max((mb for t, mb in result["driver"]["rss_mb"] if t < encoding),
                                                           default=None)
        before = requests_in(moto_log)
        result["verify"] = timed([*LITPIPE, "-q", "cache", "verify", summary["cache_url"]],
                                 env, work / "verify.log")
        result["verify"]["requests"] = requests_in(moto_log) - before
        result["keys"] = check_keys(summary["cache_url"], expected, env)
        if train_batch:
            result["train"] = train(work, cluster.address, env)
            result["read_epoch"] = read_epoch(summary["cache_url"], train_batch, work, env)
    result["parts"] = result["keys"]["parts"]
    seconds = result["driver"]["seconds"]
    result["images_per_s"] = round(expected["samples"] / seconds, 1)
    result["requests_per_part"] = round(result["requests"] / result["parts"], 2)
    return result


def train(work: Path, address: str, env: dict) -> dict:
    """`litpipe train` over the cache (one epoch, or the config's `train.steps`) in one process beside the
    cluster (the demo's text tower at the given global batch): its rusage, and per step the share spent
    waiting for data."""
    figures = timed([*LITPIPE, "-q", "train", str(work / "pipeline.yaml"), "--set", f"ray.address={address}"],
                    env, work / "train.log")
    steps = [json.loads(line) for line in open(next((work / "runs").rglob("metrics.jsonl")))
             if '"data_wait"' in line]
    waits = [step["data_wait"] for step in steps[1:]]  # the first step also waits for the reader's start
    return {**figures, "steps": len(steps), "data_wait_first": steps[0]["data_wait"] if steps else None,
            "data_wait_median": float(np.median(waits)) if waits else None,
            "samples_per_s_median": float(np.median([step["samples_per_s"] for step in steps[1:]])) if waits else None}


READ_EPOCH = """
import json, sys, time
from litpipe.store import EmbeddingCache, StreamingReader
from litpipe.store.caption_rows import file_name
from litpipe.store.tokens import TokenCache
cache = EmbeddingCache.open(sys.argv[1])
tokens = TokenCache.find(cache, cache.fs.ls(f"{cache.path}/tokens", detail=False)[0].rsplit("/", 1)[-1])
records = cache.parts()
nbytes = sum(r["bytes"] for r in records) + sum(cache.fs.size(f"{tokens.path}/{file_name(r)}") for r in records)
rows, waits, start = 0, [], time.perf_counter()
for batch in StreamingReader(cache, int(sys.argv[2]), text=False, per_caption=tokens):
    rows += len(batch.embeddings)
    waits.append(time.perf_counter() - start)
    start = time.perf_counter()
print(json.dumps({"rows": rows, "batches": len(waits), "bytes": nbytes, "first_batch_s": waits[0], "read_s": sum(waits)}))
"""


def read_epoch(cache_url: str, batch: int, work: Path, env: dict) -> dict:
    """One epoch of the trainer's input path alone (the streaming reader serving image vectors with token
    ids at the global batch, in one process): rows/s and MB/s off the store, and the reader's rusage."""
    figures = timed([sys.executable, "-c", READ_EPOCH, cache_url, str(batch)], env, work / "read-epoch.log")
    found = json.loads((work / "read-epoch.log").read_text().strip().splitlines()[-1])
    return {**figures, **found, "rows_per_s": round(found["rows"] / found["read_s"], 1),
            "mb_per_s": round(found["bytes"] / 1e6 / found["read_s"], 1)}


# --- one training epoch over a cache built without images (where the rehearsal's 10M cache cannot go) ----

CAPTION_WORDS = np.array("a an the photo picture of with on in at dog cat man woman car house tree street beach city "
                         "red blue green small large old new night sunny view close up white black two three".split())


def commit_synthetic(args: tuple) -> None:
    """Parts `first`.. of a synthetic cache, one input shard each, through the store's own `commit_part`."""
    from litpipe.store import EmbeddingCache
    from litpipe.store.commits import commit_part

    url, first, last, rows, per_part, dim = args
    cache = EmbeddingCache.open(url)
    for part in range(first, last):
        n = min(per_part, rows - part * per_part)
        rng = np.random.default_rng(part)
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        words = CAPTION_WORDS[rng.integers(0, len(CAPTION_WORDS), (n, 12))]
        lengths = rng.integers(4, 13, n)
        commit_part(cache, f"synthetic/{part:07d}.tar", pa.table({
            "key": [f"{part:07d}/{row:05d}" for row in range(n)],
            "captions": [[" ".join(w[:k])] for w, k in zip(words.tolist(), lengths.tolist())],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)}))


def synthetic_cache(root: str, rows: int, per_part: int = 4_096, dim: int = 64) -> str:
    """A complete cache of `rows` rows (random unit vectors, crawl-like captions of 4-12 words, `per_part`
    rows an input shard, float16 as the rehearsal's) written by the store's own commit path from a
    process per CPU, then finalized; its URL. It stands in for the rehearsal's 10M cache on a machine the
    shards cannot travel to (a lent GPU): the trainer reads it as it reads any cache."""
    from concurrent.futures import ProcessPoolExecutor

    from litpipe.store import EmbeddingCache
    from litpipe.store.commits import finalize

    parts = -(-rows // per_part)
    inputs = [{"url": f"synthetic/{part:07d}.tar", "size": 1, "mtime": 1.0} for part in range(parts)]
    encoder = {"model": "synthetic", "weights_sha256": "0" * 64, "dim": dim, "spec": {"model": "synthetic"}}
    cache = EmbeddingCache.open_or_create(root, encoder, {"format": "webdataset", "options": {}, "inputs": inputs},
                                          rows_per_commit=per_part)
    workers = os.cpu_count() or 1
    spans = [(cache.url, a, min(a + -(-parts // workers), parts), rows, per_part, dim)
             for a in range(0, parts, -(-parts // workers))]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(commit_synthetic, spans))
    finalize(EmbeddingCache.open(cache.url))
    return cache.url


def epoch(folder: Path, rows: int, batch: int, use_gpu: bool) -> dict:
    """One epoch of `litpipe train` (the demo's text tower, global batch `batch`) over a synthetic cache of
    `rows` rows: the build's seconds, then train's rusage, data wait and samples/s per step (`train`)."""
    work = Path(tempfile.mkdtemp(prefix="epoch-", dir=folder))
    start = time.perf_counter()
    url = synthetic_cache(str(work / "store"), rows)
    built = round(time.perf_counter() - start, 1)
    config = {"workdir": str(work / "runs"), "store": {"root": str(work / "store")},
              "data": {"train": {"format": "webdataset", "urls": "synthetic/{0000000..0000001}.tar"}},
              "train": {**TRAIN, "cache": url, "batch_size": batch, "epochs": 1, "use_gpu": use_gpu}}
    (work / "pipeline.yaml").write_text(json.dumps(config))
    trained = train(work, "local", {**os.environ, "RAY_ADDRESS": "local"})
    return {"rows": rows, "batch": batch, "use_gpu": use_gpu, "build_s": built, "train": trained}


def read_summary(log: Path) -> dict:
    """The train dataset's result from `precompute --json`'s output."""
    text = log.read_text()
    start = text.index("{")
    return json.JSONDecoder().raw_decode(text[start:])[0]["train"]


def spilled(stats: str) -> dict:
    match = re.search(r"Spilled (\d+) MiB, (\d+) objects", stats)
    restored = re.search(r"Restored (\d+) MiB, (\d+) objects", stats)
    return {"spilled_mib": int(match[1]) if match else 0, "spilled_objects": int(match[2]) if match else 0,
            "restored_mib": int(restored[1]) if restored else 0}


CHECK = """
import collections, json, sys
import pyarrow.compute as pc
from litpipe.store import EmbeddingCache
from litpipe.store.parts import open_part, read_part
cache = EmbeddingCache.open(sys.argv[1])
keys = [read_part(cache, open_part(cache, r), r, ["key"]).column("key") for r in cache.parts()]
import pyarrow as pa
column = pa.chunked_array([c for k in keys for c in k.chunks], pa.string())
print(json.dumps({"rows": len(column), "distinct": pc.count_distinct(column).as_py(), "complete": cache.complete,
                  "parts": len(keys)}))
"""


def check_keys(cache_url: str, expected: dict, env: dict) -> dict:
    """Every good key exactly once: rows = distinct keys = samples less bad and repeated ones."""
    run = subprocess.run([sys.executable, "-c", CHECK, cache_url], capture_output=True, text=True, env=env, check=True)
    found = json.loads(run.stdout.strip().splitlines()[-1])
    return {**found, "expected": expected["rows"], "ok": found["rows"] == found["distinct"] == expected["rows"] and found["complete"]}


# --- the table -----------------------------------------------------------------------------------

FIGURES = [  # (row, how to find it in a result, unit of its slope)
    ("wall time of `litpipe precompute`, s", lambda r: r["driver"]["seconds"], "ms"),
    ("driver peak RSS, MB", lambda r: r["driver"]["peak_rss_mb"], "kB"),
    ("driver CPU, s", lambda r: r["driver"]["cpu_s"], "ms"),
    ("read task peak RSS (anonymous), MB", lambda r: r["workers"]["read task"]["rss_anon_mb"], "kB"),
    ("encoder actor peak RSS (anonymous), MB", lambda r: r["workers"]["encoder actor"]["rss_anon_mb"], "kB"),
    ("object store spilled, MiB", lambda r: r["object_store"]["spilled_mib"], "kB"),
    ("S3 requests (job and finalize)", lambda r: r["requests"], "requests"),
    ("plan, s", lambda r: r["summary"]["seconds"]["plan"], "ms"),
    ("finalize, s", lambda r: r["summary"]["seconds"]["finalize"], "ms"),
    ("`cache verify`, s", lambda r: r["verify"]["seconds"], "ms"),
    ("`cache verify` peak RSS, MB", lambda r: r["verify"]["peak_rss_mb"], "kB"),
    ("`cache verify` requests", lambda r: r["verify"]["requests"], "requests"),
]


def table(results: list[dict], rows_per_commit: int) -> str:
    """The rehearsal's table from `run --json` lines: the last run at `rows_per_commit` without node loss at each size, and
    each figure's slope per image and per part between consecutive sizes (ms, kB or requests; a
    figure in s or MB is scaled by 1000)."""
    runs = {}
    for r in results:
        if "node_lost" not in r and r["driver"]["rc"] == 0 and r["rows_per_commit"] == rows_per_commit:
            runs[r["images"]] = r
    runs = [runs[size] for size in sorted(runs)]
    head = " | ".join(f"{r['images']:,} images, {r['parts']:,} parts" for r in runs)
    slopes = " | ".join(f"{a['images']:,} -> {b['images']:,}: per image / per part" for a, b in zip(runs, runs[1:]))
    lines = [f"| figure | {head} | {slopes} |", "| --- |" + " ---: |" * len(runs) + " --- |" * (len(runs) - 1)]
    for name, figure, unit in FIGURES:
        values = [figure(r) for r in runs]
        scale = 1 if unit == "requests" else 1000
        steps = [f"{(vb - va) * scale / (b['images'] - a['images']):.4g} / {(vb - va) * scale / (b['parts'] - a['parts']):.4g} {unit}"
                 for (a, va), (b, vb) in zip(zip(runs, values), zip(runs[1:], values[1:]))]
        lines.append(f"| {name} | " + " | ".join(f"{v:,}" for v in values) + " | " + " | ".join(steps) + " |")
    keys = " | ".join("yes" if r["keys"]["ok"] and r["verify"]["rc"] == 0 else "NO" for r in runs)
    lines.append(f"| every key once, verify clean | {keys} |" + " |" * (len(runs) - 1))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--images", type=int, required=True)
    gen.add_argument("--per-shard", type=int, default=10_000)
    gen.add_argument("--dir", type=Path, required=True)
    run = sub.add_parser("run")
    run.add_argument("--dir", type=Path, required=True, help="a folder `generate` wrote")
    run.add_argument("--nodes", type=int, default=2, help="worker nodes beside the head (which runs the driver)")
    run.add_argument("--cpus", type=int, default=2, help="logical CPUs per worker node")
    run.add_argument("--object-store-mb", type=int, default=400)
    run.add_argument("--rows-per-commit", type=int, default=1_000)
    run.add_argument("--node-loss", type=float, help="kill a worker node's raylet this many seconds in")
    run.add_argument("--lose", choices=["last", "encoder"], default="last",
                     help="which node --node-loss kills: the last worker node, or the one running the encoder actor")
    run.add_argument("--train-batch", type=int, default=0,
                     help="then train one epoch at this global batch (0: no), and read one epoch of its input alone")
    run.add_argument("--train-steps", type=int, default=0, help="train this many steps instead of one epoch")
    run.add_argument("--json", type=Path, help="append the result as one JSON line")
    one = sub.add_parser("epoch", help="one training epoch over a synthetic cache of --rows rows (built here)")
    one.add_argument("--rows", type=int, default=10_000_000)
    one.add_argument("--batch", type=int, default=65_536)
    one.add_argument("--gpu", action="store_true", help="train on the GPU (train.use_gpu)")
    one.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    show = sub.add_parser("table", help="the markdown table of the runs in a --json file, with slopes")
    show.add_argument("results", type=Path)
    show.add_argument("--rows-per-commit", type=int, default=1_000)
    args = parser.parse_args()
    if args.command == "table":
        print(table([json.loads(line) for line in open(args.results)], args.rows_per_commit))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the cluster and moto are stopped on the way out
    if args.command == "generate":
        print(json.dumps(generate(args.dir, args.images, args.per_shard), indent=2))
        return
    if args.command == "epoch":
        print(json.dumps(epoch(args.dir, args.rows, args.batch, args.gpu)))
        return
    result = rehearse(args.dir.resolve(), args.nodes, args.cpus, args.object_store_mb, args.rows_per_commit, args.node_loss,
                      args.lose, args.train_batch, args.train_steps)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
