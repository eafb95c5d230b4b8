"""open_clip_train's flags doing their job in `bigbatch train` (tiny model, synthetic data)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from bigbatch.cli import main
from bigbatch.parse import parse_config
from bigbatch.rundir import copy_codebase
from bigbatch.model import create_model, open_clip_options
from bigbatch.step import learning_rate

MODEL = str(Path(__file__).parent / "assets" / "test-clip.json")
FAST = ["--model", MODEL, "--workers", "0", "--device", "cpu", "--lr", "1e-3", "--warmup", "1",
        "--log-every-n-steps", "1", "--dataset-type", "synthetic", "--train-num-samples", "16",
        "--batch-size", "4", "--accum-freq", "2"]


def run(tmp_path: Path, *args: str, name: str = "run") -> Path:
    assert main(["train", *FAST, "--logs", str(tmp_path / "logs"), "--name", name, *args]) == 0
    return tmp_path / "logs" / name


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def lrs(*flags: str, total: int = 10) -> list[float]:
    cfg = parse_config(["--dataset-type", "synthetic", "--lr", "1.0", "--epochs", "5", *flags])
    return [learning_rate(step, cfg, total) for step in range(total)]


def test_const_cooldown_as_open_clip_train_schedules_it():
    # 10 steps over 5 epochs, the last 2 epochs (4 steps) decay from 1 to 0.2, squared
    got = lrs("--warmup", "2", "--lr-scheduler", "const-cooldown", "--epochs-cooldown", "2",
              "--lr-cooldown-end", "0.2", "--lr-cooldown-power", "2")
    expected = [0.5, 1, 1, 1, 1, 1] + [(1 - e / 4) ** 2 * 0.8 + 0.2 for e in range(4)]
    assert_close(torch.tensor(got), torch.tensor(expected, dtype=torch.float32))


def test_skip_scheduler_keeps_the_lr_with_no_warmup():
    assert lrs("--warmup", "3", "--skip-scheduler") == [1.0] * 10


def test_pure_bf16_trains_bf16_weights_without_autocast(tmp_path):
    run_dir = run(tmp_path, "--precision", "pure_bf16", "--epochs", "1")
    state = torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    assert state["visual.conv1.weight"].dtype == torch.bfloat16
    assert all(math.isfinite(r["loss"]) for r in records(run_dir))


def test_open_clips_bf16_casts_the_products_weights_and_reads_bf16_images(tmp_path):
    """--precision bf16: open_clip casts convolutions' and linear layers' weights, keeps the
    LayerNorms float32; the uint8 images are normalised into bf16 for the first op."""
    run_dir = run(tmp_path, "--precision", "bf16", "--epochs", "1")
    state = torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    assert state["visual.conv1.weight"].dtype == torch.bfloat16
    assert state["visual.ln_pre.weight"].dtype == torch.float32
    assert all(math.isfinite(r["loss"]) for r in records(run_dir))


def test_sgd_momentum_and_checkpoint_flags(tmp_path):
    run_dir = run(tmp_path, "--opt", "sgd", "--momentum", "0.9", "--epochs", "3",
                  "--delete-previous-checkpoint", "--save-most-recent")
    state = torch.load(run_dir / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["epoch_3.pt", "epoch_latest.pt"]


def test_debug_log_local_and_copy_codebase(tmp_path):
    run_dir = run(tmp_path, "--epochs", "1", "--debug", "--log-local", "--copy-codebase")
    assert (run_dir / "code" / "bigbatch" / "train.py").is_file()
    assert not list((run_dir / "code").rglob("__pycache__"))

    # a copy cut short (a kill mid-copy) is not taken for the code: the next start redoes it
    partial = run_dir / "code" / ".bigbatch.partial"
    shutil.move(run_dir / "code" / "bigbatch", partial)
    (partial / "train.py").unlink()
    assert (copy_codebase(run_dir) / "train.py").is_file() and not partial.exists()


def test_preprocessing_flags_reach_open_clip_transforms():
    cfg = parse_config(["--dataset-type", "synthetic", "--force-image-size", "48",
                        "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.25", "0.25", "0.25",
                        "--image-interpolation", "bilinear", "--image-resize-mode", "squash",
                        "--aug-cfg", "scale=(0.5, 1.0)", "--force-context-length", "12"])
    bundle = create_model(MODEL, **open_clip_options(cfg))
    from PIL import Image
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    assert bundle.preprocess_val(image).shape == (3, 48, 48)  # squashed, not cropped
    assert bundle.preprocess_train(image).dtype == torch.uint8
    assert bundle.tokenizer(["a red square"]).shape == (1, 12)
    # uint8 255 in channel 0 -> (1 - 0.5) / 0.25 = 2 through the on-device normalisation
    pixels = bundle.preprocess_val(image)[None]
    normalised = []
    bundle.model.visual.conv1.register_forward_hook(lambda m, args, out: normalised.append(args[0]))
    bundle.model.encode_image(pixels)
    assert_close(normalised[0][0, 0], torch.full((48, 48), 2.0))
    crop = bundle.preprocess_train.transforms[0]
    assert crop.scale == (0.5, 1.0) and crop.size == (48, 48)  # AugmentationCfg, built by open_clip


def test_timm_augmentation_keeps_float_images_normalised():
    cfg = parse_config(["--dataset-type", "synthetic", "--aug-cfg", "use_timm=True", "re_prob=0.25"])
    bundle = create_model(MODEL, **open_clip_options(cfg))
    from PIL import Image
    train = bundle.preprocess_train(Image.new("RGB", (40, 40), (0, 255, 0)))
    assert train.dtype == torch.float32  # timm's random erasing works on normalised floats
    # the val transform still hands uint8, normalised on the device
    assert bundle.preprocess_val(Image.new("RGB", (40, 40))).dtype == torch.uint8
    assert bundle.model.visual._forward_pre_hooks


def test_model_schemas(tmp_path):
    from bigbatch.errors import ConfigError
    with pytest.raises(ConfigError, match="no open_clip_config.json"):
        create_model(f"local-dir:{tmp_path}")
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        create_model("hf-hub:nobody/no-such-model-here")
    config = json.loads(Path(MODEL).read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    source = create_model(MODEL).model
    torch.save(source.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    loaded = create_model(f"local-dir:{tmp_path}").model
    assert_close(loaded.state_dict()["visual.conv1.weight"], source.state_dict()["visual.conv1.weight"])


def test_upsampling_factors_weight_the_sources_drawn(tmp_path):
    import hashlib

    import open_clip
    import torchvision.transforms as T

    from bigbatch.data import DataSpec, make_data
    from bigbatch.data.demo import write_demo_dataset
    pre, tokenizer = T.Compose([T.Resize((32, 32)), T.PILToTensor()]), open_clip.get_tokenizer("ViT-B-32")
    sources = [write_demo_dataset(tmp_path / name, num_train=12, num_val=4, image_size=32,
                                  shard_size=6, seed=seed)["train"]["pattern"]
               for name, seed in (("a", 0), ("b", 1))]

    def images(paths: str, **kw) -> set[str]:
        info = make_data(DataSpec(paths, "webdataset", 4, workers=0, **kw), pre, tokenizer)
        return {hashlib.md5(i.numpy().tobytes()).hexdigest() for b in info.loader for i in b.images}

    first, second = images(sources[0], is_train=False), images(sources[1], is_train=False)
    drawn = images("::".join(sources), resampled=True, num_samples=40, upsampling_factors="1::0")
    assert drawn <= first and len(drawn) > 6
    drawn = images("::".join(sources), resampled=True, num_samples=40, upsampling_factors="0::1")
    assert drawn <= second


def test_remote_sync_copies_the_run_folder(tmp_path):
    remote = tmp_path / "bucket"
    run_dir = run(tmp_path, "--epochs", "1", "--remote-sync", str(remote), "--remote-sync-frequency", "1",
                  "--remote-sync-protocol", "fsspec")
    copied = remote / "run"
    for name in ("out.log", "metrics.jsonl", "checkpoints/epoch_1.pt", "checkpoints/epoch_latest.pt"):
        assert (copied / name).read_bytes() == (run_dir / name).read_bytes()
    assert not (copied / "train.lock").exists()


def test_remote_sync_to_an_unwritable_place_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = main(["train", *FAST, "--logs", str(tmp_path / "logs"), "--remote-sync", str(tmp_path / "file")])
    assert code == 2 and "--remote-sync" in capsys.readouterr().err


def test_wandb_offline_logs_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = run(tmp_path, "--epochs", "1", "--report-to", "wandb,tensorboard",
                  "--wandb-project-name", "bigbatch-test", "--wandb-notes", "offline")
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list((run_dir / "tensorboard").iterdir())


def imagenet_tree(root: Path, folders: list[str], images: dict[str, int]) -> Path:
    """Class folders, `images[name]` coloured squares in some of them."""
    from PIL import Image
    for name in folders:
        (root / name).mkdir(parents=True)
    for i, (name, count) in enumerate(images.items()):
        for j in range(count):
            Image.new("RGB", (40, 40), (40 * i, 255 - 30 * j, 90)).save(root / name / f"{j}.png")
    return root


def test_imagenet_folders_map_to_imagenet_classes(tmp_path):
    from bigbatch.errors import ConfigError
    from bigbatch.imagenet import ClassFolders
    synsets = [f"n{i:08d}" for i in range(1000)]
    tree = imagenet_tree(tmp_path / "val", synsets, {synsets[3]: 1, synsets[999]: 2})
    assert [label for _, label in ClassFolders(tree, None).samples] == [3, 999, 999]
    # ImageNetV2's numbered folders are class numbers, not sorted text (10 < 2 as text)
    v2 = imagenet_tree(tmp_path / "v2", ["2", "10"], {"2": 1, "10": 1})
    assert {(Path(path).parent.name, label) for path, label in ClassFolders(v2, None).samples} == {("2", 2), ("10", 10)}
    with pytest.raises(ConfigError, match="expected ImageNet's 1000 synset folders"):
        ClassFolders(imagenet_tree(tmp_path / "few", ["cat", "dog"], {"cat": 1}), None)


def test_imagenet_zeroshot_is_logged_under_the_peer_names(tmp_path, monkeypatch):
    import bigbatch.imagenet
    monkeypatch.setattr(bigbatch.imagenet, "TEMPLATES", "simple")  # 7 templates: a faster classifier
    synsets = [f"n{i:08d}" for i in range(1000)]
    val = imagenet_tree(tmp_path / "val", synsets, {synsets[0]: 2, synsets[1]: 1})
    v2 = imagenet_tree(tmp_path / "v2", [str(i) for i in range(1000)], {"0": 1})
    run_dir = run(tmp_path, "--epochs", "1", "--imagenet-val", str(val), "--imagenet-v2", str(v2),
                  "--zeroshot-frequency", "1")
    metrics = records(run_dir, "val")[-1]
    keys = {f"imagenet{v}-zeroshot-val-top{k}" for v in ("", "v2") for k in (1, 5)}
    assert keys <= metrics.keys()
    assert all(0 <= metrics[k] <= 1 for k in keys)
    # the same numbers from the model and classifier directly
    from bigbatch.evaluate import build_zeroshot_classifier
    from bigbatch.imagenet import ClassFolders
    from bigbatch.weights import load_model, resolve_weights
    from bigbatch.zeroshot import builtin_classnames, builtin_templates
    checkpoint = str(run_dir / "checkpoints" / "epoch_1.pt")
    bundle = load_model(MODEL, resolve_weights(checkpoint, "test-clip"))
    classifier = build_zeroshot_classifier(bundle.model.eval(), bundle.tokenizer, builtin_classnames("imagenet"),
                                           builtin_templates("simple"))
    data = ClassFolders(val, bundle.preprocess_val)
    images = torch.stack([image for image, _ in data])
    labels = torch.tensor([label for _, label in data])
    with torch.no_grad():
        scores = bundle.model.encode_image(images, normalize=True) @ classifier
    expected_top1 = (scores.argmax(1) == labels).float().mean().item()
    assert metrics["imagenet-zeroshot-val-top1"] == pytest.approx(expected_top1)
