"""Put this folder first on PYTHONPATH to run Python as on the bare GPU machine: SimpleITK, medpy and wandb are not
installed there, so here any import of them fails as it would there."""

import sys

MISSING = {"SimpleITK", "medpy", "wandb"}


class NotInstalledHere:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ImportError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, NotInstalledHere())
