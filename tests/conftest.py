"""Shared test settings."""

import torch

# The test models are small, where one thread is faster than two: with two,
# every tiny operation pays for thread synchronisation.
torch.set_num_threads(1)
