"""What D-MMD compares: the within- and between-class distance distributions a model gives source and target
batches, under each way of grouping them, and the D-MMD terms between them.

    python bench/dmmd_diagnose.py --model RUN/model.pt --root DATA -s synth_msmt -t synth_market

It draws `--batches` P×K batches from each side (as the adapt stage does: the source by identity; the target by
tracklet, and by identity for comparison), runs the model in training mode without gradients (each BatchNorm
normalises one domain's batch, as in the adapt step), and prints, per grouping, the mean within-class and
between-class Euclidean distances of the embeddings (before BNNeck, what the loss sees; `--normalize` for the
quick preset's L2-normalised D-MMD) and the mean D-MMD terms against the source. A target grouping whose
within-class pairs are of another kind than the source's (same camera vs across cameras) shows up as a large
`mmd_within` that aligning cannot remove without moving the target's same-person pairs apart. Target identity labels are read for this diagnostic only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdreid.data.cache import read_image  # noqa: E402
from kdreid.data.datasets import build_dataset  # noqa: E402
from kdreid.evaluation.features import load_model, model_input_size  # noqa: E402
from kdreid.losses import dmmd_terms, euclidean_distances  # noqa: E402
from kdreid.losses.mmd import within_between  # noqa: E402


def draw_batch(rng: np.random.Generator, groups: np.ndarray, p: int, k: int) -> np.ndarray:
    """Indices of P groups with at least K images, K images each (without replacement)."""
    names, counts = np.unique(groups, return_counts=True)
    eligible = names[counts >= k]
    if len(eligible) < p:
        raise SystemExit(f"only {len(eligible)} groups have {k} images; lower -p or -k")
    chosen = rng.choice(eligible, size=p, replace=False)
    return np.concatenate([rng.choice(np.flatnonzero(groups == g), size=k, replace=False) for g in chosen])


def embed(model, records, indices, size) -> torch.Tensor:
    images = np.stack([read_image(records[i].path, *size) for i in indices])  # (N, H, W, 3) uint8
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    with torch.no_grad():
        return model(batch).embedding  # training mode: BatchNorm on this batch alone, as in the adapt step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("-s", "--source", required=True)
    parser.add_argument("-t", "--target", required=True)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("-p", type=int, default=8)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normalize", action="store_true",
                        help="L2-normalise the embeddings first, as `kdreid adapt --dmmd-normalize` (the quick preset)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = load_model(args.model).train()
    size = model_input_size(model)
    source = list(build_dataset(args.source, args.root).train)
    target = list(build_dataset(args.target, args.root).train)

    def grouping(records, key):
        return np.array([key(r) for r in records])

    source_groups = {"identity": grouping(source, lambda r: r.pid),
                     "identity+camera": grouping(source, lambda r: r.pid * 1000 + r.camid)}
    target_groups = {"tracklet": grouping(target, lambda r: r.tracklet),
                     "identity (oracle)": grouping(target, lambda r: r.pid)}
    comparisons = [("identity", "tracklet"), ("identity", "identity (oracle)"), ("identity+camera", "tracklet")]
    stats: dict[str, list] = {}
    for _ in range(args.batches):
        for s_name, t_name in comparisons:
            s_idx = draw_batch(rng, source_groups[s_name], args.p, args.k)
            t_idx = draw_batch(rng, target_groups[t_name], args.p, args.k)
            s_emb, t_emb = embed(model, source, s_idx, size), embed(model, target, t_idx, size)
            if args.normalize:
                s_emb, t_emb = (torch.nn.functional.normalize(e, dim=1) for e in (s_emb, t_emb))
            s_lab = torch.as_tensor(source_groups[s_name][s_idx])
            t_lab = torch.as_tensor(target_groups[t_name][t_idx])
            terms = {k: v.item() for k, v in dmmd_terms(s_emb, s_lab, t_emb, t_lab).items()}
            sw, sb = within_between(euclidean_distances(s_emb), s_lab)
            tw, tb = within_between(euclidean_distances(t_emb), t_lab)
            stats.setdefault((s_name, t_name), []).append(
                [sw.mean().item(), sb.mean().item(), tw.mean().item(), tb.mean().item(),
                 terms["mmd_within"], terms["mmd_between"], terms["mmd_features"]])

    print(f"{args.model}: {args.source} -> {args.target}, {args.batches} batches of {args.p}x{args.k} per row, "
          f"{size[0]}x{size[1]}{', L2-normalised' if args.normalize else ''}; mean over batches")
    header = ("source groups", "target groups", "src within", "src between", "tgt within", "tgt between",
              "mmd_within", "mmd_between", "mmd_features")
    print(" | ".join(header))
    for (s_name, t_name), rows in stats.items():
        mean = np.mean(rows, axis=0)
        print(" | ".join([s_name, t_name] + [f"{v:.3f}" for v in mean]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
