"""Input-level backdoor detectors that BaDExpert is compared with, reimplemented from their papers.

Every detector returns one score per input where HIGHER means MORE BACKDOOR-LIKE (the opposite
of BaDExpert's own score, which is low for backdoor inputs). Inputs are uint8 image batches
(N, 3, H, W); ``normalizer`` is the model's input normalization (``Preprocessing.normalizer()``),
so the detectors perturb images in pixel space, as their papers do, and normalize afterwards.

- STRIP (Gao et al., ACSAC 2019): superimpose the input with N clean images and average the
  entropy of the model's predictions; a trigger keeps dominating the blends, so backdoor inputs
  have LOW entropy. Score = -mean entropy. Superimposition as in the authors' code
  (``cv2.addWeighted(x, 1, clean, 1, 0)``: a saturating sum); N = 64 overlays per input drawn from
  the defender's reserved clean images (the backdoor-toolbox default; the original used 100).
- SCALE-UP (Guo et al., ICLR 2023): multiply pixel values by each factor in {3, 5, 7, 9, 11}
  (clipped to the valid range) and measure the scaled prediction consistency, SPC(x) = share of
  scaled copies predicted as the original prediction; backdoor inputs are consistent. With
  reserved clean images (the paper's data-limited variant), SPC is standardized with the mean
  and standard deviation of the clean SPC of the predicted class.
- IBD-PSC (Hou et al., ICML 2024): multiply the weight and bias of the last k BatchNorm layers
  by omega = 1.5; choose the smallest k at which the reserved clean images' error rate exceeds
  xi = 0.6, then average the softmax probability of the original prediction over the n = 5
  models that amplify the last k+1, ..., k+n layers, as the authors' code does (parameter-
  oriented scaling consistency); backdoor inputs keep their prediction.

Defaults follow the papers and the authors' reference code (BackdoorBox, backdoor-toolbox).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from defense.finetune import predict_logits


# ----------------------------------------------------------------------------------------------
# STRIP


@torch.inference_mode()
def strip_scores(model: nn.Module, images: torch.Tensor, normalizer: nn.Module, reserved_images: torch.Tensor,
                 overlays: int = 64, weight_input: float = 1.0, weight_overlay: float = 1.0, seed: int = 0,
                 device: str | torch.device = "cpu", batch_size: int = 2048) -> torch.Tensor:
    """-(mean prediction entropy over ``overlays`` superimpositions); higher = more backdoor-like."""
    model = model.to(device).eval()
    normalizer = normalizer.to(device)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(reserved_images), (len(images), overlays), generator=generator)
    inputs_per_chunk = max(1, batch_size // overlays)
    scores = []
    for start in range(0, len(images), inputs_per_chunk):
        chunk = images[start:start + inputs_per_chunk].to(device).float()
        background = reserved_images[picks[start:start + inputs_per_chunk].flatten()].to(device).float()
        background = background.view(len(chunk), overlays, *chunk.shape[1:])
        mixed = (weight_input * chunk[:, None] + weight_overlay * background).clamp(0, 255)
        logits = model(normalizer(mixed.flatten(0, 1))).float()
        log_probs = logits.log_softmax(1)
        entropy = -(log_probs.exp() * log_probs).sum(1) / torch.log(torch.tensor(2.0))  # bits
        scores.append(-entropy.view(len(chunk), overlays).mean(1).cpu())
    return torch.cat(scores) if scores else torch.empty(0)


# ----------------------------------------------------------------------------------------------
# SCALE-UP


SCALE_UP_FACTORS = (3, 5, 7, 9, 11)


@torch.inference_mode()
def scaled_prediction_consistency(model: nn.Module, images: torch.Tensor, normalizer: nn.Module,
                                  factors=SCALE_UP_FACTORS, device: str | torch.device = "cpu",
                                  batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(SPC in [0, 1], original predictions) for each input."""
    model = model.to(device).eval()
    normalizer = normalizer.to(device)
    factors_t = torch.tensor(factors, dtype=torch.float32, device=device)
    per_chunk = max(1, batch_size // (len(factors) + 1))
    spc, predictions = [], []
    for start in range(0, len(images), per_chunk):
        chunk = images[start:start + per_chunk].to(device).float()
        scaled = (chunk[:, None] * factors_t[None, :, None, None, None]).clamp(0, 255)
        batch = torch.cat([chunk[:, None], scaled], dim=1).flatten(0, 1)
        labels = model(normalizer(batch)).argmax(1).view(len(chunk), len(factors) + 1)
        predictions.append(labels[:, 0].cpu())
        spc.append((labels[:, 1:] == labels[:, :1]).float().mean(1).cpu())
    if not spc:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(spc), torch.cat(predictions)


@dataclass
class ScaleUp:
    """SCALE-UP, fitted (data-limited variant) on reserved clean images, then applied to inputs."""

    factors: tuple[int, ...] = SCALE_UP_FACTORS
    class_mean: torch.Tensor | None = None
    class_std: torch.Tensor | None = None

    def fit(self, model, reserved_images, normalizer, num_classes: int, device="cpu") -> "ScaleUp":
        spc, predicted = scaled_prediction_consistency(model, reserved_images, normalizer, self.factors, device)
        overall_mean, overall_std = float(spc.mean()), float(spc.std())
        self.class_mean = torch.full((num_classes,), overall_mean)
        self.class_std = torch.full((num_classes,), max(overall_std, 1e-3))
        for c in range(num_classes):
            members = spc[predicted == c]
            if len(members) >= 2:
                self.class_mean[c] = members.mean()
                self.class_std[c] = max(float(members.std()), 1e-3)
        return self

    def scores(self, model, images, normalizer, device="cpu") -> torch.Tensor:
        spc, predicted = scaled_prediction_consistency(model, images, normalizer, self.factors, device)
        if self.class_mean is None:
            return spc
        return (spc - self.class_mean[predicted]) / self.class_std[predicted]


def scale_up_scores(model, images, normalizer, reserved_images=None, num_classes: int | None = None,
                    factors=SCALE_UP_FACTORS, device="cpu") -> torch.Tensor:
    """Standardized SPC (raw SPC without reserved images); higher = more backdoor-like."""
    detector = ScaleUp(tuple(factors))
    if reserved_images is not None:
        detector.fit(model, reserved_images, normalizer, num_classes, device)
    return detector.scores(model, images, normalizer, device)


# ----------------------------------------------------------------------------------------------
# IBD-PSC


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def amplified_copy(model: nn.Module, last_k: int, omega: float) -> nn.Module:
    """A copy of ``model`` whose last ``last_k`` BatchNorm layers have weight and bias times omega."""
    copied = copy.deepcopy(model).eval()
    layers = batchnorm_layers(copied)
    with torch.no_grad():
        for layer in layers[len(layers) - last_k:] if last_k > 0 else []:
            if layer.weight is not None:
                layer.weight.mul_(omega)
            if layer.bias is not None:
                layer.bias.mul_(omega)
    return copied


@dataclass
class IbdPsc:
    n: int = 5
    xi: float = 0.6
    omega: float = 1.5
    start_k: int | None = None
    layer_errors: list[float] = field(default_factory=list)
    models: list[nn.Module] = field(default_factory=list, repr=False)

    def fit(self, model, reserved_images, reserved_labels, normalizer, device="cpu") -> "IbdPsc":
        """Adaptive layer selection: the smallest k whose amplification makes > xi of the clean images wrong."""
        count = len(batchnorm_layers(model))
        if count == 0:
            raise ValueError("IBD-PSC amplifies BatchNorm layers; this model has none")
        self.layer_errors = []
        for k in range(1, count + 1):
            logits = predict_logits(amplified_copy(model, k, self.omega), reserved_images, normalizer, device)
            error = float((logits.argmax(1) != reserved_labels).float().mean())
            self.layer_errors.append(error)
            if error > self.xi:
                self.start_k = k
                break
        if self.start_k is None:  # no depth reaches the error rate: use the deepest n settings
            self.start_k = max(0, count - self.n)
        first = min(self.start_k + 1, count)
        last = min(self.start_k + self.n, count)
        self.models = [amplified_copy(model, k, self.omega).to(device) for k in range(first, last + 1)]
        return self

    @torch.inference_mode()
    def scores(self, model, images, normalizer, device="cpu", batch_size: int = 512) -> torch.Tensor:
        if not self.models:
            raise RuntimeError("call fit() first")
        predicted = predict_logits(model, images, normalizer, device, batch_size).argmax(1)
        total = torch.zeros(len(images), dtype=torch.float64)
        for amplified in self.models:
            # float64: float32 softmax rounds every confident prediction to exactly 1.0, and the
            # resulting ties would blur the ranking that AUROC and a 1%-FPR threshold rely on
            probs = predict_logits(amplified, images, normalizer, device, batch_size).double().softmax(1)
            total += probs.gather(1, predicted[:, None]).squeeze(1)
        return total / len(self.models)


def ibd_psc_scores(model, images, normalizer, reserved_images, reserved_labels, n: int = 5, xi: float = 0.6,
                   omega: float = 1.5, device="cpu") -> torch.Tensor:
    """Mean probability of the original prediction under BN amplification; higher = more backdoor-like."""
    detector = IbdPsc(n=n, xi=xi, omega=omega).fit(model, reserved_images, reserved_labels, normalizer, device)
    return detector.scores(model, images, normalizer, device)


# ----------------------------------------------------------------------------------------------
# one interface for the benchmark


@dataclass
class Baseline:
    """A fitted detector: ``score(images)`` -> per-input scores, higher = more backdoor-like."""

    name: str
    settings: dict
    score: callable
    fit_info: dict = field(default_factory=dict)


def make_baselines(model, normalizer, reserved_images, reserved_labels, num_classes: int, device="cpu",
                   seed: int = 0, strip_overlays: int = 64) -> dict[str, Baseline]:
    """STRIP, SCALE-UP and IBD-PSC, each fitted on the defender's reserved clean images."""
    model = model.eval()
    scale_up = ScaleUp().fit(model, reserved_images, normalizer, num_classes, device)
    baselines = {
        "strip": Baseline("STRIP", {"overlays": strip_overlays, "weights": [1.0, 1.0], "seed": seed},
                          lambda images: strip_scores(model, images, normalizer, reserved_images, strip_overlays,
                                                      seed=seed, device=device)),
        "scale_up": Baseline("SCALE-UP", {"factors": list(SCALE_UP_FACTORS), "normalization": "per predicted class"},
                             lambda images: scale_up.scores(model, images, normalizer, device)),
    }
    if batchnorm_layers(model):
        psc = IbdPsc().fit(model, reserved_images, reserved_labels, normalizer, device)
        baselines["ibd_psc"] = Baseline(
            "IBD-PSC", {"n": psc.n, "xi": psc.xi, "omega": psc.omega},
            lambda images: psc.scores(model, images, normalizer, device),
            {"start_k": psc.start_k, "layer_errors": psc.layer_errors, "amplified_models": len(psc.models),
             "batchnorm_layers": len(batchnorm_layers(model))})
    return baselines
