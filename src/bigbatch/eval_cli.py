"""`bigbatch eval`: zero-shot classification and image-text retrieval of a trained model.

    bigbatch eval --model ViT-B-32 --pretrained logs/run/checkpoints/epoch_32.pt \\
        --zeroshot-data imagenet-val.csv --classnames imagenet --templates openai \\
        --retrieval-data coco-val.csv --output results.json

The metrics are bigbatch.evaluate's, the functions the training loop reports:
zero-shot top-1/top-5/mean per-class accuracy (`build_zeroshot_classifier`,
`zeroshot_accuracy`) and image<->text recall@1/5/10 (`evaluate`). The flow:

1. check the flags, read class names and templates (a file or a built-in set);
2. resolve --pretrained: a bigbatch (or open_clip_train) checkpoint is read here, its
   `model` checked against --model, its `state_dict` (or, with --ema, its
   `ema_state_dict`) loaded into the model; any other file, or an open_clip tag found
   in the local cache, is handed to open_clip (nothing is downloaded);
3. zero-shot: embed the images only (the captions of a classification set mean
   nothing, and `evaluate` would also embed them and rank all N x N pairs), then score
   them against the class embeddings; retrieval: one `evaluate` pass;
4. print a table; with --output, write the numbers and what produced them as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import math
import os
import pickle
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import open_clip
import torch

from bigbatch.config import ConfigError
from bigbatch.device import autocast_factory, pick_device, resolve_precision
from bigbatch.data import DataSpec, make_data
from bigbatch.data.spec import expand_paths, is_local
from bigbatch.evaluate import build_zeroshot_classifier, evaluate, zeroshot_accuracy
from bigbatch.export import plain_state_dict
from bigbatch.model import ModelBundle, create_model, register_model_config
from bigbatch.zeroshot import load_classnames, load_templates

DATA_FLAG = "--val-data"  # how bigbatch.data names evaluation data in its messages


# --------------------------------------------------------------------------- flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigbatch eval",
        description="Zero-shot classification and image-text retrieval of a trained model. "
                    "Give --zeroshot-data, --retrieval-data or both.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="open_clip model name (open_clip.list_models()), bigbatch-tiny/-small, or a model config JSON")
    model.add_argument("--pretrained", default=None,
                       help="weights: a bigbatch checkpoint, an open_clip checkpoint file, or an open_clip "
                            "pretrained tag already in the local cache (nothing is downloaded); "
                            "omitted: random initialisation (a chance-level baseline)")
    model.add_argument("--ema", action="store_true",
                       help="evaluate the checkpoint's EMA weights (ema_state_dict, kept by --ema-decay)")
    zeroshot = parser.add_argument_group("zero-shot classification")
    zeroshot.add_argument("--zeroshot-data", default=None,
                          help="labelled images: a CSV with --csv-label-key, or webdataset shards with .cls files")
    zeroshot.add_argument("--classnames", default=None,
                          help="class names in label order: 'imagenet' or a text file, one per line")
    zeroshot.add_argument("--templates", default="openai",
                          help="prompt templates: 'openai' (80), 'simple' (7) or a text file, one per line "
                               "with '{}' for the class name (default: openai)")
    retrieval = parser.add_argument_group("retrieval")
    retrieval.add_argument("--retrieval-data", default=None,
                           help="image-caption pairs: a CSV or webdataset shards (.txt captions)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset-type", default="auto", choices=["auto", "csv", "webdataset"],
                      help="format of the data ('auto' picks by file extension)")
    data.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths (default: filepath)")
    data.add_argument("--csv-caption-key", default="title",
                      help="CSV column of captions, for --retrieval-data (default: title); "
                           "--zeroshot-data needs no caption column")
    data.add_argument("--csv-label-key", default="label",
                      help="CSV column of integer class ids, for --zeroshot-data (default: label)")
    data.add_argument("--csv-separator", default="\t", help="CSV separator (default: tab)")
    data.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    data.add_argument("--workers", type=int, default=1, help="data loader processes (default: 1)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    run.add_argument("--precision", default="auto", choices=["auto", "fp32", "amp", "amp_bf16"],
                     help="'auto' = amp on CUDA, fp32 on CPU")
    run.add_argument("--output", default=None, help="write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run(args)
    print(format_table(results))
    if args.output:
        write_json(results, args.output)
        print(f"\nresults written to {args.output}")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    if args.zeroshot_data is None and args.retrieval_data is None:
        raise ConfigError("nothing to evaluate: pass --zeroshot-data (labelled images, with --classnames) "
                          "and/or --retrieval-data (image-caption pairs)")
    if args.zeroshot_data is not None and args.classnames is None:
        raise ConfigError("--zeroshot-data needs --classnames: 'imagenet' or a text file of the class "
                          "names in label order, one per line")
    if args.zeroshot_data is None and args.classnames is not None:
        raise ConfigError("--classnames is for zero-shot classification: add --zeroshot-data or drop --classnames")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    for flag, paths in (("--zeroshot-data", args.zeroshot_data), ("--retrieval-data", args.retrieval_data)):
        if paths is None:
            continue
        files = expand_paths(paths)
        missing = [p for p in files if is_local(p) and not os.path.isfile(p)]
        if not files or missing:
            raise ConfigError(f"{flag} {paths}: no such file" + (f" ({missing[0]})" if len(files) > 1 else "")
                              + ": give a CSV file or webdataset shards ('dir/{000000..000009}.tar')")


# --------------------------------------------------------------------------- weights


@dataclass
class Weights:
    """What --pretrained named and how it is loaded."""

    source: str | None  # the --pretrained value
    kind: str  # "random", "checkpoint" (read here), "file" or "open_clip tag" (read by open_clip)
    state_dict: dict[str, torch.Tensor] | None = None  # for "checkpoint"
    siglip: bool = False  # the weights have a logit_bias: build the model with one
    step: int | None = None
    epoch: int | None = None


def resolve_weights(pretrained: str | None, model_name: str, *, ema: bool = False) -> Weights:
    """Check --pretrained against the model before anything is built (see the module docstring)."""
    if pretrained is None:
        if ema:
            raise ConfigError("--ema evaluates a checkpoint's EMA weights: also pass --pretrained CKPT")
        return Weights(None, "random")
    path = Path(pretrained)
    if path.is_file():
        state = _peek(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            return _checkpoint_weights(pretrained, state, model_name, ema)
        if ema:
            raise ConfigError(f"--ema: {pretrained} is a plain weights file with no EMA weights "
                              "(ema_state_dict): drop --ema, or pass the training checkpoint")
        siglip = isinstance(state, dict) and "logit_bias" in state
        return Weights(pretrained, "file", siglip=siglip)
    if ema:
        raise ConfigError(f"--ema needs a checkpoint file, and {pretrained} is not a file")
    tag = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag:
        if path.suffix or os.sep in pretrained or "/" in pretrained:
            raise ConfigError(f"--pretrained {pretrained}: no such file")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        known = f"its tags are {', '.join(tags)}" if tags else "it has none"
        raise ConfigError(f"--pretrained {pretrained}: no such file, and not an open_clip pretrained tag "
                          f"of {model_name} ({known}): pass a checkpoint file")
    if cached_tag_file(tag) is None:
        raise ConfigError(
            f"--pretrained {pretrained}: the weights of open_clip's {model_name} '{pretrained}' are not "
            f"available offline (not in the local cache {_cache_location(tag)}) and bigbatch does not "
            f"download: pass a local checkpoint file, or fetch them once where there is internet "
            f"(open_clip.create_model_and_transforms('{model_name}', pretrained='{pretrained}')) and copy the cache")
    return Weights(pretrained, "open_clip tag")


def _peek(path: Path):
    """The checkpoint's contents, memory-mapped where possible (an optimizer state several
    times the weights is then never read), or None when torch cannot read it (safetensors,
    TorchScript, numpy: open_clip's loader handles those)."""
    for mmap in (True, False):  # files of torch's legacy format cannot be memory-mapped
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:  # torch raises many types for a file it does not read
            continue
    return None


def _checkpoint_weights(pretrained: str, state: dict, model_name: str, ema: bool) -> Weights:
    saved = state.get("model")
    if isinstance(saved, str) and saved != model_name:
        raise ConfigError(f"checkpoint {pretrained} is of model '{saved}', not --model '{model_name}': "
                          f"pass --model {saved} (or the config JSON it was trained from)")
    if ema and "ema_state_dict" not in state:
        raise ConfigError(f"checkpoint {pretrained} holds no EMA weights (no 'ema_state_dict'; train with "
                          "--ema-decay to keep them): drop --ema")
    weights = plain_state_dict(state["ema_state_dict" if ema else "state_dict"], model_name)
    return Weights(pretrained, "checkpoint", weights, siglip="logit_bias" in weights,
                   step=state.get("step"), epoch=state.get("epoch"))


def cached_tag_file(tag: dict) -> str | None:
    """The local file open_clip would load for a pretrained tag's config, or None when it
    would have to download it. Mirrors open_clip's `download_pretrained`: the Hugging Face
    hub (safetensors first) when the tag has a hub id and huggingface_hub is installed,
    else the URL's file in ~/.cache/clip."""
    if "file" in tag:
        return tag["file"] if os.path.isfile(tag["file"]) else None
    if tag.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache  # looks, never downloads

        repo, filename = os.path.split(tag["hf_hub"])  # "org/repo/" -> ("org/repo", "")
        filename = filename or open_clip.constants.HF_WEIGHTS_NAME
        for candidate in (*_safetensors_names(filename), filename):
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return found
        return None
    if tag.get("url"):
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(tag["url"]))
        return target if os.path.isfile(target) else None
    return None


def _safetensors_names(filename: str) -> list[str]:
    if filename == open_clip.constants.HF_WEIGHTS_NAME:
        return [open_clip.constants.HF_SAFE_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


def _cache_location(tag: dict) -> str:
    if tag.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import constants

        return f"{constants.HF_HUB_CACHE}, repo {tag['hf_hub'].rstrip('/')}"
    return os.path.expanduser("~/.cache/clip")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub answer from its cache without a network round trip.
    HF_HUB_OFFLINE is read once at import, so the module constant is what to set."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init(quiet: bool) -> Iterator[None]:
    """open_clip warns that the model is "initialized randomly" when it is given no weights;
    untrue when the checkpoint's weights are loaded right after."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    if quiet:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def build_model(model: str, weights: Weights, device: torch.device) -> ModelBundle:
    """The model of --model with --pretrained's weights, in eval mode on `device`."""
    pretrained = weights.source if weights.kind in ("file", "open_clip tag") else None
    try:
        with _hub_offline(), _quiet_random_init(weights.kind == "checkpoint"):
            bundle = create_model(model, pretrained=pretrained, siglip=weights.siglip)
        if weights.state_dict is not None:
            own = bundle.model.state_dict()
            # 1-element scalars (logit_scale) load into whatever shape the model gives them
            state = {k: v.reshape(own[k].shape) if k in own and v.numel() == 1 and v.shape != own[k].shape
                     else v for k, v in weights.state_dict.items()}
            bundle.model.load_state_dict(state, strict=True)
    except ConfigError:
        raise
    except (RuntimeError, AttributeError, KeyError, ValueError, AssertionError, OSError,
            pickle.UnpicklingError) as error:  # what open_clip's loader raises for a file that does not fit
        if weights.kind == "open_clip tag":
            raise ConfigError(f"--pretrained {weights.source}: open_clip could not load these weights from "
                              f"the local cache ({_first_line(error)}); the weights are not available offline: "
                              "pass a local checkpoint file") from None
        raise ConfigError(f"--pretrained {weights.source} does not fit --model {model} "
                          f"({type(error).__name__}: {_first_line(error)}): pass the --model it was trained with") from None
    bundle.model.to(device).eval()
    return bundle


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


# --------------------------------------------------------------------------- data


def data_spec(args: argparse.Namespace, paths: str, *, zeroshot: bool) -> DataSpec:
    """Evaluation data: read once, in order. Zero-shot samples need no caption, but the data
    layer requires one: the label column stands in for it (it exists in every labelled CSV)."""
    return DataSpec(
        paths=paths, dataset_type=args.dataset_type, batch_size=args.batch_size,
        workers=args.workers, is_train=False, csv_img_key=args.csv_img_key,
        csv_caption_key=args.csv_label_key if zeroshot else args.csv_caption_key,
        csv_separator=args.csv_separator, csv_label_key=args.csv_label_key if zeroshot else None)


@contextlib.contextmanager
def _user_errors(flag: str, *, zeroshot: bool = False) -> Iterator[None]:
    """The data layer reports a user's mistake as a ValueError (DataError included) naming
    --val-data; say it in this command's terms."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as error:
        message = str(error).replace(DATA_FLAG, flag)
        if zeroshot:  # the label column stands in for the captions (see data_spec)
            message = message.replace("--csv-caption-key", "--csv-label-key")
            if "missing caption" in message or "gave no batch" in message:
                message += (" (zero-shot shards need a .cls label and, for now, a .txt caption per sample, "
                            "any text such as the class name: the data layer skips caption-less samples)")
        raise ConfigError(message) from None


def _progress(loader: Iterable, what: str) -> Iterator:
    """Yield the batches, with a line on stderr about every tenth of the way."""
    try:
        total = len(loader)
    except TypeError:
        total = None
    start, step = time.perf_counter(), max(1, (total or 100) // 10)
    count = 0
    for count, batch in enumerate(loader, 1):
        yield batch
        if count % step == 0 and count != total:
            print(f"  {what}: {count}/{total or '?'} batches, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"  {what}: {count} batches in {time.perf_counter() - start:.1f} s", file=sys.stderr)


# --------------------------------------------------------------------------- the two evaluations


@torch.no_grad()
def zeroshot_eval(bundle: ModelBundle, loader: Iterable, classnames: list[str], templates: list[str], *,
                  device: torch.device, autocast, name: str = "--zeroshot-data") -> dict:
    """Top-1/top-5/per-class accuracy of the images of `loader` against the class names."""
    model = bundle.model
    dtype = next(model.parameters()).dtype  # pure fp16/bf16 models want inputs in their dtype
    features, labels, skipped = [], [], Counter()
    for batch in _progress(loader, "zero-shot"):
        if batch[2] is None:
            raise ConfigError(f"{name} has samples without a class label: webdataset shards need a .cls "
                              "file per sample, a CSV an integer column named by --csv-label-key")
        if len(batch[2]) and batch[2].max() >= len(classnames):
            raise ConfigError(f"{name} has label {batch[2].max().item()} but --classnames gives only "
                              f"{len(classnames)} classes: labels count from 0 in the order of the class names")
        with autocast():
            embedded = model.encode_image(batch[0].to(device=device, dtype=dtype, non_blocking=True), normalize=True)
        features.append(embedded.float().cpu())  # (B, D); the device holds one batch at a time
        labels.append(batch[2])
        if len(batch) > 3 and batch[3]:
            skipped.update(batch[3])
    if not features:
        raise ConfigError(f"{name} gave no images: check the data")
    classifier = build_zeroshot_classifier(model, bundle.tokenizer, classnames, templates, device, autocast)  # (D, C)
    labels = torch.cat(labels)
    metrics = zeroshot_accuracy(torch.cat(features).to(device), labels, classifier)
    counts = torch.bincount(labels, minlength=len(classnames)).tolist()
    per_class = metrics.pop("zeroshot_per_class")
    metrics["per_class"] = [{"label": i, "name": c, "accuracy": a if counts[i] else None, "samples": counts[i]}
                            for i, (c, a) in enumerate(zip(classnames, per_class))]
    return {"num_samples": len(labels), **metrics, "skipped": dict(skipped)}


def retrieval_eval(bundle: ModelBundle, loader: Iterable, *, device: torch.device, autocast) -> dict:
    """Image->text and text->image recall@1/5/10 over the pairs of `loader` (pair i matches i)."""
    return evaluate(bundle.model, _progress(loader, "retrieval"), device=device, autocast=autocast)


# --------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> dict:
    """Everything `bigbatch eval` does but print: returns the results `--output` writes."""
    _check_flags(args)
    classnames = templates = None
    if args.zeroshot_data is not None:
        classnames, templates = load_classnames(args.classnames), load_templates(args.templates)
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    autocast = autocast_factory(precision, device)
    model_name = register_model_config(args.model)
    weights = resolve_weights(args.pretrained, model_name, ema=args.ema)
    bundle = build_model(args.model, weights, device)

    results: dict = {
        "model": model_name, "model_arg": args.model, "checkpoint": args.pretrained,
        "weights": weights.kind, "ema": args.ema, "step": weights.step, "epoch": weights.epoch,
        "device": str(device), "precision": precision, "batch_size": args.batch_size,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    if args.zeroshot_data is not None:
        flag = "--zeroshot-data"
        with _user_errors(flag, zeroshot=True):
            data = make_data(data_spec(args, args.zeroshot_data, zeroshot=True), bundle.preprocess_val,
                             bundle.tokenizer)
            metrics = zeroshot_eval(bundle, data.loader, classnames, templates, device=device,
                                    autocast=autocast, name=f"{flag} {args.zeroshot_data}")
        results["zeroshot"] = {"dataset": args.zeroshot_data, "classnames": args.classnames,
                               "templates": args.templates, "num_classes": len(classnames),
                               "num_templates": len(templates), **metrics}
    if args.retrieval_data is not None:
        with _user_errors("--retrieval-data"):
            data = make_data(data_spec(args, args.retrieval_data, zeroshot=False), bundle.preprocess_val,
                             bundle.tokenizer)
            metrics = retrieval_eval(bundle, data.loader, device=device, autocast=autocast)
        results["retrieval"] = {"dataset": args.retrieval_data, **metrics}
    return results


def _versions() -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"bigbatch": version("bigbatch"), "open_clip": open_clip.__version__, "torch": torch.__version__}


# --------------------------------------------------------------------------- output


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def format_table(results: dict) -> str:
    """The results as a readable table."""
    weights = {"random": "random initialisation (no --pretrained)",
               "checkpoint": f"{results['checkpoint']}" + (" (EMA)" if results["ema"] else ""),
               }.get(results["weights"], f"{results['checkpoint']} ({results['weights']})")
    trained = ", ".join(f"{k} {results[k]}" for k in ("epoch", "step") if results.get(k) is not None)
    lines = [f"model       {results['model']}",
             f"weights     {weights}" + (f" [{trained}]" if trained else ""),
             f"device      {results['device']}, {results['precision']}"]
    zs = results.get("zeroshot")
    if zs:
        lines += ["", f"zero-shot   {zs['dataset']}: {zs['num_samples']} images, {zs['num_classes']} classes, "
                      f"{zs['num_templates']} templates ({zs['templates']})"]
        for key, label in (("zeroshot_top1", "top-1"), ("zeroshot_top5", "top-5"),
                           ("zeroshot_mean_per_class", "mean per class")):
            if key in zs:
                lines.append(f"  {label:<16}{_pct(zs[key]):>8}")
        present = [c for c in zs["per_class"] if c["accuracy"] is not None]
        if len(present) > 1:
            worst = sorted(present, key=lambda c: c["accuracy"])[:5]
            lines.append(f"  {'lowest classes':<16}" + ", ".join(f"{c['name']} {_pct(c['accuracy'])}" for c in worst))
        lines += _skipped_line(zs)
    rt = results.get("retrieval")
    if rt:
        lines += ["", f"retrieval   {rt['dataset']}: {rt['num_samples']} image-caption pairs",
                  f"  {'':<16}" + "".join(f"{f'R@{k}':>8}" for k in (1, 5, 10))]
        for name, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
            lines.append(f"  {label:<16}" + "".join(f"{_pct(rt.get(f'{name}_R@{k}')):>8}" for k in (1, 5, 10)))
        lines.append(f"  {'mean recall':<16}{_pct(rt['mean_recall']):>8}")
        lines += _skipped_line(rt)
    return "\n".join(lines)


def _skipped_line(metrics: dict) -> list[str]:
    skipped = metrics.get("skipped") or {}
    if not skipped:
        return []
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    return [f"  warning: {sum(skipped.values())} bad samples ({reasons}) were skipped or, in a CSV, "
            "replaced by other rows: fix the data for exact numbers"]


def _json_safe(value):
    """NaN is not JSON: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    return path
