"""What a training run reports as it goes: metrics.jsonl, TensorBoard, optionally Weights & Biases,
and the curves (loss.png, and eval.png when the run evaluates) drawn from metrics.jsonl at the end.

metrics.jsonl holds two kinds of record: `{"step", "loss", ...}` every train.log_every steps and
`{"step", "eval": {metric: value}, "chance": {metric: value}}` at each evaluation (train.eval_every).
A resumed run keeps the records up to its checkpoint's step and logs the steps after it again, so
each step is in the file once, as in a run never stopped (a line a crash tore is dropped too).
TensorBoard is told the same: each writer starts with a purge at the first step it will log
(`purge_step`), so readers drop what an earlier writer logged from there on (a new run: all of
it). W&B continues the same run: its id is kept beside the checkpoints and a resume passes it
back with `resume="allow"` (W&B keeps the values it has for steps logged again).
"""

from __future__ import annotations

import json
from collections import defaultdict

import fsspec

from litpipe.config import WandbConfig
from litpipe.errors import UserError
from litpipe.files import write_atomic
from litpipe.plots import pyplot


class MetricsLog:
    """metrics.jsonl + TensorBoard (+ W&B) under the train folder; only rank 0's is `enabled`."""

    def __init__(self, out: str, enabled: bool, resumed_at: int | None = None, wandb: WandbConfig | None = None,
                 config: dict | None = None, wandb_id: str | None = None):
        """`wandb_id`: the URL of the file that keeps the W&B run's id (beside the checkpoints)."""
        self.out, self.enabled = out, enabled
        if not enabled:
            return
        fs, root = fsspec.core.url_to_fs(out)
        fs.makedirs(root, exist_ok=True)
        if resumed_at is not None and fs.exists(f"{root}/metrics.jsonl"):
            kept = [line for line in fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines(keepends=True)
                    if (step := _step(line)) is not None and step <= resumed_at]
            write_atomic(fs, f"{root}/metrics.jsonl", "".join(kept).encode())
        self.jsonl = fsspec.open(f"{out}/metrics.jsonl", "w" if resumed_at is None else "a").open()
        self.tensorboard = None
        if "://" not in out:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(f"{out}/tensorboard", purge_step=(resumed_at or 0) + 1)
        self.wandb = _start_wandb(wandb, out, config, wandb_id, resumed_at is not None) if wandb else None

    def write(self, record: dict) -> None:
        """One training step's numbers."""
        self._write(record, {f"train/{k}": v for k, v in record.items() if k != "step"})

    def write_eval(self, step: int, metrics: dict[str, float], chance: dict[str, float]) -> None:
        """One evaluation's numbers, named `{task}/{dataset}/{metric}`."""
        self._write({"step": step, "eval": metrics, "chance": chance}, {f"eval/{k}": v for k, v in metrics.items()})

    def _write(self, record: dict, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()

    def plot(self) -> dict[str, str]:
        """loss.png, and eval.png (each metric against steps, its chance dashed) when the run evaluated."""
        with fsspec.open(f"{self.out}/metrics.jsonl", "r") as f:
            records = [json.loads(line) for line in f]
        losses = {r["step"]: r["loss"] for r in records if "loss" in r}
        evals = {r["step"]: r for r in records if "eval" in r}
        plt = pyplot()
        paths = {"loss_curve": f"{self.out}/loss.png"}
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(list(losses), list(losses.values()))
        ax.set(xlabel="step", ylabel="loss", title="text-tower training loss")
        self._save(fig, paths["loss_curve"])
        if evals:
            paths["eval_curve"] = f"{self.out}/eval.png"
            self._save(_eval_figure(plt, [evals[s] for s in sorted(evals)]), paths["eval_curve"])
        return paths

    def _save(self, fig, path: str) -> None:
        fig.tight_layout()
        with fsspec.open(path, "wb") as f:
            fig.savefig(f, format="png")
        pyplot().close(fig)


def _step(line: str) -> int | None:
    """A metrics.jsonl line's step; None for a line cut short."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else None
    except ValueError:
        return None


def _eval_figure(plt, records: list[dict]):
    """One panel per (task, dataset): its metrics in percent against steps, chance dashed in the same colour."""
    panels = defaultdict(list)
    for name in records[-1]["eval"]:
        task, dataset, metric = name.split("/", 2)
        panels[f"{task}: {dataset}"].append((name, metric))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, (title, metrics) in zip(axes[0], panels.items()):
        for name, metric in metrics:
            line, = ax.plot(steps, [100 * r["eval"].get(name, float("nan")) for r in records], marker="o", label=metric)
            ax.axhline(100 * records[-1]["chance"][name], color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set(xlabel="step", ylabel="%", title=f"{title} (dashed: chance)")
        ax.legend(fontsize=7)
    return fig


def _start_wandb(cfg: WandbConfig, out: str, config: dict | None, id_url: str | None, resumed: bool):
    """A new W&B run, or with `resumed` the run whose id `id_url` keeps; the id is written there."""
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb: Weights & Biases is not installed; pip install 'litpipe[wandb]', "
                        "or remove train.wandb") from None
    fs, path = fsspec.core.url_to_fs(id_url) if id_url else (None, None)
    run_id = json.loads(fs.cat_file(path))["id"] if resumed and fs and fs.exists(path) else None
    local = out if "://" not in out else None  # W&B writes its run files locally
    run = wandb.init(project=cfg.project, name=cfg.name, mode=cfg.mode, dir=local, config=config,
                     reinit="finish_previous", id=run_id, resume="allow" if run_id else None)
    if fs:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_atomic(fs, path, json.dumps({"id": run.id}).encode())
    return run
