"""Generic network parts. Importing registers the backbone(s)."""
from src.nn.backbone import presnet  # noqa: F401
