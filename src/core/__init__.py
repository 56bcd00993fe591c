"""Config system and component registry."""
from src.core.config import YAMLConfig  # noqa: F401
from src.core.registry import build, register  # noqa: F401
from src.core.yaml_utils import ConfigError, DataError  # noqa: F401
