"""BaDExpert guard: the offline job that turns a suspect classifier into a guard bundle.

The public verbs live in small modules, each with one job:

- :mod:`defense.models`        architectures (a registry) and loading user models and weights
- :mod:`defense.preprocessing` the one preprocessing definition shared by build, evaluate and serve
- :mod:`defense.data`          reading a clean image folder
- :mod:`defense.score`         the BaDExpert score (pure tensor math)
- :mod:`defense.threshold`     calibrating the rejection threshold
- :mod:`defense.finetune`      backdoor expert (unlearning) and auxiliary model (clean finetuning)
- :mod:`defense.guard`         the three models together, scoring batches
- :mod:`defense.bundle`        saving and loading bundles (schema: `manifest`; digests, signing, checks: `bundle_trust`)
- :mod:`defense.build`         the offline job end to end
"""

__version__ = "0.1.0"
