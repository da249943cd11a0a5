"""Images: tensor <-> PIL, PNG I/O (atomic), the load_image conversion rule, grids, GIFs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentgeo.errors import InputError, OutputExistsError
from latentgeo.images import (
    from_pil,
    load_image,
    make_grid,
    save_gif,
    save_image,
    to_pil,
    upscale,
)


def quantised(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255.0


@pytest.mark.parametrize("channels", [1, 3])
def test_pil_roundtrip_is_exact_on_8bit_values(channels):
    img = quantised((channels, 5, 7))
    pil = to_pil(img)
    assert pil.mode == ("L" if channels == 1 else "RGB") and pil.size == (7, 5)
    assert torch.equal(from_pil(pil), img)


def test_save_image_atomic_and_force(tmp_path):
    img = quantised((1, 8, 8))
    p = save_image(tmp_path / "a.png", img)
    assert torch.equal(load_image(p, 8, 1), img)
    with pytest.raises(OutputExistsError):
        save_image(p, torch.zeros(1, 8, 8))
    save_image(p, torch.zeros(1, 8, 8), force=True)
    assert load_image(p, 8, 1).max() == 0
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.png"]  # no temp files left


def test_rgb_to_grey_is_pillow_luma(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    Image.fromarray(a, "RGB").save(tmp_path / "c.png")
    grey = load_image(tmp_path / "c.png", 9, 1)
    ref = np.asarray(Image.fromarray(a, "RGB").convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(grey[0].numpy(), ref, atol=1 / 255 + 1e-6)
    rgb = load_image(tmp_path / "c.png", 9, 3)
    assert torch.equal(rgb, torch.from_numpy(a).permute(2, 0, 1).float() / 255)


def test_grey_to_rgb_replicates(tmp_path):
    Image.fromarray(np.full((8, 8), 51, np.uint8), "L").save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png", 8, 3)
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.full_like(x, 0.2))


def test_transparency_composited_on_black_for_grey_and_white_for_rgb(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[:4, :, :3] = 255
    a[:4, :, 3] = 255           # top half opaque white, bottom half fully transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    grey = load_image(tmp_path / "t.png", 8, 1)
    assert torch.all(grey[:, :4] == 1) and torch.all(grey[:, 4:] == 0)
    rgb = load_image(tmp_path / "t.png", 8, 3)
    assert torch.all(rgb == 1)
    half = load_image(tmp_path / "t.png", 8, 1, background=0.5)
    assert torch.allclose(half[:, 4:], torch.tensor(0.5))


def test_sixteen_bit_png_keeps_precision(tmp_path):
    a = np.array([[0, 257, 32768, 65535]] * 8, dtype=np.uint16).repeat(2, axis=1)
    Image.fromarray(a).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    x = load_image(tmp_path / "d.png", 8, 1)
    np.testing.assert_allclose(x[0, 0, ::2].numpy(), a[0, ::2] / 65535, atol=1e-6)


def test_resize_and_centre_crop(tmp_path):
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(tmp_path / "big.png")
    x = load_image(tmp_path / "big.png", 32, 1)
    assert x.shape == (1, 32, 32) and torch.allclose(x, torch.tensor(200 / 255), atol=1e-5)
    # 20 wide, 40 tall: the centre 20x20 is kept; rows 0-9 and 30-39 (black) are cropped.
    a = np.zeros((40, 20), np.uint8)
    a[10:30] = 255
    Image.fromarray(a).save(tmp_path / "tall.png")
    assert torch.allclose(load_image(tmp_path / "tall.png", 10, 1), torch.tensor(1.0),
                          atol=1e-5)
    palette = Image.fromarray(a).convert("P")
    palette.save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png", 20, 1).shape == (1, 20, 20)


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "notes.png").write_text("not an image")
    rand = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(rand).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "tiny.png")
    for name, msg in [("noise.png", "not an image"), ("notes.png", "not an image"),
                      ("cut.png", "truncated"), ("tiny.png", "4x4"), ("gone.png", "no such")]:
        with pytest.raises(InputError, match=msg) as e:
            load_image(tmp_path / name, 32, 1)
        assert name in str(e.value)


def test_make_grid_layout():
    imgs = torch.stack([torch.full((1, 2, 3), v) for v in (0.1, 0.2, 0.3)])
    g = make_grid(imgs, nrow=2, padding=1, pad_value=0.9)
    assert g.shape == (1, 2 * 3 + 1, 2 * 4 + 1)
    assert torch.all(g[:, 1:3, 1:4] == 0.1) and torch.all(g[:, 1:3, 5:8] == 0.2)
    assert torch.all(g[:, 4:6, 1:4] == 0.3) and torch.all(g[:, 4:6, 5:8] == 0.9)
    assert torch.all(g[:, 0] == 0.9)
    assert make_grid(imgs).shape == (1, 2 * 4 + 2, 2 * 5 + 2)  # ceil(sqrt(3)) = 2 columns
    assert torch.equal(upscale(imgs, 3)[0, 0, :3, :3], torch.full((3, 3), 0.1))


def test_gif_bounces_and_loops(tmp_path):
    frames = torch.stack([torch.full((1, 4, 4), i / 4) for i in range(4)])
    p = save_gif(tmp_path / "p.gif", frames)
    with Image.open(p) as im:
        assert im.n_frames == 6 and im.info.get("loop") == 0
        values = []
        for k in range(im.n_frames):
            im.seek(k)
            values.append(np.asarray(im.convert("L"))[0, 0])
    assert values == [0, 64, 128, 191, 128, 64]
    with pytest.raises(OutputExistsError):
        save_gif(p, frames)
