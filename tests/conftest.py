import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second thread only adds contention on a shared 2-core box (results do not depend on
    it). Per test, so a test that changes the thread count (bench, bias lab) cannot leak it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHARED_DATA = os.environ.get("DEBIAS_EXPORT_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def clip():
    from debias_export.workflow.testing import tiny_clip

    return tiny_clip(seed=0)


@pytest.fixture
def clip_inputs(clip):
    g = torch.Generator().manual_seed(1)
    return {
        "image": {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)},
        "text": clip.prepare_texts(["a photo of a nurse", "an engineer", "a long caption about a doctor at work today"]),
    }


@pytest.fixture
def shared_data():
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"shared data not found at {path}")
    return path
