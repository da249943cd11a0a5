"""Latent file I/O: bit-exact round trips, safe loading, atomic writes, clear refusals."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from latentgeo.errors import InputError, OutputExistsError, ShapeError
from latentgeo.io import load_latent, load_latent_set, save_latent, save_latent_set

META = {"model": "bundled", "prompt": "a photo of ü", "steps": "50", "method": "nao"}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_round_trip_bit_exact(tmp_path, suffix, dtype):
    x = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    path = save_latent(tmp_path / f"z{suffix}", x, META)
    y, meta = load_latent(path)
    assert y.dtype == dtype and torch.equal(x, y)
    assert meta == META


def test_bare_tensor_pt_accepted(tmp_path):
    x = torch.randn(3, 5)
    torch.save(x, tmp_path / "bare.pt")
    y, meta = load_latent(tmp_path / "bare.pt")
    assert torch.equal(x, y) and meta == {}


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"latent": _Evil(str(target))}, f)
    with pytest.raises(InputError, match="evil.pt"):
        load_latent(path)
    assert not target.exists()


@pytest.mark.parametrize("bad, fragment", [
    (torch.tensor([1.0, float("nan")]), "NaN"),
    (torch.tensor([float("inf"), 1.0]), "NaN or infinite"),
    (torch.empty(0, 4), "empty"),
    (torch.tensor(1.0), "empty"),
    (torch.arange(4), "dtype"),
])
def test_invalid_tensors_refused(tmp_path, bad, fragment):
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(InputError, match=fragment):
        load_latent(path)


def test_corrupt_files_refused(tmp_path):
    for name in ("junk.pt", "junk.safetensors"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 10)
        with pytest.raises(InputError, match=name):
            load_latent(tmp_path / name)
    with pytest.raises(InputError, match="no such file"):
        load_latent(tmp_path / "missing.pt")
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(InputError, match="unknown latent file type"):
        load_latent(tmp_path / "x.npy")


def test_refuses_overwrite_unless_forced(tmp_path):
    path = save_latent(tmp_path / "z.pt", torch.ones(3))
    with pytest.raises(OutputExistsError):
        save_latent(path, torch.zeros(3))
    save_latent(path, torch.zeros(3), force=True)
    assert torch.equal(load_latent(path)[0], torch.zeros(3))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, mask, suffix):
    # the output must look like any other new file, whatever mode the writer used
    old = os.umask(mask)
    try:
        path = save_latent(tmp_path / f"z{suffix}", torch.ones(3))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, exc):
    real_save = torch.save

    def half_write(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # bytes hit the temp file ...
        raise exc  # ... and then the write is cut off before the rename

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(type(exc)):
        save_latent(tmp_path / "z.pt", torch.ones(1000))
    assert os.listdir(tmp_path) == []


def test_sets_from_directory_and_batch_file(tmp_path):
    x = torch.randn(5, 2, 4, 4)
    written = save_latent_set(tmp_path / "d/", x, metadata=META)
    assert len(written) == 5
    y, names = load_latent_set([tmp_path / "d"])
    assert torch.equal(x, y) and names == [f"{i:03d}" for i in range(5)]
    save_latent_set(tmp_path / "b.safetensors", x)
    y, names = load_latent_set([tmp_path / "b.safetensors"])
    assert torch.equal(x, y) and len(names) == 5


def test_set_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no latent files"):
        load_latent_set([tmp_path / "empty"])
    save_latent(tmp_path / "a.pt", torch.ones(2, 3))
    save_latent(tmp_path / "b.pt", torch.ones(3, 3))
    with pytest.raises(ShapeError, match="b.pt"):
        load_latent_set([tmp_path / "a.pt", tmp_path / "b.pt"])
    save_latent_set(tmp_path / "out/", torch.ones(2, 3))
    with pytest.raises(OutputExistsError):
        save_latent_set(tmp_path / "out/", torch.ones(2, 3))
