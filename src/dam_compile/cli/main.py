"""The ``dam-compile`` command line: ``demo``, ``inspect``, ``calibrate`` and ``bench``."""

from __future__ import annotations

import argparse
import inspect as _inspect
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from dam_compile.calibration.calibrate import DEFAULT_HOLDOUT_LEN, DEFAULT_MIN_RECALL
from dam_compile.config import INNER_BACKENDS, KERNELS, MASK_SOURCES
from dam_compile.plan.defaults import DEFAULT_PCL

BENCHMARKS = ("kernel", "maskgen", "e2e", "fidelity")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value read as an int, a float, true/false/none, or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    if lowered == "none":
        return key, None
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    return key, raw


def _recall(text: str) -> float | None:
    """``none`` or a number in [0, 1]."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {value}")
    return value


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_SPEC", help="a built-in name (llama-3.2-1b, llama-3.1-8b, qwen2-7b, "
                   "mistral-7b, gpt2, bert-base, tiny-llama, tiny-qwen2, tiny-gpt2, tiny-bert), a local HF "
                   "directory, or module:function returning (model, inputs)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--layers", type=_positive, help="keep only the first N layers of a built-in model")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dam-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a small Llama-shaped model with backend='dam' and check it")
    demo.add_argument("--seq-len", type=int, help="tokens per sequence (default 8192 on CUDA, 1024 on CPU)")
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--mask-source", choices=MASK_SOURCES, default="dense")
    demo.add_argument("--kernel", choices=KERNELS, help="default: auto on CUDA, reference on CPU")
    demo.add_argument("--inner-backend", choices=INNER_BACKENDS, default="inductor")
    demo.add_argument("--block-size", type=int)
    demo.add_argument("--min-seq-len", type=int, help="default: the backend's on CUDA, 0 on CPU")
    demo.add_argument("--dump-dir", default="dam_dump", help="where the dump goes ('' for none)")
    demo.add_argument("--repeats", type=int, default=5)
    demo.add_argument("--no-compare-inductor", dest="compare_inductor", action="store_false",
                      help="skip timing plain torch.compile (inductor) as the baseline")
    demo.add_argument("--device", help="cuda or cpu (default: cuda when available)")

    inspect = sub.add_parser("inspect", help="compile a model with backend='dam', print what happened to each "
                             "attention call, and write a browsable dump")
    _model_arguments(inspect)
    inspect.add_argument("--seq-len", type=_positive, required=True, help="prompt length of the example input")
    inspect.add_argument("--batch", type=_positive, default=1)
    inspect.add_argument("--dump", help="write the dump here (open DIR/index.html)")
    inspect.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                         help="a dam backend option, e.g. -o mask_source=streaming -o min_seq_len=0 (repeatable)")
    inspect.add_argument("--no-measure", dest="measure", action="store_false",
                         help="skip the per-(layer, head) density and attention-mass recall")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")

    calibrate = sub.add_parser("calibrate", help="calibrate DAM patterns (a profile) for a model")
    _model_arguments(calibrate)
    calibrate.add_argument("--samples", type=Path, required=True,
                           help="token ids: a .txt file (one sample per line, ids separated by spaces), or a "
                           ".pt / .safetensors file holding an int tensor 'input_ids' [S, L]")
    calibrate.add_argument("--pcl", type=_positive, default=DEFAULT_PCL, help="pattern capture length (tokens)")
    calibrate.add_argument("--min-recall", type=_recall, default=DEFAULT_MIN_RECALL, metavar="R",
                           help="heads whose extended pattern keeps less than this share of their attention on the "
                           f"held-out samples run dynamic ('none' keeps the paper's method; default "
                           f"{DEFAULT_MIN_RECALL})")
    calibrate.add_argument("--holdout-len", type=_positive, default=DEFAULT_HOLDOUT_LEN,
                           help=f"tokens of each held-out sample (default {DEFAULT_HOLDOUT_LEN})")
    calibrate.add_argument("--out", type=Path, required=True, help="where to write the profile (.safetensors)")

    bench = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (a source checkout)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--quick", action="store_true", help="the script's short subset")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the script")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "demo":
        from .demo import run_demo

        result = run_demo(
            seq_len=args.seq_len, batch=args.batch, mask_source=args.mask_source, kernel=args.kernel,
            inner_backend=args.inner_backend, block_size=args.block_size, min_seq_len=args.min_seq_len,
            dump_dir=args.dump_dir or None, repeats=args.repeats, compare_inductor=args.compare_inductor,
            device=args.device,
        )
        return 0 if result.ok else 1
    if args.command == "bench":
        return _bench(parser, args)
    spec = _resolve(parser, args)
    if args.command == "inspect":
        return _inspect_model(parser, args, spec)
    return _calibrate(parser, args, spec)


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _resolve(parser: argparse.ArgumentParser, args: argparse.Namespace):
    import torch

    from .model_specs import resolve

    device = _device(args)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return resolve(args.model, device=device, dtype=dtype, layers=args.layers)
    except ValueError as err:
        parser.error(str(err))


def _inspect_model(parser: argparse.ArgumentParser, args: argparse.Namespace, spec) -> int:
    from dam_compile.explain import explain

    options = dict(args.option)
    if _device(args) == "cpu" and "inner_backend" not in options:
        # The report is about the pass, which is the same whatever compiles its result; skip Inductor's C++
        # build on the CPU.
        options["inner_backend"] = "aot_eager"
        spec.notes.append("inner_backend=aot_eager on the CPU (-o inner_backend=inductor to change)")
    if args.dump:
        options["dump_dir"] = args.dump
    inputs = spec.make_inputs(args.batch, args.seq_len)
    if "logits_to_keep" in _inspect.signature(spec.model.forward).parameters:
        inputs["logits_to_keep"] = 1  # the report is about attention; skip the full-vocabulary logits
    try:
        report = explain(spec.model, example_kwargs=inputs, measure=args.measure, progress=True, **options)
    except ValueError as err:
        parser.error(str(err))
    for note in spec.notes:
        print(f"note: {note}")
    print(report.to_json() if args.json else report)
    if args.dump:
        print(f"open {Path(args.dump) / 'index.html'}")
    return 0


def _calibrate(parser: argparse.ArgumentParser, args: argparse.Namespace, spec) -> int:
    from dam_compile.calibration.calibrate import calibrate
    from dam_compile.calibration.profile_file import save_profile
    from dam_compile.report.dump import dynamic_heads_text

    samples = _read_samples(parser, args.samples)
    device = next(spec.model.parameters()).device
    profile = calibrate(spec.model, [s.to(device) for s in samples], pcl=args.pcl, min_recall=args.min_recall,
                        holdout_len=args.holdout_len, progress=True)
    path = save_profile(profile, args.out)
    print(f"wrote {path}: {len(profile.modules)} attention modules, PCL {profile.pcl}")
    if profile.min_recall is not None:
        print(f"{profile.dynamic_summary()['dynamic_head_count']} heads dynamic (held-out recall below "
              f"{profile.min_recall} on {profile.holdout_samples} sample(s)):")
        for name, module in profile.modules.items():
            recall = ", ".join(f"{r:.2f}" for r in module.holdout_recall.tolist())
            print(f"  {name}: dynamic {dynamic_heads_text(module.dynamic_heads.nonzero().flatten().tolist())}; "
                  f"recall per head {recall}")
    _print_answer_check(spec.model, profile, samples[-1][:, :args.holdout_len].to(device))
    return 0


def _print_answer_check(model, profile, ids) -> None:
    """The profile's next-token predictions against full attention's on the last sample, and a clear warning
    when it would change the model's answers."""
    from dam_compile.answer_check import MAX_KL, MIN_TOP1, answer_check

    check = answer_check(model, profile, ids)
    print(f"answer check on the last sample ({ids.shape[1]} tokens, {check.positions} positions scored): "
          f"KL(full || profile) {check.kl:.4f} nats per token, top-1 token unchanged at {check.top1:.3f}")
    if check.loses_answers:
        print(f"WARNING: this profile changes the model's answers (limits: KL <= {MAX_KL}, top-1 >= {MIN_TOP1}). "
              "Use the default dynamic mask (no profile), or calibrate with --min-recall 0.9 or higher and check "
              "again; on real pretrained models the paper's every-head profiles lose most of the attention "
              "(benchmarks/README.md, 'On a real pretrained model').")


def _read_samples(parser: argparse.ArgumentParser, path: Path) -> list:
    import torch

    if not path.is_file():
        parser.error(f"--samples: {str(path)!r} does not exist")
    try:
        if path.suffix == ".txt":
            rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
            return [torch.tensor([int(t) for t in row])[None] for row in rows]
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ids = load_file(str(path))["input_ids"]
        elif path.suffix == ".pt":
            loaded = torch.load(path, weights_only=True)
            ids = loaded["input_ids"] if isinstance(loaded, dict) else loaded
        else:
            parser.error(f"--samples: {str(path)!r} is not .txt, .pt or .safetensors")
    except (ValueError, KeyError, RuntimeError) as err:
        parser.error(f"--samples: cannot read token ids from {str(path)!r} ({err})")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        parser.error(f"--samples: {str(path)!r} must hold an integer tensor [S, L]")
    return [row[None] for row in ids]


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    script = _benchmarks_dir() / f"bench_{args.name}.py"
    if not script.is_file():
        parser.error(f"{script} not found: run from a source checkout (benchmarks/ is not installed)"
                     if not script.parent.is_dir() else f"no benchmark script {script.name} in {script.parent}")
    extra = [a for a in args.args if a != "--"]
    command = [sys.executable, str(script), *(["--quick"] if args.quick else []), *extra]
    return subprocess.call(command, cwd=script.parent)


def _benchmarks_dir() -> Path:
    """``benchmarks/`` of the checkout this package runs from, else of the current directory."""
    checkout = Path(__file__).resolve().parents[3] / "benchmarks"  # src/dam_compile/cli/main.py
    return checkout if checkout.is_dir() else Path.cwd() / "benchmarks"


if __name__ == "__main__":
    sys.exit(main())
