"""The ``dam-compile`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import INNER_BACKENDS, KERNELS, MASK_SOURCES


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    return 2


if __name__ == "__main__":
    sys.exit(main())
