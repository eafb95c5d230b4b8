"""`bigbatch export`: a training checkpoint -> weights open_clip loads, giving the same embeddings."""

from pathlib import Path

import open_clip
import pytest
import torch
from torch.testing import assert_close

from bigbatch import export
from bigbatch.checkpoint import save_checkpoint
from bigbatch.errors import ConfigError
from bigbatch.model import create_model, register_model_config

CONFIG = Path(__file__).parent / "assets" / "test-clip.json"
NAME = "test-clip"


@pytest.fixture(scope="module")
def trained():
    """A tiny model with weights no fresh initialisation reproduces."""
    register_model_config(str(CONFIG))
    torch.manual_seed(0)
    bundle = create_model(str(CONFIG))
    with torch.no_grad():
        for param in bundle.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        bundle.model.logit_scale.fill_(3.0)
    return bundle.model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g)
    texts = open_clip.get_tokenizer(NAME)(["a cat", "a red square", "two dogs", "nothing at all"])
    return images, texts


@torch.no_grad()
def _embed(model):
    images, texts = _inputs()
    model.eval()
    return model.encode_image(images), model.encode_text(texts), model.logit_scale.detach().clone()


def _checkpoint(model, path, **extra):
    state = {"state_dict": model.state_dict(), "optimizer": {}, "step": 1, "epoch": 1,
             "model": NAME, "config": {}, **extra}
    return save_checkpoint(state, path)


def _open_clip_load(path):
    model, _, _ = open_clip.create_model_and_transforms(NAME, pretrained=str(path))
    return model


def test_open_clip_loads_checkpoint_and_export_with_same_embeddings(trained, tmp_path, capsys):
    ckpt = _checkpoint(trained, tmp_path / "epoch_1.pt")
    out = tmp_path / "exported" / "test-clip.pt"
    assert export.main([str(ckpt), str(out)]) == 0
    expected = _embed(trained)
    for path in (ckpt, out):  # (a) the checkpoint as it is, (b) the exported file
        for got, want in zip(_embed(_open_clip_load(path)), expected):
            assert_close(got, want)
    exported = torch.load(out, weights_only=True)
    assert exported.keys() == trained.state_dict().keys()  # weights only: no optimizer, step, config
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "create_model_and_transforms('test-clip'" in printed


def test_export_strips_ddp_prefix_and_reshapes_scalars(trained, tmp_path):
    # as DDP (module.) and FSDP2 (logit_scale of shape (1,)) training would save it
    wrapped = {f"module.{k}": (v.reshape(1) if k == "logit_scale" else v) for k, v in trained.state_dict().items()}
    ckpt = save_checkpoint({"state_dict": wrapped, "optimizer": {}, "step": 3, "epoch": 1,
                            "model": NAME, "config": {}}, tmp_path / "ddp.pt")
    out = tmp_path / "plain.pt"
    export.main([str(ckpt), str(out)])
    exported = torch.load(out, weights_only=True)
    assert not any(k.startswith("module.") for k in exported)
    assert exported["logit_scale"].shape == trained.logit_scale.shape == ()
    fresh = create_model(str(CONFIG)).model
    fresh.load_state_dict(exported)  # strict, without open_clip's reshaping
    for got, want in zip(_embed(fresh), _embed(trained)):
        assert_close(got, want)


def test_export_ema_weights(trained, tmp_path, capsys):
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in trained.state_dict().items()}
    ckpt = _checkpoint(trained, tmp_path / "ema.pt", ema_state_dict=ema)
    out = tmp_path / "ema_out.pt"
    export.main([str(ckpt), str(out), "--ema"])
    for key, value in torch.load(out, weights_only=True).items():
        assert_close(value, ema[key])
    export.main([str(ckpt), str(tmp_path / "live.pt")])  # without --ema: the trained weights, and a hint
    assert_close(torch.load(tmp_path / "live.pt", weights_only=True)["logit_scale"], trained.logit_scale.detach())
    assert "--ema exports those" in capsys.readouterr().out


def test_export_safetensors_loads_in_open_clip(trained, tmp_path):
    ckpt = _checkpoint(trained, tmp_path / "c.pt")
    out = tmp_path / "model.safetensors"
    export.main([str(ckpt), str(out)])
    for got, want in zip(_embed(_open_clip_load(out)), _embed(trained)):
        assert_close(got, want)


def test_export_errors(trained, tmp_path):
    ckpt = _checkpoint(trained, tmp_path / "c.pt")
    with pytest.raises(ConfigError, match="no EMA weights.*drop --ema"):
        export.main([str(ckpt), str(tmp_path / "o.pt"), "--ema"])
    with pytest.raises(ConfigError, match="overwrite its input"):
        export.main([str(ckpt), str(ckpt)])
    with pytest.raises(ConfigError, match="missing.pt: no such file"):
        export.main([str(tmp_path / "missing.pt"), str(tmp_path / "o.pt")])
    with pytest.raises(ConfigError, match="a folder, not a checkpoint file"):
        export.main([str(tmp_path), str(tmp_path / "o.pt")])
    with pytest.raises(ConfigError, match="is a folder: give a file name"):
        export.main([str(ckpt), str(tmp_path)])
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="no 'state_dict'"):
        export.main([str(tmp_path / "foreign.pt"), str(tmp_path / "o.pt")])
