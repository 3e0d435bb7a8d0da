"""The network against Sber's reference: same state dict in, same embeddings out (fp32, CPU, 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import model_module

from ruclip_search.model import CLIP, CLIPConfig
from ruclip_search.registry import CONFIGS

MID = dict(
    embed_dim=256,
    image_resolution=64,
    vision_layers=3,
    vision_width=256,
    vision_patch_size=16,
    context_length=77,
    vocab_size=1000,
    transformer_width=256,
    transformer_heads=4,
    transformer_layers=3,
)


def reference_and_ours(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = model_module().CLIP(**cfg).eval()
    # the reference leaves biases at zero and LayerNorms at 1/0: randomise every tensor for a real test
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = CLIP(CLIPConfig.from_dict(cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def random_ids(n: int, vocab: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.zeros(n, ctx, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(0, ctx - 1, (1,), generator=gen))  # tokens between BOS and EOS
        ids[i, 0] = 2
        ids[i, 1 : length + 1] = torch.randint(4, vocab, (length,), generator=gen)
        ids[i, length + 1] = 3
    return ids


def check_equal(cfg: dict, n_text: int = 16, n_img: int = 4) -> None:
    ref, ours = reference_and_ours(cfg)
    gen = torch.Generator().manual_seed(1)
    ids = random_ids(n_text, cfg["vocab_size"], cfg["context_length"], gen)
    ids[0] = 0  # the longest possible text: EOS at the last position
    ids[0, 0], ids[0, 1:-1], ids[0, -1] = 2, 5, 3
    px = torch.randn(n_img, 3, cfg["image_resolution"], cfg["image_resolution"], generator=gen)
    with torch.no_grad():
        t_ref, t_ours = ref.encode_text(ids), ours.encode_text(ids)
        i_ref, i_ours = ref.encode_image(px), ours.encode_image(px)
    assert t_ref.shape == t_ours.shape == (n_text, cfg["embed_dim"])
    assert i_ref.shape == i_ours.shape == (n_img, cfg["embed_dim"])
    assert (t_ref - t_ours).abs().max().item() <= 1e-4
    assert (i_ref - i_ours).abs().max().item() <= 1e-4
    # the embeddings must differ between inputs, or the comparison proves nothing
    assert (t_ours[1:] - t_ours[:1]).abs().max() > 1e-2


def test_mid_size_matches_reference():
    check_equal(MID)


def test_text_truncation_to_longest_eos_is_exact():
    _, ours = reference_and_ours(MID)
    gen = torch.Generator().manual_seed(3)
    ids = random_ids(8, MID["vocab_size"], MID["context_length"], gen)
    with torch.no_grad():
        batch = ours.encode_text(ids)
        one_by_one = torch.cat([ours.encode_text(ids[i : i + 1]) for i in range(len(ids))])
    assert (batch - one_by_one).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ruclip-vit-large-patch14-224"])
def test_full_size_matches_reference(name):
    check_equal(CONFIGS[name], n_text=4, n_img=2)


def test_parts_load_strictly_from_a_full_state_dict():
    ref, _ = reference_and_ours(MID)
    sd = ref.state_dict()
    text = CLIP(CLIPConfig.from_dict(MID), parts=("text",))
    text.load_checkpoint_state(sd)
    assert not hasattr(text, "visual")
    image = CLIP(CLIPConfig.from_dict(MID), parts=("image",))
    image.load_checkpoint_state(sd)
    assert not hasattr(image, "transformer")
    n_text = sum(p.numel() for p in text.parameters())
    n_full = sum(p.numel() for p in ref.parameters())
    assert n_text < n_full


def test_missing_eos_is_an_error():
    _, ours = reference_and_ours(MID)
    with pytest.raises(ValueError, match="EOS"):
        ours.encode_text(torch.zeros(1, 77, dtype=torch.long))


def test_registry_configs_build():
    for name, cfg in CONFIGS.items():
        c = CLIPConfig.from_dict(cfg)
        assert c.vision_width // 64 >= 12, name
        assert np.isclose(c.embed_dim, 512) or np.isclose(c.embed_dim, 768)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_close_to_fp32(dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ref, ours = reference_and_ours(MID)
    gen = torch.Generator().manual_seed(5)
    ids = random_ids(8, MID["vocab_size"], MID["context_length"], gen)
    px = torch.randn(4, 3, 64, 64, generator=gen)
    with torch.no_grad():
        t32 = torch.nn.functional.normalize(ours.encode_text(ids), dim=-1)
        i32 = torch.nn.functional.normalize(ours.encode_image(px), dim=-1)
        half = ours.to("cuda", dtype)
        t16 = torch.nn.functional.normalize(half.encode_text(ids.cuda()).float().cpu(), dim=-1)
        i16 = torch.nn.functional.normalize(half.encode_image(px.cuda()).float().cpu(), dim=-1)
    assert (t32 * t16).sum(-1).min() > 0.99
    assert (i32 * i16).sum(-1).min() > 0.99


def test_packed_cpu_linear_matches_and_follows_weight_changes():
    from ruclip_search import model as m

    lin = torch.nn.Linear(64, 32)
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.allclose(m.linear(x, lin.weight, lin.bias), lin(x), atol=1e-5)
        lin.weight.mul_(2)  # an in-place change must not be served from a stale packed copy
        assert torch.allclose(m.linear(x, lin.weight, lin.bias), lin(x), atol=1e-5)
        big = torch.randn(2, m.PACKED_MAX_ROWS, 64)
        assert torch.allclose(m.linear(big, lin.weight, lin.bias), lin(big), atol=1e-5)
