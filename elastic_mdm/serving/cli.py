"""The console-script target of installs made before `elastic_mdm.commands` existed (their `elastic-mdm` script
names `elastic_mdm.serving.cli:main`): it runs the dispatcher. Nothing in the library imports this module."""

from ..commands import main

__all__ = ["main"]
