"""The built-in model families; importing this package registers each of them.

To add a family: write ``families/<name>.py`` with its config, name table, module and load groups,
``register`` a ``Family`` at the end of it, and import it here. Nothing else changes.
"""

from ptmserve.models.families import bert, distilbert, gpt2, llama, roberta  # noqa: F401 - each registers itself
