"""Built-in class names and prompt templates for zero-shot classification.

The data files sit next to this module, one entry per line:

- ``imagenet_classnames.txt``: the 1000 ImageNet-1k classes in label order, with the
  cleaned-up names of OpenAI's CLIP notebook (as open_clip ships them);
- ``openai_templates.txt``: the 80 prompt templates of the CLIP paper;
- ``simple_templates.txt``: the 7-template subset open_clip calls "simple".

Templates are ``str.format`` strings: ``"a photo of a {}."``. ``--classnames`` and
``--templates`` take either one of these names or a path to a file of the same form.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from bigbatch.errors import ConfigError
from bigbatch.evaluate import load_lines

CLASSNAMES = {"imagenet": "imagenet_classnames.txt"}
TEMPLATES = {"openai": "openai_templates.txt", "simple": "simple_templates.txt"}


def _read(filename: str) -> list[str]:
    text = resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def builtin_classnames(name: str) -> list[str]:
    """The class names of a built-in set, in label order (``"imagenet"``)."""
    if name not in CLASSNAMES:
        raise ConfigError(f"unknown built-in class names {name!r}: choose one of {sorted(CLASSNAMES)} "
                          f"or pass a text file with one class name per line")
    return _read(CLASSNAMES[name])


def builtin_templates(name: str) -> list[str]:
    """The prompt templates of a built-in set (``"openai"``: 80, ``"simple"``: 7)."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown built-in templates {name!r}: choose one of {sorted(TEMPLATES)} "
                          f"or pass a text file with one template per line, '{{}}' marking the class name")
    return _read(TEMPLATES[name])


def load_classnames(value: str, flag: str = "--classnames") -> list[str]:
    """A built-in set's name or a file of class names (one per line, in label order)."""
    return _load(value, flag, CLASSNAMES, builtin_classnames, "class name")


def load_templates(value: str, flag: str = "--templates") -> list[str]:
    """A built-in set's name or a file of templates; each must contain '{}' exactly once
    (a template without it would give every class the same prompt)."""
    templates = _load(value, flag, TEMPLATES, builtin_templates, "template, '{}' marking the class name,")
    for template in templates:
        try:
            ok = template.count("{}") == 1 and template.format("\0") == template.replace("{}", "\0")
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{flag} {value}: template {template!r} must contain '{{}}' exactly once "
                              "(where the class name goes) and no other braces")
    return templates


def _load(value: str, flag: str, builtins: dict, builtin, what: str) -> list[str]:
    path = Path(value)
    if path.is_file():
        try:
            return load_lines(path)
        except (ValueError, UnicodeDecodeError) as error:
            raise ConfigError(f"{flag} {error}") from None
    if value in builtins:
        return builtin(value)
    if path.suffix or "/" in value or "\\" in value:  # meant as a file
        raise ConfigError(f"{flag} {value}: no such file (give a text file with one {what} per line, "
                          f"or a built-in set: {', '.join(sorted(builtins))})")
    raise ConfigError(f"{flag} {value!r}: not a built-in set ({', '.join(sorted(builtins))}) "
                      f"and no such file: pass one of those names or a text file with one {what} per line")
