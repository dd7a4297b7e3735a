"""Shared test settings: two cores, so every test process uses at most two torch threads."""

import torch

torch.set_num_threads(2)
