"""BaDExpert guard: the offline job that turns a suspect classifier into a guard bundle.

The public verbs live in small modules, each with one job:

- :mod:`defense.models`        architectures (a registry) and loading user models and weights
- :mod:`defense.preprocessing` the one preprocessing definition shared by build, evaluate and serve
- :mod:`defense.data`          reading a clean image folder
- :mod:`defense.score`         the BaDExpert score (pure tensor math)
- :mod:`defense.threshold`     calibrating the rejection threshold
- :mod:`defense.finetune`      backdoor expert (unlearning) and auxiliary model (clean finetuning)
- :mod:`defense.guard`         the three models together, scoring batches
- :mod:`defense.manifest`      what a bundle says about itself (the manifest's schema)
- :mod:`defense.bundle_trust`  the manifest's digest, signing and verification, checks of its values
- :mod:`defense.bundle`        saving and loading bundles
- :mod:`defense.build`         the offline job end to end
- :mod:`defense.evaluation`    detection metrics; :mod:`defense.bootstrap` their intervals;
  :mod:`defense.plots` and :mod:`defense.report` the evaluation report
- :mod:`defense.device`        which torch device to run on (the server uses it too)

The ``badexpert`` command is the :mod:`badexpert` package, above this one and :mod:`service`; this
package imports neither.
"""

__version__ = "0.1.0"
