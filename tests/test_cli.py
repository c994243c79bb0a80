"""`litpipe` as a user meets it: help for every command, `--set` overrides, bad configs as messages."""

import os
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from litpipe.cli import build_parser, main
from litpipe.config import config_from_args

REPO_CONFIG = Path(__file__).resolve().parents[1] / "pipeline.yaml"
CONSOLE_SCRIPT = Path(sys.executable).with_name("litpipe")


def command_paths(parser: argparse.ArgumentParser, prefix: tuple = ()) -> list[tuple]:
    """Every command and sub-command (`cache ls`) the parser knows, stages included."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths += command_paths(sub, (*prefix, name))
    return paths


COMMANDS = command_paths(build_parser())


def test_help_lists_every_command_in_pipeline_order_with_what_it_does(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = []  # [name, help text]: a command starts at indent 4, its help may wrap onto deeper lines
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("    ") and not line.startswith("     "):
            listed.append([*line.split(maxsplit=1), ""][:2])
        elif line.startswith("     ") and listed:
            listed[-1][1] += " " + line.strip()
    assert [name for name, _ in listed] == ["run", "ablation", "sweep", "demo-data", "config", "precompute", "text-features", "train", "export",
                                            "tokenizer",
                                            "eval", "search", "serve", "cache"]
    assert all(len(text) > 20 for _, text in listed)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_that_says_what_it_does(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: litpipe " + " ".join(command))
    assert len(out.splitlines()) > 3


def test_console_script_is_installed_and_shows_help():
    result = subprocess.run([str(CONSOLE_SCRIPT), "demo-data", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout and "OpenMoji" in result.stdout


def test_set_overrides_reach_the_config():
    args = build_parser().parse_args([
        "run", str(REPO_CONFIG), "--set", "train.batch_size=2048", "--set", "ray.address=auto",
        "--set", "encoder.pretrained=hf-hub:org/model",
    ])
    cfg = config_from_args(args)
    assert (cfg.train.batch_size, cfg.ray.address, cfg.encoder.pretrained) == (2048, "auto", "hf-hub:org/model")


def test_bad_config_exits_2_with_the_message_and_no_traceback(tmp_path):
    bad = tmp_path / "pipeline.yaml"
    bad.write_text(REPO_CONFIG.read_text().replace("  batch_size: 1024", "  batch_sise: 1024"))
    result = subprocess.run([str(CONSOLE_SCRIPT), "run", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "train.batch_sise: unknown key; did you mean train.batch_size?" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("argv, message", [
    (["run", "no-such-pipeline.yaml"], "no such config file"),
    (["run", str(REPO_CONFIG), "--set", "train.batch_size"], "expected dotted.key=value"),
    (["run", str(REPO_CONFIG), "--set", "train.batch_size=-1"], "train.batch_size"),
])
def test_user_errors_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("litpipe: ") and message in err


def test_python_m_litpipe_and_version_answer_as_the_console_script_does():
    module = subprocess.run([sys.executable, "-m", "litpipe", "--version"], capture_output=True, text=True)
    script = subprocess.run([str(CONSOLE_SCRIPT), "--version"], capture_output=True, text=True)
    import litpipe

    assert module.returncode == script.returncode == 0
    assert module.stdout == script.stdout == f"litpipe {litpipe.__version__}\n"


def test_the_config_may_follow_the_options(tmp_path, capsys):
    """`litpipe cache ls --json CONFIG`, as `cache export ID --out DIR CONFIG` is typed."""
    config = tmp_path / "elsewhere.yaml"
    config.write_text(REPO_CONFIG.read_text().replace("root: litpipe-store", f"root: {tmp_path / 'store'}"))
    assert main(["cache", "ls", "--json", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "[]"  # its own empty store, not the repository's
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "ls", "--json", str(config), "surplus"])
    assert exit_.value.code == 2


def test_rerun_to_finish_exits_75_and_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    """A scheduler tells "fix the config" (2) from "retry" (75); Ctrl-C is 128 + SIGINT."""
    from litpipe import cli
    from litpipe.precompute.results import PrecomputeIncomplete

    def incomplete(args):
        raise PrecomputeIncomplete("1 input shard(s) failed after retries")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_config", incomplete)
    assert main(["config", str(REPO_CONFIG)]) == 75
    monkeypatch.setattr(cli, "_config", interrupted)
    assert main(["config", str(REPO_CONFIG)]) == 130
    err = capsys.readouterr().err
    assert "failed after retries" in err and "interrupted" in err and "Traceback" not in err


def test_the_config_is_read_from_any_fsspec_url(capsys):
    import fsspec

    with fsspec.open("memory://configs/pipeline.yaml", "w") as f:
        f.write(REPO_CONFIG.read_text().replace("batch_size: 1024", "batch_size: 2048"))
    assert main(["config", "memory://configs/pipeline.yaml"]) == 0
    assert '"batch_size": 2048' in capsys.readouterr().out
    assert main(["config", "memory://configs/missing.yaml"]) == 2
    assert "memory://configs/missing.yaml: no such config file" in capsys.readouterr().err


def test_relative_paths_in_a_config_mean_relative_to_its_file_from_any_folder(tmp_path, monkeypatch, capsys):
    import json

    experiment = tmp_path / "experiments" / "a"
    (experiment / "data").mkdir(parents=True)
    (experiment / "tower.pt").write_bytes(b"weights")
    (experiment / "kinds.txt").write_text("cat\ndog\n")
    (experiment / "pipeline.yaml").write_text(
        "workdir: runs/a\n"
        "data:\n  train: {format: webdataset, urls: data/train-*.tar}\n"
        "  pets: {format: webdataset, urls: [data/p-0.tar, s3://bucket/p-1.tar], classnames: kinds.txt}\n"
        "encoder: {model: ViT-B-32, pretrained: tower.pt}\n"
        "store: {root: store}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["config", "../experiments/a/pipeline.yaml", "--set", "train.checkpoint_dir=ckpt"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    a = str(experiment)  # absolute: nothing downstream depends on the working folder
    assert (cfg["workdir"], cfg["store"]["root"], cfg["encoder"]["pretrained"]) == (f"{a}/runs/a", f"{a}/store", f"{a}/tower.pt")
    assert cfg["data"]["train"]["urls"] == f"{a}/data/train-*.tar"
    assert cfg["data"]["pets"]["urls"] == [f"{a}/data/p-0.tar", "s3://bucket/p-1.tar"]
    assert cfg["data"]["pets"]["classnames"] == f"{a}/kinds.txt"
    assert cfg["train"]["checkpoint_dir"] == str(elsewhere / "ckpt")  # --set speaks from the working folder
    (experiment / "tower.pt").unlink()  # a name that is no file there is a pretrained tag
    (experiment / "pipeline.yaml").write_text((experiment / "pipeline.yaml").read_text().replace("tower.pt", "laion2b_s34b_b79k"))
    assert main(["config", "../experiments/a/pipeline.yaml"]) == 0
    assert json.loads(capsys.readouterr().out)["encoder"]["pretrained"] == "laion2b_s34b_b79k"


@pytest.mark.long
def test_a_clean_run_prints_litpipes_lines_and_ray_keeps_its_own_in_its_logs(tmp_path):
    import yaml
    from precompute_samples import image_bytes, sample_members, tiny_config, write_tar

    write_tar(tmp_path / "in-000000.tar", sample_members("a", image_bytes(1), "one"))
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(tiny_config({"train": {"format": "webdataset", "urls": str(tmp_path / "in-*.tar")}},
                                                 str(tmp_path / "store"), ray={"num_cpus": 2})))
    result = subprocess.run([str(CONSOLE_SCRIPT), "precompute", str(config)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: cache " in result.stdout and "embedded 1" in result.stdout
    for chatter in ("Token authentication", "Started a local Ray instance", "Starting execution of Dataset",
                    "Progress bars disabled"):
        assert chatter not in result.stderr, result.stderr


def test_quiet_silences_every_progress_bar_in_this_process_and_the_ones_it_starts(monkeypatch, capsys):
    from litpipe.progress import QUIET, QUIET_LIBRARIES, progress

    for name in (QUIET, *QUIET_LIBRARIES):
        monkeypatch.setenv(name, "")  # restored after the test
    list(progress(range(3), desc="shown"))
    assert "shown" in capsys.readouterr().err
    assert main(["-q", "config", "--defaults"]) == 0
    list(progress(range(3), desc="hidden", disable=False))  # a bar that sets `disable` itself is silenced too
    assert "hidden" not in capsys.readouterr().err
    assert all(os.environ[name] for name in (QUIET, *QUIET_LIBRARIES))  # Ray's workers inherit these
