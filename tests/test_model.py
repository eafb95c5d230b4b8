"""Parameter groups (weight decay, layer-wise lr decay, tower lr) and tower locking."""

from __future__ import annotations

import pytest

from bigbatch.errors import ConfigError
from bigbatch.model import create_model, lock_towers, parameter_groups
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
