"""The job layer (latentgeo.jobs, latentgeo.launch): shards, seeds, provenance, resume, temp
files, manifests, failures. Fast: no models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from latentgeo import jobs
from latentgeo.errors import InputError, LatentgeoError, OutputExistsError
from latentgeo.launch import Launch, Shard, detect_launch, parse_shard, rank_device, resolve_shard


# -- launch ---------------------------------------------------------------------------------------
def test_detect_launch_from_each_launcher():
    assert detect_launch({}) == Launch()
    assert not detect_launch({}).launched
    tr = detect_launch({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                        "TORCHELASTIC_RUN_ID": "x"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.launcher) == (1, 2, 1, "torchrun")
    acc = detect_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                         "ACCELERATE_MIXED_PRECISION": "no"})
    assert (acc.rank, acc.world_size, acc.local_rank, acc.launcher) == (3, 4, 1, "accelerate")
    one = detect_launch({"ACCELERATE_MIXED_PRECISION": "no"})
    assert one.launched and one.world_size == 1
    mpi = detect_launch({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"})
    assert (mpi.rank, mpi.world_size, mpi.local_rank, mpi.launcher) == (2, 3, 2, "mpi")


@pytest.mark.parametrize("env, fragment", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 does not fit WORLD_SIZE=2"),
    ({"RANK": "0"}, "must be set together"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
])
def test_detect_launch_refuses_inconsistent_variables(env, fragment):
    with pytest.raises(InputError, match=fragment):
        detect_launch(env)


def test_parse_shard():
    assert parse_shard("1/3") == Shard(1, 3)
    assert parse_shard(" 0 / 1 ") == Shard(0, 1)
    for bad in ["3/3", "-1/3", "1", "a/b", "1/0", ""]:
        with pytest.raises(InputError, match="^--shard"):
            parse_shard(bad, "--shard")


@given(st.integers(0, 200), st.integers(1, 17))
def test_shard_blocks_partition_the_items(n, count):
    blocks = [Shard(i, count).block(n) for i in range(count)]
    assert [p for b in blocks for p in b] == list(range(n))  # contiguous, in order, no overlap
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@given(st.integers(0, 100), st.integers(1, 5), st.integers(1, 4))
def test_manual_shards_under_a_launcher_partition_once(n, count, world):
    """A job array of N torchrun jobs of W ranks: every item exactly once."""
    seen = []
    for i in range(count):
        for r in range(world):
            s = resolve_shard(f"{i}/{count}", Launch(rank=r, world_size=world,
                                                     launcher="torchrun"))
            assert s.count == count * world
            seen.extend(s.block(n))
    assert sorted(seen) == list(range(n))


def test_rank_device():
    alone, r1 = Launch(), Launch(rank=1, world_size=2, local_rank=1, launcher="torchrun")
    assert rank_device("cpu", r1, cuda_count=4) == "cpu"
    assert rank_device("cuda", r1, cuda_count=4) == "cuda:1"
    assert rank_device("cuda", Launch(5, 8, 5, "torchrun"), cuda_count=4) == "cuda:1"
    assert rank_device("cuda", alone, cuda_count=4) == "cuda"
    assert rank_device("cuda:3", r1, cuda_count=4) == "cuda:3"
    assert rank_device("auto", r1, cuda_count=0) == "cpu"
    assert rank_device("auto", r1, cuda_count=2) == "cuda:1"


# -- hashing, seeds, order ------------------------------------------------------------------------
def test_tensor_hash_is_about_values_not_storage():
    batch = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert jobs.tensor_hash(batch[2]) == jobs.tensor_hash(batch[2].clone())
    assert jobs.tensor_hash(batch[2]) != jobs.tensor_hash(batch[1])
    assert jobs.tensor_hash(batch[2]) != jobs.tensor_hash(batch[2].double())
    assert jobs.tensor_hash(batch[2]) != jobs.tensor_hash(batch[2].reshape(1, 64))


def test_item_seed_depends_on_the_item_only():
    hashes = [jobs.bytes_hash(str(i).encode()) for i in range(50)]
    seeds = [jobs.item_seed(h) for h in hashes]
    assert len(set(seeds)) == 50 and all(0 <= s < 2**63 for s in seeds)
    # any order / split gives each item the same seed
    assert [jobs.item_seed(h) for h in reversed(hashes)] == seeds[::-1]
    assert jobs.item_seed(hashes[0], seed=1) != seeds[0]
    a = torch.randn(3, generator=jobs.item_generator(hashes[7]))
    b = torch.randn(3, generator=jobs.item_generator(hashes[7]))
    assert torch.equal(a, b)


def test_sort_and_unique_keys():
    items = [jobs.Item("b", "x/b.png"), jobs.Item("a", "y/a.png")]
    assert [it.key for it in jobs.sort_items(items)] == ["a", "b"]
    with pytest.raises(InputError, match=r"x/b\.png and z/b\.png would both be written as b"):
        jobs.sort_items([*items, jobs.Item("b", "z/b.png")])


def test_chunks():
    assert [len(c) for c in jobs.chunks(range(10), 4)] == [4, 4, 2]
    assert list(jobs.chunks([], 3)) == []
    with pytest.raises(InputError):
        list(jobs.chunks([1], 0))


# -- provenance and writes ------------------------------------------------------------------------
PROV = jobs.Provenance(input="ab" * 32, options={"steps": 5, "guidance": 1.0, "condition": None},
                       model="00987b80305e085c")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_seed_files_carry_provenance(tmp_path, suffix):
    from latentgeo.io import load_latent

    x = torch.randn(1, 4, 4)
    p = jobs.save_seed(tmp_path / f"s{suffix}", x, {"model": "m"}, PROV)
    y, meta = load_latent(p)
    assert torch.equal(x, y) and meta["model"] == "m"
    assert jobs.read_provenance(p) == PROV


def test_png_carries_provenance_and_pixels(tmp_path):
    from latentgeo.images import load_image

    img = torch.rand(1, 8, 8)
    p = jobs.save_png(tmp_path / "a.png", img, PROV)
    assert jobs.read_provenance(p) == PROV
    back = load_image(p, 8, 1)
    assert (back - img).abs().max() <= 0.5 / 255 + 1e-6


def test_read_provenance_of_foreign_or_broken_files(tmp_path):
    from latentgeo.images import save_image

    save_image(tmp_path / "plain.png", torch.rand(1, 8, 8))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    assert jobs.read_provenance(tmp_path / "plain.png") is None
    assert jobs.read_provenance(tmp_path / "junk.safetensors") is None
    assert jobs.read_provenance(tmp_path / "missing.png") is None
    assert jobs.Provenance.from_json("{") is None


def test_differences_name_what_changed():
    other = jobs.Provenance(PROV.input, {**PROV.options, "steps": 10}, "ffff")
    diff = other.differences(PROV)
    assert "model 00987b80305e085c -> ffff" in diff and "steps 5 -> 10" in diff
    assert PROV.differences(jobs.Provenance.from_json(PROV.to_json())) == []
    tup = jobs.Provenance("x", {"shape": (1, 2)}, "m")
    assert tup.differences(jobs.Provenance.from_json(tup.to_json())) == []


def _items(n):
    return [jobs.Item(f"k{i}", f"in/k{i}", i) for i in range(n)]


def test_plan_skips_matching_refuses_different_and_force_redoes(tmp_path):
    items = _items(4)
    target = lambda it: tmp_path / f"{it.key}.png"  # noqa: E731
    prov = lambda it: jobs.Provenance(str(it.ref), {"steps": 5}, "m")  # noqa: E731
    for it in items[:2]:
        jobs.save_png(target(it), torch.rand(1, 4, 4), prov(it))
    p = jobs.plan(items, target, prov)
    assert [i.key for i in p.todo] == ["k2", "k3"] and [i.key for i in p.skipped] == ["k0", "k1"]

    before = {q.name: q.stat().st_mtime_ns for q in tmp_path.iterdir()}
    other = lambda it: jobs.Provenance(str(it.ref), {"steps": 7}, "m")  # noqa: E731
    with pytest.raises(OutputExistsError, match=r"k0\.png: exists from a different run "
                       r"\(steps 5 -> 7\) \(and 1 more\); pass force=True"):
        jobs.plan(items, target, other)
    assert {q.name: q.stat().st_mtime_ns for q in tmp_path.iterdir()} == before
    assert len(jobs.plan(items, target, other, force=True).todo) == 4

    from latentgeo.images import save_image

    save_image(tmp_path / "k3.png", torch.rand(1, 4, 4))
    with pytest.raises(OutputExistsError, match="k3.png: exists without latentgeo provenance"):
        jobs.plan(items, target, prov)


def test_write_atomic_never_replaces_and_cleans_up(tmp_path):
    p = tmp_path / "out.bin"
    jobs.write_atomic(p, lambda t: t.write_bytes(b"one"))
    with pytest.raises(OutputExistsError, match="exists"):
        jobs.write_atomic(p, lambda t: t.write_bytes(b"two"))
    assert p.read_bytes() == b"one"
    jobs.write_atomic(p, lambda t: t.write_bytes(b"three"), force=True)
    assert p.read_bytes() == b"three"

    def interrupted(t):
        t.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jobs.write_atomic(tmp_path / "new.bin", interrupted)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out.bin"]


def test_temp_names_and_stale_cleanup(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = jobs.temp_path(tmp_path / "a.png")  # this process: alive
    stale = jobs.temp_path(tmp_path / "b.png", pid=dead.pid)
    foreign = tmp_path / f".c.png.otherhost.{dead.pid}.0123abcd.tmp"
    unrelated = tmp_path / ".d.png.tmp"
    for q in (live, stale, foreign, unrelated):
        q.write_bytes(b"")
    assert f".{os.getpid()}." in live.name
    assert jobs.clean_stale_temps(tmp_path) == [stale]
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(
        q.name for q in (live, foreign, unrelated))


def test_sigkill_mid_write_leaves_a_temp_that_a_restart_removes(tmp_path):
    code = ("import time, sys; from pathlib import Path; from latentgeo import jobs\n"
            "def w(t):\n    t.write_bytes(b'x'); print('writing', flush=True); time.sleep(60)\n"
            f"jobs.write_atomic(Path({str(tmp_path / 'slow.png')!r}), w)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(jobs.__file__).parents[1])})
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".slow.png.") and not (
        tmp_path / "slow.png").exists()
    assert jobs.clean_stale_temps(tmp_path) == left
    assert list(tmp_path.iterdir()) == []


def test_sigterm_becomes_an_interrupt_that_cleans_up(tmp_path):
    def write(t):
        t.write_bytes(b"x")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    with pytest.raises(jobs.Terminated) as info, jobs.sigterm_as_interrupt():
        jobs.write_atomic(tmp_path / "t.png", write)
    assert info.value.signum == signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# -- the loop, manifests, failures ----------------------------------------------------------------
def _process(tmp_path, calls):
    def process(items, inputs):
        calls.append(len(items))
        if any(x == 13 for x in inputs):
            raise InputError("unlucky chunk")
        out = []
        for it, x in zip(items, inputs):
            p = tmp_path / f"{it.key}.txt"
            p.write_text(str(x))
            out.append(jobs.Outcome(p, {"value": x}))
        return out
    return process


def _load(it):
    if it.ref == 5:
        raise InputError(f"{it.source}: unreadable")
    return it.ref


def test_run_streams_bounded_chunks_records_failures_and_progress(tmp_path):
    items, calls, ticks = _items(16), [], []
    m = jobs.Manifest(tmp_path, Shard(0, 1))
    m.start("test", len(items), {"steps": 5})
    rep = jobs.run(items, _load, _process(tmp_path, calls), batch_size=4, manifest=m,
                   progress=ticks.append)
    m.end(len(rep.done), len(rep.skipped), len(rep.failed), rep.seconds)
    m.close()
    assert max(calls) <= 4 and sum(ticks) == 16
    failed = {it.key: why for it, why in rep.failed}
    # item 5 fails alone on load; the chunk holding 13 (12..15) fails in process
    assert set(failed) == {"k5", "k12", "k13", "k14", "k15"}
    assert failed["k5"] == "in/k5: unreadable" and failed["k12"] == "unlucky chunk"
    assert len(rep.done) == 11

    s = jobs.merge_manifests(tmp_path)
    assert not s.ok and not s.incomplete and len(s.failed) == 5
    assert s.records["in/k3"]["metrics"] == {"value": 3}
    assert s.shards[0].done == 11 and s.shards[0].failed == 5 and s.shards[0].items == 16

    with pytest.raises(InputError, match=r"5 input\(s\) failed \(in/k5: unreadable; in/k12: "
                       r"unlucky chunk; in/k13: unlucky chunk; and 2 more\), 11 output"):
        jobs.exit_on_failures(rep.failed, 11, world_size=1, warn=print)
    warned = []
    jobs.exit_on_failures(rep.failed, 11, world_size=2, warn=warned.append)
    assert warned and "exit 0 under the launcher" in warned[0]
    jobs.exit_on_failures([], 3, world_size=1, warn=print)


def test_manifest_merge_shards_resume_and_truncation(tmp_path):
    items = _items(6)
    for i in range(3):
        shard = Shard(i, 3)
        m = jobs.Manifest(tmp_path, shard)
        mine = jobs.shard_items(items, shard)
        m.start("test", len(mine), {})
        for it in mine:
            m.item(it.source, f"{it.key}.txt", "done", 0.5, {"psnr": float(it.ref)})
        if i != 2:  # shard 2 is killed before its end record
            m.end(len(mine), 0, 0, 1.0)
        m.close()
    with open(jobs.manifest_path(tmp_path, Shard(2, 3)), "a") as f:
        f.write('{"event": "item", "inp')  # a line cut short by SIGKILL
    s = jobs.merge_manifests(tmp_path)
    assert [st.complete for st in s.shards] == [True, True, False]
    assert len(s.records) == 6 and not s.failed and not s.ok

    # resume of shard 2: its items skipped, metrics inherited from the earlier done records
    m = jobs.Manifest(tmp_path, Shard(2, 3))
    mine = jobs.shard_items(items, Shard(2, 3))
    m.start("test", len(mine), {})
    rep = jobs.run([], _load, _process(tmp_path, []), batch_size=2, manifest=m, skipped=mine,
                   target=lambda it: tmp_path / f"{it.key}.txt")
    m.end(0, len(rep.skipped), 0, rep.seconds)
    m.close()
    s = jobs.merge_manifests(tmp_path)
    assert s.ok and s.shards[2].skipped == 2 and s.shards[2].done == 0
    assert s.records["in/k5"]["status"] == "skipped"
    assert s.records["in/k5"]["metrics"] == {"psnr": 5.0}


def test_merge_reports_missing_shards_and_no_manifest(tmp_path):
    m = jobs.Manifest(tmp_path, Shard(1, 2))
    m.start("test", 0, {})
    m.end(0, 0, 0, 0.0)
    m.close()
    s = jobs.merge_manifests(tmp_path)
    assert [st.index for st in s.incomplete] == [0] and s.incomplete[0].path is None
    with pytest.raises(InputError, match="nothing: not a directory"):
        jobs.merge_manifests(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no manifest"):
        jobs.merge_manifests(tmp_path / "empty")


def test_newest_split_is_judged(tmp_path):
    """A re-run with another number of shards supersedes the old split's files."""
    old = jobs.Manifest(tmp_path, Shard(0, 2))
    old.start("test", 3, {})  # never ended
    old.close()
    time.sleep(0.01)
    new = jobs.Manifest(tmp_path, Shard(0, 1))
    new.start("test", 6, {})
    new.end(6, 0, 0, 1.0)
    new.close()
    assert jobs.merge_manifests(tmp_path).ok
    assert json.loads(new.path.read_text().splitlines()[0])["shards"] == 1


def test_errors_are_latentgeo_errors():
    assert issubclass(OutputExistsError, LatentgeoError)


# -- progress and the manifest command ------------------------------------------------------------
class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_progress_lines_per_rank_off_a_terminal(monkeypatch):
    from latentgeo.cli.jobrun import job_progress

    monkeypatch.setenv("LATENTGEO_PROGRESS_EVERY", "0")
    r1 = Launch(rank=1, world_size=2, local_rank=1, launcher="torchrun")
    s = _Stream(tty=False)
    with job_progress("rendering 3 seed(s)", 3, r1, Shard(1, 2), stream=s) as advance:
        for _ in range(3):
            advance(1)
    lines = s.text.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("[shard 1/2] rendering 3 seed(s): 3/3 items")
    # at a terminal only rank 0 draws (a Rich bar); other ranks and --json runs say nothing
    s = _Stream(tty=True)
    with job_progress("x", 3, r1, Shard(1, 2), stream=s) as advance:
        advance(3)
    assert s.text == ""
    s = _Stream(tty=False)
    with job_progress("x", 3, Launch(), Shard(), quiet=True, stream=s) as advance:
        advance(3)
    assert s.text == ""


def test_manifest_command_table_json_and_exit_status(cli, tmp_path):
    from tests.conftest import assert_one_line_error

    items = _items(5)
    for i in range(2):
        m = jobs.Manifest(tmp_path, Shard(i, 2))
        mine = jobs.shard_items(items, Shard(i, 2))
        m.start("render", len(mine), {})
        for it in mine:
            m.item(it.source, f"{it.key}.png", "done", 0.1, {"psnr_db": 30.0 + it.ref})
        m.end(len(mine), 0, 0, 0.5)
        m.close()
    r = cli("manifest", tmp_path)
    assert "5 input(s), 5 done" in " ".join(r.stdout.split()) and "psnr_db" in r.stdout
    info = json.loads(cli("manifest", tmp_path, "--json").stdout)
    assert info["ok"] and info["metric_means"]["psnr_db"] == pytest.approx(32.0)
    assert [s["shard"] for s in info["shards"]] == ["0/2", "1/2"]
    # a failure, then a shard that never finished: exit 2, one line naming both
    m = jobs.Manifest(tmp_path, Shard(1, 2))
    m.start("render", 2, {})
    m.item("in/k4", "", "failed", 0.0, error="in/k4: not a seed")
    m.close()
    r = cli("manifest", tmp_path, expect=2)
    assert "k4: not a seed" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}: 1 input(s) failed; 1 shard(s) incomplete (1/2)")
    r = cli("manifest", tmp_path / "none", expect=2)
    assert_one_line_error(r, "not a directory")


def test_seed_items_read_lazily_and_skip_unusable_files(tmp_path):
    from latentgeo.io import save_latent

    g = torch.Generator().manual_seed(0)
    batch, one = torch.randn(5, 1, 4, 4, generator=g), torch.randn(1, 4, 4, generator=g)
    save_latent(tmp_path / "b.safetensors", batch)
    save_latent(tmp_path / "p.pt", batch[:3])
    save_latent(tmp_path / "one.safetensors", one)
    save_latent(tmp_path / "wrong.pt", torch.randn(2, 3))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    paths = [tmp_path / n for n in ("b.safetensors", "p.pt", "one.safetensors", "wrong.pt",
                                    "junk.safetensors")]
    items, problems = jobs.seed_items(paths, (1, 4, 4))
    assert [it.key for it in items] == [*(f"b_{i:03d}" for i in range(5)),
                                        *(f"p_{i:03d}" for i in range(3)), "one"]
    assert items[1].source == f"{tmp_path / 'b.safetensors'}[1]"
    assert len(problems) == 2 and "(2, 3) does not fit" in problems[0]
    assert "junk.safetensors" in problems[1]
    for i in range(5):
        assert torch.equal(jobs.load_seed(items[i]), batch[i])
    assert torch.equal(jobs.load_seed(items[6]), batch[1])
    assert torch.equal(jobs.load_seed(items[8]), one)
    assert jobs.tensor_hash(jobs.load_seed(items[6])) == jobs.tensor_hash(batch[1])


def test_folder_names_are_strings_in_path_order(tmp_path):
    """A folder's seeds come back as the strings str(Path) gives, sorted by name, latent files
    only (what a job holds for the whole run: no Path per input); the Path variant agrees."""
    from latentgeo.io import expand_latent_paths, latent_file_names, save_latent

    for name in ("b.safetensors", "a.pt", "c.PT"):
        save_latent(tmp_path / name, torch.zeros(1, 2, 2))
    for name in ("notes.txt", ".safetensors"):  # not latent files (the second has no suffix)
        (tmp_path / name).write_text("x")
    (tmp_path / "sub.pt").mkdir()
    names = latent_file_names([tmp_path])
    assert names == [str(tmp_path / n) for n in ("a.pt", "b.safetensors", "c.PT")]
    assert all(type(n) is str for n in names)
    assert expand_latent_paths([tmp_path]) == [tmp_path / n for n in ("a.pt", "b.safetensors",
                                                                      "c.PT")]
    items, _ = jobs.seed_items(names, (1, 2, 2))
    assert [it.key for it in items] == ["a", "b", "c"]
    assert items[0].source is names[0]  # shared with the caller's list, not a copy



def test_write_atomic_with_a_string_path_stays_a_string(tmp_path):
    """Given a str, write_atomic hands ``write`` the temp file's name as a str and returns the
    str (no Path per file); the rules are those of a Path: never replace, clean up."""
    p = str(tmp_path / "sub" / "out.bin")
    seen = []

    def write(t):
        seen.append(t)
        with open(t, "wb") as f:
            f.write(b"one")

    assert jobs.write_atomic(p, write) == p
    assert type(seen[0]) is str and os.path.dirname(seen[0]) == os.path.dirname(p)
    assert jobs._TEMP_RE.match(os.path.basename(seen[0]))
    with pytest.raises(OutputExistsError, match="exists"):
        jobs.write_atomic(p, write)
    assert Path(p).read_bytes() == b"one"
    assert sorted(q.name for q in (tmp_path / "sub").iterdir()) == ["out.bin"]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="pathlib interns path parts before 3.12")
def test_a_seed_folder_job_interns_no_name_per_item(tmp_path, monkeypatch):
    """On Python 3.11 every Path built from a new name interns it, and a long job's churn of
    interned names made the interpreter rebuild its interned-string table (measured: 3.7 MiB
    more resident memory at about 7,000 seeds of a render). Listing, loading, planning,
    writing (to string targets) and the manifest intern as many strings for 30 items as for 3."""
    from latentgeo.io import latent_file_names, save_latent

    def job(n: int) -> tuple[int, list[str]]:
        folder = tmp_path / f"seeds{n}"
        folder.mkdir()
        for i in range(n):
            save_latent(folder / f"s{i:03d}.safetensors", torch.randn(1, 4, 4))
        out = str(tmp_path / f"out{n}")
        calls = []
        real = sys.intern
        monkeypatch.setattr(sys, "intern", lambda s: calls.append(s) or real(s))
        names = latent_file_names([str(folder)])
        items, _ = jobs.seed_items(names, (1, 4, 4))

        def target(it):
            return os.path.join(out, f"{it.key}.png")

        def process(chunk, inputs):
            return [jobs.Outcome(jobs.save_png(target(it), x.clamp(0, 1), jobs.Provenance(
                jobs.tensor_hash(x), {}, "m"))) for it, x in zip(chunk, inputs)]

        todo = jobs.plan(jobs.shard_items(jobs.sort_items(items), Shard()), target,
                         lambda it: None).todo
        jobs.clean_stale_temps(out)
        log = jobs.Manifest(out, Shard())
        report = jobs.run(todo, jobs.load_seed, process, batch_size=4, manifest=log,
                          keep_outcomes=False)
        log.close()
        monkeypatch.setattr(sys, "intern", real)
        assert report.n_done == n
        return len(calls), sorted(os.listdir(out))

    job(2)  # first use: imports (PIL, safetensors) intern their names once
    few, files = job(3)
    many, files_many = job(30)
    assert many == few, f"{many - few} more string(s) interned for 27 more items"
    assert files == ["manifest-00000-of-00001.jsonl", "s000.png", "s001.png", "s002.png"]
    assert len(files_many) == 31
