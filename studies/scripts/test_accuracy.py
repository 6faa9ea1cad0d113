"""Test accuracy of a checkpoint on a params file's test split (to report a teacher chosen without it).

Usage: python studies/scripts/test_accuracy.py runs/mnist/params.yaml runs/mnist/teacher.pt
"""

import sys

import torch

from pipeline.data import input_transform, load_dataset
from pipeline.models import load_checkpoint
from pipeline.params import load_params
from pipeline.train import accuracy

params = load_params(sys.argv[1])
data = load_dataset(params.data)
model, ckpt = load_checkpoint(sys.argv[2])
acc = accuracy(model, data.test, input_transform(None, data.mean, data.std), torch.device("cpu"))
params_m = sum(p.numel() for p in model.parameters())
print(f"{sys.argv[2]} ({ckpt['arch']}, {params_m} parameters): test accuracy {100 * acc:.2f} %, "
      f"{round((1 - acc) * len(data.test))} errors of {len(data.test)}")
