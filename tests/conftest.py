import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("COLUMNS", "200")
# tests build tiny models from configs: never wait on the network for the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on this small shared machine two intra-op threads turned a
    10 s training test into minutes."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

