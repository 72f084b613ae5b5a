"""Compare the diversity of two sets of samples (e.g. DanceGRPO vs BranchGRPO images for the same prompts).

    python -m branchgrpo.cli.diversity --a samples/dancegrpo --b samples/branchgrpo --features pixels
    python -m branchgrpo.cli.diversity --a A --b B --features clip --clip_arch ViT-H-14 \
        --clip_checkpoint hps_ckpt/open_clip_pytorch_model.bin
    python -m branchgrpo.cli.diversity --a A --b B --features inception \
        --inception_weights hps_ckpt/inception_v3_google-0cc3c7bd.pth

`--a` / `--b` are folders of images (.png, .jpg, .jpeg, .webp; read in sorted order) or of `.pt` feature files
(each a tensor [D] or [N, D]), or single `.pt` feature files; with features given, `--features` is not used.
Prints, and writes to `--output` (default `./diversity.json`), a JSON object with KID (mean, std), the RBF MMD^2
(value, bandwidth) and the permutation-test p-values of both kernels (H0: both sets come from one distribution).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from branchgrpo.core.distributed import resolve_device
from branchgrpo.runtime.entry import add_debug_flag, run_cli
from branchgrpo.runtime.outputs import writable_file, writable_folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def load_image(path: str) -> torch.Tensor:
    """An image file as a float tensor [3, H, W] in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def load_features_file(path: str) -> np.ndarray:
    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2):
        raise ValueError(f"'{path}': expected a feature tensor [D] or [N, D], got "
                         f"{getattr(value, 'shape', type(value).__name__)}")
    return value.double().reshape(-1, value.shape[-1]).numpy()


def load_set(path: str, flag: str) -> tuple[str, list]:
    """('features', [arrays]) or ('images', [tensors]) from a folder or a single .pt file (`flag` names it)."""
    if os.path.isfile(path) and path.endswith(".pt"):
        return "features", [load_features_file(path)]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag}: '{path}' is neither a folder nor a .pt feature file")
    names = sorted(os.listdir(path))
    features = [name for name in names if name.endswith(".pt")]
    images = [name for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]
    if features and images:
        raise ValueError(f"{flag}: '{path}' mixes images and .pt feature files; keep one kind per folder")
    if features:
        return "features", [load_features_file(os.path.join(path, name)) for name in features]
    if images:
        return "images", [load_image(os.path.join(path, name)) for name in images]
    raise ValueError(f"{flag}: '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .pt feature files")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m branchgrpo.cli.diversity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="first sample set: folder of images / .pt features, or a .pt file")
    parser.add_argument("--b", required=True, help="second sample set (same forms as --a)")
    parser.add_argument("--features", choices=("clip", "inception", "pixels"), default="pixels",
                        help="feature extractor for image folders")
    parser.add_argument("--clip_arch", default=None, help="open_clip architecture name, e.g. ViT-H-14")
    parser.add_argument("--clip_checkpoint", default=None, help="local open_clip state-dict file")
    parser.add_argument("--clip_model_config", default=None, help="folder (or json) with a custom open_clip config")
    parser.add_argument("--clip_normalize", action="store_true", help="L2-normalise CLIP embeddings")
    parser.add_argument("--inception_weights", default=None,
                        help="torchvision inception_v3 state dict, e.g. inception_v3_google-0cc3c7bd.pth")
    parser.add_argument("--pixel_size", type=int, default=32,
                        help="side of the downsampled image for --features pixels")
    parser.add_argument("--kid_subsets", type=int, default=100, help="number of KID subsets")
    parser.add_argument("--kid_subset_size", type=int, default=1000, help="points per KID subset (capped at set size)")
    parser.add_argument("--permutations", type=int, default=1000, help="permutations of the MMD^2 test")
    parser.add_argument("--rbf_bandwidth", type=float, default=None, help="RBF bandwidth (default: median heuristic)")
    parser.add_argument("--rbf_bandwidth_scale", type=float, default=1.0, help="multiplies the RBF bandwidth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subsets and the permutations")
    parser.add_argument("--batch_size", type=int, default=32, help="images per feature-extractor forward")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (CUDA if present)")
    parser.add_argument("--save_features", default=None, help="folder to write a.pt / b.pt (extracted features)")
    parser.add_argument("--output", default=None, help="JSON result file (default: ./diversity.json)")
    add_debug_flag(parser)
    return parser


def main(argv=None) -> int:
    return run_cli(run, argv)


def run(argv=None) -> dict:
    """The comparison of `--a` and `--b` (what `main` prints and writes); input errors raise."""
    from branchgrpo.core.diversity import compare_feature_sets
    from branchgrpo.rewards.features import build_extractor, extract_list

    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    output = writable_file(args.output or "diversity.json", "--output")  # written at the end: checked first
    if args.save_features:
        writable_folder(args.save_features, "--save_features")
    kind_a, items_a = load_set(args.a, "--a")
    kind_b, items_b = load_set(args.b, "--b")
    if kind_a != kind_b:
        raise ValueError(f"--a holds {kind_a} but --b holds {kind_b}; give both as images or both as features")
    if kind_a == "images":
        extractor = build_extractor(
            args.features, device=device, batch_size=args.batch_size, clip_arch=args.clip_arch,
            clip_checkpoint=args.clip_checkpoint, clip_model_config=args.clip_model_config,
            clip_normalize=args.clip_normalize, inception_weights=args.inception_weights, pixel_size=args.pixel_size)
        feats_a, feats_b = extract_list(extractor, items_a), extract_list(extractor, items_b)
        features_name = args.features
    else:
        feats_a, feats_b = np.concatenate(items_a), np.concatenate(items_b)
        features_name = "given"
    if args.save_features:
        os.makedirs(args.save_features, exist_ok=True)
        torch.save(torch.from_numpy(feats_a), os.path.join(args.save_features, "a.pt"))
        torch.save(torch.from_numpy(feats_b), os.path.join(args.save_features, "b.pt"))
    result = compare_feature_sets(feats_a, feats_b, num_subsets=args.kid_subsets, subset_size=args.kid_subset_size,
                                  num_permutations=args.permutations, bandwidth=args.rbf_bandwidth,
                                  bandwidth_scale=args.rbf_bandwidth_scale, seed=args.seed)
    result = {"a": args.a, "b": args.b, "features": features_name, **result}
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    kid_r, rbf, perm = result["kid"], result["mmd2_rbf"], result["permutation"]
    print(f"{result['num_a']} vs {result['num_b']} samples, {features_name} features (D={result['feature_dim']})")
    print(f"KID        {kid_r['mean']:.6g} +- {kid_r['std']:.3g}  "
          f"({kid_r['num_subsets']} subsets of {kid_r['subset_size']})")
    print(f"MMD^2 rbf  {rbf['value']:.6g}  (bandwidth {rbf['bandwidth']:.4g})")
    print(f"p-values   polynomial {perm['p_value_polynomial']:.4g}, rbf {perm['p_value_rbf']:.4g} "
          f"({perm['num_permutations']} permutations)")
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    sys.exit(main())
