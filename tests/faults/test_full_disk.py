"""A full disk (a small tmpfs as the store root): the run fails with a clear error and every artifact committed
before is intact; with room again, the same command finishes the work."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.artifacts import Store


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_fails_clearly_and_keeps_what_was_committed(pipeline, small_disk, capsys):
    pipeline.store = small_disk / "store"
    assert pipeline.run() == 0  # small: fits
    committed = Store(str(pipeline.store)).list()
    capsys.readouterr()
    # Much bigger chunks of random numbers: the disk fills while `numbers` writes.
    code = pipeline.run("numbers.rows_per_chunk=3000000", "numbers.seed=7")
    out, err = capsys.readouterr()
    assert code in (1, 2), out + err
    assert "No space left on device" in out + err and "Traceback" not in err
    store = Store(str(pipeline.store))
    for artifact in committed:
        store.verify(store.load(artifact.stage, artifact.version), full=True)  # every earlier artifact intact
    assert not [a for a in store.list() if a.version not in {c.version for c in committed}]  # nothing half-made
    # Room again (the tmpfs grown in place): the same command finishes, reusing what was committed.
    subprocess.run(["mount", "-o", "remount,size=96m", str(small_disk)], check=True)
    assert pipeline.run("numbers.rows_per_chunk=3000000", "numbers.seed=7") == 0
    assert len(Store(str(pipeline.store)).list()) == len(committed) + 4
