"""The released RuCLIP checkpoints and how to find their files: a local folder or the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path

from .defaults import MODEL as DEFAULT_MODEL  # noqa: F401  (re-exported: registry.DEFAULT_MODEL)
from .errors import ModelNotFoundError

HUB_ORG = "ai-forever"
FILES = ("config.json", "pytorch_model.bin", "bpe.model")

_BASE_TEXT = dict(
    context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12
)
_LARGE_TEXT = dict(
    context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12, transformer_layers=12
)
_BASE_VISION = dict(embed_dim=512, vision_layers=12, vision_width=768)
_LARGE_VISION = dict(embed_dim=768, vision_layers=24, vision_width=1024)

# Architecture of each released checkpoint (its config.json wins when present). Used to build
# random-weight models of the true size for benchmarks and tests without downloading anything.
CONFIGS: dict[str, dict] = {
    "ruclip-vit-base-patch32-224": dict(**_BASE_VISION, **_BASE_TEXT, image_resolution=224, vision_patch_size=32),
    "ruclip-vit-base-patch16-224": dict(**_BASE_VISION, **_BASE_TEXT, image_resolution=224, vision_patch_size=16),
    "ruclip-vit-large-patch14-224": dict(**_LARGE_VISION, **_LARGE_TEXT, image_resolution=224, vision_patch_size=14),
    "ruclip-vit-large-patch14-336": dict(**_LARGE_VISION, **_LARGE_TEXT, image_resolution=336, vision_patch_size=14),
    "ruclip-vit-base-patch32-384": dict(**_BASE_VISION, **_BASE_TEXT, image_resolution=384, vision_patch_size=32),
    "ruclip-vit-base-patch16-384": dict(**_BASE_VISION, **_BASE_TEXT, image_resolution=384, vision_patch_size=16),
}
MODELS = tuple(CONFIGS)


def model_key(model: str | os.PathLike[str]) -> str:
    """The name an index records for a model: its registry name, or its folder as an absolute path."""
    name = os.fspath(model)
    return name if name in CONFIGS else str(Path(name).expanduser().resolve())


def hub_repo(name: str) -> str:
    """The hub repository of a released model: `ai-forever/<name>`."""
    return f"{HUB_ORG}/{name}"


def _weights_file(folder: Path) -> Path | None:
    for candidate in ("model.safetensors", "pytorch_model.bin"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def check_folder(folder: Path) -> Path:
    """Raise ModelNotFoundError naming the first missing file of a model folder."""
    for fname in ("config.json", "bpe.model"):
        if not (folder / fname).is_file():
            raise ModelNotFoundError(
                f"{folder / fname} is missing: a RuCLIP folder needs config.json, pytorch_model.bin "
                f"(or model.safetensors) and bpe.model; copy the file there or pass a released model name"
            )
    if _weights_file(folder) is None:
        raise ModelNotFoundError(
            f"{folder} has no pytorch_model.bin or model.safetensors: copy the weights there or pass a released model name"
        )
    return folder


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Return a local folder holding the model's files, downloading a released model into the HF cache if needed.

    A path to an existing folder is used as it is. Downloads resume, honour HF_HUB_OFFLINE and the
    usual huggingface_hub cache settings.
    """
    path = Path(os.path.expanduser(os.fspath(name_or_path)))
    if path.is_dir():
        return check_folder(path)
    name = os.fspath(name_or_path)
    if name not in CONFIGS:
        if os.sep in name or name.startswith("."):
            raise ModelNotFoundError(f"model folder {name} does not exist: check the path")
        raise ModelNotFoundError(f"unknown model {name!r}: use a folder or one of {', '.join(MODELS)}")
    return _download(name)


def _download(name: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - older huggingface_hub
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import LocalEntryNotFoundError

    repo = hub_repo(name)
    folder = None
    for fname in FILES:
        try:
            local = hf_hub_download(repo_id=repo, filename=fname)
        except LocalEntryNotFoundError as e:
            raise ModelNotFoundError(
                f"{name}: {fname} is not in the Hugging Face cache and cannot be downloaded now "
                f"(offline or HF_HUB_OFFLINE=1); connect once to download it, or pass a local folder with --model"
            ) from e
        except Exception as e:  # network, auth, disk: one line, no traceback for the user
            raise ModelNotFoundError(
                f"{name}: downloading {fname} from {repo} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "check the connection and retry, or pass a local folder with --model"
            ) from e
        folder = Path(local).parent
    assert folder is not None
    return folder
