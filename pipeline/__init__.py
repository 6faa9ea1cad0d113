"""Knowledge distillation from precomputed, augmentation-aware teacher logits.

Modules, one job each:
  params   read and validate params.yaml
  data     load the dataset and its fixed train/val/test split
  models   the teacher and student architectures and their checkpoints
  replay   the one function that rebuilds augmented view v of sample i
  store    the logit store (zarr or HDF5): write, validate, batch read
  loss     the distillation loss
  train    the training and evaluation loops
  report   figures and the markdown report
"""


class KDError(Exception):
    """A problem with the user's input (params, files, stores) that the CLI reports as an error."""
