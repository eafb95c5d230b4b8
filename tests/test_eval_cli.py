"""`bigbatch eval` against metrics computed here by hand from encode_image / encode_text."""

import datetime
import io
import json
import re
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bigbatch import eval_cli
from bigbatch.checkpoint import save_checkpoint
from bigbatch.errors import ConfigError
from bigbatch import weights as weights_module
from bigbatch.model import create_model, register_model_config
from bigbatch.zeroshot import builtin_classnames, builtin_templates

CONFIG = Path(__file__).parent / "assets" / "test-clip.json"
NAME = "test-clip"
CLASSNAMES = ["red", "green", "blue", "yellow", "purple", "white"]
TEMPLATES = ["a photo of a {} thing.", "{}"]
LABELS = [0, 0, 1, 1, 1, 2, 3, 3, 4, 4]  # class 5 ("white") has no image
CAPTIONS = [f"caption number {i}" for i in range(len(LABELS))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint of a tiny model and a labelled, captioned CSV of 10 small images."""
    root = tmp_path_factory.mktemp("eval")
    register_model_config(str(CONFIG))
    torch.manual_seed(0)
    model = create_model(str(CONFIG)).model
    ema = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v
           for k, v in model.state_dict().items()}
    ckpt = save_checkpoint({"state_dict": model.state_dict(), "ema_state_dict": ema, "optimizer": {},
                            "step": 7, "epoch": 2, "model": NAME, "config": {}}, root / "epoch_2.pt")
    g = torch.Generator().manual_seed(0)
    rows = ["filepath\ttitle\tlabel"]
    for i, (label, caption) in enumerate(zip(LABELS, CAPTIONS)):
        pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i}.png")
        rows.append(f"img{i}.png\t{caption}\t{label}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root, ckpt, model, ema


def _args(root, ckpt, *extra):
    return ["--model", str(CONFIG), "--pretrained", str(ckpt), "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--precision", "fp32", "--csv-label-key", "label", *extra]


@torch.no_grad()
def _expected(model, root):
    """Zero-shot and retrieval metrics with plain torch ops (no ties with random weights)."""
    model.eval()
    preprocess = open_clip.create_model_and_transforms(NAME)[2]
    tokenizer = open_clip.get_tokenizer(NAME)
    images = torch.stack([preprocess(Image.open(root / f"img{i}.png").convert("RGB")) for i in range(len(LABELS))])
    image = F.normalize(model.encode_image(images), dim=-1)  # (N, D)
    classes = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer([t.format(c) for t in TEMPLATES])),
                                                   dim=-1).mean(0), dim=0) for c in CLASSNAMES])  # (C, D)
    labels = torch.tensor(LABELS)
    logits = image @ classes.T  # (N, C)
    rank = (logits > logits[torch.arange(len(labels)), labels][:, None]).sum(1)
    per_class = [(rank[labels == c] == 0).float().mean().item() if (labels == c).any() else None
                 for c in range(len(CLASSNAMES))]
    present = [a for a in per_class if a is not None]
    zeroshot = {"zeroshot_top1": (rank == 0).float().mean().item(), "zeroshot_top5": (rank < 5).float().mean().item(),
                "zeroshot_mean_per_class": sum(present) / len(present), "per_class": per_class}
    text = F.normalize(model.encode_text(tokenizer(CAPTIONS)), dim=-1)
    retrieval = {}
    for name, scores in (("image_to_text", image @ text.T), ("text_to_image", text @ image.T)):
        ranks = (scores > scores.diag()[:, None]).sum(1)
        for k in (1, 5, 10):
            retrieval[f"{name}_R@{k}"] = (ranks < k).float().mean().item()
    return zeroshot, retrieval


def test_eval_matches_hand_computed_metrics(setup, tmp_path, capsys):
    root, ckpt, model, _ = setup
    data = str(root / "data.csv")
    out = tmp_path / "results.json"
    assert eval_cli.main(_args(root, ckpt, "--zeroshot-data", data, "--classnames", str(root / "classes.txt"),
                               "--templates", str(root / "templates.txt"), "--retrieval-data", data,
                               "--output", str(out))) == 0
    zeroshot, retrieval = _expected(model, root)
    results = json.loads(out.read_text())

    assert results["model"] == NAME and results["checkpoint"] == str(ckpt)
    assert (results["step"], results["epoch"], results["weights"]) == (7, 2, "checkpoint")
    assert datetime.datetime.fromisoformat(results["date"]).tzinfo is not None
    zs = results["zeroshot"]
    assert (zs["dataset"], zs["num_samples"], zs["num_classes"], zs["num_templates"]) == (data, 10, 6, 2)
    for key in ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class"):
        assert zs[key] == pytest.approx(zeroshot[key], abs=1e-6), key
    assert [c["name"] for c in zs["per_class"]] == CLASSNAMES
    assert [c["samples"] for c in zs["per_class"]] == [2, 3, 1, 2, 2, 0]
    assert zs["per_class"][5]["accuracy"] is None  # no image of "white": null, not NaN
    assert [c["accuracy"] for c in zs["per_class"]] == pytest.approx(zeroshot["per_class"], abs=1e-6)
    rt = results["retrieval"]
    assert rt["num_samples"] == 10
    for key, value in retrieval.items():
        assert rt[key] == pytest.approx(value, abs=1e-6), key
    assert rt["mean_recall"] == pytest.approx(sum(retrieval.values()) / 6, abs=1e-6)

    table = capsys.readouterr().out
    lines = table.splitlines()
    for key, label in (("zeroshot_top1", "top-1"), ("zeroshot_top5", "top-5")):
        assert f"  {label:<16}{f'{100 * zeroshot[key]:.1f}%':>8}" in lines
    assert "mean per class" in table and "lowest classes" in table
    i2t = "".join(f"{100 * retrieval[f'image_to_text_R@{k}']:7.1f}%" for k in (1, 5, 10))
    assert f"  image -> text   {i2t}" in lines
    assert "epoch 2, step 7" in table and f"results written to {out}" in table


def test_caption_less_csv_and_builtin_templates(setup, capsys):
    root, ckpt, model, _ = setup
    rows = (root / "data.csv").read_text().splitlines()
    no_captions = root / "labels_only.csv"  # filepath,label: no caption column at all
    no_captions.write_text("\n".join(",".join(r.split("\t")[::2]) for r in rows) + "\n")
    results = eval_cli.run(eval_cli.build_parser().parse_args(_args(
        root, ckpt, "--zeroshot-data", str(no_captions), "--csv-separator", ",",
        "--classnames", str(root / "classes.txt"), "--templates", "simple")))
    assert results["zeroshot"]["num_samples"] == 10 and results["zeroshot"]["num_templates"] == 7
    assert "retrieval" not in results


def test_ema_weights_are_evaluated(setup):
    root, ckpt, _, ema = setup
    weights = weights_module.resolve_weights(str(ckpt), NAME, ema=True)
    bundle = weights_module.load_model(str(CONFIG), weights, torch.device("cpu"))
    for key, value in bundle.model.state_dict().items():
        torch.testing.assert_close(value, ema[key])


def test_builtin_sets():
    names = builtin_classnames("imagenet")
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert len(builtin_templates("openai")) == 80 and len(builtin_templates("simple")) == 7
    assert all(t.count("{}") == 1 for t in builtin_templates("openai"))


@pytest.mark.parametrize("extra, message", [
    (["--retrieval-data", "MISSING.csv"], r"--retrieval-data MISSING.csv: no such file"),
    ([], "nothing to evaluate"),
    (["--zeroshot-data", "DATA"], "--zeroshot-data needs --zeroshot-classnames"),
    (["--zeroshot-data", "DATA", "--classnames", "nope/classes.txt"], r"--zeroshot-classnames nope/classes.txt: no such file"),
    (["--zeroshot-data", "DATA", "--classnames", "cifar10"], r"'cifar10': not a built-in set \(imagenet\)"),
    (["--zeroshot-data", "DATA", "--classnames", "imagenet", "--templates", "fancy"], r"not a built-in set \(openai, simple\)"),
    (["--zeroshot-data", "DATA", "--classnames", "imagenet", "--templates", "CLASSES"], "must contain '{}' exactly once"),
    (["--zeroshot-data", "DATA", "--classnames", "imagenet", "--csv-label-key", "cls"],
     r"has no column 'cls'.*set --csv-label-key"),
    (["--zeroshot-data", "DATA", "--zeroshot-classnames", "imagenet", "--csv-label-key", None],
     r"--zeroshot-data .*data.csv is a CSV: name its column of integer class ids with --csv-label-key"),
    (["--imagenet-val", "nowhere"], r"--imagenet-val nowhere: no such folder"),
    (["--retrieval-data", "DATA", "--csv-caption-key", "caption"], r"has no column 'caption'.*set --csv-caption-key"),
    (["--retrieval-data", "DATA", "--precision", "amp"], "amp.*is for CUDA"),
    (["--retrieval-data", "DATA", "--output", "ROOT"], "is a folder: give a file name"),  # before, not after
])
def test_user_errors(setup, monkeypatch, extra, message):
    """Each one stops before a model is built."""
    root, ckpt, _, _ = setup
    monkeypatch.setattr(weights_module, "load_model", lambda *a, **k: pytest.fail("the model was built"))
    extra = [{"DATA": str(root / "data.csv"), "CLASSES": str(root / "classes.txt"), "ROOT": str(root)}.get(a, a)
             for a in extra]
    argv = _args(root, ckpt, *extra)
    if None in argv:  # drop the flag before None, and the default _args gave it
        flag = argv[argv.index(None) - 1]
        argv = [a for i, a in enumerate(argv) if a != flag and (i == 0 or argv[i - 1] != flag)]
    with pytest.raises(ConfigError, match=message):
        eval_cli.main(argv)


def test_labels_beyond_classnames(setup, tmp_path):
    root, ckpt, _, _ = setup
    (tmp_path / "three.txt").write_text("red\ngreen\nblue\n")
    with pytest.raises(ConfigError, match=r"--zeroshot-data .* has label 4 but there are only 3 class names"):
        eval_cli.main(_args(root, ckpt, "--zeroshot-data", str(root / "data.csv"),
                            "--classnames", str(tmp_path / "three.txt")))


def test_checkpoint_of_another_model(setup, tmp_path):
    root, _, model, _ = setup
    other = save_checkpoint({"state_dict": model.state_dict(), "optimizer": {}, "step": 1, "epoch": 1,
                             "model": "bigbatch-tiny", "config": {}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="is of model 'bigbatch-tiny', not --model 'test-clip'.*--model bigbatch-tiny"):
        eval_cli.main(_args(root, other, "--retrieval-data", str(root / "data.csv")))
    with pytest.raises(ConfigError, match="no EMA weights"):
        weights_module.resolve_weights(str(other), "bigbatch-tiny", ema=True)


def test_plain_weights_of_another_model(setup, tmp_path):
    root, _, _, _ = setup
    torch.save(create_model("bigbatch-tiny").model.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ConfigError, match="does not fit --model"):
        eval_cli.main(_args(root, tmp_path / "tiny.pt", "--retrieval-data", str(root / "data.csv")))


def test_pretrained_tags_offline(setup, tmp_path, monkeypatch):
    """A tag is used only from the local cache; one that is not there gets a clear error."""
    root, ckpt, model, _ = setup
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache: ~/.cache/clip
    with pytest.raises(ConfigError, match="not available offline.*pass a local checkpoint file"):
        weights_module.resolve_weights("openai", register_model_config("ViT-B-32"))
    with pytest.raises(ConfigError, match="not an open_clip pretrained tag of test-clip"):
        weights_module.resolve_weights("laion2b", NAME)

    # a tag of our own, its weights laid out as huggingface_hub caches them
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, NAME, {"cached": {"hf_hub": "bigbatch/test-clip/", "url": ""}})
    snapshot = cache / "models--bigbatch--test-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--bigbatch--test-clip" / "refs").mkdir()
    (cache / "models--bigbatch--test-clip" / "refs" / "main").write_text("0" * 40)
    torch.save(model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    weights = weights_module.resolve_weights("cached", NAME)
    assert weights.kind == "open_clip tag"
    bundle = weights_module.load_model(str(CONFIG), weights, torch.device("cpu"))
    for key, value in bundle.model.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key])


def _shard(path, root, *, captions: bool, labels=None):
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels or LABELS):
            files = {"png": (root / f"img{i}.png").read_bytes()}
            if label is not None:
                files["cls"] = str(label).encode()
            if captions:
                files["txt"] = CAPTIONS[i].encode()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_webdataset_shards_with_cls_labels(setup, tmp_path):
    root, ckpt, _, _ = setup
    shard = _shard(tmp_path / "val-000000.tar", root, captions=True)
    flags = ["--classnames", str(root / "classes.txt"), "--templates", str(root / "templates.txt")]
    from_csv = eval_cli.run(eval_cli.build_parser().parse_args(
        _args(root, ckpt, "--zeroshot-data", str(root / "data.csv"), *flags)))["zeroshot"]
    from_shards = eval_cli.run(eval_cli.build_parser().parse_args(
        _args(root, ckpt, "--zeroshot-data", shard, "--retrieval-data", shard, *flags)))
    for key in ("num_samples", "zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class"):
        assert from_shards["zeroshot"][key] == pytest.approx(from_csv[key]), key
    assert from_shards["retrieval"]["num_samples"] == 10

    # zero-shot shards need no captions; retrieval shards do, and say so naming their flag
    bare = _shard(tmp_path / "bare-000000.tar", root, captions=False)
    from_bare = eval_cli.run(eval_cli.build_parser().parse_args(_args(root, ckpt, "--zeroshot-data", bare, *flags)))
    for key in ("num_samples", "zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class"):
        assert from_bare["zeroshot"][key] == pytest.approx(from_csv[key]), key
    with pytest.raises(ConfigError, match=r"no usable sample .* of --retrieval-data .*missing caption"):
        eval_cli.main(_args(root, ckpt, "--retrieval-data", bare))


def test_samples_with_bad_labels_are_skipped_and_counted(setup, tmp_path):
    """A missing, negative ("unlabelled") or non-integer class id costs its sample, not the
    evaluation; the accuracy is that of the well-labelled samples alone."""
    root, ckpt, _, _ = setup
    flags = ["--classnames", str(root / "classes.txt"), "--templates", str(root / "templates.txt")]
    bad = {1: None, 4: -1, 7: "seven"}
    labels = [bad.get(i, label) for i, label in enumerate(LABELS)]
    shard = _shard(tmp_path / "bad-000000.tar", root, captions=False, labels=labels)
    rows = (root / "data.csv").read_text().splitlines()
    good = root / "good_labels.csv"  # beside the images its rows name
    good.write_text("\n".join(rows[i] for i in range(len(rows)) if i - 1 not in bad) + "\n")
    expected = eval_cli.run(eval_cli.build_parser().parse_args(
        _args(root, ckpt, "--zeroshot-data", str(good), *flags)))["zeroshot"]
    results = eval_cli.run(eval_cli.build_parser().parse_args(
        _args(root, ckpt, "--zeroshot-data", shard, *flags)))["zeroshot"]
    assert results["num_samples"] == expected["num_samples"] == 7
    for key in ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class"):
        assert results[key] == pytest.approx(expected[key]), key
    assert results["skipped"] == {"missing label": 1, "bad label": 2}

    as_csv = root / "bad_labels.csv"  # the same in a CSV: an empty, a negative, a word
    as_csv.write_text("\n".join([rows[0], *(r.rsplit("\t", 1)[0] + "\t" + ("" if l is None else str(l))
                                            for r, l in zip(rows[1:], labels))]) + "\n")
    results = eval_cli.run(eval_cli.build_parser().parse_args(
        _args(root, ckpt, "--zeroshot-data", str(as_csv), *flags)))["zeroshot"]
    assert results["num_samples"] == 7 and results["skipped"] == {"bad label": 2, "missing label": 1}
    assert results["zeroshot_top1"] == pytest.approx(expected["zeroshot_top1"])

    # a set without class ids at all is one line, after a few samples, not a read of it all
    for i in range(2):
        _shard(tmp_path / f"none-{i:06d}.tar", root, captions=False, labels=[None] * 10)
    with pytest.raises(ConfigError, match=r"--zeroshot-data .*: its first samples have no class id: zero-shot "
                                          r"shards need one per sample, an integer in KEY.cls$"):
        eval_cli.main(_args(root, ckpt, "--zeroshot-data", str(tmp_path / "none-{000000..000001}.tar"), *flags))


def test_model_is_read_from_a_bigbatch_checkpoint_and_one_progress_line_per_pass(setup, tmp_path, capsys):
    root, ckpt, model, _ = setup
    state = torch.load(ckpt, weights_only=True)
    state["config"] = {"model": str(CONFIG)}  # what training records: the --model it was given
    trained = save_checkpoint(state, tmp_path / "trained.pt")
    flags = ["--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32",
             "--retrieval-data", str(root / "data.csv")]
    assert eval_cli.main(["--pretrained", str(trained), *flags]) == 0
    out, err = capsys.readouterr()
    assert f"model       {NAME}" in out
    assert err.count("retrieval:") == 1 and "3 batches in" in err  # not a line per batch

    state.update(model="other", config={"model": str(tmp_path / "gone.json")})
    moved = save_checkpoint(state, tmp_path / "moved.pt")
    with pytest.raises(ConfigError, match="gone.json, which is not here: pass --model"):
        eval_cli.main(["--pretrained", str(moved), *flags])
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="records no model .*: pass --model"):
        eval_cli.main(["--pretrained", str(tmp_path / "plain.pt"), *flags])
    with pytest.raises(ConfigError, match="which model\\? pass --pretrained CKPT .* or --model NAME"):
        eval_cli.main(flags)


def test_imagenet_flags_as_in_training(setup, tmp_path, monkeypatch, capsys):
    """--imagenet-val / --imagenet-v2: the trees, class names, templates and metric names of training."""
    import bigbatch.imagenet
    from bigbatch.evaluate import build_zeroshot_classifier
    from bigbatch.imagenet import ClassFolders

    root, ckpt, model, _ = setup
    monkeypatch.setattr(bigbatch.imagenet, "TEMPLATES", "simple")  # 7 templates: a faster classifier
    val, v2 = tmp_path / "val", tmp_path / "v2"
    for tree, folders in ((val, [f"n{i:08d}" for i in range(1000)]), (v2, [str(i) for i in range(1000)])):
        for name in folders:
            (tree / name).mkdir(parents=True)
    for i, label in enumerate(LABELS):  # the setup's images, under ImageNet classes 0..4
        (root / f"img{i}.png").link_to(val / f"n{label:08d}" / f"{i}.png")
        (root / f"img{i}.png").link_to(v2 / str(label) / f"{i}.png")
    results = eval_cli.run(eval_cli.build_parser().parse_args(_args(
        root, ckpt, "--imagenet-val", str(val), "--imagenet-v2", str(v2))))["imagenet"]

    preprocess, tokenizer = open_clip.create_model_and_transforms(NAME)[2], open_clip.get_tokenizer(NAME)
    classifier = build_zeroshot_classifier(model.eval(), tokenizer, builtin_classnames("imagenet"),
                                           builtin_templates("simple"))
    data = ClassFolders(val, preprocess)
    with torch.no_grad():
        scores = model.encode_image(torch.stack([image for image, _ in data]), normalize=True) @ classifier
    best = scores.topk(5, dim=1).indices
    labels = torch.tensor([label for _, label in data])
    expected = {1: (best[:, 0] == labels).float().mean().item(), 5: (best == labels[:, None]).any(1).float().mean().item()}
    for prefix in ("imagenet-zeroshot-val", "imagenetv2-zeroshot-val"):
        for k in (1, 5):
            assert results[f"{prefix}-top{k}"] == pytest.approx(expected[k]), (prefix, k)
    assert (results["imagenet_val_samples"], results["imagenet_v2_samples"]) == (10, 10)
    eval_cli.main(_args(root, ckpt, "--imagenet-val", str(val)))
    assert re.search(rf"imagenet-zeroshot-val-top1 +{100 * expected[1]:.1f}%", capsys.readouterr().out)


def test_out_of_memory_names_the_batch_size(setup, monkeypatch):
    import bigbatch.evaluate

    def running_out(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has ...")

    monkeypatch.setattr(bigbatch.evaluate, "evaluate", running_out)
    root, ckpt, _, _ = setup
    with pytest.raises(ConfigError, match=r"^out of memory \(CUDA out of memory. Tried to allocate 9.00 GiB\) "
                                          r"with --batch-size 4: lower --batch-size$"):
        eval_cli.main(_args(root, ckpt, "--retrieval-data", str(root / "data.csv")))
