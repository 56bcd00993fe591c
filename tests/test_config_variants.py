"""The CASS variant configs change exactly what their header says, and nothing else."""
import glob
import os
import re

import pytest

from src.core.config import YAMLConfig

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
BASELINES = ('dset4_r18_ratio0.3', 'dset4_r18_synth_cpu')
VARIANTS = sorted(path for base in BASELINES for path in glob.glob(os.path.join(CONFIGS, f'{base}_*.yaml')))
HEADER = re.compile(r'^# Changes from (\S+\.yaml): (.+?)\.?$', re.M)


def _flatten(d, prefix=''):
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def _resolved(path):
    cfg = _flatten(YAMLConfig(path).yaml_cfg)
    cfg.pop('__include__', None)
    return cfg


def test_every_variant_of_each_baseline_is_checked():
    names = {os.path.basename(p)[:-5] for p in VARIANTS}
    for base in BASELINES:
        for v in ('A', 'B', 'C', 'balanced', 'area_patch', 'B_r0.3', 'C_r0.3', 'balanced_r0.3', 'area_patch_r0.3',
                  'perlevel', 'patch_r0.3'):
            assert f'{base}_{v}' in names


@pytest.mark.parametrize('path', VARIANTS, ids=os.path.basename)
def test_variant_differs_from_its_baseline_in_exactly_the_keys_its_header_names(path):
    with open(path) as f:
        match = HEADER.search(f.read())
    assert match, f"{path}: no '# Changes from BASELINE.yaml: key, key' header line"
    baseline, named = match.group(1), {k.strip() for k in match.group(2).split(',')}
    base = _resolved(os.path.join(CONFIGS, baseline))
    variant = _resolved(path)
    changed = {k for k in set(base) | set(variant) if base.get(k, '<absent>') != variant.get(k, '<absent>')}
    assert changed == named, f"{os.path.basename(path)} changes {sorted(changed)}, header names {sorted(named)}"
    # the normalisation-only variants: the value is the one of the file's name
    name = os.path.basename(path)[len(baseline) - 4:-5]
    expected_norm = {'B': 'object', 'C': 'object_area', 'balanced': 'object_balanced', 'area_patch': 'area_patch',
                     'A': 'patch', 'patch': 'patch', 'perlevel': ['object_balanced', 'area_patch']}[name.removesuffix('_r0.3')]
    assert variant['dset.cass_normalization'] == expected_norm
    assert variant['dset.cass_expansion_ratio'] == (0.3 if name.endswith('_r0.3') or name in ('A', 'perlevel')
                                                    else 0.8)
