"""`bigbatch eval`: zero-shot classification and image-text retrieval of a trained model.

    bigbatch eval --pretrained logs/run/checkpoints/epoch_32.pt \\
        --zeroshot-data val.csv --csv-label-key label --zeroshot-classnames imagenet \\
        --imagenet-val imagenet/val --retrieval-data coco-val.csv --output results.json

The metrics are bigbatch.evaluate's, the functions the training loop reports:
zero-shot top-1/top-5/mean per-class accuracy (`zeroshot_classification`), ImageNet as
open_clip_train reports it (`imagenet.imagenet_zeroshot`) and image<->text recall@1/5/10
(`evaluate`). The flags eval shares with `bigbatch train` are train's own definitions
(`config.add_options`): same names, defaults and meaning. The flow:

1. check the flags, read class names and templates (a file or a built-in set);
2. resolve --pretrained: a bigbatch (or open_clip_train) checkpoint is read here, its
   `model` checked against --model (or, without --model, taken as the model), its `state_dict` (or, with --ema, its
   `ema_state_dict`) loaded into the model; any other file, or an open_clip tag found
   in the local cache, is handed to open_clip (nothing is downloaded);
3. zero-shot: embed the images only (the captions of a classification set mean
   nothing, and need not exist), then score them against the class embeddings;
   retrieval: one `evaluate` pass;
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
from pathlib import Path
from typing import Iterable, Iterator

from bigbatch.config import check_imagenet_dirs
from bigbatch.errors import ConfigError
from bigbatch.flags import Parser
from bigbatch.parse import add_options


# --------------------------------------------------------------------------- flags


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bigbatch eval",
        description="Zero-shot classification and image-text retrieval of a trained model. "
                    "Give --zeroshot-data, --imagenet-val/--imagenet-v2, --retrieval-data, or several.")
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
    add_options(zeroshot, "zeroshot_classnames", "zeroshot_templates", "imagenet_val", "imagenet_v2",
                zeroshot_classnames={"aliases": ("--classnames",)},
                zeroshot_templates={"aliases": ("--templates",)},
                imagenet_val={"help": "ImageNet-1k validation as an ImageFolder tree (1000 synset folders): "
                                      "top-1/5 as imagenet-zeroshot-val-top1/top5, as in training"})
    retrieval = parser.add_argument_group("retrieval")
    retrieval.add_argument("--retrieval-data", default=None,
                           help="image-caption pairs: a CSV or webdataset shards (.txt captions)")
    data = parser.add_argument_group("data")
    add_options(data, "dataset_type", "csv_img_key", "csv_caption_key", "csv_label_key", "csv_separator",
                "batch_size", "workers",
                dataset_type={"choices": ["auto", "webdataset", "csv"]},
                batch_size={"type": int, "help": "images per forward (default: 64)"})
    run = parser.add_argument_group("run")
    add_options(run, "device", "precision", "threads",
                precision={"choices": ["auto", "fp32", "amp", "amp_bf16", "amp_bfloat16"],
                           "help": "'auto' = amp on CUDA, fp32 on CPU (default: 'auto')"})
    run.add_argument("--output", default=None, help="write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bigbatch.faults import out_of_memory_named
    with out_of_memory_named(f"--batch-size {args.batch_size}", "lower --batch-size"):
        results = run(args)
    print(format_table(results))
    if args.output:
        write_json(results, args.output)
        print(f"\nresults written to {args.output}")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    if not (args.zeroshot_data or args.retrieval_data or args.imagenet_val or args.imagenet_v2):
        raise ConfigError("nothing to evaluate: pass --zeroshot-data (labelled images, with --zeroshot-classnames), "
                          "--imagenet-val/--imagenet-v2 DIR and/or --retrieval-data (image-caption pairs)")
    if args.zeroshot_data is not None and args.zeroshot_classnames is None:
        raise ConfigError("--zeroshot-data needs --zeroshot-classnames: 'imagenet' or a text file of the class "
                          "names in label order, one per line")
    if args.zeroshot_data is None and args.zeroshot_classnames is not None:
        raise ConfigError("--zeroshot-classnames is for --zeroshot-data: add --zeroshot-data or drop "
                          "--zeroshot-classnames (--imagenet-val has its own)")
    check_imagenet_dirs(args.imagenet_val, args.imagenet_v2)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    if args.output is not None:
        _check_writable(Path(args.output))
    if args.model is None and args.pretrained is None:
        raise ConfigError("which model? pass --pretrained CKPT (a bigbatch checkpoint records its model) "
                          "or --model NAME (random weights: a chance-level baseline)")
    from bigbatch.data.spec import expand_paths, local_path
    for flag, paths in (("--zeroshot-data", args.zeroshot_data), ("--retrieval-data", args.retrieval_data)):
        if paths is None:
            continue
        files = expand_paths(paths)
        missing = [p for p in files if local_path(p) is not None and not os.path.isfile(local_path(p))]
        if not files or missing:
            raise ConfigError(f"{flag} {paths}: no such file" + (f" ({missing[0]})" if len(files) > 1 else "")
                              + ": give a CSV file or webdataset shards ('dir/{000000..000009}.tar')")


# --------------------------------------------------------------------------- data


def data_spec(args: argparse.Namespace, flag: str, *, zeroshot: bool):
    """Evaluation data: read once, in order. Zero-shot samples need no caption, only a label."""
    from bigbatch.data import DataSpec

    return DataSpec(
        paths=getattr(args, flag[2:].replace("-", "_")), dataset_type=args.dataset_type, batch_size=args.batch_size,
        workers=args.workers, is_train=False, csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key,
        captions=not zeroshot, csv_separator=args.csv_separator,
        csv_label_key=args.csv_label_key if zeroshot else None, flag=flag)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """The data layer reports a user's mistake as a ValueError that names the flag."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None


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


# --------------------------------------------------------------------------- the evaluations


def zeroshot_eval(bundle, loader: Iterable, classnames: list[str], templates: list[str], *,
                  device, autocast, name: str = "--zeroshot-data") -> dict:
    """Top-1/top-5/per-class accuracy of the images of `loader` against the class names."""
    from bigbatch.data import DataError
    from bigbatch.evaluate import build_zeroshot_classifier, zeroshot_classification

    classifier = build_zeroshot_classifier(bundle.model, bundle.tokenizer, classnames, templates,
                                           device, autocast)  # (D, C)
    try:
        metrics = zeroshot_classification(bundle.model, _progress(loader, "zero-shot"), classifier,
                                          device=device, autocast=autocast)
    except DataError:
        raise
    except ValueError as error:  # evaluate's words, about this data
        raise ConfigError(f"{name} {error}") from None
    per_class, counts = metrics.pop("zeroshot_per_class"), metrics.pop("zeroshot_class_samples")
    metrics["per_class"] = [{"label": i, "name": c, "accuracy": a if n else None, "samples": n}
                            for i, (c, a, n) in enumerate(zip(classnames, per_class, counts))]
    return metrics


def retrieval_eval(bundle, loader: Iterable, *, device, autocast) -> dict:
    """Image->text and text->image recall@1/5/10 over the pairs of `loader` (pair i matches i)."""
    from bigbatch.evaluate import evaluate

    return evaluate(bundle.model, _progress(loader, "retrieval"), device=device, autocast=autocast)


def imagenet_eval(bundle, args: argparse.Namespace, *, device, autocast) -> dict:
    """--imagenet-val / --imagenet-v2 exactly as training reports them (the peer's metric names)."""
    from bigbatch.imagenet import imagenet_zeroshot, open_trees

    trees = open_trees({"imagenet_val": args.imagenet_val, "imagenet_v2": args.imagenet_v2}, bundle.preprocess_val)
    metrics = imagenet_zeroshot(bundle.model, trees, bundle.tokenizer, device=device, autocast=autocast,
                                batch_size=args.batch_size, workers=args.workers)
    sizes = {f"{key}_samples": len(tree) for key, tree in trees.items()}
    return {"imagenet_val": args.imagenet_val, "imagenet_v2": args.imagenet_v2, **sizes, **metrics}


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
    for flag, zeroshot in (("--zeroshot-data", True), ("--retrieval-data", False)):
        if getattr(args, flag[2:].replace("-", "_")) is not None:  # columns and shards, before the model
            with _user_errors():
                check_data(data_spec(args, flag, zeroshot=zeroshot))
    classnames = templates = None
    if args.zeroshot_data is not None:
        _check_labelled(args)
        classnames = load_classnames(args.zeroshot_classnames, "--zeroshot-classnames")
        templates = load_templates(args.zeroshot_templates, "--zeroshot-templates")
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
        with _user_errors():
            data = make_data(data_spec(args, "--zeroshot-data", zeroshot=True), bundle.preprocess_val,
                             bundle.tokenizer)
            metrics = zeroshot_eval(bundle, data.loader, classnames, templates, device=device,
                                    autocast=autocast, name=f"--zeroshot-data {args.zeroshot_data}")
        results["zeroshot"] = {"dataset": args.zeroshot_data, "classnames": args.zeroshot_classnames,
                               "templates": args.zeroshot_templates, "num_classes": len(classnames),
                               "num_templates": len(templates), **metrics}
    if args.imagenet_val or args.imagenet_v2:
        results["imagenet"] = imagenet_eval(bundle, args, device=device, autocast=autocast)
    if args.retrieval_data is not None:
        with _user_errors():
            data = make_data(data_spec(args, "--retrieval-data", zeroshot=False), bundle.preprocess_val,
                             bundle.tokenizer)
            metrics = retrieval_eval(bundle, data.loader, device=device, autocast=autocast)
        results["retrieval"] = {"dataset": args.retrieval_data, **metrics}
    return results


def _check_labelled(args: argparse.Namespace) -> None:
    """A zero-shot CSV names its label column (shards carry .cls files)."""
    from bigbatch.data.factory import resolve_type

    with _user_errors():
        kind = resolve_type(data_spec(args, "--zeroshot-data", zeroshot=True))
    if kind == "csv" and args.csv_label_key is None:
        raise ConfigError(f"--zeroshot-data {args.zeroshot_data} is a CSV: name its column of integer "
                          "class ids with --csv-label-key COLUMN")


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
    inet = results.get("imagenet")
    if inet:
        from bigbatch.imagenet import METRIC_PREFIX, TEMPLATES

        for key, prefix in METRIC_PREFIX.items():
            if inet.get(key):
                lines += ["", f"{key.replace('_', '-'):<12}{inet[key]}: {inet[f'{key}_samples']} images, "
                              f"ImageNet's 1000 classes, templates {TEMPLATES}"]
                lines += [f"  {f'{prefix}-top{k}':<28}{_pct(inet[f'{prefix}-top{k}']):>8}" for k in (1, 5)]
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


def _check_writable(path: Path) -> None:
    """--output is checked before the evaluation, not after it: its folder is made (or
    exists) and takes a file of that name."""
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder: give a file name, e.g. {path / 'results.json'}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
        if not existed:
            path.unlink()  # written at the end: no empty file if the evaluation fails
    except OSError as error:
        raise ConfigError(f"--output {path}: cannot write it ({error.strerror}): give a writable path") from None


def write_json(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    return path
