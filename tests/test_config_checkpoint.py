import pytest
import torch

from napari_m3hl.io.checkpoint import check_compatible, load_checkpoint, load_model, make_payload, save_checkpoint
from napari_m3hl.config import TrainConfig, list_presets, load_preset
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.method.networks import UNet2D


def test_presets_and_variants():
    assert {"acdc_unet2d", "la_vnet3d"} <= set(list_presets())
    paper = load_preset("acdc_unet2d", "paper")
    ref = load_preset("acdc_unet2d", "reference")
    assert (paper.lr, paper.lam, paper.low_tap, paper.mix_weight) == (1e-3, 0.5, "low_enc", 1.0)
    assert (ref.lr, ref.low_tap, ref.teacher_init, ref.teacher_mode, ref.mix_weight) == (0.01, "low_dec", "independent", "train", 0.5)
    assert paper.patch_size == (256, 256) and paper.block_size == (64, 64) and paper.batch_size == 24
    la = load_preset("la_vnet3d", "reference")
    assert la.patch_size == (112, 112, 80) and la.block_size == (28, 28, 20) and la.lr_schedule == "step"
    over = load_preset("acdc_unet2d", iterations=5, lr=None)
    assert over.iterations == 5 and over.lr == load_preset("acdc_unet2d").lr


def test_bad_settings():
    with pytest.raises(M3HLInputError, match="multiple of 4"):
        load_preset("acdc_unet2d", batch_size=6)
    with pytest.raises(M3HLInputError, match="no variant"):
        load_preset("acdc_unet2d", "nope")
    with pytest.raises(M3HLInputError, match="not found"):
        load_preset("missing_preset")
    with pytest.raises(M3HLInputError, match="unknown training settings"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(M3HLInputError, match="aug_scale and aug_gamma .* >= 0, got -0.2, 0.0"):
        TrainConfig(aug_scale=-0.2).validate()
    with pytest.raises(M3HLInputError, match="m3hl_lr_scale .* must be > 0, got 0"):
        TrainConfig(m3hl_lr_scale=0).validate()


def test_checkpoint_roundtrip_weights_only(tmp_path):
    cfg = TrainConfig()
    net = UNet2D()
    path = save_checkpoint(tmp_path / "c.pt", make_payload(cfg, net, net, iteration=12))
    ckpt = load_checkpoint(path)  # weights_only=True inside
    assert ckpt["iteration"] == 12 and ckpt["class_names"] == list(cfg.class_names)
    model, _ = load_model(path)
    for a, b in zip(model.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    half = save_checkpoint(tmp_path / "h.pt", make_payload(cfg, net, half=True))
    assert half.stat().st_size < path.stat().st_size * 0.6
    m2, _ = load_model(half)
    assert next(m2.parameters()).dtype == torch.float32


def test_checkpoint_errors(tmp_path):
    with pytest.raises(M3HLInputError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(M3HLInputError, match="could not be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(M3HLInputError, match="not an M³HL checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    ckpt = make_payload(TrainConfig(), UNet2D())
    with pytest.raises(M3HLInputError, match="predicts 4 classes"):
        check_compatible(ckpt, "unet2d", 2)
    with pytest.raises(M3HLInputError, match="unet2d model"):
        check_compatible(ckpt, "vnet3d", 4)
