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

The steps are `bigbatch.checkpoint.export_weights`; this module is the command.

The result loads with `open_clip.create_model_and_transforms(MODEL, pretrained=OUT)`.

torch and open_clip are imported inside the functions that use them: `bigbatch export
--help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bigbatch.flags import Parser


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
    state, model = result.state_dict, result.model
    n_params = sum(t.numel() for t in state.values() if t.is_floating_point())
    which = "EMA weights" if args.ema else "weights"
    print(f"wrote {args.output}: {which} of model {model or '(unknown)'}, {len(state)} tensors, "
          f"{n_params / 1e6:.2f} M values" + (f", step {result.step}" if result.step is not None else ""))
    if result.ema_state_dict is not None and not args.ema:
        print("note: the checkpoint also holds EMA weights; --ema exports those instead")
    if model:
        print(f"load it with: open_clip.create_model_and_transforms({model!r}, pretrained={str(args.output)!r})")
        from bigbatch.model import PACKAGED_CONFIGS
        if (PACKAGED_CONFIGS / f"{model}.json").is_file():  # bigbatch's own: unknown to plain open_clip
            print(f"note: {model!r} is bigbatch's config: first `import bigbatch.model` (it registers it), or "
                  f"open_clip.add_model_config({str(PACKAGED_CONFIGS / (model + '.json'))!r})")
        elif model not in open_clip.list_models():
            print(f"note: open_clip knows {model!r} only once its config is registered: "
                  "open_clip.add_model_config(PATH_TO_ITS_JSON)")
        elif "logit_bias" in state and not _config(model).get("init_logit_bias"):
            print("note: these weights have a logit_bias (trained with --siglip) that the config of "
                  f"{model!r} lacks: pass init_logit_bias=-10.0 to create_model_and_transforms as well")
    return 0


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, ema: bool = False):
    """Write the plain weights of `checkpoint` to `output` (bigbatch.checkpoint.export_weights),
    scalars shaped as the model the checkpoint records has them; returns the Checkpoint,
    its `state_dict` the weights written."""
    from bigbatch.checkpoint import export_weights

    return export_weights(checkpoint, output, ema=ema, scalar_shape=_scalar_shape)


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
