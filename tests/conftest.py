import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def image_check_cache(tmp_path_factory):
    """The decoded-image check's cache in a temporary folder, not the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MASKRCNN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: two gain little, and crawl when the cores are
    shared (OpenMP spin-waits), e.g. with worker or DDP processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
