"""`bigbatch eval`: zero-shot classification and image-text retrieval of a trained model.

    bigbatch eval --pretrained logs/run/checkpoints/epoch_32.pt \\
        --zeroshot-data imagenet-val.csv --classnames imagenet --templates openai \\
        --retrieval-data coco-val.csv --output results.json

The metrics are bigbatch.evaluate's, the functions the training loop reports:
zero-shot top-1/top-5/mean per-class accuracy (`build_zeroshot_classifier`,
`zeroshot_accuracy`) and image<->text recall@1/5/10 (`evaluate`). The flow:

1. check the flags, read class names and templates (a file or a built-in set);
2. resolve --pretrained: a bigbatch (or open_clip_train) checkpoint is read here, its
   `model` checked against --model (or, without --model, taken as the model), its `state_dict` (or, with --ema, its
   `ema_state_dict`) loaded into the model; any other file, or an open_clip tag found
   in the local cache, is handed to open_clip (nothing is downloaded);
3. zero-shot: embed the images only (the captions of a classification set mean
   nothing, and `evaluate` would also embed them and rank all N x N pairs), then score
   them against the class embeddings; retrieval: one `evaluate` pass;
4. print a table; with --output, write the numbers and what produced them as JSON.

torch, open_clip and the data layer are imported inside the functions that use them,
once the flags are parsed: `--help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from bigbatch.errors import ConfigError
from bigbatch.flags import Parser

DATA_FLAG = "--val-data"  # how bigbatch.data names evaluation data in its messages


# --------------------------------------------------------------------------- flags


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bigbatch eval",
        description="Zero-shot classification and image-text retrieval of a trained model. "
                    "Give --zeroshot-data, --retrieval-data or both.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="open_clip model name (open_clip.list_models()), bigbatch-tiny/bigbatch-small, or a "
                            "model config JSON (default: the model a bigbatch checkpoint given as --pretrained records)")
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
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: torch's choice, one per core)")
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
    if args.model is None and args.pretrained is None:
        raise ConfigError("which model? pass --pretrained CKPT (a bigbatch checkpoint records its model) "
                          "or --model NAME (random weights: a chance-level baseline)")
    from bigbatch.data.spec import expand_paths, is_local
    for flag, paths in (("--zeroshot-data", args.zeroshot_data), ("--retrieval-data", args.retrieval_data)):
        if paths is None:
            continue
        files = expand_paths(paths)
        missing = [p for p in files if is_local(p) and not os.path.isfile(p)]
        if not files or missing:
            raise ConfigError(f"{flag} {paths}: no such file" + (f" ({missing[0]})" if len(files) > 1 else "")
                              + ": give a CSV file or webdataset shards ('dir/{000000..000009}.tar')")


# --------------------------------------------------------------------------- data


def data_spec(args: argparse.Namespace, paths: str, *, zeroshot: bool):
    """Evaluation data: read once, in order. Zero-shot samples need no caption, but the data
    layer requires one: the label column stands in for it (it exists in every labelled CSV)."""
    from bigbatch.data import DataSpec

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
    """Yield the batches, with one progress line on stderr: updated in place on a terminal,
    written once at the end elsewhere (a log file gets no line per batch)."""
    try:
        total = len(loader)
    except TypeError:
        total = None
    live, start, count = sys.stderr.isatty(), time.perf_counter(), 0
    for count, batch in enumerate(loader, 1):
        yield batch
        if live:
            print(f"\r  {what}: {count}/{total or '?'} batches, {time.perf_counter() - start:.0f} s",
                  end="", file=sys.stderr, flush=True)
    print(f"{chr(13) if live else ''}  {what}: {count} batches in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)


# --------------------------------------------------------------------------- the two evaluations


def zeroshot_eval(bundle, loader: Iterable, classnames: list[str], templates: list[str], *,
                  device, autocast, name: str = "--zeroshot-data") -> dict:
    """Top-1/top-5/per-class accuracy of the images of `loader` against the class names."""
    import torch

    from bigbatch.evaluate import build_zeroshot_classifier, zeroshot_accuracy

    with torch.no_grad():
        model = bundle.model
        features, labels, skipped = [], [], Counter()
        for batch in _progress(loader, "zero-shot"):
            if batch[2] is None:
                raise ConfigError(f"{name} has samples without a class label: webdataset shards need a .cls "
                                  "file per sample, a CSV an integer column named by --csv-label-key")
            if len(batch[2]) and batch[2].max() >= len(classnames):
                raise ConfigError(f"{name} has label {batch[2].max().item()} but --classnames gives only "
                                  f"{len(classnames)} classes: labels count from 0 in the order of the class names")
            with autocast():
                embedded = model.encode_image(batch[0].to(device=device, non_blocking=True), normalize=True)
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


def retrieval_eval(bundle, loader: Iterable, *, device, autocast) -> dict:
    """Image->text and text->image recall@1/5/10 over the pairs of `loader` (pair i matches i)."""
    from bigbatch.evaluate import evaluate

    return evaluate(bundle.model, _progress(loader, "retrieval"), device=device, autocast=autocast)


# --------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> dict:
    """Everything `bigbatch eval` does but print: returns the results `--output` writes."""
    _check_flags(args)
    from bigbatch.data import check_data, make_data
    from bigbatch.device import autocast_factory, pick_device, resolve_precision, set_threads
    from bigbatch.model import register_model_config
    from bigbatch.weights import checkpoint_model, load_model, resolve_weights
    from bigbatch.zeroshot import load_classnames, load_templates

    set_threads(args.threads)
    for flag, paths, zeroshot in (("--zeroshot-data", args.zeroshot_data, True),
                                  ("--retrieval-data", args.retrieval_data, False)):
        if paths is not None:  # columns and shards, before the model is built
            with _user_errors(flag, zeroshot=zeroshot):
                check_data(data_spec(args, paths, zeroshot=zeroshot))
    classnames = templates = None
    if args.zeroshot_data is not None:
        classnames, templates = load_classnames(args.classnames), load_templates(args.templates)
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    autocast = autocast_factory(precision, device)
    model_arg = args.model or checkpoint_model(args.pretrained)
    model_name = register_model_config(model_arg)
    weights = resolve_weights(args.pretrained, model_name, ema=args.ema)
    bundle = load_model(model_arg, weights, device)
    bundle.model.eval()

    results: dict = {
        "model": model_name, "model_arg": model_arg, "checkpoint": args.pretrained,
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
    import open_clip
    import torch

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
