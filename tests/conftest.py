import torch
import pytest

from tiny import SHARED_DATA, make_gpt2, make_llama, make_tokenizer, save_model_dir


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (tests read ../shared/data beside the project)")
    return SHARED_DATA


@pytest.fixture
def llama_dir(tmp_path, tokenizer):
    return save_model_dir(make_llama(), tokenizer, tmp_path / "tiny-llama")


@pytest.fixture
def gpt2_dir(tmp_path, tokenizer):
    return save_model_dir(make_gpt2(), tokenizer, tmp_path / "tiny-gpt2")


# One thread: tiny models run fastest on one, and two OpenMP threads thrash (10-50x slower) as soon as
# anything else uses a core of this 2-core machine.
torch.set_num_threads(1)
