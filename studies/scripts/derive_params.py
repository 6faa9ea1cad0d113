"""Write a params file from a recipe plus dotted overrides, the way `dvc exp run -S key=value` would.

Usage: python studies/scripts/derive_params.py recipes/mnist-hinton.yaml out/params.yaml \
           data.root=../shared/data/mnist teacher.epochs=20
Values are parsed as YAML (`20` is an int, `[1, 2]` a list, `null` None). The result is validated.
"""

import sys
from pathlib import Path

import yaml

from pipeline.params import load_params


def main(recipe: str, out: str, *overrides: str) -> None:
    raw = yaml.safe_load(Path(recipe).read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node[p]
        if last not in node:
            sys.exit(f"{recipe}: no key {key}")
        node[last] = yaml.safe_load(value)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(yaml.safe_dump(raw, sort_keys=False))
    load_params(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
