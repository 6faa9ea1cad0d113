"""One click command per pipeline stage, assembled into the `kd` command in `stages.cli`."""
