"""Sber's reference implementation (PyPI ruclip==0.0.2), imported by file path: the test oracle.

Its package __init__ imports a function today's huggingface_hub no longer has, so we load model.py and
processor.py directly. processor.py imports youtokentome at top level; when that is not installed we give
it a stand-in module, which is enough for the image transforms (tokenizer tests use committed goldens).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _ruclip_dir() -> Path:
    spec = importlib.util.find_spec("ruclip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the reference is missing: pip install --no-deps ruclip==0.0.2 (the README's test command does)")
    return Path(list(spec.submodule_search_locations)[0])


def _load(name: str):
    key = f"_ruclip_reference_{name}"
    if key in sys.modules:
        return sys.modules[key]
    if name == "processor" and importlib.util.find_spec("youtokentome") is None:
        sys.modules.setdefault("youtokentome", types.ModuleType("youtokentome"))
    spec = importlib.util.spec_from_file_location(key, _ruclip_dir() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def model_module():
    """The reference `ruclip/model.py` (class CLIP)."""
    return _load("model")


def processor_module():
    """The reference `ruclip/processor.py` (class RuCLIPProcessor)."""
    return _load("processor")


def predictor_module():
    """The reference `ruclip/predictor.py` (class Predictor); needs more_itertools."""
    return _load("predictor")


def image_transform(image_size: int = 224):
    """The reference processor's image_transform (its tokenizer is not needed for images, so none is loaded)."""
    module = processor_module()
    real_bpe = getattr(module.yttm, "BPE", None)
    module.yttm.BPE = lambda *args, **kwargs: None
    try:
        return module.RuCLIPProcessor("unused-bpe.model", image_size=image_size).image_transform
    finally:
        if real_bpe is None:
            del module.yttm.BPE
        else:
            module.yttm.BPE = real_bpe
