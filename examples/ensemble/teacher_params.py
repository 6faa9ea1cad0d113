"""Write one teacher's full kd params file: BASE with KEY=VALUE overrides (dotted keys, YAML values).

    python teacher_params.py kd.yaml params/a.yaml teacher.arch=cnn seed=0

Every key must already exist in BASE (kd refuses unknown keys anyway; this says so before any stage runs)."""

import sys
from pathlib import Path

import yaml


def main(base: str, out: str, *overrides: str) -> None:
    params = yaml.safe_load(Path(base).read_text())
    for override in overrides:
        key, _, value = override.partition("=")
        *sections, last = key.split(".")
        node = params
        for section in sections:
            node = node[section]
        if last not in node:
            sys.exit(f"{override}: {key} is not a key of {base}")
        node[last] = yaml.safe_load(value)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(yaml.safe_dump(params, sort_keys=False))


if __name__ == "__main__":
    main(*sys.argv[1:])
