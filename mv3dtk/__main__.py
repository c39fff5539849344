"""``python -m mv3dtk`` is the ``mv3d`` CLI (and the torchrun target)."""

from .cli import main

if __name__ == "__main__":
    main()
