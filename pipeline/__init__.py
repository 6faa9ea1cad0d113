"""Knowledge distillation from precomputed, augmentation-aware teacher logits.

Modules, one job each:
  params   read and validate params.yaml
  sources  readers of the raw data sets (digits, IDX, CIFAR pickles, image folders), one per format
  data     the dataset, its fixed train/val/test split, the input transform and the fingerprint
  models   the teacher and student architectures (CIFAR ResNets and WRNs in cifar_models, timm:<name>) and checkpoints
  checkpoints  the teachers users bring: safetensors, plain or nested state dicts, prefixes, class count, input checks
  replay   the one function that rebuilds augmented view v of sample i
  mix      MixUp / CutMix as part of a view, drawn from the view's own seed
  store    the logit store (zarr or HDF5): layout, metadata, validated batch reads
  writer   writing a store chunk by chunk, resumable, over torchrun ranks (with train)
  topk     compact storage: top-K logits and a tail summary
  distributed  torchrun's process group: rank, world size, broadcast, gather
  cache    the cache's engine: views in, chunks of teacher logits out
  loaders  DataLoaders over (sample, view) pairs, a rank's share of a batch, the store's read-ahead
  ensemble several teachers' logits mixed at read time into one target
  loss     the distillation loss
  train    the training and evaluation loops
  resume   end-of-epoch checkpoints of a training run, bound to what decides it
  metrics  test-split measures: predictions, confusion, agreement, calibration (ECE), parameters, inference time
  figures  the report's figures (training curves, confusion matrix, per-class accuracy, reliability diagram)
  report   the report's inputs (logs, search results, store facts) and its sections
  render   sections as markdown and as one self-contained HTML page
"""


class KDError(Exception):
    """A problem with the user's input (params, files, stores) that the CLI reports as an error."""
