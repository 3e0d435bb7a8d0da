"""`load_model`: a loaded RuCLIP that turns Russian texts and images into L2-normalised numpy embeddings."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import QueryError
from .model import CLIP, PARTS, cast, from_pretrained, quantize_int8
from .preprocess import Preprocessor
from .registry import DEFAULT_MODEL, model_key
from .tokenizer import BPETokenizer

ImageInput = Image.Image | str | os.PathLike | bytes


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' means the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class RuCLIP:
    """A RuCLIP model ready for inference: tokenizer, preprocessing and the towers asked for."""

    def __init__(self, net: CLIP, tokenizer: BPETokenizer, preprocessor: Preprocessor, name: str, device: torch.device):
        self.net, self.tokenizer, self.preprocessor = net, tokenizer, preprocessor
        self.name, self.device = name, device
        self.config = net.config
        self.dim: int = net.config.embed_dim
        self.image_size: int = net.config.image_resolution
        self.context_length: int = net.config.context_length

    def __repr__(self) -> str:
        return f"RuCLIP({self.name!r}, parts={self.net.parts}, device={self.device}, dtype={self.net.dtype})"

    @property
    def parts(self) -> tuple[str, ...]:
        return self.net.parts

    def _need(self, part: str) -> None:
        if part not in self.net.parts:
            raise QueryError(f"this model was loaded with parts={self.net.parts}; load it with '{part}' too")

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token ids exactly as the reference RuCLIPProcessor makes them: int64 (N, context_length)."""
        return self.tokenizer.tokenize(texts, self.context_length)

    @torch.inference_mode()
    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings, float32 (N, D)."""
        self._need("text")
        ids = torch.from_numpy(self.tokenize(texts))
        out = []
        for i in range(0, len(ids), batch_size):
            x = self.net.encode_text(ids[i : i + batch_size].to(self.device))
            out.append(F.normalize(x.float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(N, 3, S, S) preprocessed pixels -> L2-normalised float32 (N, D)."""
        self._need("image")
        x = self.net.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(x.float(), dim=-1).cpu().numpy()

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image (PIL, path or encoded bytes) -> (3, S, S) tensor."""
        if isinstance(image, Image.Image):
            return self.preprocessor(image)
        return self.preprocessor.load(image)

    def encode_images(self, images: Iterable[ImageInput], batch_size: int = 32) -> np.ndarray:
        """L2-normalised image embeddings, float32 (N, D); images are PIL images, paths or encoded bytes."""
        self._need("image")
        out, batch = [], []
        for image in images:
            batch.append(self.preprocess(image))
            if len(batch) == batch_size:
                out.append(self.encode_pixels(torch.stack(batch)))
                batch = []
        if batch:
            out.append(self.encode_pixels(torch.stack(batch)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    parts: Iterable[str] = PARTS,
    preprocess: str = "fast",
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
) -> RuCLIP:
    """Load a released RuCLIP by name (downloaded once into the Hugging Face cache) or a local folder.

    parts=("text",) skips the image tower (a search process needs only the text one). dtype defaults to
    float16 on CUDA and float32 on the CPU; "bfloat16" is accepted too. quantize="int8" (CPU only) runs the
    linear layers in dynamic int8: about 3x faster text queries, cosine ~0.998 to the exact embeddings.
    """
    dev = pick_device(device)
    net, tokenizer, name = from_pretrained(name_or_path, parts)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "float16": torch.float16,
            "fp16": torch.float16,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
        }[dtype]
    net = cast(net, dev, dtype)
    if quantize is not None:
        if quantize != "int8" or dev.type != "cpu" or dtype != torch.float32:
            raise ValueError(f"quantize must be None or 'int8' (CPU, float32 only), got {quantize!r} on {dev}")
        net = quantize_int8(net)
    c = net.config
    pre = Preprocessor(image_size=c.image_resolution, mean=tuple(c.mean), std=tuple(c.std), mode=preprocess)
    return RuCLIP(net, tokenizer, pre, name, dev)


class ModelCache:
    """Loaded models shared by everything one process serves: each (model, towers) is loaded once.

    A server with several indexes of the same model holds one text tower, not one per index; an index that
    is rebuilt with another model gets that model from here too. Thread-safe; loading happens under a lock
    per key, so two requests never load the same model twice.
    """

    def __init__(self, device: str | torch.device = "auto", **load_kwargs: object) -> None:
        self.device, self.load_kwargs = device, load_kwargs
        self._models: dict[tuple[str, tuple[str, ...]], RuCLIP] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, tuple[str, ...]], threading.Lock] = {}

    def get(self, name_or_path: str | os.PathLike[str], parts: Iterable[str] = ("text",)) -> RuCLIP:
        """The model with these towers, loaded on first use (a loaded model with more towers serves too)."""
        name, want = model_key(name_or_path), tuple(sorted(parts))
        key = (name, want)
        with self._lock:
            for (n, have), model in self._models.items():
                if n == name and set(want) <= set(have):
                    return model
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = load_model(name_or_path, device=self.device, parts=want, **self.load_kwargs)  # type: ignore[arg-type]
            with self._lock:
                self._models[key] = model
            return model

    def put(self, model: RuCLIP) -> None:
        """Share an already loaded model (e.g. one a caller passed in) under its name."""
        with self._lock:
            self._models[(model_key(model.name), tuple(sorted(model.parts)))] = model

    def __len__(self) -> int:
        return len(self._models)
