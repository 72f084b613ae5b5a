"""The reward-hacking monitor: at every held-out evaluation, the samples are compared with the base model's samples of
the same prompts and seeds (the evaluation at step 0), for images and videos alike (DESIGN section 10).

The failures reported for this family of methods - grids and checkerboards, over-saturation, diversity collapsing
while the reward still rises - each move one of these numbers:

- KID and MMD^2 (branchgrpo.core.diversity) between the evaluation's features and the base's, with the permutation
  p-value of the RBF MMD^2. The two sets share their noise (sample i of both comes from the same seed), which makes
  them positively correlated: the pooled permutation test is then conservative (a small p-value still means the
  distributions differ). Training is meant to move the distribution, so these are shown, and only checked against a
  threshold when one is given (`--hacking_max_kid`).
- Within-prompt diversity: the mean pairwise Euclidean feature distance between the samples of one prompt (its
  seeds), averaged over prompts; checked as a ratio to the base's (`--hacking_min_diversity_ratio`).
- A high-frequency artefact score: the share of an image's AC spectral energy (the DC term left out) in the top band
  of frequencies, `--hacking_hf_band` of the frequency range measured in the max-norm (so a checkerboard, at Nyquist
  in both axes, and stripes at Nyquist in one axis are both in it); averaged over samples and checked as a ratio to
  the base's (`--hacking_max_hf_ratio`). A checkerboard has all its AC energy in the top band (share 1); an image
  with a flat spectrum (white noise on average, a single bright pixel exactly) has the top band's share of the
  frequency bins; smooth natural images have little.

Videos: features of the middle frame (as the eval CLI's PNGs), the high-frequency share averaged over up to
`VIDEO_FRAMES` evenly spaced frames. Only the base samples' features and two means are kept (checkpointed state, so a
resumed run compares against the same reference); the images are not. Every rank computes its own samples' features,
the features are gathered, and every rank takes the same decision.

Samples that are not finite (NaN or inf in the image, its features or its high-frequency share: a diverging policy)
are left out of every statistic, as the held-out reward leaves them out of its mean, and counted
(`monitor_nonfinite`); a statistic that too few finite samples remain for is null, never a NaN.

The monitor is one of the run's guards (branchgrpo.runtime.guards): `measure` computes an evaluation's entries,
`observe` reads the record's alarm, and under `--hacking_guard stop` an alarm trips it.
"""

from __future__ import annotations

import base64
import logging
import math
import time

import numpy as np
import torch

from branchgrpo.core import distributed
from branchgrpo.runtime.entry import RunHalted
from branchgrpo.runtime.guards import Guard, Observation
from branchgrpo.runtime.outputs import still_frames

log = logging.getLogger(__name__)

VIDEO_FRAMES = 8  # frames per video that enter the high-frequency share
FFT_CHUNK = 8  # images per FFT call (a 720 x 720 RGB image is 12 MB of complex64)


class RewardHackingError(RunHalted):
    """The run stopped because the monitor crossed a threshold under --hacking_guard stop (after a checkpoint)."""


# ---------------------------------------------------------------------------------------------------------------
# Pure statistics
# ---------------------------------------------------------------------------------------------------------------
def top_band_mask(height: int, width: int, band: float) -> torch.Tensor:
    """bool [H, W] over the DFT bins (numpy/torch order): max(|f_y|, |f_x|) / 0.5 > 1 - band, with f in cycles per
    pixel. Computed on integer frequencies (k / n exactly) so that bins on the edge fall on a defined side."""
    if not 0 < band <= 1:
        raise ValueError(f"band must be in (0, 1], got {band}")
    ky = torch.fft.fftfreq(height, d=1.0 / height).abs()  # |k| in 0..n/2
    kx = torch.fft.fftfreq(width, d=1.0 / width).abs()
    radius = torch.maximum(2 * ky[:, None] / height, 2 * kx[None, :] / width)  # in [0, 1]
    return radius > 1 - band + 1e-12


def high_frequency_share(media: torch.Tensor, band: float = 0.5, max_frames: int = VIDEO_FRAMES,
                         device: torch.device | str | None = None, kind: str = "image") -> torch.Tensor:
    """Per sample: the share of AC spectral energy (summed over channels) in the top frequency band; float64 [B].
    Images [B, C, H, W]; videos [B, C, F, H, W]: the mean over up to `max_frames` evenly spaced frames. An image
    without AC energy (constant) scores 0. No window is applied, so the closed forms are exact: the image is
    treated as periodic (its border discontinuity adds the same energy to the base and the trained model).
    `device`: where the FFTs run, a chunk at a time (default: where `media` is)."""
    if kind == "video":
        frames = media.shape[2]
        index = torch.linspace(0, frames - 1, min(frames, max_frames)).round().long()
        clips = media.index_select(2, index.to(media.device))
        per_frame = high_frequency_share(clips.transpose(1, 2).flatten(0, 1), band, device=device)
        return per_frame.reshape(media.shape[0], index.numel()).mean(1)
    if media.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W] or videos [B, C, F, H, W], got {tuple(media.shape)}")
    device = media.device if device is None else torch.device(device)
    mask = top_band_mask(media.shape[-2], media.shape[-1], band).to(device)
    out = []
    for start in range(0, media.shape[0], FFT_CHUNK):
        x = media[start:start + FFT_CHUNK].to(device, torch.float32)
        power = torch.fft.fft2(x).abs().square().sum(1).double()  # [b, H, W]
        power[:, 0, 0] = 0.0  # the DC term is the mean brightness, not structure
        ac = power.flatten(1).sum(1)
        top = power[:, mask].sum(1)
        out.append(torch.where(ac > 0, top / ac.clamp_min(1e-300), torch.zeros_like(ac)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over the unordered pairs of rows of `features [S, D]` (S >= 2)."""
    x = np.asarray(features, dtype=np.float64)
    if x.shape[0] < 2:
        raise ValueError(f"mean pairwise distance needs at least 2 samples, got {x.shape[0]}")
    diff = x[:, None, :] - x[None, :, :]
    dist = np.sqrt((diff * diff).sum(-1))
    return float(dist[np.triu_indices(x.shape[0], k=1)].mean())


def within_prompt_diversity(features: np.ndarray, prompt_ids) -> float | None:
    """Mean over prompts (with >= 2 samples) of the mean pairwise feature distance of that prompt's samples; None
    when no prompt has two samples."""
    prompt_ids = np.asarray(prompt_ids)
    values = [mean_pairwise_distance(features[prompt_ids == p]) for p in np.unique(prompt_ids)
              if (prompt_ids == p).sum() >= 2]
    return float(np.mean(values)) if values else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None:
        return None
    return value / reference if reference > 0 else (1.0 if value == 0 else math.inf)


# ---------------------------------------------------------------------------------------------------------------
# The monitor (checkpointed state: the base samples' features)
# ---------------------------------------------------------------------------------------------------------------
def _encode(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(array.shape), "float32_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode(blob: dict) -> np.ndarray:
    data = np.frombuffer(base64.b64decode(blob["float32_base64"]), dtype="<f4")
    return data.reshape(blob["shape"]).copy()


class HackingMonitor(Guard):
    """Compares each evaluation with the step-0 one (see the module docstring); `eval_cfg` is the run's EvalConfig.

    `measure` returns the entries the evaluation record gains, `monitor_alarm` naming the thresholds crossed;
    `observe` of that record warns about an alarm, and under `--hacking_guard stop` it also trips the guard (the
    trainer then writes a checkpoint and raises `error(checkpoint)`)."""

    STATE_OPTIONAL = True  # a checkpoint written before the monitor existed resumes without a reference (warned)

    def __init__(self, eval_cfg, device: torch.device | str = "cpu", is_main: bool = True, media: str = "image"):
        self.cfg, self.device, self.is_main, self.media = eval_cfg, torch.device(device), is_main, media
        self.reference: dict | None = None  # features float32 [N, D], sample ids, hf share, diversity, settings
        self.extractor = None
        self.alarm: tuple[int, list[str]] | None = None  # (step, what crossed its threshold) of the last alarm
        self.last_cost_s = 0.0
        self._warned_no_reference = False

    @property
    def enabled(self) -> bool:
        return self.cfg.hacking_guard != "off"

    @property
    def settings(self) -> dict:
        """What the reference depends on: a resumed run must compute its features the same way."""
        c = self.cfg
        return {"hacking_features": c.hacking_features, "hacking_feature_weights": c.hacking_feature_weights,
                "hacking_clip_arch": c.hacking_clip_arch if c.hacking_features == "clip" else None,
                "hacking_hf_band": c.hacking_hf_band}

    def _features(self, stills: torch.Tensor) -> np.ndarray:
        if self.extractor is None:
            from branchgrpo.rewards.features import build_extractor

            c = self.cfg
            self.extractor = build_extractor(
                c.hacking_features, device=self.device, clip_arch=c.hacking_clip_arch,
                clip_checkpoint=c.hacking_feature_weights, inception_weights=c.hacking_feature_weights,
                pixel_size=min(32, *stills.shape[-2:]), flags=c.feature_flags)  # never upsample small images' pixels
        return self.extractor(stills).astype(np.float32)

    @torch.no_grad()
    def measure(self, step: int, media: torch.Tensor, sample_ids, is_pad, samples_per_prompt: int) -> dict:
        """This rank's evaluation samples (`media` [n, ...] in [0, 1], their global sample ids, padding flags) ->
        the record's `monitor_*` entries (identical on every rank). The step-0 evaluation becomes the reference."""
        if not self.enabled:
            return {}
        start = time.time()
        ids, x, hf_all, num_nonfinite = self._gather(media, sample_ids, is_pad)
        hf_share = float(hf_all.mean()) if len(hf_all) else None
        diversity = within_prompt_diversity(x, ids // samples_per_prompt)
        record = {"monitor_hf_share": hf_share, "monitor_diversity": diversity, "monitor_nonfinite": num_nonfinite}
        if self.reference is None and step == 0:
            self.reference = {"features": x, "sample_ids": ids.tolist(), "hf_share": hf_share,
                              "diversity": diversity, "settings": self.settings}
        if self.reference is None:
            if not self._warned_no_reference and self.is_main:
                log.warning("reward-hacking monitor: the checkpoint has no step-0 reference (written before the "
                            "monitor existed); only absolute values are logged")
            self._warned_no_reference = True
            return record
        record.update(self._compare(x, hf_share, diversity))
        record["monitor_alarm"] = self._crossed(record)
        self.last_cost_s = time.time() - start  # logged, not recorded: eval.jsonl stays reproducible
        return record

    def _gather(self, media: torch.Tensor, sample_ids, is_pad) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Every rank's samples, padding dropped, in sample-id order: ids, features, high-frequency shares of the
        finite ones, and how many were not finite (in the image, its features or its share)."""
        feats = torch.from_numpy(self._features(still_frames(media, self.media))).double()
        hf = high_frequency_share(media, self.cfg.hacking_hf_band, device=self.device, kind=self.media).double()
        finite = torch.isfinite(media.flatten(1)).all(1).cpu() & torch.isfinite(feats).all(1) & torch.isfinite(hf)
        ids = torch.tensor(list(sample_ids), dtype=torch.float64)
        keep = (~torch.tensor(list(is_pad), dtype=torch.bool)).double()
        # a non-finite sample's figures are zeroed before the gather: only its flag travels
        values = torch.where(finite[:, None], torch.cat([hf[:, None], feats], dim=1), torch.zeros(()))
        local = torch.cat([ids[:, None], keep[:, None], finite[:, None].double(), values], dim=1)
        gathered = distributed.all_gather_cat(local).numpy()
        gathered = gathered[gathered[:, 1] > 0]
        gathered = gathered[np.argsort(gathered[:, 0], kind="stable")]
        num_nonfinite = int((gathered[:, 2] == 0).sum())
        gathered = gathered[gathered[:, 2] > 0]
        return gathered[:, 0].astype(np.int64), gathered[:, 4:].astype(np.float32), gathered[:, 3], num_nonfinite

    def _compare(self, x: np.ndarray, hf_share: float | None, diversity: float | None) -> dict:
        from branchgrpo.core.diversity import kid, permutation_test

        ref = self.reference
        out = {"monitor_hf_ratio": _ratio(hf_share, ref["hf_share"]),
               "monitor_diversity_ratio": _ratio(diversity, ref["diversity"]),
               "monitor_kid": None, "monitor_mmd2": None, "monitor_mmd2_p": None}
        y = ref["features"]
        if len(x) and np.array_equal(x, y):  # the base model itself (step 0): identical sets, no evidence of a change
            out.update(monitor_kid=0.0, monitor_mmd2=0.0, monitor_mmd2_p=1.0)
            return out
        n = min(len(x), len(y))
        if n < 2:  # the unbiased KID / MMD^2 need two samples a side: nothing to report (null, not a number)
            return out
        size = min(n, 1000)
        out["monitor_kid"] = kid(x, y, num_subsets=1 if size == n else 100, subset_size=size).mean
        if self.cfg.hacking_permutations > 0:
            try:
                test = permutation_test(x, y, kernel="rbf", num_permutations=self.cfg.hacking_permutations)
                out.update(monitor_mmd2=test.statistic, monitor_mmd2_p=test.p_value)
            except ValueError:  # every feature vector identical (median bandwidth 0): no RBF test
                pass
        return out

    @staticmethod
    def summary(record: dict) -> str:
        """The monitor's figures of one evaluation record, for the log."""
        names = ("hf_share", "hf_ratio", "diversity_ratio", "kid", "mmd2_p")
        figures = [f"{n} " + ("n/a" if record.get("monitor_" + n) is None else f"{record['monitor_' + n]:.4g}")
                   for n in names]
        skipped = record.get("monitor_nonfinite")
        return ", ".join(figures) + (f"; {skipped} non-finite sample(s) left out" if skipped else "")

    def thresholds(self) -> dict[str, tuple[str, float]]:
        """record key -> (direction, threshold) for the checks that are on."""
        c, out = self.cfg, {}
        if c.hacking_max_hf_ratio > 0:
            out["monitor_hf_ratio"] = (">", c.hacking_max_hf_ratio)
        if c.hacking_min_diversity_ratio > 0:
            out["monitor_diversity_ratio"] = ("<", c.hacking_min_diversity_ratio)
        if c.hacking_max_kid > 0:
            out["monitor_kid"] = (">", c.hacking_max_kid)
        return out

    def _crossed(self, record: dict) -> list[str]:
        crossed = []
        for key, (direction, limit) in self.thresholds().items():
            value = record.get(key)
            if value is not None and (value > limit if direction == ">" else value < limit):
                crossed.append(f"{key[len('monitor_'):]} {value:.4g} {direction} {limit:g}")
        return crossed

    # --- the guard ---------------------------------------------------------------------------------------------
    def observe(self, seen: Observation) -> None:
        """An evaluation's record: its alarm, if any, is warned about (rank 0) and kept for the message."""
        crossed = seen.record.get("monitor_alarm") if seen.evaluation else None
        if not crossed:
            return
        self.alarm = (seen.step, crossed)
        if self.is_main:
            log.warning("reward-hacking monitor at step %d: %s (against the step-0 samples of the same prompts and "
                        "seeds; --hacking_guard %s)", seen.step, "; ".join(crossed), self.cfg.hacking_guard)

    @property
    def tripped(self) -> bool:
        return self.cfg.hacking_guard == "stop" and self.alarm is not None

    def error(self, checkpoint) -> RewardHackingError:
        step, crossed = self.alarm
        return RewardHackingError(
            f"reward hacking suspected at the evaluation of step {step}: {'; '.join(crossed)} (against the base "
            f"model's samples of the same prompts and seeds; --hacking_guard stop); stopped after writing "
            f"{checkpoint}. Look at the evaluation grids under samples/ and the monitor panel of reward_curve.png; to "
            "go on anyway, resume with --resume_from_checkpoint latest and a looser threshold or --hacking_guard warn")

    # --- checkpointed state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        if self.reference is None:
            return None
        ref = self.reference
        return {"features": _encode(ref["features"]), "sample_ids": ref["sample_ids"], "hf_share": ref["hf_share"],
                "diversity": ref["diversity"], "settings": ref["settings"]}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        changed = {k: (v, self.settings.get(k)) for k, v in state["settings"].items() if self.settings.get(k) != v}
        if changed and self.enabled:
            detail = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"--resume_from_checkpoint: the reward-hacking monitor's reference was computed with "
                             f"other settings ({detail}); resume with the run's own")
        self.reference = {"features": _decode(state["features"]), "sample_ids": list(state["sample_ids"]),
                          "hf_share": state["hf_share"], "diversity": state["diversity"],
                          "settings": dict(state["settings"])}
