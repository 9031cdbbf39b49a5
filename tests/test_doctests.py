"""The `>>>` examples in the docstrings of the config, `generate` and the Trainer run as written (tiny models)."""

from __future__ import annotations

import doctest

import pytest

from elastic_mdm import configuration_elastic_mdm, generation_elastic_mdm
from elastic_mdm.training import trainer

MODULES = [configuration_elastic_mdm, generation_elastic_mdm, trainer]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module) -> None:
    """Every example of the module passes, and the module has at least one."""
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{module.__name__} has no >>> example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {module.__name__} failed"
