"""Dispatch ``python -m unet3d_dist.bench <part>`` to ``unet3d_dist.bench.<part>.main(argv)``."""

import importlib
import pkgutil
import sys

import unet3d_dist.bench as package


def parts() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_") and m.name != "common"
    )


def main() -> None:
    available = parts()
    if len(sys.argv) < 2 or sys.argv[1] not in available:
        print(f"usage: python -m unet3d_dist.bench {{{','.join(available)}}} [options]", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"unet3d_dist.bench.{sys.argv[1].replace('-', '_')}")
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()
