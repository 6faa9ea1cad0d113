"""Where a benchmark's figures go: printed, appended to a markdown file, merged into the flat results JSON.

Every benchmark in bench/ writes its markdown section and its JSON keys through `publish` (a script there imports it
as `from output import publish`: Python puts the script's folder first on sys.path)."""

import json
from pathlib import Path


def publish(lines: list[str], results: dict | None = None, append_to=None, json_path=None, quiet: bool = False,
            new_file: bool = False) -> None:
    """Print `lines` (unless `quiet`); append them to `append_to` (markdown; with `new_file`, write it afresh: the
    first section of BENCHMARKS.md) and merge `results` (flat {key: number}, rounded to 4 digits) into the JSON
    object at `json_path`, each when given."""
    if not quiet:
        print("\n".join(lines))
    if append_to:
        with open(append_to, "w" if new_file else "a") as f:
            f.write("\n".join(lines) + "\n")
    if json_path and results:
        path = Path(json_path)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update({k: round(v, 4) for k, v in results.items()})
        path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")


def growth_line(title: str, results: dict, prefix: str) -> list[str]:
    """The lines saying how a time per item grows with the data: `results` keys `<prefix><N>samples` (microseconds)
    as "title: N samples t us, ..."; none when there are no such keys."""
    scale = {k: v for k, v in results.items() if k.startswith(prefix)}
    if not scale:
        return []
    return ["", f"{title}: " + ", ".join(f"{k[len(prefix):].replace('samples', '')} samples {v:.1f} us"
                                         for k, v in scale.items())]
