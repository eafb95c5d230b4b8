"""open_clip_train's command lines run under `bigbatch train`: its parser is read here, so a
flag it gains and bigbatch lacks fails a test instead of a user's command."""

from __future__ import annotations

import argparse
from pathlib import Path
from unittest import mock

import pytest

from bigbatch.errors import ConfigError
from bigbatch.parse import build_parser, parse_config
from bigbatch.peer_flags import REFUSED, TABLE, markdown_table

SYNTH = ["--dataset-type", "synthetic"]


def peer_parser() -> argparse.ArgumentParser:
    """The parser open_clip_train.params.parse_args builds (it builds it inside the call and
    returns only the namespace, so catch it on its way to parse_args)."""
    params = pytest.importorskip("open_clip_train.params")
    caught = []
    parse = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        caught.append(self)
        return parse(self, [], namespace)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        params.parse_args([])
    return caught[0]


def peer_flags() -> list[str]:
    return [s for a in peer_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


def test_every_open_clip_train_flag_is_a_bigbatch_flag():
    ours = {s for a in build_parser()._actions for s in a.option_strings}
    missing = [flag for flag in peer_flags() if flag not in ours]
    assert not missing, f"open_clip_train flags unknown to bigbatch train: {missing}"


def test_every_open_clip_train_flag_has_a_row_in_the_readme_table():
    assert set(peer_flags()) <= set(TABLE)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "README's table is stale: paste `python -m bigbatch.peer_flags`"


def test_peer_choices_are_accepted():
    for action in peer_parser()._actions:
        flag = action.option_strings[0] if action.option_strings else ""
        if action.choices and flag not in ("--dist-backend", "--dataset-type"):  # backends: see README
            for choice in action.choices:
                parse_config([*SYNTH, flag, choice])


def test_store_true_flags_and_valued_flags_parse_as_the_peer_writes_them(tmp_path):
    cfg = parse_config([*SYNTH, "--save-most-recent", "--delete-previous-checkpoint", "--debug",
                        "--log-local", "--ddp-static-graph", "--no-set-device-rank", "--use-bn-sync",
                        "--force-quick-gelu", "--force-custom-text", "--skip-scheduler",
                        "--copy-codebase", "--pretrained", "", "--precision", "amp_bfloat16",
                        "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.25", "0.25", "0.25",
                        "--force-image-size", "32", "--aug-cfg", "scale=(0.5, 1.0)", "color_jitter=0.4",
                        "--opt", "sgd", "--momentum", "0.9", "--dist-url", "tcp://127.0.0.1:1234",
                        "--wandb-project-name", "p", "--wandb-notes", "n", "--loss-dist-impl", "bidir",
                        "--remote-sync", str(tmp_path), "--remote-sync-frequency", "60",
                        "--remote-sync-protocol", "fsspec"])
    assert cfg.aug_cfg == {"scale": (0.5, 1.0), "color_jitter": 0.4}
    assert cfg.image_mean == [0.5] * 3 and cfg.force_image_size == [32]
    assert cfg.pretrained is None and cfg.opt == "sgd" and cfg.momentum == 0.9


def test_yaml_takes_lists_and_mappings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset_type: synthetic\nimage_mean: [0.5, 0.5, 0.5]\nforce_image_size: 48\n"
                    "aug_cfg: {scale: [0.8, 1.0], use_timm: false}\nlr_scheduler: const-cooldown\n"
                    "epochs_cooldown: 1\n")
    cfg = parse_config(["--config", str(path)])
    assert cfg.image_mean == [0.5] * 3 and cfg.force_image_size == [48]
    assert cfg.aug_cfg == {"scale": [0.8, 1.0], "use_timm": False}


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_flags_without_sense_here_stop_with_one_line(flag):
    argv = [*SYNTH, f"--{flag.replace('_', '-')}"] + ([] if flag in ("horovod", "torchscript", "trace") else ["ViT-B-32"])
    with pytest.raises(ConfigError) as error:
        parse_config(argv)
    assert "\n" not in str(error.value)
    assert any(word in str(error.value) for word in ("drop", "use", "launch"))


@pytest.mark.parametrize("argv, message", [
    (["--lr-scheduler", "const-cooldown"], "needs --epochs-cooldown"),
    (["--epochs", "2", "--epochs-cooldown", "3"], "--epochs-cooldown must be between 1 and --epochs"),
    (["--opt", "lamb"], "choose adamw, sgd, or timm/NAME"),
    (["--aug-cfg", "scal=(0.5, 1.0)"], "unknown key \\(did you mean 'scale'\\?\\)"),
    (["--force-image-size", "1", "2", "3"], "one size, or height and width"),
    (["--image-mean", "0.1", "0.2"], "one per RGB channel"),
    (["--report-to", "mlflow"], "give tensorboard, wandb"),
    (["--loss-dist-impl", "ring"], "choose one of"),
    (["--train-data", "a/{0..1}.tar::b/{0..1}.tar", "--train-data-upsampling-factors", "1::2"],
     "also pass --dataset-resampled"),
    (["--train-data", "a/{0..1}.tar::b/{0..1}.tar", "--dataset-resampled",
      "--train-data-upsampling-factors", "1"], "one non-negative number per --train-data source \\(2\\)"),
    (["--imagenet-val", "/no/such/dir"], "no such folder"),
])
def test_bad_peer_options_name_the_fix(argv, message):
    if "--train-data" not in argv:
        argv = [*SYNTH, *argv]
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_missing_optional_packages_name_the_install(monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "bitsandbytes") else find_spec(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        parse_config([*SYNTH, "--report-to", "wandb,tensorboard"])
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        parse_config([*SYNTH, "--use-bnb-linear", "SwitchBackLinear"])
