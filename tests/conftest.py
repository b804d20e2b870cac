import pytest
import torch


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory):
    """The quick zoo (2 clean + 3 backdoored greyscale CNNs), built once per test session."""
    from trigscan.zoo.build import build_zoo, quick_specs

    root = tmp_path_factory.mktemp("quick_zoo")
    index = build_zoo(root, quick_specs(), jobs=2, log=lambda line: None, quiet=True)
    return root, index


@pytest.fixture
def one_thread():
    """Run the test on one torch thread, restoring the thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
