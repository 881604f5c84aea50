"""FLIP-style CLIP pretraining: ``python -m flipkern.pretrain`` / ``flipkern-pretrain``.

``main(argv)`` is the CLI (flipkern.pretrain.cli); ``run(args)`` the loop
(flipkern.pretrain.train).
"""
from .cli import build_parser, main, parse_args
from .train import run

__all__ = ["main", "parse_args", "build_parser", "run"]
