"""open_clip models, their transforms and tokenizer, and the optimizer's parameter groups.

`--model` is any open_clip model name, a name of the small configs shipped here
(`bigbatch-tiny`, `bigbatch-small`: CPU-sized, for demos and tests), or a path to a
model config JSON (open_clip's format, or an `open_clip_config.json` holding
`model_cfg`).
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import open_clip
import torch
from torch import nn

from bigbatch.errors import ConfigError
from bigbatch.inputs import normalize_on_device, uint8_transform
from bigbatch.patch_embedding import use_matmul_patch_embedding_on

HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"  # open_clip's schemas
PACKAGED_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(PACKAGED_CONFIGS)
SIGLIP_INIT = dict(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)  # t = 10, b = -10 (Zhai et al. 2023)
BLOCK_LISTS = ("resblocks", "blocks", "layer", "layers")  # where towers keep their transformer blocks


@dataclass
class ModelBundle:
    model: nn.Module                 # returns open_clip's output dict
    preprocess_train: Callable       # PIL image -> (3, H, W) uint8 tensor, with augmentation
    preprocess_val: Callable         # (the model normalises uint8 images itself: bigbatch.inputs)
    tokenizer: Callable | None       # list[str] -> (n, context_length) long
    name: str                        # the open_clip config name


def create_model(model: str, *, pretrained: str | None = None, siglip: bool = False,
                 force_patch_dropout: float | None = None, grad_checkpointing: bool = False,
                 device: torch.device | str = "cpu", tokenizer: bool = True, **open_clip_options) -> ModelBundle:
    """Build an open_clip model (random init unless `pretrained` names a local checkpoint)
    whose transforms end in uint8 images and whose image tower normalises them.

    `open_clip_options` go to open_clip.create_model_and_transforms as they are (precision,
    force_image_size, image_mean, aug_cfg, cache_dir ...: see `open_clip_options`). On
    CUDA, patchifying stems run as one matrix product (bigbatch.patch_embedding). tokenizer=False:
    none is loaded (the bundle's is None), for callers that feed token ids themselves."""
    name = register_model_config(model)
    kwargs = dict(open_clip_options)
    if siglip:
        kwargs.update(SIGLIP_INIT)
    try:
        with hub_offline():
            net, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, output_dict=True,
                force_patch_dropout=force_patch_dropout, **kwargs)
    except Exception as error:  # the hub's offline errors have many types
        if name.startswith(HF_HUB):
            raise ConfigError(f"--model {model}: not in the local Hugging Face cache ({type(error).__name__}) "
                              f"and bigbatch does not download: fetch it once where there is internet "
                              f"(or pass --cache-dir), or save it and use local-dir:DIR") from None
        hint = hugging_face_error(model, name, error) or (unbuildable(name, error) if pretrained is None else None)
        if hint is not None:
            raise hint from None
        if isinstance(error, RuntimeError) and pretrained and "state_dict" in str(error):
            raise ConfigError(f"--pretrained {pretrained} does not fit --model {model}: "
                              f"pass the --model it was trained with") from None
        raise
    tokenize = load_tokenizer(model, name, kwargs.get("force_context_length"),
                              kwargs.get("cache_dir")) if tokenizer else None
    if pretrained is None and not name.startswith((HF_HUB, LOCAL_DIR)):  # those bring weights
        init_caption_projection(net)
    if grad_checkpointing:
        net.set_grad_checkpointing(True)
    use_matmul_patch_embedding_on(net, device)
    preprocess_train, mean, std = uint8_transform(preprocess_train)
    preprocess_val, val_mean, val_std = uint8_transform(preprocess_val)
    if mean is None:  # timm's training transform (use_timm) stays float: the val one says
        mean, std = val_mean, val_std
    if mean is not None:
        normalize_on_device(net.visual, mean, std)
    return ModelBundle(net, preprocess_train, preprocess_val, tokenize, name)


def load_tokenizer(model: str, name: str, context_length: int | None, cache_dir: str | None) -> Callable:
    """open_clip's tokenizer for the model. Those of SigLIP, NLLB, XLM-R ... are Hugging Face
    tokenizers: they need `transformers` and their files in the local cache."""
    try:
        with hub_offline():
            return open_clip.get_tokenizer(name, context_length=context_length, cache_dir=cache_dir)
    except Exception as error:
        if (hint := hugging_face_error(model, name, error)) is not None:
            raise hint from None
        raise


def hugging_face_error(model: str, name: str, error: Exception) -> ConfigError | None:
    """What to do when the Hugging Face part of the model (config `name`) cannot be built
    offline: a text tower such as RoBERTa's or NLLB's, a tokenizer such as SigLIP's. None for
    other errors, and for models without such a part."""
    text = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    if not (text.get("hf_model_name") or text.get("hf_tokenizer_name")):
        return None
    if isinstance(error, ImportError) or "pip install transformers" in str(error):
        return ConfigError(f"--model {model} has a Hugging Face text tower or tokenizer, which needs the "
                           f"transformers package: pip install transformers sentencepiece")
    if isinstance(error, (OSError, ValueError)):  # the hub's offline and missing-file errors
        return ConfigError(f"--model {model}: its Hugging Face files are not in the local cache "
                           f"({type(error).__name__}) and bigbatch does not download: load the model once "
                           f"where there is internet, then point HF_HOME at that cache")
    return None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
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


LOW_PRECISIONS = ("bf16", "fp16", "pure_bf16", "pure_fp16")  # open_clip casts the weights


def weights_precision(precision: str) -> str:
    """The precision open_clip builds the weights in: a low one it casts them to, else fp32
    (autocast's master weights)."""
    return precision if precision in LOW_PRECISIONS else "fp32"


def open_clip_options(cfg) -> dict:
    """TrainConfig's options that open_clip.create_model_and_transforms takes as they are."""
    size = cfg.force_image_size
    return dict(
        precision=weights_precision(cfg.precision),
        force_image_size=size[0] if size and len(size) == 1 else tuple(size) if size else None,
        force_context_length=cfg.force_context_length, force_quick_gelu=cfg.force_quick_gelu,
        force_custom_text=cfg.force_custom_text, pretrained_image=cfg.pretrained_image,
        image_mean=tuple(cfg.image_mean) if cfg.image_mean else None,
        image_std=tuple(cfg.image_std) if cfg.image_std else None,
        image_interpolation=cfg.image_interpolation, image_resize_mode=cfg.image_resize_mode,
        aug_cfg=open_clip.AugmentationCfg(**cfg.aug_cfg) if cfg.aug_cfg else None,
        cache_dir=cfg.cache_dir)


def use_bnb_linear(model: nn.Module, class_name: str) -> None:
    """--use-bnb-linear: open_clip's replace_linear with a bitsandbytes class (int8 etc.)."""
    import bitsandbytes
    from open_clip.utils import replace_linear
    replacement = getattr(bitsandbytes.nn.triton_based_modules, class_name, None)
    if replacement is None:
        raise ConfigError(f"--use-bnb-linear {class_name}: bitsandbytes.nn.triton_based_modules has "
                          f"no such class (e.g. SwitchBackLinear)")
    replace_linear(model, replacement)


def is_coca(model: nn.Module) -> bool:
    """A CoCa model: its outputs add caption logits and labels for the caption loss."""
    return isinstance(model, open_clip.CoCa)


def init_caption_projection(model: nn.Module) -> None:
    """open_clip's CoCa leaves its caption decoder's output projection as torch.empty
    (whatever memory held: zeros, garbage, NaN); give it the normal init it intends."""
    if is_coca(model):  # drawn on the CPU, as open_clip's own init: the same weights on any device
        projection = model.text_decoder.text_projection
        drawn = nn.init.normal_(torch.empty(projection.shape), std=projection.shape[0] ** -0.5)
        with torch.no_grad():
            projection.copy_(drawn)


USER_CONFIGS: dict[str, str] = {}  # config name -> the JSON file --model gave


def unbuildable(name: str, error: Exception) -> ConfigError | None:
    """A model config from the user's JSON file that open_clip cannot build (a value of the
    wrong type or range): one line naming the file. None for other models and errors."""
    if name in USER_CONFIGS and isinstance(error, (TypeError, ValueError, KeyError, AttributeError,
                                                   AssertionError)):
        return ConfigError(f"--model {USER_CONFIGS[name]}: open_clip cannot build this config "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
                           f"check its values against open_clip's model_configs")
    return None


def config_name(model: str) -> str:
    """The name open_clip knows `--model` by once registered (and a checkpoint records): a
    JSON file's stem, anything else as given."""
    return Path(model).stem if model.endswith(".json") else model


def register_model_config(model: str) -> str:
    """Resolve `--model` to an open_clip config name, registering a JSON file if given;
    `hf-hub:ORG/REPO` and `local-dir:DIR` pass as they are (open_clip reads them)."""
    if model.startswith(LOCAL_DIR) and not (Path(model[len(LOCAL_DIR):]) / "open_clip_config.json").is_file():
        raise ConfigError(f"--model {model}: no open_clip_config.json in that folder (give a folder "
                          f"holding open_clip_config.json and its weights)")
    if model.startswith((HF_HUB, LOCAL_DIR)):
        return model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"--model {model}: " + ("a folder, not a config file" if path.is_dir()
                                                      else "no such config file"))
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"--model {model}: not a readable JSON model config ({error}): give "
                              f"open_clip's format, e.g. its model_configs/ViT-B-32.json") from None
        if not isinstance(config, dict):
            raise ConfigError(f"--model {model}: a model config is a JSON object with embed_dim, "
                              f"vision_cfg and text_cfg, not a {type(config).__name__}")
        config = config.get("model_cfg", config)  # open_clip_config.json nests it
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - config.keys()
        if missing:
            raise ConfigError(f"--model {model}: a model config needs keys {sorted(missing)}")
        registry = Path(tempfile.mkdtemp(prefix="bigbatch-models-"))
        (registry / path.name).write_text(json.dumps(config))
        open_clip.add_model_config(registry)
        USER_CONFIGS[config_name(model)] = model
        return config_name(model)
    if model not in open_clip.list_models():
        raise ConfigError(f"unknown --model {model!r}: use a name from open_clip.list_models() "
                          f"(e.g. ViT-B-32), bigbatch-tiny, or a path to a model config JSON")
    return model


def lock_towers(model: nn.Module, *, image: bool, image_unlocked_groups: int = 0,
                image_freeze_bn_stats: bool = False, text: bool = False,
                text_unlocked_layers: int = 0, text_freeze_layer_norm: bool = False) -> tuple[int, ...]:
    """Freeze towers as open_clip_train does; returns the model-input positions (0 images,
    1 texts) of towers left with no trainable parameter, which pass 2 need not recompute."""
    if image:  # what CLIP's lock_image_tower does; CoCa has no such method
        model.visual.lock(unlocked_groups=image_unlocked_groups, freeze_bn_stats=image_freeze_bn_stats)
    if text:  # CustomTextCLIP and CoCa (not its decoder) lock through their text module
        lock = model.text.lock if isinstance(getattr(model, "text", None), nn.Module) else model.lock_text_tower
        try:
            lock(unlocked_layers=text_unlocked_layers, freeze_layer_norm=text_freeze_layer_norm)
        except AssertionError:  # open_clip's own text tower locks LayerNorm with its layers
            lock(unlocked_layers=text_unlocked_layers, freeze_layer_norm=True)
    towers = _tower_parameters(model)
    return tuple(i for i, params in enumerate(towers) if params and not any(p.requires_grad for p in params))


def set_frozen_towers_to_eval(model: nn.Module, frozen_inputs: tuple[int, ...]) -> None:
    """A frozen tower runs deterministically (no dropout, BatchNorm statistics fixed): it is
    embedded once per sample, so it must give the same features it would give again."""
    for module in _tower_modules(model, frozen_inputs):
        module.eval()


def _tower_modules(model: nn.Module, inputs: tuple[int, ...]) -> list[nn.Module]:
    text = [getattr(model, n) for n in ("text", "transformer", "token_embedding", "ln_final")
            if isinstance(getattr(model, n, None), nn.Module)]
    return ([model.visual] if 0 in inputs else []) + (text if 1 in inputs else [])


def _tower_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    image, text = [], []
    for name, param in model.named_parameters():
        if not name.startswith("logit_"):
            (image if name.startswith("visual.") else text).append(param)
    return image, text


def parameter_groups(model: nn.Module, weight_decay: float, *, layer_decay: float | None = None,
                     tower_lr_scale: tuple[float, float] = (1.0, 1.0)) -> list[dict]:
    """AdamW groups: decay matrices, spare gains, biases and the logit scale/bias (ndim < 2).

    Each group has an `lr_scale` (the schedule's lr is multiplied by it): the tower's
    scale (--lr-image / --lr-text relative to --lr) times, with --layer-decay, decay^(L+1-l)
    for layer l of a tower of L blocks (embeddings l = 0, heads l = L+1).
    """
    groups: dict[tuple[float, float], dict] = {}
    depths = _tower_depths(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "logit_scale" in name or "logit_bias" in name
        scale = 1.0
        if not name.startswith("logit_"):
            tower = 0 if name.startswith("visual.") else 1
            scale = tower_lr_scale[tower]
            if layer_decay is not None:
                depth = depths[tower]
                scale *= layer_decay ** (depth + 1 - _layer_id(name, depth))
        key = (0.0 if no_decay else weight_decay, scale)
        groups.setdefault(key, {"params": [], "weight_decay": key[0], "lr_scale": scale})
        groups[key]["params"].append(param)
    return list(groups.values())


def _tower_depths(model: nn.Module) -> tuple[int, int]:
    names = [n for n, _ in model.named_parameters()]
    return (len({_block_index(n) for n in names if n.startswith("visual.") and _block_index(n) is not None}),
            len({_block_index(n) for n in names if not n.startswith("visual.") and _block_index(n) is not None}))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The towers' transformer blocks, the units grad checkpointing recomputes and FSDP2
    shards: the numbered members of a block list (open_clip's `resblocks`, timm's `blocks`,
    Hugging Face's `layer`), outermost only."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if _block_index(name) is not None and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def _block_index(name: str) -> int | None:
    """i for a name inside block i of a block list (...resblocks.{i}...), else None."""
    parts = name.split(".")
    for marker in BLOCK_LISTS:
        if marker in parts:
            i = parts.index(marker) + 1
            if i < len(parts) and parts[i].isdigit():
                return int(parts[i])
    return None


EMBEDDINGS = ("class_embedding", "positional_embedding", "conv1", "ln_pre", "token_embedding",
              "patch_embed", "cls_token", "pos_embed")  # open_clip's and timm's names


def _layer_id(name: str, depth: int) -> int:
    """0 for embeddings (before the blocks), i+1 for block i, depth+1 for what follows."""
    block = _block_index(name)
    if block is not None:
        return block + 1
    short = name.removeprefix("visual.").removeprefix("trunk.")
    return 0 if short.split(".")[0] in EMBEDDINGS else depth + 1


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper."""
    return getattr(model, "module", model)
