"""Model families. Importing registers every family's components (only RT-DETR / DSET today)."""
from src.zoo import rtdetr  # noqa: F401
