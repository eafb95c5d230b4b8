"""The CLI end to end on tiny data: smoke runs, bad data, resume equals uninterrupted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

import bigbatch.build
import bigbatch.checkpoint
import bigbatch.train
from bigbatch.cli import main

MODEL = str(Path(__file__).parent / "assets" / "test-clip.json")
FAST = ["--model", MODEL, "--workers", "0", "--precision", "fp32", "--device", "cpu",
        "--lr", "1e-3", "--warmup", "2", "--log-every-n-steps", "1"]


def run(tmp_path: Path, *args: str, name: str = "run") -> Path:
    code = main(["train", *FAST, "--logs", str(tmp_path / "logs"), "--name", name, *args])
    assert code == 0
    return tmp_path / "logs" / name


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_synthetic_smoke_with_accumulation(tmp_path, capsys):
    run_dir = run(tmp_path, "--dataset-type", "synthetic", "--train-num-samples", "40", "--offload-inputs",
                  "--loss-tile-size", "5",
                  "--batch-size", "4", "--accum-freq", "3", "--epochs", "1")
    train = records(run_dir, "train")
    # 10 micro-batches of 4 -> 3 full steps of 3 and one step of the leftover micro-batch
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["effective_batch"] for r in train] == [12, 12, 12, 4]  # what each step trained on
    assert (run_dir / "checkpoints" / "epoch_latest.pt").is_file()
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "effective batch 12 = batch-size 4 x accum-freq 3 x world-size 1" in out
    assert "samples/s" in out and "ETA" in out


def test_an_epoch_smaller_than_one_batch_is_said_and_logged_as_trained(tmp_path, capsys):
    """16 samples with an effective batch of 32: one step of 16 an epoch, said at the start,
    and logged as 16 (not the 32 asked for); a warmup the run never finishes is said too."""
    run_dir = run(tmp_path, "--dataset-type", "synthetic", "--train-num-samples", "16", "--batch-size", "4",
                  "--accum-freq", "8", "--epochs", "1", "--warmup", "10")
    assert [r["effective_batch"] for r in records(run_dir, "train")] == [16]
    out = capsys.readouterr().out
    assert "an epoch holds 16 samples, fewer than one effective batch (32)" in out
    assert "--warmup 10 is not shorter than the run (1 steps)" in out


def make_csv(root: Path, n: int = 24) -> Path:
    """Coloured squares with captions; one unreadable image and one empty caption."""
    rows = []
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    for i in range(n):
        name = list(colours)[i % 3]
        path = root / "images" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), colours[name]).save(path)
        rows.append({"img": f"images/{i}.png", "caption": f"a {name} square", "label": i % 3})
    (root / "images" / "3.png").write_bytes(b"not a png at all")
    rows[5]["caption"] = ""
    table = root / "pairs.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["img", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")
    (root / "templates.txt").write_text("a {} square\na photo of {}\n")
    return table


def test_csv_with_bad_rows_is_skipped_counted_and_evaluated(tmp_path, capsys):
    table = make_csv(tmp_path)
    run_dir = run(tmp_path, "--train-data", str(table), "--val-data", str(table),
                  "--csv-separator", ",", "--csv-img-key", "img", "--csv-caption-key", "caption",
                  "--csv-label-key", "label", "--batch-size", "4", "--accum-freq", "2",
                  "--epochs", "2", "--zeroshot-frequency", "1",
                  "--zeroshot-classnames", str(tmp_path / "classnames.txt"),
                  "--zeroshot-templates", str(tmp_path / "templates.txt"))
    val = records(run_dir, "val")
    assert [r["epoch"] for r in val] == [1, 2]
    assert {"val_loss", "zeroshot_top1", "image_to_text_R@1"} <= val[-1].keys()
    out = capsys.readouterr().out
    assert "skipped" in out and "unreadable image" in out and "missing caption" in out
    assert "row " in (run_dir / "out.log").read_text()  # each bad row named, in the run's log
    assert set(records(run_dir, "train")[-1]["skipped"]) == {"unreadable image", "missing caption"}


def test_missing_csv_column_is_one_clear_error(tmp_path, capsys):
    table = make_csv(tmp_path)
    code = main(["train", *FAST, "--logs", str(tmp_path / "logs"), "--train-data", str(table),
                 "--csv-separator", ",", "--csv-img-key", "image"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch: error:") and "--csv-img-key" in err


class Crash(RuntimeError):
    pass


def crash_after_first_save_then_resume(tmp_path, monkeypatch, args) -> Path:
    """Run 'broken' until the process dies right after its first checkpoint, then resume it."""
    save = bigbatch.checkpoint.save_run

    def save_then_crash(*a, **kw):
        save(*a, **kw)
        raise Crash

    monkeypatch.setattr(bigbatch.checkpoint, "save_run", save_then_crash)
    with pytest.raises(Crash):
        run(tmp_path, *args, name="broken")
    monkeypatch.setattr(bigbatch.checkpoint, "save_run", save)
    return run(tmp_path, *args, "--resume", "latest", name="broken")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch, workers):
    """Dropout masks and (with a loader worker) augmentations continue exactly."""
    args = ["--dataset-type", "synthetic", "--train-num-samples", "24", "--batch-size", "4",
            "--accum-freq", "2", "--epochs", "2", "--force-patch-dropout", "0.5",
            "--workers", workers]
    whole = run(tmp_path, *args, name="whole")

    resumed = crash_after_first_save_then_resume(tmp_path, monkeypatch, args)
    a = torch.load(whole / "checkpoints" / "epoch_latest.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 6)
    for key, value in a["state_dict"].items():
        assert_close(b["state_dict"][key], value, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("data", ["synthetic-workers0", "webdataset-workers0", "webdataset-workers2"])
def test_resumed_from_a_mid_epoch_checkpoint_equals_uninterrupted(tmp_path, monkeypatch, data):
    """The batches already trained on are left out, the rest come in the same order with
    the same augmentations, dropout masks continue: the same weights as never stopping."""
    kind, workers = data.split("-workers")
    if kind == "synthetic":
        source = ["--dataset-type", "synthetic", "--train-num-samples", "40"]
    else:
        from bigbatch.data.demo import write_demo_dataset
        shards = write_demo_dataset(tmp_path / "shards", num_train=40, num_val=4, image_size=32,
                                    shard_size=5)["train"]["pattern"]
        source = ["--train-data", shards]
    args = [*source, "--workers", workers, "--batch-size", "4", "--accum-freq", "2",
            "--epochs", "2", "--force-patch-dropout", "0.5", "--save-every-n-steps", "2"]
    whole = run(tmp_path, *args, name="whole")  # 5 steps an epoch: saves mid-epoch after 2, 4, 6, 8

    save = bigbatch.checkpoint.save_run

    def crash_after_a_mid_epoch_save(*a, epoch_samples=0, **kw):
        save(*a, epoch_samples=epoch_samples, **kw)
        if a[0].step == 8:  # step 8: 3 steps (24 samples) into the second epoch
            raise Crash

    monkeypatch.setattr(bigbatch.checkpoint, "save_run", crash_after_a_mid_epoch_save)
    with pytest.raises(Crash):
        run(tmp_path, *args, name="broken")
    assert torch.load(tmp_path / "logs" / "broken" / "checkpoints" / "epoch_latest.pt",
                      weights_only=True)["epoch_samples"] == 24
    monkeypatch.setattr(bigbatch.checkpoint, "save_run", save)
    resumed = run(tmp_path, *args, "--resume", "latest", name="broken")

    a = torch.load(whole / "checkpoints" / "epoch_latest.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert (a["epoch"], a["step"], b["epoch"], b["step"]) == (2, 10, 2, 10)
    assert [r["step"] for r in records(resumed, "train")][-3:] == [8, 9, 10]  # 8 from the first try
    for key, value in a["state_dict"].items():
        assert_close(b["state_dict"][key], value, msg=lambda m, k=key: f"{k}: {m}")


def test_mid_epoch_resume_with_another_data_layout_warns_and_ends_a_finished_epoch(tmp_path, monkeypatch,
                                                                                  capsys):
    args = ["--dataset-type", "synthetic", "--batch-size", "4", "--accum-freq", "2", "--epochs", "2",
            "--save-every-n-steps", "2"]
    save = bigbatch.checkpoint.save_run

    def crash_at_step_4(*a, **kw):  # 4 of 5 steps into epoch 1: 32 samples
        save(*a, **kw)
        if a[0].step == 4:
            raise Crash

    monkeypatch.setattr(bigbatch.checkpoint, "save_run", crash_at_step_4)
    with pytest.raises(Crash):
        run(tmp_path, *args, "--train-num-samples", "40")
    monkeypatch.setattr(bigbatch.checkpoint, "save_run", save)
    capsys.readouterr()
    resumed = run(tmp_path, *args, "--train-num-samples", "24", "--resume", "latest")  # 3 steps/epoch
    assert "only approximate those already trained on" in capsys.readouterr().out
    state = torch.load(resumed / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (2, 4 + 3)  # epoch 1 was over: epoch 2 in full


def test_garbage_val_data_stops_before_the_first_step(tmp_path, capsys):
    from bigbatch.data.demo import write_demo_dataset
    shards = write_demo_dataset(tmp_path / "shards", num_train=16, num_val=4, image_size=32,
                                shard_size=8)["train"]["pattern"]
    (tmp_path / "val.tar").write_text("filepath\ttitle\nimg.png\ta cat\n")  # a CSV named .tar
    code = main(["train", *FAST, "--logs", str(tmp_path / "logs"), "--train-data", shards,
                 "--val-data", str(tmp_path / "val.tar"), "--batch-size", "4"])
    assert code != 0 and not list((tmp_path / "logs").rglob("*.pt"))
    err = capsys.readouterr().err
    assert "--val-data" in err and "Traceback" not in err and "step 1" not in err


def test_existing_run_without_resume_is_refused(tmp_path, capsys):
    args = ["--dataset-type", "synthetic", "--train-num-samples", "8", "--batch-size", "4",
            "--epochs", "1"]
    run(tmp_path, *args)
    assert main(["train", *FAST, "--logs", str(tmp_path / "logs"), "--name", "run", *args]) == 2
    assert "--resume latest" in capsys.readouterr().err


def test_checkpoint_from_another_model_is_refused(tmp_path, capsys):
    args = ["--dataset-type", "synthetic", "--train-num-samples", "8", "--batch-size", "4",
            "--epochs", "1"]
    first = run(tmp_path, *args)
    code = main(["train", *args, "--model", "bigbatch-tiny", "--workers", "0",
                 "--logs", str(tmp_path / "logs"), "--name", "other",
                 "--resume", str(first / "checkpoints" / "epoch_latest.pt")])
    assert code == 2
    assert "resume with the same --model" in capsys.readouterr().err


def test_data_with_nothing_usable_is_one_clear_error(tmp_path, capsys):
    table = make_csv(tmp_path, n=6)
    for image in (tmp_path / "images").iterdir():
        image.write_bytes(b"garbage")
    code = main(["train", *FAST, "--logs", str(tmp_path / "logs"), "--train-data", str(table),
                 "--csv-separator", ",", "--csv-img-key", "img", "--csv-caption-key", "caption",
                 "--batch-size", "2", "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch: error:") and "Traceback" not in err


def test_bf16_siglip_tensorboard_and_pretrained_from_our_checkpoint(tmp_path):
    args = ["--dataset-type", "synthetic", "--train-num-samples", "16", "--batch-size", "4",
            "--accum-freq", "2", "--epochs", "1"]
    first = run(tmp_path, *args, "--precision", "amp_bf16", "--siglip", "--report-to", "tensorboard")
    assert list((first / "tensorboard").glob("events.out.tfevents.*"))
    state = torch.load(first / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert "logit_bias" in state["state_dict"]

    tuned = run(tmp_path, *args, "--siglip", "--lr", "1e-9", "--warmup", "1000",
                "--pretrained", str(first / "checkpoints" / "epoch_latest.pt"), name="tuned")
    after = torch.load(tuned / "checkpoints" / "epoch_latest.pt", weights_only=True)["state_dict"]
    # a vanishing learning rate keeps the weights where the pretrained checkpoint left them
    assert_close(after["visual.conv1.weight"], state["state_dict"]["visual.conv1.weight"],
                 rtol=1e-4, atol=1e-6)


def test_finetune_with_locked_image_tower_keeps_it_bit_for_bit(tmp_path):
    args = ["--dataset-type", "synthetic", "--train-num-samples", "16", "--batch-size", "4",
            "--accum-freq", "2", "--epochs", "1"]
    pretrain = run(tmp_path, *args)
    start = torch.load(pretrain / "checkpoints" / "epoch_latest.pt", weights_only=True)
    tuned = run(tmp_path, *args, "--pretrained", str(pretrain / "checkpoints" / "epoch_latest.pt"),
                "--lock-image", "--layer-decay", "0.8", "--ema-decay", "0.5", name="tuned")
    end = torch.load(tuned / "checkpoints" / "epoch_latest.pt", weights_only=True)
    for key, value in start["state_dict"].items():
        if key.startswith("visual."):
            assert torch.equal(end["state_dict"][key], value), key
    assert not torch.equal(end["state_dict"]["text_projection"], start["state_dict"]["text_projection"])
    ema = end["ema_state_dict"]
    assert not torch.equal(ema["text_projection"], end["state_dict"]["text_projection"])


def test_pretrained_that_is_neither_file_nor_cached_tag_is_refused(tmp_path, capsys):
    args = ["--dataset-type", "synthetic", "--train-num-samples", "8", "--epochs", "1"]
    assert main(["train", *FAST, *args, "--logs", str(tmp_path), "--pretrained", "/missing.pt"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", *FAST, *args, "--logs", str(tmp_path), "--name", "b",
                 "--pretrained", "laion2b"]) == 2
    assert "pass a checkpoint file" in capsys.readouterr().err


def test_global_batch_size_sets_accum_freq(tmp_path, capsys):
    args = ["--dataset-type", "synthetic", "--train-num-samples", "24", "--epochs", "1"]
    run_dir = run(tmp_path, *args, "--batch-size", "4", "--global-batch-size", "12")
    assert {r["effective_batch"] for r in records(run_dir, "train")} == {12}
    assert "batch-size 4 x accum-freq 3 x world-size 1" in capsys.readouterr().out
    assert main(["train", *FAST, *args, "--logs", str(tmp_path), "--name", "x",
                 "--batch-size", "5", "--global-batch-size", "12"]) == 2
    assert "--batch-size that divides 12" in capsys.readouterr().err


def test_batch_size_auto_needs_a_gpu(tmp_path, capsys):
    code = main(["train", *FAST, "--dataset-type", "synthetic", "--logs", str(tmp_path),
                 "--batch-size", "auto"])
    assert code == 2 and "on CPU give a number" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--precision", "amp"], "on CPU use --precision fp32 or amp_bf16"),
    (["--fsdp"], "--fsdp shards the model across ranks"),
    (["--lock-image", "--lock-text"], "leave only the logit scale to train"),  # a CLIP; CoCa's decoder trains
])
def test_flags_that_cannot_work_here_are_one_clear_error(tmp_path, capsys, flags, message):
    code = main(["train", *FAST, "--dataset-type", "synthetic", "--logs", str(tmp_path), *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_offloaded_inputs_with_a_locked_tower(tmp_path):
    run_dir = run(tmp_path, "--dataset-type", "synthetic", "--train-num-samples", "16",
                  "--batch-size", "4", "--accum-freq", "2", "--epochs", "1",
                  "--lock-image", "--offload-inputs")
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2]


def test_fused_adamw_steps_like_torch_default():
    """The trainer's fused AdamW makes the update open_clip_train's default AdamW makes."""
    from bigbatch.model import parameter_groups
    from tiny_models import open_clip_vit

    fused_model = open_clip_vit()
    default_model = open_clip_vit()
    default_model.load_state_dict(fused_model.state_dict())
    hyper = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    fused = bigbatch.build.adamw(parameter_groups(fused_model, 0.2), **hyper)
    default = torch.optim.AdamW(parameter_groups(default_model, 0.2), **hyper)
    assert fused.defaults["fused"] and not default.defaults["fused"]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(fused_model.parameters(), default_model.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        fused.step()
        default.step()
    assert_close(fused_model.state_dict(), default_model.state_dict())


def test_coca_trains_on_contrastive_plus_caption_loss_and_evaluates(tmp_path, capsys):
    table = make_csv(tmp_path)
    run_dir = run(tmp_path, "--model", str(Path(__file__).parent / "assets" / "test-coca.json"),
                  "--train-data", str(table), "--val-data", str(table), "--csv-separator", ",",
                  "--csv-img-key", "img", "--csv-caption-key", "caption", "--csv-label-key", "label",
                  "--batch-size", "4", "--accum-freq", "2", "--epochs", "2", "--lr", "3e-3",
                  "--coca-caption-loss-weight", "1.5",
                  "--zeroshot-classnames", str(tmp_path / "classnames.txt"),
                  "--zeroshot-templates", "simple")  # a built-in set, as in bigbatch eval
    train = records(run_dir, "train")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    # the caption loss starts near log(vocab) = 10.8, weighted 1.5; contrastive adds ~log(8)
    assert train[0]["loss"] > 1.5 * 9 and train[-1]["loss"] < train[0]["loss"]
    assert {"val_loss", "zeroshot_top1"} <= records(run_dir, "val")[-1].keys()
    state = torch.load(run_dir / "checkpoints" / "epoch_latest.pt", weights_only=True)["state_dict"]
    assert any(k.startswith("text_decoder.") for k in state)


def test_coca_with_locked_towers_trains_its_decoder_only(tmp_path, capsys, monkeypatch):
    modes = []  # the image tower's mode at each forward: locked towers run in eval mode
    forward = bigbatch.train.cached_backward

    def spy(model, *args, **kwargs):
        modes.append(bigbatch.train.unwrap(model).visual.training)
        return forward(model, *args, **kwargs)

    monkeypatch.setattr(bigbatch.train, "cached_backward", spy)
    args = ["--model", str(Path(__file__).parent / "assets" / "test-coca.json"), "--dataset-type", "synthetic",
            "--train-num-samples", "16", "--batch-size", "4", "--accum-freq", "2", "--epochs", "1"]
    start = torch.load(run(tmp_path, *args) / "checkpoints" / "epoch_latest.pt", weights_only=True)
    tuned = run(tmp_path, *args, "--lock-image", "--lock-text", "--pretrained",
                str(tmp_path / "logs" / "run" / "checkpoints" / "epoch_latest.pt"), name="tuned")
    assert "recomputed in pass 2" in capsys.readouterr().out
    assert modes[-1] is False
    end = torch.load(tuned / "checkpoints" / "epoch_latest.pt", weights_only=True)["state_dict"]
    for key, value in start["state_dict"].items():
        if key.startswith(("visual.", "text.")):
            assert torch.equal(end[key], value), key
    assert not torch.equal(end["text_decoder.text_projection"], start["state_dict"]["text_decoder.text_projection"])


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: the mistake must be found before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(bigbatch.train, "build_model", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--train-data", "missing/shard-{000000..000003}.tar"], "no shards match --train-data"),
    (["--train-data", "missing.csv"], "no CSV file at 'missing.csv'"),
    (["--train-data", "{csv}", "--val-data", "gone.csv"], "no CSV file at 'gone.csv'"),
    (["--train-data", "{csv}", "--csv-caption-key", "title"], "has no column 'title'"),
])
def test_a_failed_start_builds_no_model_and_leaves_no_run_folder(tmp_path, capsys, no_model, flags, message):
    csv_flags = ["--csv-separator", ",", "--csv-img-key", "img", "--csv-caption-key", "caption"]
    flags = csv_flags + [str(make_csv(tmp_path)) if f == "{csv}" else f for f in flags]
    assert main(["train", *FAST, "--logs", str(tmp_path / "logs"), "--name", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "logs").exists()


def test_the_same_command_twice_resumes_then_says_the_run_is_finished(tmp_path, capsys, monkeypatch):
    args = ["--dataset-type", "synthetic", "--train-num-samples", "8", "--batch-size", "4",
            "--epochs", "1", "--resume", "latest"]
    run_dir = run(tmp_path, *args)
    out, err = capsys.readouterr()
    assert "no checkpoint in" in out and "starting a new run" in out
    assert out.count("starting from random weights (no --pretrained)") == 1
    assert "No pretrained weights loaded" not in out + err  # open_clip's warning, replaced by ours

    def refuse(*a, **k):
        raise AssertionError("a finished run built its model")
    monkeypatch.setattr(bigbatch.train, "build_model", refuse)
    before = (run_dir / "metrics.jsonl").read_text()
    run(tmp_path, *args)
    out = capsys.readouterr().out
    assert "run run has finished" in out and f"delete {run_dir}" in out and "another --name" in out
    assert (run_dir / "metrics.jsonl").read_text() == before
    finished = run_dir / "checkpoints" / "epoch_1.pt"  # the same, resumed by path under a new name
    code = main(["train", *FAST, "--logs", str(tmp_path / "logs"), "--name", "again", *args[:-2],
                 "--resume", str(finished)])
    assert code == 0 and "run again has finished" in capsys.readouterr().out

    monkeypatch.undo()
    run(tmp_path, *args[:-4], "--epochs", "2", "--resume", "latest")  # more epochs: it continues
    out, err = capsys.readouterr()
    assert "resumed from" in out and "random weights" not in out and "No pretrained" not in err
    assert records(run_dir, "train")[-1]["epoch"] == 2


def test_threads_sets_torchs_thread_count(tmp_path, monkeypatch):
    counts = []
    monkeypatch.setattr(torch, "set_num_threads", counts.append)
    run(tmp_path, "--dataset-type", "synthetic", "--train-num-samples", "4", "--batch-size", "4",
        "--epochs", "1", "--threads", "1")
    assert counts == [1]
    with pytest.raises(Exception, match="--threads must be at least 1"):
        from bigbatch.parse import parse_config
        parse_config(["--dataset-type", "synthetic", "--threads", "0"])


def test_training_from_pipe_and_fsspec_shards_equals_the_local_path(tmp_path):
    """`--train-data 'pipe:cat .../shard-{...}.tar'` and an fsspec URL (memory://) train the
    local path's steps on the same samples, counted by the sizes.json beside the shards."""
    import fsspec

    from bigbatch.data.demo import write_demo_dataset
    demo = write_demo_dataset(tmp_path / "shards", num_train=24, num_val=4, image_size=32, shard_size=6)
    train_dir = Path(demo["out_dir"]) / "train"
    memory = fsspec.filesystem("memory")
    for path in train_dir.iterdir():  # the shards and their sizes.json
        memory.pipe(f"/demo-train/{path.name}", path.read_bytes())
    pattern = Path(demo["train"]["pattern"]).name
    losses = {}
    for name, data in (("local", demo["train"]["pattern"]), ("pipe", f"pipe:cat {train_dir}/{pattern}"),
                       ("fsspec", f"memory://demo-train/{pattern}")):
        run_dir = run(tmp_path, "--train-data", data, "--batch-size", "4", "--accum-freq", "2",
                      "--epochs", "1", "--workers", "2", name=name)
        losses[name] = [(r["step"], r["loss"]) for r in records(run_dir, "train")]
    assert [step for step, _ in losses["local"]] == [1, 2, 3]  # 24 samples = 3 steps of 4 x 2
    assert_close(losses["pipe"], losses["local"])
    assert_close(losses["fsspec"], losses["local"])


def test_distillation_with_accumulation_logs_its_terms_and_resumes_exactly(tmp_path, monkeypatch):
    """A teacher of another architecture (bigbatch-tiny, weights from a file) with --accum-freq 2:
    the distill term is logged under open_clip_train's name; the checkpoint holds the student
    alone, and a run resumed from it (the teacher rebuilt from the flags) equals the whole run."""
    from bigbatch.model import create_model
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save(create_model("bigbatch-tiny").model.state_dict(), teacher)
    args = ["--dataset-type", "synthetic", "--train-num-samples", "16", "--batch-size", "4",
            "--accum-freq", "2", "--epochs", "2", "--force-patch-dropout", "0.5",
            "--distill-model", "bigbatch-tiny", "--distill-pretrained", str(teacher)]
    whole = run(tmp_path, *args, name="whole")
    train = records(whole, "train")
    assert len(train) == 4
    for r in train:
        assert r["distill_loss"] > 0 and r["contrastive_loss"] > 0
        assert r["loss"] == pytest.approx(r["contrastive_loss"] + r["distill_loss"], rel=1e-5)

    resumed = crash_after_first_save_then_resume(tmp_path, monkeypatch, args)
    a = torch.load(whole / "checkpoints" / "epoch_latest.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert a["state_dict"].keys() == create_model(MODEL).model.state_dict().keys()  # no teacher
    for key, value in a["state_dict"].items():
        assert_close(b["state_dict"][key], value, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("flags, message", [
    (["--distill-model", "bigbatch-tiny"], "needs both --distill-model and --distill-pretrained"),
    (["--distill-model", "bigbatch-tiny", "--distill-pretrained", "t.pt", "--siglip"], "drop --siglip"),
    (["--distill-model", "ViT-B-32", "--distill-pretrained", "openai"],
     "--distill-pretrained openai: the weights of open_clip's ViT-B-32 'openai' are not available offline"),
    (["--distill-model", "bigbatch-small", "--distill-pretrained", "{bigbatch-small}"],
     "--distill-model bigbatch-small reads images of size (64, 64), the student (--model) gives (32, 32)"),
    (["--model", str(MODEL).replace("clip", "coca"), "--distill-model", "bigbatch-tiny",
      "--distill-pretrained", "{bigbatch-tiny}"], "with a CoCa student is not supported"),
])
def test_distillation_mistakes_are_one_line_and_leave_no_run_folder(tmp_path, capsys, flags, message):
    from bigbatch.model import create_model
    flags = list(flags)
    for i, flag in enumerate(flags):
        if flag.startswith("{"):
            flags[i] = str(tmp_path / "teacher.pt")
            torch.save(create_model(flag.strip("{}")).model.state_dict(), flags[i])
    code = main(["train", *FAST, "--dataset-type", "synthetic", "--logs", str(tmp_path / "logs"),
                 "--name", "x", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "logs").exists()
