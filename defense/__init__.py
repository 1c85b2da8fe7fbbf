"""BaDExpert guard: the offline job that turns a suspect classifier into a guard bundle.

The public API, for notebooks and pipelines (the ``badexpert`` command calls the same methods)::

    from defense import Bundle

    bundle = Bundle.build(model, "clean_images/", architecture="cifar_resnet18", out="guard/")
    bundle = bundle.calibrate("more_clean_images/", out="guard-2/")
    bundle = Bundle.load("guard-2/")
    decisions = bundle.decide(images)  # a uint8 tensor, PIL images, files or a folder
    report = bundle.evaluate("clean_test/", "triggered_test/", report_dir="report/")

- :class:`Bundle`      the three models and the threshold: :meth:`Bundle.build` (a suspect model and
  clean images in), :meth:`Bundle.load` (digests and signature checked), :meth:`Bundle.calibrate`
  (a new threshold from more clean images), :meth:`Bundle.save`, :meth:`Bundle.score`,
  :meth:`Bundle.decide`, :meth:`Bundle.evaluate` (the paper's metrics on clean and triggered images)
- :class:`Decisions`   what :meth:`Bundle.decide` returns; :class:`GuardScores` what
  :meth:`Bundle.score` returns; :class:`Report` what :meth:`Bundle.evaluate` returns
- :class:`BuildConfig` the build's settings and their defaults (options of :meth:`Bundle.build`)
- :class:`UserError`   every error that is the caller's to fix, with a one-line message

These names are the stable surface; every other module is internal and may change. (The verbs
are methods, not functions of the package: ``defense.build`` and ``defense.calibrate`` are modules.)
The modules, each with one job:

- :mod:`defense.models`        architectures (a registry) and loading user models and weights
- :mod:`defense.preprocessing` the one preprocessing definition shared by build, evaluate and serve
- :mod:`defense.data`          reading a clean image folder
- :mod:`defense.score`         the BaDExpert score (pure tensor math)
- :mod:`defense.threshold`     calibrating the rejection threshold
- :mod:`defense.finetune`      backdoor expert (unlearning) and auxiliary model (clean finetuning)
- :mod:`defense.auxiliary_recipes` the auxiliary's finetuning recipes (plain, warm-up, fresh head)
- :mod:`defense.guard`         the three models together, scoring batches
- :mod:`defense.manifest`      what a bundle says about itself (the manifest's schema)
- :mod:`defense.bundle_trust`  the manifest's digest, signing and verification, checks of its values
- :mod:`defense.bundle`        saving and loading bundles
- :mod:`defense.guard_bundle`  the :class:`Bundle`; :mod:`defense.build_job` and
  :mod:`defense.build_inputs` what its build makes of the inputs; :mod:`defense.image_inputs` images
  as Python holds them
- :mod:`defense.build`         the offline job end to end, in memory
- :mod:`defense.evaluate_job`  the evaluation of a bundle; :mod:`defense.evaluation` detection metrics;
  :mod:`defense.bootstrap` their intervals; :mod:`defense.plots` and :mod:`defense.report` the report
- :mod:`defense.device`        which torch device to run on (the server uses it too)

The ``badexpert`` command is the :mod:`badexpert` package, above this one and :mod:`service`; this
package imports neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from defense.version import __version__

if TYPE_CHECKING:
    from defense.build import BuildConfig
    from defense.errors import UserError
    from defense.evaluate_job import Report
    from defense.guard_bundle import Bundle, Decisions
    from defense.score import GuardScores

# The public names and the module of each, imported on first use: ``import defense.errors`` stays light.
_PUBLIC = {
    "Bundle": "defense.guard_bundle",
    "Decisions": "defense.guard_bundle",
    "GuardScores": "defense.score",
    "Report": "defense.evaluate_job",
    "BuildConfig": "defense.build",
    "UserError": "defense.errors",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'defense' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
