"""pipeline.yaml validation: every kind of bad config fails before work starts, naming key and fix."""

import typing

import pydantic
import pytest
import yaml

from litpipe.config import ConfigError, load_config, validate_config


def load_with(*overrides):
    return load_config("pipeline.yaml", list(overrides))


def test_embedded_default_is_valid():
    cfg = load_with()
    assert cfg.train.dataset in cfg.data and cfg.eval.retrieval


def test_set_overrides_parse_values_as_yaml():
    cfg = load_with("train.batch_size=4096", "train.grad_cache=false", "eval.ks=[1, 2]")
    assert cfg.train.batch_size == 4096 and cfg.train.grad_cache is False and cfg.eval.ks == [1, 2]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_sise=3", "train.batch_sise: unknown key; did you mean train.batch_size?"),
        ("data.train.formt=x", "data.train.formt: unknown key; did you mean data.train.format?"),
        ("train.batch_size=abc", "train.batch_size: Input should be a valid integer"),
        ("train.batch_size=1", "train.batch_size: Input should be greater than or equal to 2"),
        ("encoder.precision=fp8", "encoder.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ("train.workers=3", "batch_size must be divisible by the number of workers (3); got 1024"),
        ("eval.retrieval=[nope]", "eval.retrieval[0]: no dataset `nope` under data"),
        ("train.tower.heads=3", "width (128) must be divisible by heads (3)"),
    ],
)
def test_bad_config_names_key_and_fix(override, message):
    with pytest.raises(ConfigError) as err:
        load_with(override)
    assert message in str(err.value)


def test_malformed_override_says_the_form():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_with("train.batch_size")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_config_defaults_print_every_key_with_the_value_litpipe_uses(capsys):
    from litpipe.cli import main
    from litpipe.config import PipelineConfig

    assert main(["config", "--defaults"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    printed["data"] = {"train": {**printed["data"]["<name>"], "format": "webdataset", "urls": "x.tar"}}
    printed["eval"]["zeroshot"] = []
    assert validate_config(printed) == validate_config({"data": {"train": {"format": "webdataset", "urls": "x.tar"}}})

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            yield prefix + name
            inner = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                          if isinstance(a, type) and issubclass(a, pydantic.BaseModel)), None)
            optional_section = not field.is_required() and field.default is None  # printed as null, keys commented
            if inner is not None and inner.__name__ not in ("DatasetConfig", "ZeroShotConfig") and not optional_section:
                yield from keys(inner, prefix + name + ".")

    def present(tree, dotted):
        for part in dotted.split("."):
            tree = tree[part]
        return True

    for key in keys(PipelineConfig):
        assert present(printed, key), key


def test_a_config_for_precompute_alone_needs_no_train_section_and_training_names_the_key():
    from litpipe.config import ConfigError, training_dataset

    cfg = validate_config({"data": {"imagenet": {"format": "webdataset", "urls": "/d/*.tar"}}})
    with pytest.raises(ConfigError, match="train.dataset: no dataset `train` under data; known: imagenet"):
        training_dataset(cfg)
    with pytest.raises(ConfigError, match="train.dataset: no dataset `train`"):
        validate_config({"data": {"imagenet": {"format": "webdataset", "urls": "/d/*.tar"}}, "train": {"lr": 0.01}})
