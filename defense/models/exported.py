"""Models saved with ``torch.export.save`` (``.pt2``, an ExportedProgram), finetuned through
``exported.module()`` and written back by re-exporting.

``ExportedProgram.module()`` is a GraphModule whose ``train()`` and ``eval()`` raise
NotImplementedError (torch 2.14): :class:`ExportedModel` wraps it so that the rest of the package
can switch modes as with any model. The switch changes nothing in the graph: batch norm and dropout
keep the mode the program was exported in (normally eval: batch norm then uses its running
statistics while the weights are finetuned). The weights are ordinary parameters: gradients flow and
optimizers update them. The batch dimension must be dynamic (``torch.export.Dim``), since the
guard runs batches of any size.

Loading a ``.pt2`` runs the user's exported graph: like a TorchScript archive, it is trusted code.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from defense.errors import UserError

class ExportedModel(nn.Module):
    """``exported.module()`` with ``train()``/``eval()`` that only record the mode (see the module doc)."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.graph(inputs)

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode  # the graph's own modes are fixed at export time
        return self


def is_exported_archive(path: Path) -> bool:
    """A torch.export archive: a zip file holding the serialized program."""
    if path.suffix != ".pt2" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("archive_format") or "/models/" in name for name in archive.namelist())


def load_exported(data: bytes, where: str) -> ExportedModel:
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as error:  # torch raises many types for a bad archive
        raise UserError(f"{where}: cannot load the torch.export archive ({_first_line(error)})")
    return ExportedModel(program.module())


def check_dynamic_batch(model: nn.Module, input_size: tuple[int, int], where: str) -> None:
    """Refuse an exported program whose batch dimension is fixed: the guard runs batches of any size."""
    if not isinstance(model, ExportedModel):
        return
    height, width = input_size
    for size in (1, 3):
        try:
            with torch.inference_mode():
                model(torch.zeros(size, 3, height, width))
        except Exception as error:
            raise UserError(f"{where}: the exported program does not take a batch of {size} ({_first_line(error)}); "
                            "export it with a dynamic batch dimension: dynamic_shapes=({0: torch.export.Dim('batch')},)")


def save_exported(model: nn.Module, path: Path, input_size: tuple[int, int]) -> None:
    """Re-export the (finetuned) model with a dynamic batch dimension and save it as ``.pt2``."""
    graph = model.graph if isinstance(model, ExportedModel) else model
    height, width = input_size
    example = torch.zeros(2, 3, height, width, device=next(iter(graph.parameters())).device)
    with torch.no_grad():  # the batch dimension keeps the range the user's export gave it
        program = torch.export.export(graph, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
