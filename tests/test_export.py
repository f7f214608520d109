"""The rewritten program through torch.export and torch-mlir: our ops by name, or decomposed to ATen."""

import pytest
import torch

from dam_compile import export_mlir, export_rewritten
from dam_compile.reference_mode import SparseReferenceMode

from dam_testing import rel_err
from hf_models import build, ids_for

OPTIONS = dict(mask_source="streaming", block_size=16, min_seq_len=0, kernel="reference", sink_blocks=1,
               local_blocks=1)


def inputs():
    return {"input_ids": ids_for("llama", n=64), "use_cache": False}


def dam_targets(program):
    return {str(n.target) for n in program.graph.nodes if str(n.target).startswith("dam.")}


@pytest.mark.parametrize("source", ["streaming", "dynamic", "dense"])
@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.slow
def test_exported_program_computes_what_the_backend_computes(source, decompose):
    model = build("llama")
    options = {**OPTIONS, "mask_source": source}
    program = export_rewritten(model, example_kwargs=inputs(), decompose=decompose, **options)
    assert dam_targets(program) == (set() if decompose else {"dam.sparse_attention.default", f"dam.{source}_plan.default"})
    with torch.no_grad(), SparseReferenceMode(options, model):
        expected = model(**inputs()).logits
    assert rel_err(program.module()(**inputs()).logits, expected) < 1e-5


def test_export_refuses_what_it_cannot_export():
    with pytest.raises(ValueError, match="calibrated"):
        export_rewritten(build("llama"), example_kwargs=inputs(), mask_source="calibrated",
                         profile=_tiny_profile())


def _tiny_profile():
    from dam_compile import calibrate

    model = build("llama")
    return calibrate(model, [ids_for("llama", n=32)], pcl=16, progress=False)


mlir = pytest.importorskip("torch_mlir", reason="the mlir extra (torch-mlir) is not installed")


def parse(text: str):
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_dialect

    context = ir.Context()
    torch_dialect.register_dialect(context)
    return ir.Module.parse(text, context)


def test_mlir_keeps_our_ops_by_name_and_round_trips_through_the_parser():
    module = export_mlir(build("llama"), example_kwargs=inputs(), **OPTIONS)
    text = str(module)
    assert text.count('torch.operator "torch.dam.sparse_attention"') == 2
    assert text.count('torch.operator "torch.dam.streaming_plan"') == 2
    assert str(parse(text)) == text


def test_mlir_lowered_to_the_torch_backend_decomposes_our_ops():
    text = str(export_mlir(build("llama"), example_kwargs=inputs(), output_type="torch", **OPTIONS))
    assert "torch.dam." not in text and "torch.aten.bmm" in text  # attention, lowered to batched matmuls
    parse(text)


def test_mlir_arguments_are_checked():
    with pytest.raises(ValueError, match="decompose=True"):
        export_mlir(build("llama"), example_kwargs=inputs(), output_type="torch", decompose=False, **OPTIONS)
    with pytest.raises(ValueError, match="output_type"):
        export_mlir(build("llama"), example_kwargs=inputs(), output_type="llvm", **OPTIONS)


@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.slow
def test_exported_program_with_a_padded_attention_mask(decompose):
    """A left-padded batch with its attention_mask: the key padding is read once (dam.key_padding) and the
    program equals the eager oracle on every valid position, with our ops or decomposed to ATen."""
    model = build("llama")
    ids = ids_for("llama", batch=2, n=64)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    program = export_rewritten(model, example_kwargs=kwargs, decompose=decompose, **OPTIONS)
    targets = dam_targets(program)
    assert targets == set() if decompose else "dam.key_padding.default" in targets
    with torch.no_grad(), SparseReferenceMode(OPTIONS, model):
        expected = model(**kwargs).logits
    valid = mask.bool()
    assert rel_err(program.module()(**kwargs).logits[valid], expected[valid]) < 1e-5
