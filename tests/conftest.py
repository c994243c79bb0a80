"""Fixtures shared across the stages' tests. Append only; each stage keeps its own in its test files."""

import pytest

# A small randomly initialised open_clip architecture: real open_clip code, fast on 2 CPU cores.
TINY_ARCHITECTURE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole test session (starting one costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
