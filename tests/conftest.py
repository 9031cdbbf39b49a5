import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> Path:
    """One quick in-process run of the main job's config (`elastic_mdm.commands.train.main`, the command of
    scripts/train.py) with a small sample report, shared by every test that needs a trained checkpoint folder."""
    pytest.importorskip("jsonschema")
    pytest.importorskip("yaml")
    from helpers import QUICK

    from elastic_mdm.commands.train import main

    output = tmp_path_factory.mktemp("run") / "tiny"
    metrics = main(
        ["configs/tiny.yaml", "--output_dir", str(output), "--report_num_samples", "16", "--report_num_steps", "8"]
        + QUICK
    )
    assert "eval_nelbo_bits_per_token" in metrics and 0.0 <= metrics["report"]["json_validity"] <= 1.0
    assert 0.0 <= metrics["report"]["template_json_validity"] <= 1.0
    return output


@pytest.fixture
def one_torch_thread():
    """Tiny shapes run fastest, and steadiest on a busy CPU, on one torch thread (intra-op threads contending for
    two busy cores made runs up to 10x slower); the other tests get theirs back. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated_python(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run Python code in a fresh interpreter where `elastic_mdm` is NOT importable, offline: what a user who only
    has the checkpoint folder gets with `trust_remote_code=True`.

    The package may be pip-installed in editable mode (a .pth finder in site-packages). `-I -S` starts Python isolated
    (no PYTHON* variables, no cwd / script dir, no user site) and without `site`, so no .pth file runs;
    site-packages itself is then put back on sys.path by hand so that torch and transformers still import.
    """
    run_dir = tmp_path / "isolated_cwd"
    run_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
    )
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    bootstrap = f"import sys; sys.path.extend({site_dirs!r})\n"

    def run(code: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-I", "-S", "-c", bootstrap + code, *args],
            cwd=run_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def synthetic_tokenizer():
    """The built-in task's byte-level BPE on 200 records (the pipeline and lm-eval tests)."""
    from elastic_mdm.data import synthetic

    return synthetic.build_tokenizer(num_records=200)


@pytest.fixture(scope="session")
def synthetic_model(synthetic_tokenizer):
    """`helpers.tiny_model_for(synthetic_tokenizer)`: random, seed 0, eval mode; tests only read it."""
    from helpers import tiny_model_for

    return tiny_model_for(synthetic_tokenizer)
