"""Train the tiny RuCLIP-format fixture model that end-to-end tests search with.

    python scripts/make_fixture_model.py [--out tests/fixtures/tiny-ruclip] [--steps 600]

Writes config.json, pytorch_model.bin and a youtokentome bpe.model (the three files of a released
checkpoint) for a ~0.3M-parameter CLIP trained contrastively on tests/fixture_images.py drawings
(4 colours × 3 shapes) with Russian captions. It takes a few CPU minutes and needs youtokentome
(only here, to train the BPE model; run time reads bpe.model with our own tokenizer).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fixture_images import COLOURS, FIXTURE_CLASSES, SHAPES, draw  # noqa: E402

from ruclip_search.model import CLIP, CLIPConfig  # noqa: E402
from ruclip_search.preprocess import Preprocessor  # noqa: E402
from ruclip_search.tokenizer import BPETokenizer  # noqa: E402

CONFIG = dict(
    embed_dim=32,
    image_resolution=32,
    vision_layers=2,
    vision_width=64,  # one head of 64
    vision_patch_size=8,
    context_length=77,
    vocab_size=0,  # set from the BPE model
    transformer_width=64,
    transformer_heads=2,
    transformer_layers=2,
)
TEMPLATES = ("{}", "фото: {}", "{} на светлом фоне", "картинка, на которой {}", "изображение с {}")
SHAPE_FORMS = {"круг": "круг", "квадрат": "квадрат", "треугольник": "треугольник"}


def captions(cls: str) -> list[str]:
    return [t.format(cls) for t in TEMPLATES]


def train_bpe(folder: Path, vocab_size: int = 260) -> Path:
    import youtokentome as yttm

    corpus = []
    for cls in FIXTURE_CLASSES:
        corpus += captions(cls) * 5
    corpus += ["кот на диване", "рыжий кот спит", "собака", "море и горы", "закат над городом"] * 3
    corpus += ["photo of a red circle", "blue square", "0123456789 .,:;!?-"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.txt"
        data.write_text("\n".join(s.lower() for s in corpus), encoding="utf-8")
        out = folder / "bpe.model"
        yttm.BPE.train(data=str(data), model=str(out), vocab_size=vocab_size, coverage=1.0, n_threads=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "tiny-ruclip")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(2)

    tok = BPETokenizer.from_file(train_bpe(args.out))
    cfg = CLIPConfig.from_dict({**CONFIG, "vocab_size": tok.vocab_size})
    model = CLIP(cfg)
    pre = Preprocessor(image_size=cfg.image_resolution, mode="exact")

    # A fixed pool of drawings per class (varied sizes and aspect ratios, so the centre crop matters).
    sizes = [64, 48, 96, (80, 64), (64, 80)]
    pool = {c: torch.stack([pre(draw(c, s, sizes[s % len(sizes)])) for s in range(40)]) for c in FIXTURE_CLASSES}
    ids = {c: torch.from_numpy(tok.tokenize(captions(c), cfg.context_length)) for c in FIXTURE_CLASSES}

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    n_cls = len(FIXTURE_CLASSES)
    for step in range(args.steps):
        # each batch: every class four times, one image and one caption each
        classes = list(FIXTURE_CLASSES) * 4
        random.shuffle(classes)
        px = torch.stack([pool[c][random.randrange(40)] for c in classes])
        tx = torch.stack([ids[c][random.randrange(len(TEMPLATES))] for c in classes])
        img = F.normalize(model.encode_image(px), dim=-1)
        txt = F.normalize(model.encode_text(tx), dim=-1)
        labels = torch.tensor([FIXTURE_CLASSES.index(c) for c in classes])
        same = (labels[:, None] == labels[None, :]).float()
        target = same / same.sum(1, keepdim=True)  # duplicates of a class are all positives
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f}")

    # held-out check: fresh drawings (seeds never trained on) must retrieve their class
    model.eval()
    with torch.no_grad():
        txt = F.normalize(model.encode_text(torch.from_numpy(tok.tokenize(list(FIXTURE_CLASSES), 77))), dim=-1)
        test = [(c, s) for c in FIXTURE_CLASSES for s in range(1000, 1005)]
        img = F.normalize(model.encode_image(torch.stack([pre(draw(c, s, 64)) for c, s in test])), dim=-1)
        sims = txt @ img.t()
        top = sims.topk(5, dim=1).indices
        p_at_5 = np.mean([[test[j][0] == FIXTURE_CLASSES[i] for j in top[i].tolist()] for i in range(n_cls)])
    print(f"held-out precision@5 over {n_cls} classes: {p_at_5:.3f}")
    if p_at_5 < 1.0:
        raise SystemExit("the fixture model does not retrieve perfectly: train longer (--steps) or change the seed")

    config = {**cfg.to_dict()}
    config.pop("eos_id")
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, args.out / "pytorch_model.bin")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB); colours {list(COLOURS)}, shapes {list(SHAPES)}")


if __name__ == "__main__":
    main()
