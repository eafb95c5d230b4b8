"""`bigbatch export CKPT OUT.pt [--ema]`: a training checkpoint -> a plain open_clip weights file.

A bigbatch checkpoint already loads in open_clip (its `state_dict` key is what
open_clip's loader looks for), but it also carries the optimizer state (twice the
weights again, for AdamW), the run's config and RNG states. The exported file holds
the model's weights only:

1. take `state_dict` (or, with --ema, `ema_state_dict`: the averaged weights that
   training evaluates when `--ema-decay` is on);
2. strip wrapper prefixes: `module.` (DDP, timm's EMA) and `_orig_mod.` (torch.compile);
3. give 1-element `logit_scale` / `logit_bias` the shape of the open_clip model (FSDP2
   training stores them as (1,); open_clip's loader reshapes them, a plain
   `model.load_state_dict` does not);
4. write atomically: a `.safetensors` name gives a safetensors file, anything else `torch.save`.

The result loads with `open_clip.create_model_and_transforms(MODEL, pretrained=OUT)`.

torch and open_clip are imported inside the functions that use them: `bigbatch export
--help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bigbatch.config import ConfigError
from bigbatch.flags import Parser

if TYPE_CHECKING:
    import torch

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SCALARS = ("logit_scale", "logit_bias")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bigbatch export",
        description="Write the weights of a bigbatch (or open_clip_train) checkpoint as a plain "
                    "open_clip file: open_clip.create_model_and_transforms(MODEL, pretrained=OUT).")
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint to export (e.g. logs/RUN/checkpoints/epoch_latest.pt)")
    parser.add_argument("output", metavar="OUT", help="file to write: OUT.pt (torch.save) or OUT.safetensors")
    parser.add_argument("--ema", action="store_true",
                        help="export the exponential moving average of the weights (ema_state_dict; "
                             "training with --ema-decay keeps it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import open_clip

    result = export_checkpoint(args.checkpoint, args.output, ema=args.ema)
    state, model = result["state_dict"], result["model"]
    n_params = sum(t.numel() for t in state.values() if t.is_floating_point())
    which = "EMA weights" if args.ema else "weights"
    print(f"wrote {args.output}: {which} of model {model or '(unknown)'}, {len(state)} tensors, "
          f"{n_params / 1e6:.2f} M values" + (f", step {result['step']}" if result.get("step") is not None else ""))
    if result["has_ema"] and not args.ema:
        print("note: the checkpoint also holds EMA weights; --ema exports those instead")
    if model:
        print(f"load it with: open_clip.create_model_and_transforms({model!r}, pretrained={str(args.output)!r})")
        if model not in open_clip.list_models():
            print(f"note: open_clip knows {model!r} only once its config is registered: `import bigbatch.model` "
                  "registers bigbatch's own configs, open_clip.add_model_config(DIR) any other JSON")
        elif "logit_bias" in state and not _config(model).get("init_logit_bias"):
            print("note: these weights have a logit_bias (trained with --siglip) that the config of "
                  f"{model!r} lacks: pass init_logit_bias=-10.0 to create_model_and_transforms as well")
    return 0


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, ema: bool = False) -> dict:
    """Write the plain weights of `checkpoint` to `output`; returns what was written:
    `state_dict`, `model` (the open_clip config name, or None), `step`, `has_ema`."""
    from bigbatch.checkpoint import load_checkpoint, save_checkpoint

    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and checkpoint.exists() and os.path.samefile(output, checkpoint):
        raise ConfigError(f"export would overwrite its input {checkpoint}: pick another OUT path")
    state = load_checkpoint(checkpoint)
    has_ema = "ema_state_dict" in state
    if ema and not has_ema:
        raise ConfigError(f"checkpoint {checkpoint} holds no EMA weights (no 'ema_state_dict'; train with "
                          "--ema-decay to keep them): drop --ema to export the trained weights")
    weights = state["ema_state_dict"] if ema else state["state_dict"]
    model = state.get("model") if isinstance(state.get("model"), str) else None
    weights = plain_state_dict(weights, model)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".safetensors":
        _save_safetensors(weights, output)
    else:
        save_checkpoint(weights, output)
    return {"state_dict": weights, "model": model, "step": state.get("step"), "has_ema": has_ema}


def plain_state_dict(state_dict: dict[str, torch.Tensor], model: str | None = None) -> dict[str, torch.Tensor]:
    """Weights under open_clip's own key names, scalars shaped as the model `model` has them."""
    import torch

    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConfigError("the checkpoint's weights are not a dict of tensors: it is not a bigbatch "
                          "or open_clip training checkpoint")
    plain = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):  # DDP(compile(model)) nests both
            key = next(key.removeprefix(p) for p in WRAPPER_PREFIXES if key.startswith(p))
        plain[key] = value
    shape = _scalar_shape(model)
    for key in SCALARS:
        if shape is not None and key in plain and plain[key].numel() == 1:
            plain[key] = plain[key].reshape(shape)
    return plain


def _config(model: str) -> dict:
    import open_clip

    return open_clip.get_model_config(model) or {}


def _scalar_shape(model: str | None) -> tuple[int, ...] | None:
    """() for open_clip's default scalar logit_scale/bias, (1,) with `nonscalar_logit_scale`;
    None when the model's config is unknown (then the tensors are left as they are)."""
    import open_clip

    if not model or model not in open_clip.list_models():
        return None
    return (1,) if _config(model).get("nonscalar_logit_scale") else ()


def _save_safetensors(weights: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file  # installed with open_clip (and timm)

    tmp = path.with_name(f".{path.name}.tmp")
    # safetensors refuses tensors that share memory or are not contiguous
    save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, str(tmp))
    os.replace(tmp, path)
