"""The `kd` command: `kd teacher`, `kd cache`, `kd distill`, `kd search`, `kd evaluate`."""

import click

from stages.cache import cache
from stages.distill import distill
from stages.evaluate import evaluate
from stages.search import search
from stages.teacher import teacher


@click.group()
def kd():
    """Knowledge distillation from precomputed, augmentation-aware teacher logits."""


for command in (teacher, cache, distill, search, evaluate):
    kd.add_command(command)

if __name__ == "__main__":
    kd()
