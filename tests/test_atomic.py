import os
import threading

import pytest

from maskrcnn.atomic import atomic_write


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_write(path) as fh:
            fh.write("half of the new")
            raise error
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_a_complete_write_replaces_the_file(tmp_path):
    path = tmp_path / "f.bin"
    with atomic_write(path, "wb") as fh:
        fh.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(path, "a"):
            pass


def test_threads_writing_one_path_each_write_whole_files(tmp_path):
    # predict's writer threads may draw one input twice: each write has its own temporary file
    path = tmp_path / "f.bin"
    started = threading.Barrier(2)

    def write(byte: bytes) -> None:
        with atomic_write(path, "wb") as fh:
            fh.write(byte * 1000)
            started.wait()  # both temporary files are open at once

    threads = [threading.Thread(target=write, args=(b,)) for b in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in (b"a" * 1000, b"b" * 1000) and os.listdir(tmp_path) == ["f.bin"]
