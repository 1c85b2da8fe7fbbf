"""The auxiliary model's finetuning recipes (``--finetune-recipe``; docs/method.md, section 3).

Every recipe is the paper's clean finetuning (SGD, Nesterov, step decay, crop and flip) with the
same learning-rate search on D_select (:func:`defense.rates.choose_finetuning_rate`); they differ
in how the finetuning moves M:

- ``plain``: the paper's. Where large rates collapse the model (no BatchNorm), the search falls to a
  small rate, and a small rate can leave the backdoor in M' (the early dip warns).
- ``warmup``: the rate rises linearly over the first epoch and gradients are clipped, so that the
  larger rates of the grid stay stable on such models and move them further.
- ``fresh_head``: the classifier layer is drawn afresh before finetuning, so the mapping from
  features to classes is relearned from clean images alone; a trigger feature that sent inputs to
  the target through the old head has no clean image to teach it again.

``--self-test choose`` measures every recipe on the canaried copy of M and keeps the one whose
guard separates the canaries best (defense/self_test.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from defense.errors import UserError


@dataclass(frozen=True)
class FinetuneRecipe:
    """How clean finetuning moves M, beyond its learning rate (the keyword arguments of
    :func:`defense.finetune.clean_finetune`)."""

    name: str
    warmup_epochs: int = 0
    max_grad_norm: float | None = None
    fresh_head: bool = False

    def finetune_options(self) -> dict:
        options = asdict(self)
        del options["name"]
        return options


FINETUNE_RECIPES = {recipe.name: recipe for recipe in (
    FinetuneRecipe("plain"),
    FinetuneRecipe("warmup", warmup_epochs=1, max_grad_norm=5.0),
    FinetuneRecipe("fresh_head", fresh_head=True),
)}
DEFAULT_RECIPE = "plain"


def finetune_recipe(name: str) -> FinetuneRecipe:
    """The recipe called ``name``, or a UserError naming the known ones."""
    try:
        return FINETUNE_RECIPES[name]
    except KeyError:
        raise UserError(f"--finetune-recipe {name}: expected one of {', '.join(FINETUNE_RECIPES)}") from None
