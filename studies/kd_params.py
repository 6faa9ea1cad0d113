"""Write the kd params files of a study (studies/README.md), from the study's params.yaml, into params/.

    python ../kd_params.py          # run by the study's `params` stage, in the study's folder

Every kd command reads one full params file, and DVC's templating can put a value into a command but not merge it
into a file; so this one stage writes them all, each kd's `recipe` with sections of params.yaml set over it:

    params/teacher.yaml        recipe + kd + teacher                 the teacher (a study with one: no `teachers`)
    params/teacher-<t>.yaml    recipe + kd + teacher + teachers.<t>  the teacher <t> (a study with several)
    params/kd.yaml             recipe + kd                           a store shared by every row
    params/<row>.yaml          recipe + kd + rows.<row>.kd           the row's own store (the seed plays no part)
    params/<row>-<seed>.yaml   recipe + kd + rows.<row>.kd + seed    the row's student for one seed

A section is set over the one before key by key (nested mappings merged, any other value replaced). Every file is
validated by kd's own loader, so a mistyped key stops the study here, before anything trains. The kd stages depend
on the keys they read in these files, so changing params.yaml re-runs only the stages whose settings changed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml


def merged(base: dict, over: dict | None) -> dict:
    """`base` with `over` set over it: nested mappings merged key by key, any other value replaced. (A key kd does
    not know is refused when the file is validated, naming the file.)"""
    out = dict(base)
    for key, value in (over or {}).items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = merged(base[key], value) if both else value
    return out


def kd_files(study: dict) -> dict[str, dict]:
    """Each params file's name (without .yaml) and its contents, from the study's params (a dict)."""
    recipe = yaml.safe_load(Path(study["recipe"]).read_text())
    base = merged(recipe, study.get("kd"))
    files = {"kd": base}
    teacher = merged(base, study.get("teacher"))
    if "teachers" not in study:
        files["teacher"] = teacher
    for name, over in (study.get("teachers") or {}).items():
        files[f"teacher-{name}"] = merged(teacher, over)
    for row, spec in study["rows"].items():
        files[row] = merged(base, spec.get("kd"))
        for seed in study["seeds"]:
            files[f"{row}-{seed}"] = {**files[row], "seed": seed}
    return files


def main(study_path: str = "params.yaml", out: str = "params") -> None:
    from pipeline import KDError
    from pipeline.params import load_params  # imports torch: only once the study's own keys are read

    files = kd_files(yaml.safe_load(Path(study_path).read_text()))
    shutil.rmtree(out, ignore_errors=True)  # written anew, completely
    Path(out).mkdir(parents=True)
    for name, params in files.items():
        path = Path(out) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        try:
            load_params(path)
        except KDError as e:
            raise SystemExit(f"{path} (from {study_path}): {e}") from None
    print(f"{len(files)} params files in {out}/")


if __name__ == "__main__":
    main(*sys.argv[1:])
