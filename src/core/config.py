"""YAMLConfig: load, validate and build everything a training run needs from one YAML file.

Validation happens at load time, before anything is built: every top-level key must be a known
setting or the section of a registered component; every component section and every nested
``{type: Name, ...}`` mapping must only use the constructor's keyword names; a section registered by a
model family (``registry.register_section``, e.g. ``dset:``) is checked by its owner's validator. Errors
name the file that set the key, the key, and the valid keys. The registry is complete because importing
any ``src.*`` module first runs ``src/__init__.py``, which imports every registering package.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

from src.core import registry
from src.core.input_size import apply_input_size
from src.core.yaml_utils import ConfigError, DataError, Origins, deep_merge, load_yaml_config, parse_overrides
from src.misc.backends import MATMUL_PRECISIONS

# Top-level settings that are not component sections: name -> one-line meaning (shown in errors/docs).
GLOBAL_KEYS: Dict[str, str] = {
    "task": "always 'detection'",
    "model": "name of the registered model component (e.g. RTDETR)",
    "criterion": "name of the registered criterion component",
    "postprocessor": "name of the registered postprocessor component",
    "num_classes": "number of object classes (shared with components that declare it)",
    "input_size": "[h, w] network input size (multiples of 32 avoid padding): fills eval_spatial_size and every train/val Resize size",
    "eval_spatial_size": "[h, w] evaluation input size (anchors are precomputed for it); set by input_size",
    "use_focal_loss": "sigmoid/focal classification (shared)",
    "train_dataloader": "training data loader (see DATALOADER_KEYS)",
    "val_dataloader": "validation data loader",
    "optimizer": "optimizer with regex parameter groups",
    "lr_scheduler": "learning-rate schedule after warmup",
    "lr_warmup_scheduler": "linear warmup per iteration",
    "epochs": "number of training epochs",
    "clip_max_norm": "gradient clipping max norm (<= 0 disables)",
    "use_ema": "keep an EMA of the weights and evaluate it",
    "ema": "EMA settings {decay, warmups}",
    "use_amp": "mixed precision (autocast + GradScaler for float16) on CUDA and CPU",
    "amp_dtype": "autocast dtype under use_amp: float16 (with GradScaler) or bfloat16 (no scaler); default "
                 "float16 on CUDA, bfloat16 on CPU (float16 autocast is about 50x slower there)",
    "eval_amp": "evaluate under the autocast of use_amp / amp_dtype (null, default: follows use_amp, except "
                "float16 on CPU: float32; the eval json's eval_dtype says which dtype ran)",
    "amp_init_scale": "GradScaler's initial loss scale for float16 AMP (default 65536)",
    "sync_bn": "convert BatchNorm to SyncBatchNorm under DDP",
    "find_unused_parameters": "DDP find_unused_parameters",
    "output_dir": "where logs, checkpoints and eval json go",
    "checkpoint_freq": "also keep checkpoint_XXXX.pth every N epochs (0 = only last/best)",
    "print_freq": "console / TensorBoard scalar interval in iterations",
    "eval_freq": "evaluate every N epochs (the last epoch is always evaluated)",
    "seed": "random seed",
    "deterministic": "torch deterministic algorithms (bit-exact CPU resume)",
    "cudnn_benchmark": "CUDA: cuDNN autotuning; null (default) = on unless multi-scale training or deterministic",
    "float32_matmul_precision": "CUDA: highest | high (default: TF32 on Ampere+) | medium (src/misc/backends.py)",
    "skip_nonfinite_steps": "skip up to N steps whose loss is NaN/inf before stopping",
    "max_iters_per_epoch": "cap iterations per epoch (demo/smoke runs); null = full epoch",
    "tuning": "weights file to tune from (same as -t)",
}

AMP_DTYPES = ("float16", "bfloat16")

DATALOADER_KEYS = {
    "type": "DataLoader",
    "dataset": "{type: CocoDetection, ...}",
    "total_batch_size": "batch size summed over all processes",
    "shuffle": "shuffle every epoch",
    "num_workers": "loader worker processes",
    "drop_last": "drop the last incomplete batch",
    "collate_fn": "{type: BatchImageCollateFunction, ...}",
    "pin_memory": "pin host memory (default: true on CUDA, false on CPU)",
    "persistent_workers": "keep the loader's workers between epochs / evaluations (default: true when "
                          "num_workers > 0; epoch policies and worker seeds still follow the epoch)",
}

# Sections validated by their own builders (src/optim) at build time, before training starts.
BUILDER_SECTIONS = ("optimizer", "lr_scheduler", "lr_warmup_scheduler", "ema")


def section_of(cls, name: str) -> str:
    """The top-level section a registered component is built from: its own name, or the section named by its
    class's ``__config_section__`` (a subclass that extends a component and takes the same keys)."""
    return getattr(cls, "__config_section__", None) or name


class YAMLConfig:
    """The merged, validated config of one run.

    >>> cfg = YAMLConfig('configs/rtdetrv2_r18vd_coco.yaml', overrides=['epochs=3'])
    >>> model = cfg.model
    """

    def __init__(self, path: str, overrides: list[str] | dict | None = None, **kwargs):
        self.path = path
        cfg, origins = load_yaml_config(path)
        if overrides:
            ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
            deep_merge(cfg, ov, origins, "command line (-u)")
        if kwargs:
            deep_merge(cfg, kwargs, origins, "YAMLConfig(...) arguments")
        self.yaml_cfg: dict = cfg
        self.origins: Origins = origins
        apply_input_size(cfg, origins, self.where)  # one key fills eval_spatial_size and every Resize size
        self.validate()
        self._model = None

    # ------------------------------------------------------------------ validation
    def where(self, path: tuple) -> str:
        """'file: a.b.c' for a key path (the file that set it, or its closest parent)."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                return f"{self.origins[path[:n]]}: {'.'.join(map(str, path))}"
        return f"{self.path}: {'.'.join(map(str, path))}"

    def validate(self):
        cfg = self.yaml_cfg
        components = set(registry.registered_names())
        sections = registry.sections()
        for key, value in cfg.items():
            if key in GLOBAL_KEYS or key in sections:
                continue
            if key in components:
                owner = section_of(registry.get(key), key)
                if owner != key:
                    raise ConfigError(f"{self.where((key,))}: {key} takes its settings from the {owner}: section "
                                      f"(it extends {owner}); move these keys to {owner}:")
                self._check_component_section(key, value, (key,))
                continue
            raise ConfigError(f"{self.where((key,))}: unknown top-level key {key!r}. Valid settings: "
                              f"{', '.join(sorted([*GLOBAL_KEYS, *sections]))}; or a component section: "
                              f"{', '.join(sorted(components))}")
        for name_key in ("model", "criterion", "postprocessor"):
            name = cfg.get(name_key)
            if name is not None and name not in components:
                raise ConfigError(f"{self.where((name_key,))}: {name!r} is not a registered component; "
                                  f"registered: {', '.join(sorted(components))}")
        for dl in ("train_dataloader", "val_dataloader"):
            if dl in cfg:
                self._check_dataloader(cfg[dl], (dl,))
        self._check_amp()
        self._check_backends()
        self.sections: Dict[str, Any] = {}
        for name, (check, _) in sections.items():
            try:
                self.sections[name] = check(cfg.get(name), where=lambda key, n=name: self.where((n,) if key is None
                                                                                               else (n, key)))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if self.sections[name] is not None:
                for key, component in registry.section_requirements(name).items():
                    if cfg.get(key) != component:
                        raise ConfigError(
                            f"{self.where((key,))}: {key} is {cfg.get(key)!r} but the {name}: section is on, which "
                            f"needs {key}: {component} (e.g. include configs/include/{name}.yaml); "
                            f"or turn the section off with {name}.enabled: false")

    def __getattr__(self, name: str):
        """``cfg.<section>``: the checked value of a registered section (e.g. ``cfg.dset``; None when off)."""
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _check_backends(self):
        bench, precision = self.yaml_cfg.get("cudnn_benchmark"), self.yaml_cfg.get("float32_matmul_precision", "high")
        if bench is not None and not isinstance(bench, bool):
            raise ConfigError(f"{self.where(('cudnn_benchmark',))} = {bench!r} is invalid: must be true, false or null "
                              f"(auto: on unless multi-scale training)")
        if precision not in MATMUL_PRECISIONS:
            raise ConfigError(f"{self.where(('float32_matmul_precision',))} = {precision!r} is invalid: must be one "
                              f"of {', '.join(MATMUL_PRECISIONS)}")

    def _check_amp(self):
        eval_amp = self.yaml_cfg.get("eval_amp")
        if eval_amp is not None and not isinstance(eval_amp, bool):
            raise ConfigError(f"{self.where(('eval_amp',))} = {eval_amp!r} is invalid: must be true, false or null "
                              f"(default: follows use_amp)")
        dtype, scale = self.yaml_cfg.get("amp_dtype", "float16"), self.yaml_cfg.get("amp_init_scale", 65536.0)
        if dtype not in AMP_DTYPES:
            raise ConfigError(f"{self.where(('amp_dtype',))} = {dtype!r} is invalid: must be one of "
                              f"{', '.join(AMP_DTYPES)}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < float("inf")):
            raise ConfigError(f"{self.where(('amp_init_scale',))} = {scale!r} is invalid: must be a finite "
                              f"number > 0 (GradScaler's initial loss scale, e.g. 65536)")

    def _check_component_section(self, name: str, section: Any, path: tuple):
        if section is None:
            return
        if not isinstance(section, dict):
            raise ConfigError(f"{self.where(path)}: the section of component {name} must be a mapping")
        params = registry.constructor_params(registry.get(name))
        for k, v in section.items():
            if k == "type":
                continue
            if k not in params:
                raise ConfigError(f"{self.where(path + (k,))}: unknown key {k!r} for {name}; valid keys: "
                                  f"{', '.join(sorted(params))}")
            self._check_nested(v, path + (k,))

    def _check_nested(self, value: Any, path: tuple):
        """Recurse into lists and mappings; any mapping with a registered ``type`` is checked too."""
        if isinstance(value, dict):
            t = value.get("type")
            if isinstance(t, str) and t in registry.registered_names():
                self._check_component_section(t, value, path)
                return
            for k, v in value.items():
                self._check_nested(v, path + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self._check_nested(v, path + (i,))

    def _check_dataloader(self, section: Any, path: tuple):
        if not isinstance(section, dict):
            raise ConfigError(f"{self.where(path)}: must be a mapping with keys {', '.join(DATALOADER_KEYS)}")
        for k, v in section.items():
            if k not in DATALOADER_KEYS:
                raise ConfigError(f"{self.where(path + (k,))}: unknown key {k!r}; valid keys: "
                                  f"{', '.join(DATALOADER_KEYS)}")
        for k in ("dataset", "collate_fn"):
            spec = section.get(k)
            if spec is None:
                continue
            t = spec.get("type") if isinstance(spec, dict) else None
            if t not in registry.registered_names():
                raise ConfigError(f"{self.where(path + (k,))}: needs a 'type' naming a registered component, "
                                  f"got {t!r}; registered: {', '.join(registry.registered_names())}")
            self._check_component_section(t, spec, path + (k,))

    # ------------------------------------------------------------------ building
    def create(self, name: str, **extra):
        """Build the registered component ``name`` from its top-level section.

        ``__inject__`` arguments given as a component name (or a ``{type: ...}`` mapping) are built
        recursively; ``__share__`` arguments come from the top-level keys of the same name.
        """
        cls = registry.get(name)
        owner = section_of(cls, name)  # a registered subclass may take its parent's section (DSETHybridEncoder)
        section = copy.deepcopy(self.yaml_cfg.get(owner) or {})
        section.pop("type", None)
        return self._instantiate(cls, section, (owner,), extra)

    def build_spec(self, spec: dict, path: tuple, **extra):
        spec = copy.deepcopy(spec)
        cls = registry.get(spec.pop("type"))
        return self._instantiate(cls, spec, path, extra)

    def _instantiate(self, cls, kwargs: dict, path: tuple, extra: dict):
        params = registry.constructor_params(cls)
        for dep in getattr(cls, "__inject__", []):
            value = kwargs.get(dep)
            if isinstance(value, str):
                kwargs[dep] = self.create(value)
            elif isinstance(value, dict) and "type" in value:
                kwargs[dep] = self.build_spec(value, path + (dep,))
        for shared in getattr(cls, "__share__", []):
            if shared not in kwargs and shared in self.yaml_cfg and shared in params:
                kwargs[shared] = copy.deepcopy(self.yaml_cfg[shared])
        for name in getattr(cls, "__sections__", []):
            if name not in params:
                raise TypeError(f"{cls.__name__} declares __sections__ {name!r} but its constructor has no "
                                f"argument of that name")
            if name not in kwargs:
                kwargs[name] = self.sections.get(name)
        kwargs.update(extra)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, RuntimeError) as e:
            if isinstance(e, (ConfigError, DataError)):  # a data file's error names that file, not the YAML
                raise
            files = sorted({f for k, f in self.origins.items() if k[:len(path)] == path}, reverse=True)
            raise ConfigError(f"{' and '.join(files) or self.path}: {'.'.join(map(str, path))}: building "
                              f"{cls.__name__} failed: {e}. Check the values of this section") from e

    @property
    def model(self):
        if self._model is None:
            self._model = self.create(self.yaml_cfg["model"])
        return self._model

    @property
    def criterion(self):
        return self.create(self.yaml_cfg["criterion"])

    @property
    def postprocessor(self):
        return self.create(self.yaml_cfg["postprocessor"])

    def get(self, key: str, default=None):
        return self.yaml_cfg.get(key, default)

    def __getitem__(self, key):
        return self.yaml_cfg[key]

    def __contains__(self, key):
        return key in self.yaml_cfg
