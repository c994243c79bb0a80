"""A sweep file: a base pipeline.yaml, named arms and a search space over its keys -> the list of trials.

```yaml
base: pipeline.yaml              # relative to this file
arms:                            # named settings, each crossed with the space (default: one arm, `base`)
  L: {}
  control: {train.shuffle_captions: true}
space:                           # dotted pipeline.yaml keys
  train.lr: [0.001, 0.003]       # grid: every value
  train.tower.lit: [LU, Lu]
  train.warmup_steps: {loguniform: [10, 1000]}   # random search only: uniform, loguniform, randint, choice
search: grid                     # or random: `samples` draws from the space, seeded
samples: 4
seed: 0
metric: zeroshot/heldout/acc1    # eval-while-training's `{task}/{dataset}/{metric}`: the best trial, ASHA
mode: max
asha: {grace_period: 1, reduction_factor: 2}   # optional early stopping at each eval.every
trial: {cpus: 1, gpus: 0}        # resources per trial (a fraction of a GPU is fine)
concurrent: 2                    # trials at once (default: as many as the resources allow)
```

Trials are drawn here, on the driver, not by Ray Tune's searcher: every trial's config is known and
checked before anything starts, the caches they need are prepared once (`runner.prepare`), and a
restored sweep draws the same trials again.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from litpipe.config import ConfigError, PipelineConfig, load_config

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


class TrialResources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)


class AshaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(1, ge=1, description="evaluations every trial gets before it can be stopped")
    reduction_factor: float = Field(2, gt=1)


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str
    arms: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"base": {}})
    space: dict[str, Any] = Field(default_factory=dict)
    search: Literal["grid", "random"] = "grid"
    samples: int = Field(1, ge=1)
    seed: int = 0
    metric: str | None = None
    mode: Literal["max", "min"] = "max"
    asha: AshaConfig | None = None
    trial: TrialResources = Field(default_factory=TrialResources)
    concurrent: int | None = Field(None, ge=1)
    out: str | None = None  # default: {base workdir}/sweeps/{this file's name}
    settings_from: str | None = None  # the folder relative paths in settings start from (default: this file's)


@dataclass
class Trial:
    name: str  # its folder under the sweep's trials/
    arm: str
    settings: dict[str, Any]  # dotted key -> value: the arm's, then the space's


@dataclass
class Sweep:
    path: str
    spec: SweepFile
    trials: list[Trial]
    out: str

    def config(self, trial: Trial) -> PipelineConfig:
        """The trial's pipeline.yaml: the base with its settings, writing under its own folder (and its
        checkpoints under its own name, where the base puts them elsewhere)."""
        overrides = [f"{key}={json.dumps(value)}" for key, value in trial.settings.items()]
        cfg = load_config(self.base, [*overrides, f"workdir={self.out}/trials/{trial.name}"],
                          self.spec.settings_from or self.folder)
        if cfg.train.checkpoint_dir:
            train = cfg.train.model_copy(update={"checkpoint_dir": f"{cfg.train.checkpoint_dir.rstrip('/')}/{trial.name}"})
            cfg = cfg.model_copy(update={"train": train})
        return cfg

    @property
    def folder(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    @property
    def base(self) -> str:
        return os.path.join(self.folder, self.spec.base)


def load_sweep(path: str, check: bool = True) -> Sweep:
    """Read and check a sweep file and draw its trials; every trial's config is validated here (`check`:
    the driver's call; a trial loads only its own), so a misspelt key or a bad value is named before Ray starts."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        spec = SweepFile.model_validate(raw)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    trials = draw_trials(spec, path)
    base = load_config(os.path.join(os.path.dirname(os.path.abspath(path)), spec.base))
    out = spec.out or f"{base.workdir}/sweeps/{os.path.splitext(os.path.basename(path))[0]}"
    sweep = Sweep(path, spec, trials, os.path.join(os.path.dirname(os.path.abspath(path)), out))
    for trial in trials if check else []:
        try:
            cfg = sweep.config(trial)
        except ConfigError as err:
            raise ConfigError(f"{path}: trial {trial.name} ({trial.settings}): {err}") from None
        if cfg.train.workers > 1:
            raise ConfigError(f"{path}: trial {trial.name}: train.workers is {cfg.train.workers}; a sweep runs each "
                              "trial in one process (give it more with trial.cpus / trial.gpus)")
    if spec.asha and not spec.metric:
        raise ConfigError(f"{path}: asha needs a metric to compare trials by (e.g. metric: zeroshot/heldout/acc1)")
    return sweep


def draw_trials(spec: SweepFile, path: str = "sweep") -> list[Trial]:
    """Each arm crossed with the grid (every combination, in the file's order) or with `samples` seeded draws."""
    grid = {k: v for k, v in spec.space.items() if isinstance(v, list)}
    drawn = {k: v for k, v in spec.space.items() if not isinstance(v, list)}
    for key, value in drawn.items():
        if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS):
            raise ConfigError(f"{path}: space.{key}: give a list of values (grid) or one of "
                              f"{', '.join(DISTRIBUTIONS)} (random), e.g. {{loguniform: [1e-4, 1e-2]}}")
    if drawn and spec.search == "grid":
        raise ConfigError(f"{path}: space.{next(iter(drawn))} is a distribution: set search: random")
    if spec.search == "grid":
        points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    else:
        rng = random.Random(spec.seed)
        points = [{key: (rng.choice(values) if key in grid else _draw(rng, *next(iter(spec.space[key].items()))))
                   for key, values in {**grid, **drawn}.items()} for _ in range(spec.samples)]
    trials = []
    for arm, settings in spec.arms.items():
        for point in points:
            index = len(trials)
            label = ",".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in point.items())
            name = f"{index:03d}-{arm}" + (f"-{label}" if label else "")
            trials.append(Trial(name.replace("/", "_")[:120], arm, {**settings, **point}))
    return trials


def _draw(rng: random.Random, kind: str, args: list):
    if kind == "choice":
        return rng.choice(args)
    low, high = args
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randint(low, high - 1)  # randint: [low, high) as numpy's and Ray Tune's


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
