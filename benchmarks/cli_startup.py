"""Wall time of `mv3d --help` (and, for comparison, bare Python and `import torch`), median of N
fresh processes. Usage: python benchmarks/cli_startup.py [N]"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

MV3D = str(Path(sys.executable).with_name("mv3d"))


def median_wall(cmd: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    base = median_wall([sys.executable, "-c", "pass"], n)
    rows = [
        ("python -c pass", base),
        ("mv3d --help", median_wall([MV3D, "--help"], n)),
        ("mv3d synth --help", median_wall([MV3D, "synth", "--help"], n)),
        ("mv3d stages", median_wall([MV3D, "stages"], n)),
        ("python -c 'import torch'", median_wall([sys.executable, "-c", "import torch"], n)),
    ]
    print(f"{'command':<28} {'median s':>9} {'x python':>9}   (n={n})")
    for name, t in rows:
        print(f"{name:<28} {t:>9.3f} {t / base:>9.1f}")


if __name__ == "__main__":
    main()
