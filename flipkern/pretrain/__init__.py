"""FLIP-style CLIP pretraining: ``python -m flipkern.pretrain`` / ``flipkern-pretrain``.

``main(argv)`` is the CLI (flipkern.pretrain.cli); ``run(args)`` the loop
(flipkern.pretrain.train).
"""
from .cli import build_parser, main, parse_args


def run(args):
    from .train import run as _run
    return _run(args)


__all__ = ["main", "parse_args", "build_parser", "run"]
