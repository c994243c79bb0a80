"""Two Ray Train workers (gloo, CPU) against one process on the concatenated batch, in float64."""

import json
import sys

import pytest
import torch
from conftest import tiny_train_config

CHUNK = 5
KINDS = ("softmax", "sigmoid")


def tiny_setup(kind):
    """The same float64 tower, batch and loss on every process (seeded, no files)."""
    import torch.nn.functional as F

    from litpipe.models.text_tower import TextTower
    from litpipe.train_text.loss import global_contrastive_loss

    torch.manual_seed(0)
    tower = TextTower(dict(width=32, layers=1, heads=2, context_length=12, vocab_size=500), 24, init_bias=-3.0).double()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 498, (24, 12), generator=g)
    tokens[:, -1] = 499
    images = F.normalize(torch.randn(24, 24, generator=g, dtype=torch.float64), dim=-1)

    def loss_fn(features, images):
        return global_contrastive_loss(features, images, tower.logit_scale, tower.logit_bias, kind, chunk_size=CHUNK)

    return tower, tokens, images, loss_fn


def heads_setup(kind):
    """Heads on both sides (float64) over fixed features, 1-4 captions per image, every caption a positive: the
    ranks hold different numbers of texts, and the image rows carry gradient."""
    import torch.nn.functional as F

    from litpipe.train_text.loss import global_contrastive_loss

    torch.manual_seed(0)
    heads = torch.nn.ModuleDict({"text": torch.nn.Linear(16, 24), "image": torch.nn.Linear(20, 24)}).double()
    heads.logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    heads.logit_bias = torch.nn.Parameter(torch.tensor(-3.0, dtype=torch.float64))
    g = torch.Generator().manual_seed(2)
    owner = torch.repeat_interleave(torch.arange(24), torch.randint(1, 5, (24,), generator=g))
    texts, images = torch.randn(len(owner), 16, generator=g, dtype=torch.float64), torch.randn(24, 20, generator=g,
                                                                                             dtype=torch.float64)

    def loss_fn(image_rows: slice):
        mine = (owner >= image_rows.start) & (owner < image_rows.stop)
        return global_contrastive_loss(F.normalize(heads["text"](texts[mine]), dim=-1), heads["image"](images[image_rows]),
                                       heads.logit_scale, heads.logit_bias, kind, CHUNK, owner[mine] - image_rows.start)

    return heads, loss_fn


def worker_step(config):
    """One Ray Train worker: its half of the batch, GradCache step, gradients summed over ranks."""
    import torch

    from litpipe.train_text.gather import sum_gradients, world
    from litpipe.train_text.grad_cache import grad_cached_backward

    rank, size = world()
    for kind in KINDS:
        tower, tokens, images, loss_fn = tiny_setup(kind)
        rows = slice(rank * len(tokens) // size, (rank + 1) * len(tokens) // size)
        loss = grad_cached_backward(tower, tokens[rows], CHUNK, lambda f: loss_fn(f, images[rows]))
        sum_gradients(tower.parameters())
        grads = {k: p.grad for k, p in tower.named_parameters() if p.grad is not None}
        torch.save({"world": size, "loss": loss, "grads": grads}, f"{config['out']}/{kind}-rank{rank}.pt")
        heads, heads_loss = heads_setup(kind)
        loss = heads_loss(slice(rank * 24 // size, (rank + 1) * 24 // size))
        loss.backward()
        sum_gradients(heads.parameters())
        torch.save({"world": size, "loss": loss.detach(), "grads": {k: p.grad for k, p in heads.named_parameters()}},
                   f"{config['out']}/{kind}-heads-rank{rank}.pt")


def test_two_ray_train_workers_give_the_loss_and_gradients_of_one_process_on_the_whole_batch(ray_local, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    TorchTrainer(worker_step, train_loop_config={"out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="grads")).fit()

    for kind in KINDS:
        tower, tokens, images, loss_fn = tiny_setup(kind)
        check_against_one_process(tower, loss_fn(tower(tokens), images), tmp_path, kind)
        heads, heads_loss = heads_setup(kind)  # several captions per image, uneven texts per rank, image gradients
        check_against_one_process(heads, heads_loss(slice(0, 24)), tmp_path, f"{kind}-heads")


def check_against_one_process(tower, expected, folder, name):
    expected.backward()
    for rank in (0, 1):
        got = torch.load(folder / f"{name}-rank{rank}.pt")
        assert got["world"] == 2
        torch.testing.assert_close(got["loss"], expected.detach(), rtol=1e-12, atol=1e-12)
        for key, p in tower.named_parameters():
            reference = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got["grads"].get(key, torch.zeros_like(p)), reference, rtol=1e-9, atol=1e-12,
                                       msg=f"{name} {key}")


@pytest.mark.long
def test_train_stage_with_two_workers_runs_ray_train_and_writes_the_text_tower(ray_local, tiny_cache):
    from litpipe.config import validate_config
    from litpipe.models.text_tower import load_text_tower
    from litpipe.train_text.stage import run

    raw = tiny_train_config(tiny_cache, "two-workers", workers=2, steps=2, eval_every=1)
    raw["eval"] = {"retrieval": ["train"]}
    summary = run(validate_config(raw))
    assert summary.world_size == 2 and summary.steps == 2
    records = [json.loads(line) for line in open(f"{raw['workdir']}/train/metrics.jsonl")]
    assert [r["step"] for r in records if "eval" in r] == [1, 2]  # rank 0 alone evaluates, once per eval step
    tower, tokenizer, meta = load_text_tower(summary.artifact)
    assert meta["steps"] == 2 and tower(tokenizer(["a red cat"])).shape == (1, 32)
    assert any("2 worker(s)" in line for line in summary.report)


@pytest.mark.long
def test_a_workers_user_error_reaches_the_driver_as_its_own_message(ray_local, tiny_cache):
    """A worker's UserError (here: a cache that is not there) ends the run, once `train.max_failures` restarts
    are spent, with the worker's message, not Ray Train's wrapping of it."""
    from litpipe.config import validate_config
    from litpipe.errors import UserError
    from litpipe.train_text.stage import run

    raw = tiny_train_config(tiny_cache, "worker-error", workers=2, steps=2, max_failures=0, cache="0" * 16)
    with pytest.raises(UserError) as raised:
        run(validate_config(raw))
    assert "0" * 16 in str(raised.value) and "Training failed" not in str(raised.value)
