import pytest


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory):
    """The quick zoo (2 clean + 3 backdoored greyscale CNNs), built once per test session."""
    from trigscan.zoo.build import build_zoo, quick_specs

    root = tmp_path_factory.mktemp("quick_zoo")
    index = build_zoo(root, quick_specs(), jobs=2, log=lambda line: None, quiet=True)
    return root, index
