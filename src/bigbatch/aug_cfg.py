"""--aug-cfg: the keys and values of open_clip's AugmentationCfg, checked before a loader
worker would meet them (an unknown key or a value of the wrong type fails there, mid-run)."""

from __future__ import annotations

import difflib
from dataclasses import fields

from bigbatch.errors import ConfigError


def check_aug_cfg(aug_cfg: dict) -> None:
    """Keys are open_clip's AugmentationCfg fields: a typo stops here, not in a worker."""
    from open_clip import AugmentationCfg
    known = [f.name for f in fields(AugmentationCfg)]
    for key in aug_cfg:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"--aug-cfg {key}=...: unknown key{hint}; open_clip's "
                              f"AugmentationCfg has {', '.join(known)}")
        expected = AUG_CFG_VALUES.get(key)
        if expected and not expected[0](aug_cfg[key]):
            raise ConfigError(f"--aug-cfg {key}={aug_cfg[key]!r}: {key} takes {expected[1]}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(*lengths: int):
    return lambda value: isinstance(value, (tuple, list)) and len(value) in lengths and all(map(_number, value))


# what open_clip's transforms read in each AugmentationCfg field (a wrong type fails in a worker)
AUG_CFG_VALUES = {
    "scale": (_numbers(2), "two numbers, e.g. scale='(0.5, 1.0)'"),
    "ratio": (lambda v: v is None or _numbers(2)(v), "two numbers, e.g. ratio='(0.75, 1.33)'"),
    "color_jitter": (lambda v: v is None or _number(v) or _numbers(3, 4)(v), "a number, or 3 or 4 numbers"),
    "re_prob": (lambda v: v is None or _number(v), "a probability, e.g. 0.25"),
    "re_count": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "a whole number"),
    "use_timm": (lambda v: isinstance(v, bool), "True or False"),
    "color_jitter_prob": (lambda v: v is None or _number(v), "a probability, e.g. 0.8"),
    "gray_scale_prob": (lambda v: v is None or _number(v), "a probability, e.g. 0.2"),
}
