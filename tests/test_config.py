"""Flags, YAML and validation: bad input stops early with one message naming the fix."""

from __future__ import annotations

import dataclasses

import pytest

from bigbatch.cli import main
from bigbatch.config import BatchLayout, ConfigError, TrainConfig
from bigbatch.parse import parse_config

SYNTH = ["--dataset-type", "synthetic"]


def test_flags_keep_open_clip_train_names_and_meanings():
    cfg = parse_config(["--train-data", "shards/{000..009}.tar::more/{0..3}.tar",
                        "--batch-size", "32", "--accum-freq", "8", "--lr", "1e-3",
                        "--warmup", "5", "--lr-scheduler", "const", "--precision", "amp_bf16",
                        "--grad-clip-norm", "1.0", "--dataset-resampled", "--siglip"])
    assert cfg.train_data.endswith("more/{0..3}.tar")
    assert (cfg.batch_size, cfg.accum_freq, cfg.lr, cfg.warmup) == (32, 8, 1e-3, 5)
    assert cfg.dataset_resampled and cfg.siglip and cfg.grad_clip_norm == 1.0
    assert BatchLayout(cfg.batch_size, cfg.accum_freq, world_size=4).effective_batch == 32 * 8 * 4
    with pytest.raises(dataclasses.FrozenInstanceError):  # validated: nothing changes it after
        cfg.batch_size = 64


def from_yaml(tmp_path, text: str, *flags: str):
    """parse_config of a YAML file holding `text` (then `flags`)."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return parse_config(["--config", str(path), *flags])


def test_yaml_sets_options_and_flags_override(tmp_path):
    cfg = from_yaml(tmp_path, "dataset_type: synthetic\nbatch-size: 16\nlr: 1e-3\naccum_freq: 2\n",
                    "--accum-freq", "4")
    assert (cfg.batch_size, cfg.lr, cfg.accum_freq) == (16, 1e-3, 4)
    assert isinstance(cfg.lr, float)


def test_yaml_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'accum_frequency'.*accum_freq"):
        from_yaml(tmp_path, "dataset_type: synthetic\naccum_frequency: 4\n")


def test_yaml_booleans_quoted_or_not(tmp_path):
    cfg = from_yaml(tmp_path, 'dataset_type: synthetic\nsiglip: "no"\nlocal_loss: "Yes"\ngather_with_grad: on\n')
    assert (cfg.siglip, cfg.local_loss, cfg.gather_with_grad) == (False, True, True)
    with pytest.raises(ConfigError, match="'siglip' expects true or false, got 'maybe'"):
        from_yaml(tmp_path, "dataset_type: synthetic\nsiglip: maybe\n")


def test_yaml_choice_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="--precision 'fp8': choose one of"):
        from_yaml(tmp_path, "dataset_type: synthetic\nprecision: fp8\n")


@pytest.mark.parametrize("argv, message", [
    (["--accum-freq", "0"], "--accum-freq must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--beta2", "1.0"], "--beta2 must be in"),
    (["--grad-clip-norm", "0"], "--grad-clip-norm must be positive"),
    (["--resume", "latest"], "also pass --name"),
    (["--resume", "/nope.pt"], "no such checkpoint"),
    (["--accum-freq", "4", "--global-batch-size", "64"], "give one of them, not both"),
    (["--val-data", "v.tar", "--zeroshot-templates", "simple"], "--zeroshot-templates needs --zeroshot-classnames"),
    (["--zeroshot-classnames", "cifar10"], r"--zeroshot-classnames 'cifar10': not a built-in set \(imagenet\)"),
    (["--zeroshot-templates", "fancy"], r"--zeroshot-templates 'fancy': not a built-in set \(openai, simple\)"),
    # NaN passes every comparison: refused as such, whichever float flag holds it
    (["--wd", "nan"], "--wd must be a finite number"), (["--grad-clip-norm", "nan"], "--grad-clip-norm must be a finite"),
    (["--lr-image", "inf"], "--lr-image must be a finite"), (["--image-std", "1", "nan", "1"], "--image-std must be a finite"),
    # beyond any data set: a typo, refused before a divisor search could run for hours
    (["--global-batch-size", str(10 ** 20)], r"--global-batch-size must be between 1 and 2\*\*32"),
    (["--batch-size", str(2 ** 40)], r"--batch-size must be between 1 and 2\*\*32"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\)"),
    (["--force-image-size", "0"], "in pixels"),
    (["--name", "../elsewhere"], r"the run's folder inside --logs \(no '\.\.'"),
    (["--lock-text-unlocked-layers", "-1"], "--lock-text-unlocked-layers must be 0 or more"),
    (["--aug-cfg", "scale=big"], "scale takes two numbers"), (["--aug-cfg", "use_timm=1"], "use_timm takes True"),
])
def test_bad_values_and_combinations(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(SYNTH + argv)


def test_no_training_data_names_the_flag():
    with pytest.raises(ConfigError, match="pass --train-data"):
        parse_config([])


def test_cli_reports_one_line_and_exit_2(capsys):
    assert main(["train", "--dataset-type", "synthetic", "--accum-freq", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "bigbatch: error: --accum-freq must be at least 1, got 0"


def test_cli_unknown_model_is_a_clear_error(capsys, tmp_path):
    code = main(["train", *SYNTH, "--model", "ViT-Q-99", "--logs", str(tmp_path)])
    assert code == 2
    assert "unknown --model 'ViT-Q-99'" in capsys.readouterr().err


def test_cli_unknown_command(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_every_field_has_help_and_group():
    import dataclasses
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help") and f.metadata.get("group"), f.name


def test_zeroshot_files_are_checked_before_training(tmp_path):
    names, templates = tmp_path / "names.txt", tmp_path / "templates.txt"
    names.write_text("# nothing but a comment\n")
    templates.write_text("a photo of a {}.\n")
    with pytest.raises(ConfigError, match="--zeroshot-classnames .* has no entries"):
        parse_config(SYNTH + ["--val-data", "v.tar", "--zeroshot-classnames", str(names),
                              "--zeroshot-templates", str(templates)])
    names.write_text("cat\ndog\n")
    templates.write_text("a photo of a cat\n")
    with pytest.raises(ConfigError, match="must contain '{}' exactly once"):
        parse_config(SYNTH + ["--val-data", "v.tar", "--zeroshot-classnames", str(names),
                              "--zeroshot-templates", str(templates)])


@pytest.mark.parametrize("text, message", [
    ("lr: !!python/object/apply:os.system ['true']\n", "line 1, column 5: could not determine a constructor"),
    ("lr: [1e-3,\nepochs: 2\n", "line 3, column 1: not valid YAML (expected ',' or ']'"),
    ("lr: 1e-3\n  epochs: 2\n", "line 2, column 9: not valid YAML (mapping values are not allowed here)"),
])
def test_yaml_that_cannot_be_read_is_one_line_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), *SYNTH]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bigbatch: error: --config {path}: {message}") and err.count("\n") == 1
    assert "remove the tag" in err if "python" in text else "fix the file" in err


def test_max_nonfinite_steps_is_a_count():
    assert parse_config([*SYNTH]).max_nonfinite_steps == 5
    with pytest.raises(ConfigError, match="--max-nonfinite-steps must be 0 or more"):
        parse_config([*SYNTH, "--max-nonfinite-steps", "-1"])


@pytest.mark.parametrize("model", ["ViT-B-32", "RN50", "convnext_base", "coca_ViT-B-32"])
def test_adamw_defaults_are_open_clip_trains_for_the_model(model):
    from open_clip_train.params import get_default_params

    from bigbatch.config import adamw_hyperparameters

    peer = get_default_params(model)
    cfg = parse_config(["--model", model, "--dataset-type", "synthetic"])
    assert adamw_hyperparameters(cfg) == (peer["beta1"], peer["beta2"], peer["eps"])
    given = parse_config(["--model", model, "--dataset-type", "synthetic", "--beta2", "0.95", "--eps", "1e-7"])
    assert adamw_hyperparameters(given) == (0.9, 0.95, 1e-7)
