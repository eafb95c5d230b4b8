"""open_clip_train's own published command lines run under `bigbatch train` unchanged.

Each line is copied from open_clip's test suite (tests/test_training_simple.py), its
README or its scripts/, with only what this machine needs changed: paths (data made
here), the model's size (a tiny config of the same family), sample counts, batch size,
epochs and workers; and `--precision amp` (float16 autocast, for GPUs; bigbatch refuses it
on CPU in one line) becomes CPU's `amp_bf16`. Every other flag is passed as written. Lines
without --train-data evaluate the model once, as open_clip_train does.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.data.demo import write_demo_dataset
from bigbatch.data.shapes import draw_sample

ASSETS = Path(__file__).parent / "assets"
TINY_VIT, TINY_RN, TINY_COCA = (str(ASSETS / f"test-{k}.json") for k in ("clip", "rn", "coca"))
CPU_AMP = "amp_bf16"  # the lines' --precision amp, on this CPU


def train(tmp_path: Path, argv: list[str], name: str = "run") -> Path:
    """`bigbatch train` with the peer's argv, its logs kept under tmp_path."""
    code = main(["train", *argv, "--logs", str(tmp_path / "logs"), "--name", name, "--device", "cpu"])
    assert code == 0
    run_dir = tmp_path / "logs" / name
    assert (run_dir / "checkpoints" / "epoch_latest.pt").is_file()
    return run_dir


def csv_dataset(root: Path, n: int = 16) -> Path:
    """A tab-separated CSV of shape images with columns filepath and title (the peer's defaults)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        image, caption, _ = draw_sample(random.Random(i), 32)
        image.save(root / "images" / f"{i}.png")
        rows.append({"filepath": str(root / "images" / f"{i}.png"), "title": caption})
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["filepath", "title"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return root / "data.csv"


def imagenet_val(root: Path) -> Path:
    """ImageNet's 1000 synset folders, two of them holding an image."""
    for i in range(1000):
        (root / f"n{i:08d}").mkdir(parents=True)
    for i in (0, 1):
        draw_sample(random.Random(i), 40)[0].save(root / f"n{i:08d}" / "0.png")
    return root


def shards(root: Path, n: int = 16) -> str:
    return write_demo_dataset(root, num_train=n, num_val=4, image_size=32, shard_size=4)["train"]["pattern"]


@pytest.fixture
def fast_imagenet(monkeypatch):
    import bigbatch.imagenet
    monkeypatch.setattr(bigbatch.imagenet, "TEMPLATES", "simple")  # 7 templates, not 80


@pytest.fixture
def offline_wandb(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


# --- open_clip's tests/test_training_simple.py (model: RN50, coca_ViT-B-32, ViT-B-32 -> tiny)

PEER_TEST = ['--save-frequency', '1', '--zeroshot-frequency', '1', '--dataset-type', "synthetic",
             '--train-num-samples', '16', '--warmup', '1', '--batch-size', '4', '--lr', '1e-3',
             '--wd', '0.1', '--epochs', '1', '--workers', '2']


def test_peer_test_training(tmp_path):
    train(tmp_path, [*PEER_TEST, '--model', TINY_RN])


def test_peer_test_training_coca(tmp_path):
    train(tmp_path, [*PEER_TEST, '--model', TINY_COCA])


def test_peer_test_training_unfreezing_vit(tmp_path):
    run_dir = train(tmp_path, [*PEER_TEST, '--model', TINY_VIT, '--lock-image',
                               '--lock-image-unlocked-groups', '5', '--accum-freq', '2'])
    state = torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2  # 16 samples, 4 x 2 per step


# --- open_clip's README and scripts/

@pytest.mark.slow
def test_readme_csv_training_with_imagenet_zeroshot(tmp_path, fast_imagenet):
    data = csv_dataset(tmp_path / "csv")
    run_dir = train(tmp_path, [
        '--save-frequency', '1', '--zeroshot-frequency', '1', '--report-to', 'tensorboard',
        f'--train-data={data}', f'--val-data={data}', '--csv-img-key', 'filepath',
        '--csv-caption-key', 'title', f'--imagenet-val={imagenet_val(tmp_path / "val")}',
        '--warmup', '10000', '--batch-size=4', '--lr=1e-3', '--wd=0.1', '--epochs=1',
        '--workers=2', '--model', TINY_RN])
    assert "imagenet-zeroshot-val-top1" in (run_dir / "metrics.jsonl").read_text()


def test_readme_webdataset_single_node(tmp_path):
    train(tmp_path, ['--train-data', shards(tmp_path / "shards"), '--train-num-samples', '16',
                     '--dataset-type', 'webdataset', '--batch-size', '4', '--precision', CPU_AMP,
                     '--workers', '2', '--model', TINY_VIT])


def test_readme_slurm_line_on_one_process(tmp_path):
    train(tmp_path, ['--save-frequency', '1', '--report-to', 'tensorboard',
                     f'--train-data={shards(tmp_path / "shards")}', '--warmup', '2000',
                     '--batch-size=4', '--epochs=1', '--workers=2', '--model', TINY_VIT,
                     '--seed', '0', '--local-loss', '--gather-with-grad'], name="ViT-B-32-Vanilla")


@pytest.mark.slow
def test_readme_coca_caption_only_finetune(tmp_path, offline_wandb):
    train(tmp_path, ['--dataset-type', 'csv', '--train-data', str(csv_dataset(tmp_path / "csv")),
                     '--warmup', '1000', '--batch-size', '4', '--lr', '1e-5', '--wd', '0.1',
                     '--epochs', '1', '--workers', '3', '--model', TINY_COCA, '--report-to', 'wandb',
                     '--coca-contrastive-loss-weight', '0', '--coca-caption-loss-weight', '1',
                     '--log-every-n-steps', '100'])


@pytest.mark.slow
def test_readme_pipe_shards_with_locked_text(tmp_path):
    pattern = shards(tmp_path / "shards")
    train(tmp_path, [f'--train-data=pipe:cat {pattern}', '--train-num-samples', '16',
                     f'--val-data=pipe:cat {pattern}', '--val-num-samples', '16',
                     '--dataset-type', 'webdataset', '--batch-size', '4', '--warmup', '2000',
                     '--epochs', '1', '--lr', '5e-4', '--precision', CPU_AMP, '--workers', '2',
                     '--model', TINY_VIT, '--lock-text', '--lock-text-unlocked-layers', '10',
                     '--report-to', 'tensorboard'], name="10_unfrozen")


@pytest.mark.slow
def test_script_h14_224_32_finetune(tmp_path, fast_imagenet, offline_wandb):
    train(tmp_path, [
        '--save-frequency', '1', '--save-most-recent', '--zeroshot-frequency', '1',
        '--train-data', shards(tmp_path / "shards"), '--dataset-type', 'webdataset',
        '--lr', '2.048e-3', '--beta1', '0.9', '--beta2', '0.95', '--warmup', '782', '--wd', '0.2',
        '--batch-size', '4', '--aug-cfg', "scale=(0.4, 1.0)", "color_jitter=(0.32, 0.32, 0.32, 0.08)",
        'color_jitter_prob=0.8', 'gray_scale_prob=0.2', '--epochs=1', '--workers=2',
        '--model', TINY_VIT, '--precision', 'amp_bf16', '--local-loss', '--gather-with-grad',
        '--force-image-size', '32', '--grad-checkpointing', '--log-every-n-steps', '32',
        '--seed', '0', '--imagenet-val', str(imagenet_val(tmp_path / "val")),
        '--report-to', 'wandb', '--wandb-project-name', 'project_name'], name="name")


def evaluate(argv: list[str], capsys) -> str:
    """`bigbatch train` of an evaluation-only line: no run folder, the metrics printed."""
    assert main(["train", *argv, "--device", "cpu"]) == 0
    return capsys.readouterr().out


def test_readme_evaluating_a_local_checkpoint(tmp_path, capsys, monkeypatch):
    """No --train-data: open_clip_train evaluates --pretrained's weights on --val-data."""
    from bigbatch.model import create_model
    checkpoint = tmp_path / "checkpoints" / "epoch_K.pt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": create_model(TINY_RN).model.state_dict(), "epoch": 3}, checkpoint)
    monkeypatch.chdir(tmp_path)
    out = evaluate([f"--val-data={csv_dataset(tmp_path / 'csv')}", "--model", TINY_RN,
                    "--pretrained", str(checkpoint)], capsys)
    assert "validation:" in out and "i->t R@1/5/10" in out
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_readme_evaluating_a_pretrained_model_on_imagenet(tmp_path, capsys, fast_imagenet):
    weights = tmp_path / "weights.pt"  # the line's hosted tag, as a local file (nothing downloads here)
    from bigbatch.model import create_model
    torch.save(create_model(TINY_VIT).model.state_dict(), weights)
    out = evaluate(["--imagenet-val", str(imagenet_val(tmp_path / "val")), "--model", TINY_VIT,
                    "--pretrained", str(weights)], capsys)
    assert "imagenet-zeroshot-val-top1" in out
