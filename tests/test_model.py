"""Parameter groups (weight decay, layer-wise lr decay, tower lr) and tower locking."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bigbatch.errors import ConfigError
from bigbatch.model import create_model, lock_towers, parameter_groups, register_model_config
from tiny_models import open_clip_vit


def scales_by_name(model, **kwargs):
    groups = parameter_groups(model, 0.1, **kwargs)
    return {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_no_weight_decay_on_gains_biases_and_logit_scale():
    model = open_clip_vit(siglip=True)
    scales = scales_by_name(model)
    named = dict(model.named_parameters())
    for name in ("logit_scale", "logit_bias", "visual.ln_pre.weight", "ln_final.bias"):
        assert scales[id(named[name])][1] == 0.0, name
    assert scales[id(named["visual.conv1.weight"])][1] == 0.1


def test_layer_decay_and_tower_lr():
    model = open_clip_vit()  # 2 blocks per tower
    scales = scales_by_name(model, layer_decay=0.5, tower_lr_scale=(1.0, 0.1))
    named = dict(model.named_parameters())
    expected = {
        "visual.conv1.weight": 0.5 ** 3,                      # embeddings: layer 0
        "visual.transformer.resblocks.0.mlp.c_fc.weight": 0.5 ** 2,
        "visual.transformer.resblocks.1.mlp.c_fc.weight": 0.5,
        "visual.proj": 1.0,                                   # head: layer L + 1
        "token_embedding.weight": 0.1 * 0.5 ** 3,
        "transformer.resblocks.1.attn.in_proj_weight": 0.1 * 0.5,
        "text_projection": 0.1,
        "logit_scale": 1.0,
    }
    for name, scale in expected.items():
        assert scales[id(named[name])][0] == pytest.approx(scale), name


def test_lock_towers_reports_fully_frozen_inputs():
    assert lock_towers(open_clip_vit(), image=True) == (0,)
    assert lock_towers(open_clip_vit(), image=True, image_unlocked_groups=1) == ()
    assert lock_towers(open_clip_vit(), image=False, text=True) == (1,)


def test_unknown_model_and_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown --model"):
        create_model("ViT-Nope")
    bad = tmp_path / "cfg.json"
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(ConfigError, match="needs keys"):
        create_model(str(bad))
    for text, message in (("not json", "not a readable JSON model config"), ("", "not a readable JSON"),
                          ("[1, 2]", "a JSON object .* not a list"),
                          ('{"embed_dim": "abc", "vision_cfg": {}, "text_cfg": {}}', "open_clip cannot build")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            create_model(str(bad))
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        create_model(str(tmp_path / "folder.json"))


def test_a_damaged_weights_file_is_named_as_such(tmp_path):
    """Empty, cut short or not weights at all: one line that says the file may be damaged,
    not only that it is another model's."""
    import bigbatch.weights as weights_module

    config = str(Path(__file__).parent / "assets" / "test-clip.json")
    name = register_model_config(config)
    good = tmp_path / "weights.pt"
    torch.save(create_model(config).model.state_dict(), good)
    empty, cut, text = tmp_path / "empty.pt", tmp_path / "cut.pt", tmp_path / "text.pt"
    empty.write_bytes(b"")
    cut.write_bytes(good.read_bytes()[:2000])
    text.write_text("hello")
    with pytest.raises(ConfigError, match="is an empty file"):
        weights_module.resolve_weights(str(empty), name)
    for path in (cut, text):
        with pytest.raises(ConfigError, match="or is damaged"):
            weights_module.load_model(config, weights_module.resolve_weights(str(path), name), "cpu")
        with pytest.raises(ConfigError, match="torch cannot read it"):
            weights_module.checkpoint_model(str(path))


def hf_tokenized_config(tmp_path: Path) -> str:
    """The test model with a Hugging Face tokenizer named in its text config (as SigLIP's,
    NLLB's ... are); the repository does not exist, so no cache can hold it."""
    config = json.loads((Path(__file__).parent / "assets" / "test-clip.json").read_text())
    config["text_cfg"]["hf_tokenizer_name"] = "bigbatch-tests/no-such-tokenizer"
    path = tmp_path / "hf-tokenized.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_a_hugging_face_tokenizer_without_transformers_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match="pip install transformers"):
        create_model(hf_tokenized_config(tmp_path))
    assert create_model(hf_tokenized_config(tmp_path), tokenizer=False).tokenizer is None  # the planner's


def test_a_hugging_face_tokenizer_not_in_the_cache_says_so(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="not in the local cache"):
        create_model(hf_tokenized_config(tmp_path))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: an illegal memory access was encountered")])
@pytest.mark.parametrize("pretrained", [False, True])
def test_a_device_failing_while_loading_is_not_blamed_on_the_weights(tmp_path, monkeypatch, error, pretrained):
    """Building on the GPU can run out of memory or meet a driver error: that error, as it
    is, and not '--pretrained does not fit --model'."""
    import bigbatch.weights as weights_module

    config = str(Path(__file__).parent / "assets" / "test-clip.json")
    name = register_model_config(config)
    checkpoint = tmp_path / "weights.pt"
    torch.save(create_model(config).model.state_dict(), checkpoint)
    weights = weights_module.resolve_weights(str(checkpoint) if pretrained else None, name)

    def failing(*args, **kwargs):
        raise error
    monkeypatch.setattr(weights_module, "create_model", failing)
    with pytest.raises(type(error), match="CUDA"):
        weights_module.load_model(config, weights, "cpu")


@pytest.mark.parametrize("conv_dtype, other_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_uint8_images_are_normalised_into_the_first_convolutions_dtype(conv_dtype, other_dtype):
    """float32 under autocast even beside a low-precision layer; bf16 where open_clip's bf16
    cast the convolutions but left a LayerNorm (listed first) in float32."""
    from torch import nn

    from bigbatch.inputs import normalize_on_device
    tower = nn.Module()
    tower.norm = nn.LayerNorm(4).to(other_dtype)  # registered before the convolution
    tower.conv = nn.Conv2d(3, 4, 2, stride=2).to(conv_dtype)
    tower.forward = lambda images: tower.conv(images)
    seen = []
    tower.conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    normalize_on_device(tower, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    tower(torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8))
    assert seen == [conv_dtype]
