"""Tests for napari_m3hl.method.augment."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_m3hl.method.augment import augment_2d, augment_scale_gamma, prepare_batch_2d, prepare_batch_3d, resize_2d


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rot90/flip variants of the last two axes."""
    out = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        out += [r, torch.flip(r, dims=(-1,))]
    return out


def _pattern(h: int = 32, w: int = 32):
    img = torch.arange(h * w, dtype=torch.float32).reshape(h, w) / (h * w)
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[2:10, 3:20] = 1
    lab[12:30, 5:9] = 2
    lab[20:25, 18:30] = 3
    return img, lab


def test_prepare_batch_2d_shapes_and_types():
    rng = np.random.default_rng(0)
    samples = [(rng.random((h, w)).astype(np.float32), rng.integers(0, 4, (h, w)).astype(np.uint8))
               for h, w in [(40, 30), (25, 50), (64, 64)]]
    g = torch.Generator().manual_seed(0)
    img, lab = prepare_batch_2d(samples, size=(48, 48), generator=g)
    assert img.shape == (3, 1, 48, 48) and img.dtype == torch.float32
    assert lab.shape == (3, 48, 48) and lab.dtype == torch.int64
    assert set(lab.unique().tolist()) <= {0, 1, 2, 3}

    img, lab = prepare_batch_2d([(s[0], None) for s in samples], size=(32, 40), generator=g)
    assert img.shape == (3, 1, 32, 40) and lab is None
    with pytest.raises(ValueError, match="mix"):
        prepare_batch_2d([samples[0], (samples[1][0], None)], size=(32, 32))


def test_rot90_flip_of_known_pattern_and_consistency():
    img, lab = _pattern()
    b = 64
    g = torch.Generator().manual_seed(1)
    out_img, out_lab = augment_2d(img.expand(b, 1, 32, 32).clone(), lab.expand(b, 32, 32).clone(),
                                  size=(32, 32), generator=g)
    variants_img, variants_lab = _dihedral(img), _dihedral(lab)
    exact, kinds = 0, set()
    for i in range(b):
        hits = [j for j, v in enumerate(variants_img) if torch.equal(out_img[i, 0], v)]
        if hits:
            exact += 1
            kinds.add(hits[0])
            # the label got the same transform as the image
            assert torch.equal(out_lab[i], variants_lab[hits[0]])
    # rot90/flip (p=0.5) and unchanged (p=0.25) are exact; small rotations (p=0.25) are not
    assert 0.5 * b <= exact <= 0.95 * b
    assert len(kinds) >= 5


def test_labels_stay_in_class_set_after_rotation():
    img, lab = _pattern(40, 30)
    b = 48
    g = torch.Generator().manual_seed(2)
    out_img, out_lab = augment_2d(img.expand(b, 1, 40, 30).clone(), lab.expand(b, 40, 30).clone(),
                                  size=(64, 64), generator=g)
    assert out_lab.dtype == torch.int64
    assert set(out_lab.unique().tolist()) <= {0, 1, 2, 3}
    assert out_img.shape == (b, 1, 64, 64)
    assert torch.isfinite(out_img).all()
    # rotated samples keep roughly the class areas (no label smearing)
    ref = resize_2d(img[None, None], lab[None], (64, 64))[1][0]
    for c in (1, 2, 3):
        areas = (out_lab == c).flatten(1).sum(1).float()
        assert torch.all((areas - (ref == c).sum()).abs() <= 0.35 * (ref == c).sum())


def test_determinism_with_seeded_generator():
    img, lab = _pattern()
    x, y = img.expand(16, 1, 32, 32).clone(), lab.expand(16, 32, 32).clone()
    a = augment_2d(x, y, size=(32, 32), generator=torch.Generator().manual_seed(5))
    b = augment_2d(x, y, size=(32, 32), generator=torch.Generator().manual_seed(5))
    c = augment_2d(x, y, size=(32, 32), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_nearest_image_interp_keeps_values():
    img, _ = _pattern()
    allowed = set(img.flatten().tolist()) | {0.0}

    def n_pure(interp: str) -> int:
        out, lab = augment_2d(img.expand(16, 1, 32, 32).clone(), None, size=(64, 64),
                              generator=torch.Generator().manual_seed(0), image_interp=interp)
        assert out.shape == (16, 1, 64, 64) and lab is None
        return sum(set(out[i, 0].flatten().tolist()) <= allowed for i in range(16))

    # nearest resize of rot/flip or unchanged samples only reuses input values
    assert n_pure("nearest") >= 8
    assert n_pure("bilinear") == 0
    with pytest.raises(ValueError):
        augment_2d(img[None, None], None, size=(8, 8), image_interp="cubic")


def test_prepare_batch_3d_shapes_and_content():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 2, (30, 28, 20)).astype(np.uint8)
    small = rng.integers(0, 2, (10, 12, 6)).astype(np.uint8)
    samples = [(big.astype(np.float32) * 2.0, big), (small.astype(np.float32) * 2.0, small)]
    g = torch.Generator().manual_seed(0)
    img, lab = prepare_batch_3d(samples, patch=(16, 16, 8), generator=g)
    assert img.shape == (2, 1, 16, 16, 8) and img.dtype == torch.float32
    assert lab.shape == (2, 16, 16, 8) and lab.dtype == torch.int64
    # image and label got the same rot/flip/crop
    assert torch.equal(img[:, 0], lab.float() * 2.0)
    # the small volume is zero-padded: its voxel count of ones is preserved
    assert int(lab[1].sum()) == int(small.sum())
    img_u, lab_u = prepare_batch_3d([(s[0], None) for s in samples], patch=(16, 16, 8), generator=g)
    assert img_u.shape == (2, 1, 16, 16, 8) and lab_u is None
    a = prepare_batch_3d(samples, (16, 16, 8), torch.Generator().manual_seed(3))
    b = prepare_batch_3d(samples, (16, 16, 8), torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_prepare_batch_3d_crop_is_block_of_transformed_volume():
    vol = np.arange(12 * 10 * 6, dtype=np.float32).reshape(12, 10, 6)
    img, _ = prepare_batch_3d([(vol, None)], patch=(8, 8, 4), generator=torch.Generator().manual_seed(4))
    crop = img[0, 0].numpy()
    found = False
    for k in range(4):
        for axis in (0, 1):
            t = np.flip(np.rot90(vol, k, axes=(0, 1)), axis=axis)
            for x in range(t.shape[0] - 7):
                for y in range(t.shape[1] - 7):
                    for z in range(3):
                        found |= np.array_equal(t[x:x + 8, y:y + 8, z:z + 4], crop)
    assert found


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_augment_on_cuda():
    img, lab = _pattern()
    out, out_lab = augment_2d(img.expand(4, 1, 32, 32).cuda(), lab.expand(4, 32, 32).cuda(), size=(16, 16),
                              generator=torch.Generator(device="cuda").manual_seed(0))
    assert out.is_cuda and out_lab.is_cuda and out.shape == (4, 1, 16, 16)


def test_scale_gamma_off_returns_the_batch_and_draws_nothing():
    img, lab = torch.rand(3, 1, 32, 32), torch.randint(0, 4, (3, 32, 32))
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    out_img, out_lab = augment_scale_gamma(img, lab, 0.0, 0.0, gen)
    assert out_img is img and out_lab is lab
    assert torch.equal(gen.get_state(), state)  # the papers' batches stay the same draw for draw


def test_scale_zooms_a_centred_square_by_the_drawn_factor():
    # a centred 16×16 square on 64×64; each sample's zoom is the generator's first draw mapped as documented
    s, half = 64, 8
    lab = torch.zeros(4, s, s, dtype=torch.long)
    lab[:, s // 2 - half:s // 2 + half, s // 2 - half:s // 2 + half] = 2
    img = (lab > 0).float()[:, None]
    out_img, out_lab = augment_scale_gamma(img, lab, 0.5, 0.0, torch.Generator().manual_seed(3))
    u = torch.rand(4, generator=torch.Generator().manual_seed(3))
    zoom = torch.exp((u * 2 - 1) * math.log1p(0.5))
    assert set(out_lab.unique().tolist()) <= {0, 2}
    side = (out_lab == 2).sum(dim=(1, 2)).float().sqrt()  # side of the zoomed square in pixels
    assert torch.allclose(side, 2 * half * zoom, atol=1.5)
    assert torch.equal(out_img[:, 0] > 0.5, out_lab == 2)  # image and label moved together


def test_gamma_keeps_the_order_of_intensities_and_the_labels():
    img = torch.linspace(0, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)
    lab = torch.randint(0, 4, (2, 16, 16))
    out_img, out_lab = augment_scale_gamma(img, lab, 0.0, 0.5, torch.Generator().manual_seed(1))
    assert out_lab is lab
    assert float(out_img.min()) >= 0.0 and float(out_img.max()) <= 1.0
    for b in range(2):
        flat = out_img[b].flatten()
        assert bool((flat[1:] >= flat[:-1]).all())  # monotone: a contrast change, not a new image
    u = torch.rand(2, generator=torch.Generator().manual_seed(1))
    g = torch.exp((u * 2 - 1) * math.log1p(0.5))
    assert torch.allclose(out_img, img ** g.reshape(2, 1, 1, 1), atol=1e-6)
