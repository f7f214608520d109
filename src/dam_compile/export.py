"""Export the rewritten program: ``torch.export`` of the model, the attention pass on its graph, and the
result as an ``ExportedProgram`` or, through torch-mlir, as MLIR (the ``mlir`` extra).

In the export our ops appear by name (``dam.sparse_attention``, ``dam.dynamic_plan``, ...; in MLIR as
``torch.operator "torch.dam.sparse_attention"``). With ``decompose=True`` they are replaced by ATen (dense SDPA
with the plan as a token mask; see :mod:`dam_compile.ops.decompositions`) for backends that lack them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .config import DAMConfig
from .ops.decompositions import decomposition_table
from .passes.pipeline import rewrite_attention

MLIR_OUTPUT_TYPES = ("raw", "torch", "linalg-on-tensors", "tosa", "stablehlo")


def export_rewritten(
    model: torch.nn.Module, *example_inputs: Any, example_kwargs: dict[str, Any] | None = None,
    decompose: bool = False, **options: Any,
) -> torch.export.ExportedProgram:
    """``torch.export.export(model, ...)`` with every eligible attention rewritten as ``backend="dam"`` does
    under ``options``; ``model`` is not modified. Calibrated profiles are not exported yet (their patterns would
    have to become lifted constants)."""
    config = DAMConfig.from_options(options)
    if config.source == "calibrated":
        raise ValueError("mask_source='calibrated' cannot be exported yet; export with 'dynamic', 'dense' or "
                         "'streaming'")
    with torch.no_grad():
        program = torch.export.export(model, tuple(example_inputs), kwargs=example_kwargs or {})
    rewritten = rewrite_attention(program.graph_module, config.mask_options()).graph_module
    values = [n.meta["val"] for n in rewritten.graph.nodes if n.op == "placeholder"]
    FakeTensorProp(rewritten, torch._guards.detect_fake_mode(values)).propagate_dont_convert_inputs(*values)
    program = _rebuilt(program, root=rewritten)
    return program.run_decompositions(decomposition_table() if decompose else {})


def export_mlir(
    model: torch.nn.Module, *example_inputs: Any, example_kwargs: dict[str, Any] | None = None,
    output_type: str = "raw", decompose: bool | None = None, **options: Any,
):
    """The rewritten program as a torch-mlir module.

    Args:
        output_type: torch-mlir's: ``"raw"`` (the imported FX graph; our ops stay named) or a lowered form
            (``"torch"``, ...), whose backend contract has no ``dam`` ops: those need ``decompose``.
        decompose: replace our ops by ATen; ``None`` decomposes exactly when ``output_type`` is not ``"raw"``.
        options: ``dam`` backend options.
    """
    try:
        from torch_mlir import fx
    except ImportError as err:
        raise ImportError("export_mlir needs torch-mlir: pip install 'dam-compile[mlir]'") from err
    if output_type not in MLIR_OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(MLIR_OUTPUT_TYPES)}, got {output_type!r}")
    decompose = output_type != "raw" if decompose is None else decompose
    if output_type != "raw" and not decompose:
        raise ValueError(f"output_type={output_type!r} lowers to torch-mlir's backend contract, which has no dam "
                         "ops: pass decompose=True, or output_type='raw' to keep them")
    program = export_rewritten(model, *example_inputs, example_kwargs=example_kwargs, decompose=decompose, **options)
    return fx.export_and_import(_frozen_buffers_as_constants(program), output_type=output_type)


def _frozen_buffers_as_constants(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """torch-mlir's importer reads every buffer from ``state_dict``, where ``torch.export`` leaves out the
    non-persistent ones (HF's rotary ``inv_freq``). For a frozen import they are constants: a copy of the
    program that lists them as lifted tensor constants."""
    from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec

    sig = program.graph_signature
    specs = [
        InputSpec(InputKind.CONSTANT_TENSOR, s.arg, s.target)
        if s.kind == InputKind.BUFFER and not s.persistent and s.target in program.constants else s
        for s in sig.input_specs
    ]
    if specs == list(sig.input_specs):
        return program
    return _rebuilt(program, signature=ExportGraphSignature(input_specs=specs, output_specs=sig.output_specs))


def _rebuilt(program: torch.export.ExportedProgram, *, root: torch.fx.GraphModule | None = None,
             signature=None) -> torch.export.ExportedProgram:
    """``program`` with another graph module or signature, everything else (state, constants) shared."""
    root = program.graph_module if root is None else root
    return torch.export.ExportedProgram(
        root=root, graph=root.graph, graph_signature=signature or program.graph_signature,
        state_dict=program.state_dict, range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph, constants=program.constants,
    )
