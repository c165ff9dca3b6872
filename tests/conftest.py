import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_process():
    """Tests use tiny models: one intra-op thread per test process avoids oversubscribing the cores
    (pytest -n 2 runs two processes) without slowing any test down. Session-wide, so module-scoped
    fixtures (models built once per file) run on one thread too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tok():
    """The bundled model's tokenizer as ``peftkit train`` loads it (a pad token set), one per test file."""
    import peftkit
    from peftkit.train.modeling import load_tokenizer

    return load_tokenizer(str(peftkit.model_path()))
