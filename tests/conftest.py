import torch
import pytest

from fixture_data import write_fixture_data
from tiny import _SAMPLE, STANDARD_FILES, make_gpt2, make_llama, make_tokenizer, save_model_dir, standard_data_dir, standard_data_problem


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "standard_data(*files): the test reads these files (paths relative to the standard data folder) through "
        "the shared_data fixture; it is skipped, with the reason, when they are absent (default: all STANDARD_FILES)",
    )


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def shared_data(request):
    """The real standard data folder ($SEMISPARSE_DATA, else ../shared/data); skips when it lacks the test's files.

    A test names the files it reads with ``@pytest.mark.standard_data(...)``; unmarked, it needs all of them.
    """
    marker = request.node.get_closest_marker("standard_data")
    reason = standard_data_problem(marker.args if marker else STANDARD_FILES)
    if reason:
        pytest.skip(reason)
    return standard_data_dir()


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory):
    """A folder laid out like the standard data, with a few made-up items per file (tests/fixture_data.py)."""
    return write_fixture_data(tmp_path_factory.mktemp("fixture-data"))


@pytest.fixture
def llama_dir(tmp_path, tokenizer):
    return save_model_dir(make_llama(), tokenizer, tmp_path / "tiny-llama")


@pytest.fixture
def cli(capsys):
    """The CLI in-process (fast): cli(*args) returns returncode, stdout and stderr like subprocess.run."""
    from clirun import run_in_process

    return lambda *args: run_in_process(capsys, *args)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved once per test module (read-only: tests write their outputs elsewhere)."""
    return save_model_dir(make_llama(), make_tokenizer(), tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A small training/evaluation text file, one sentence a line."""
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(_SAMPLE.replace(". ", ".\n"))
    return path


@pytest.fixture
def gpt2_dir(tmp_path, tokenizer):
    return save_model_dir(make_gpt2(), tokenizer, tmp_path / "tiny-gpt2")


# One thread: tiny models run fastest on one, and two OpenMP threads thrash (10-50x slower) as soon as
# anything else uses a core of this 2-core machine.
torch.set_num_threads(1)
