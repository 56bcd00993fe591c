"""The repository's package. Importing it registers every component, config section, training hook and
weight adapter (as RT-DETR does): each package below imports its registering modules in its own
``__init__``, so the registry is complete as soon as any ``src.*`` module is imported, and every edge is a
plain import that the layering test (tests/test_layering.py) sees. Layers, bottom to top: core, misc, nn,
data, optim (never import the zoo) < zoo (the model families) < solver (the training loop)."""
from src import core, misc, nn, data, optim, zoo  # noqa: F401  (order: lower layers first)
