"""The mistakes of a first hour are named before Ray or a model starts, with the key and the fix."""

import time

import pytest
import yaml

from litpipe.config import load_config
from litpipe.errors import UserError
from litpipe.precompute import stage
from litpipe.store import CacheError, list_caches
from precompute_samples import image_bytes, sample_members, tiny_config, write_tar


@pytest.fixture
def jpegs(tmp_path):
    """A webdataset of JPEGs and the config of a user who guessed its image extension wrong."""
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "s-0.tar", [m for i in range(4) for m in sample_members(f"k{i}", image_bytes(i, fmt="JPEG"),
                                                                                          f"c {i}", ext="jpg")])
    raw = tiny_config({"train": {"format": "webdataset", "urls": "data/s-*.tar", "image_column": "png"}}, "store")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def quickly(call, seconds: float = 10.0):
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        call()
    assert time.perf_counter() - started < seconds
    return str(err.value)


def test_an_image_column_that_matches_nothing_is_a_config_error_and_commits_nothing(jpegs):
    message = quickly(lambda: stage.run(load_config(str(jpegs / "pipeline.yaml"))))
    assert message.startswith("data.train.image_column: png: (none of .png; it has .jpg, .json, .txt)")
    assert "set it to the image's extension" in message and list_caches(str(jpegs / "store")) == []


def test_a_glob_that_matches_nothing_names_the_key_not_pipeline_yaml(jpegs):
    message = quickly(lambda: stage.run(load_config(str(jpegs / "pipeline.yaml"), ["data.train.urls=data/t-*.tar"])))
    assert message.startswith("data.train.urls: ") and "t-*.tar: matches no files" in message
    assert "pipeline.yaml" not in message


def test_a_misspelt_encoder_is_named_with_the_close_names_before_any_worker_starts(jpegs):
    config = load_config(str(jpegs / "pipeline.yaml"), ["data.train.image_column=jpg", "encoder.architecture=null",
                                                         "encoder.model=ViT-B-23"])
    message = quickly(lambda: stage.run(config))
    assert message.startswith("encoder.model `ViT-B-23`: open_clip has no such model; did you mean ViT-B-32")
    assert len(message) < 300


def test_training_on_workers_without_a_cache_is_said_by_the_driver(jpegs):
    from litpipe.train_text import stage as train_stage

    config = load_config(str(jpegs / "pipeline.yaml"), ["train.workers=2", "train.batch_size=4"])
    with pytest.raises(CacheError, match="no float16 cache of dataset `train`.*run `litpipe precompute` first"):
        train_stage.run(config)


@pytest.mark.long
def test_model_loading_reports_and_bars_stay_out_of_the_console_from_ray_workers(tiny_cache, text_models, tmp_path):
    """A frozen text model saved with its pretraining head: transformers' LOAD REPORT table (its unused
    keys) and loading bars, once per Ray worker that loads it, with colour codes, are not printed."""
    import subprocess
    import sys

    import transformers

    from conftest import head_config

    folder = tmp_path / "bert-mlm"  # BertForMaskedLM's weights loaded as a BertModel: unused `cls.*` keys
    transformers.BertForMaskedLM.from_pretrained(text_models["bert"]).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(text_models["bert"]).save_pretrained(folder)
    raw = head_config(tiny_cache, "worker-output", text_models)
    raw["train"]["text_model"]["model"] = str(folder)
    raw["ray"] = {"num_cpus": 2}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "litpipe", "text-features", str(tmp_path / "pipeline.yaml")],
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "text features of cache" in done.stdout, output[-3000:]
    assert "LOAD REPORT" not in output and "Loading weights" not in output, output[-3000:]


def test_ray_workers_get_quiet_model_loading_and_litpipe_q_and_a_users_own_settings_win():
    from litpipe.ray_cluster import worker_env

    assert worker_env(False, {}) == {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    assert worker_env(True, {}) == {}  # litpipe -v: every library's own output
    assert worker_env(False, {"TRANSFORMERS_VERBOSITY": "info"})["TRANSFORMERS_VERBOSITY"] == "info"
    quiet = worker_env(True, {"LITPIPE_QUIET": "1"})  # reaches a cluster's workers, which inherit nothing
    assert quiet["LITPIPE_QUIET"] == "1" and quiet["TQDM_DISABLE"] == "1"
