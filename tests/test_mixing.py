import math

import pytest
import torch

from napari_m3hl.method.mixing import block_grid, block_masks, mix


@pytest.mark.parametrize(
    "spatial,block,ratio",
    [((256, 256), (64, 64), 0.5), ((256, 216), (64, 64), 0.5), ((100, 37), (16, 16), 0.3),
     ((112, 112, 80), (28, 28, 20), 0.5), ((30, 50, 17), (8, 8, 8), 0.75), ((64, 64), (64, 64), 1.0)],
)
def test_exact_block_count_per_sample(spatial, block, ratio):
    n = 7
    m = block_masks(n, spatial, block, ratio, torch.Generator().manual_seed(1))
    assert m.shape == (n, *spatial) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    grid = block_grid(spatial, block)
    k = round(ratio * math.prod(grid))
    # pool each block: a block is all-0 or all-1, and exactly k blocks are 0 per sample
    for i in range(n):
        zeros = 0
        for idx in torch.cartesian_prod(*[torch.arange(g) for g in grid]).reshape(-1, len(grid)).tolist():
            sl = tuple(slice(j * b, min((j + 1) * b, s)) for j, b, s in zip(idx, block, spatial))
            vals = m[(i,) + sl].unique()
            assert len(vals) == 1, "a block mixes 0 and 1"
            zeros += int(vals.item() == 0)
        assert zeros == k


def test_exact_pixel_ratio_when_divisible():
    m = block_masks(16, (256, 256), (64, 64), 0.5, torch.Generator().manual_seed(0))
    assert torch.allclose(m.mean(dim=(1, 2)), torch.full((16,), 0.5))


def test_masks_differ_between_samples_and_seeds():
    a = block_masks(8, (128, 128), (32, 32), 0.5, torch.Generator().manual_seed(0))
    b = block_masks(8, (128, 128), (32, 32), 0.5, torch.Generator().manual_seed(0))
    c = block_masks(8, (128, 128), (32, 32), 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(x.flatten().tolist()) for x in a}) > 1


def test_mix_is_complementary_for_images_and_labels():
    g = torch.Generator().manual_seed(3)
    m = block_masks(4, (64, 48), (16, 16), 0.5, g)
    a, b = torch.rand(4, 2, 64, 48), torch.rand(4, 2, 64, 48)
    ab, ba = mix(a, b, m), mix(b, a, m)
    # every pixel of both images appears exactly once across the two mixes
    assert torch.allclose(ab + ba, a + b)
    assert torch.equal(ab[:, 0][m.bool()], a[:, 0][m.bool()])
    assert torch.equal(ab[:, 1][~m.bool()], b[:, 1][~m.bool()])
    la, lb = torch.randint(0, 4, (4, 64, 48)), torch.randint(0, 4, (4, 64, 48))
    lab = mix(la, lb, m)
    assert lab.dtype == la.dtype
    assert torch.equal(lab[m.bool()], la[m.bool()]) and torch.equal(lab[~m.bool()], lb[~m.bool()])


def test_bad_arguments():
    with pytest.raises(ValueError):
        block_masks(1, (64, 64), (16,), 0.5)
    with pytest.raises(ValueError):
        block_masks(1, (64, 64), (16, 16), 1.5)
    with pytest.raises(ValueError):
        mix(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), torch.zeros(1, 4, 4))
