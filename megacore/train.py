"""``python -m megacore.train CONFIG.yaml [key=value ...]`` — the entry point torchrun launches.

    torchrun --nproc-per-node 4 -m megacore.train configs/tiny_cpu.yaml parallel.tensor=2
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from megacore.cli import run_train

    return run_train(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
