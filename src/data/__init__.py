"""Data sets, transforms and collate functions. Importing registers them."""
from src.data import coco_dataset, collate, transforms  # noqa: F401
