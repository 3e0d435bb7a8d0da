"""Model speed, ours beside Sber's reference (ruclip==0.0.2) in the same run, same random weights.

    python scripts/bench_model.py [--model ruclip-vit-large-patch14-224] [--runs 5] [--batch 8] [--device cpu]

1. One-query text latency with the full-size text tower: ours end to end (tokenize + encode + normalise)
   against the reference's `encode_text` on ready-made ids, median of --runs x 20 calls; same embedding to 1e-4.
   Also ours with dynamic int8 linear layers (cosine to fp32 reported).
2. Image tower throughput (images/s) at --batch, median of --runs.
Needs `pip install --no-deps ruclip==0.0.2` (its model.py is imported by file path). No weights are downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from reference import model_module  # noqa: E402

from ruclip_search.encoder import RuCLIP  # noqa: E402
from ruclip_search.model import CLIP, CLIPConfig, quantize_int8  # noqa: E402
from ruclip_search.preprocess import Preprocessor  # noqa: E402
from ruclip_search.registry import CONFIGS  # noqa: E402
from ruclip_search.tokenizer import BPETokenizer  # noqa: E402

QUERY = "рыжий кот спит на диване"


def median_time(fn, runs: int, inner: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ruclip-vit-large-patch14-224", choices=list(CONFIGS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-images", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = CONFIGS[args.model]
    print(
        f"model {args.model} (random weights), device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )

    torch.manual_seed(0)
    ref = model_module().CLIP(**cfg).eval().to(dev)
    sd = ref.state_dict()
    net = CLIP(CLIPConfig.from_dict(cfg)).eval()
    net.load_state_dict(sd, strict=True)
    net.to(dev)
    tok = BPETokenizer.from_file(ROOT / "tests" / "fixtures" / "tokenizer" / "bpe.model")
    ours = RuCLIP(net, tok, Preprocessor(image_size=cfg["image_resolution"]), args.model, dev)
    ids = torch.from_numpy(ours.tokenize(QUERY)).to(dev)

    # --- text: one query -------------------------------------------------------------------------
    with torch.inference_mode():
        e_ref = F.normalize(ref.encode_text(ids).float(), dim=-1).cpu().numpy()
    e_ours = ours.encode_text(QUERY)
    diff = float(np.abs(e_ref - e_ours).max())

    def ref_text():
        with torch.inference_mode():
            ref.encode_text(ids)

    t_ref = median_time(ref_text, args.runs, 20)
    t_ours = median_time(lambda: ours.encode_text(QUERY), args.runs, 20)

    # what a search process holds: the text tower alone (Index.open loads parts=("text",))
    def text_tower() -> CLIP:
        net = CLIP(CLIPConfig.from_dict(cfg), parts=("text",)).eval()
        net.load_checkpoint_state(sd)
        return net

    search_model = RuCLIP(text_tower().to(dev), tok, ours.preprocessor, args.model, dev)
    e_text = search_model.encode_text(QUERY)
    t_text = median_time(lambda: search_model.encode_text(QUERY), args.runs, 20)
    q8 = RuCLIP(quantize_int8(text_tower()), tok, ours.preprocessor, args.model, torch.device("cpu"))
    if dev.type == "cpu":
        e_q8 = q8.encode_text(QUERY)
        cos_q8 = float((e_q8 * e_ours).sum())
        t_q8 = median_time(lambda: q8.encode_text(QUERY), args.runs, 20)
    n_tokens = int((ids != 0).sum())
    print(f"\none text query ({n_tokens} tokens incl. BOS/EOS), median of {args.runs}x20 calls")
    print(f"  reference encode_text (ids ready, 77 positions): {t_ref * 1e3:8.1f} ms")
    print(f"  ours, tokenize+encode+normalise (fp32):          {t_ours * 1e3:8.1f} ms   {t_ref / t_ours:5.1f}x faster")
    print(
        f"  ours, text tower only (as Index.open loads it):  {t_text * 1e3:8.1f} ms   {t_ref / t_text:5.1f}x faster"
        f"   same result: {np.array_equal(e_text, e_ours)}"
    )
    if dev.type == "cpu":
        print(
            f"  ours, int8 dynamic linear layers:                {t_q8 * 1e3:8.1f} ms   {t_ref / t_q8:5.1f}x faster"
            f"   cosine to fp32 {cos_q8:.4f}"
        )
    print(f"  max |ours - reference| (normalised): {diff:.2e}  {'OK' if diff <= 1e-4 else 'FAIL'}")

    # --- images: throughput ----------------------------------------------------------------------
    if args.skip_images:
        return
    s = cfg["image_resolution"]
    px = torch.randn(args.batch, 3, s, s, generator=torch.Generator().manual_seed(0)).to(dev)

    def ref_img():
        with torch.inference_mode():
            ref.encode_image(px)

    with torch.inference_mode():
        i_diff = float((ref.encode_image(px) - net.encode_image(px)).abs().max())
    runs = max(3, args.runs // 2) if dev.type == "cpu" else args.runs
    ti_ref = median_time(ref_img, runs, 1)
    ti_ours = median_time(lambda: ours.encode_pixels(px), runs, 1)
    print(f"\nimage tower, batch {args.batch}, median of {runs} runs")
    print(f"  reference: {args.batch / ti_ref:8.2f} images/s")
    print(f"  ours:      {args.batch / ti_ours:8.2f} images/s   {ti_ref / ti_ours:5.2f}x")
    print(f"  max |ours - reference| (raw embeddings): {i_diff:.2e}")


if __name__ == "__main__":
    main()
