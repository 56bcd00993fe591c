"""tools/bias_experiment.py, smoke profile end to end: real train.py runs, complete records, table, plot, pictures."""
import json

import pytest

from tools import bias_experiment as bx


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp('bias')
    out, work = root / 'out', root / 'work'
    assert bx.main(['--profile', 'smoke', '--out', str(out), '--work', str(work)]) == 0
    return out, work


def test_smoke_profile_writes_one_complete_record_per_run(smoke):
    out, _ = smoke
    result = json.loads((out / 'bias_experiment.json').read_text())
    profile = bx.PROFILES['smoke']
    records = result['records']
    assert len(records) == len(profile.cells) * len(profile.seeds)
    assert {(r['cell'], r['seed']) for r in records} == {(c.name, s) for c in profile.cells for s in profile.seeds}
    for r in records:
        assert set(bx.RECORD_KEYS) <= set(r), set(bx.RECORD_KEYS) - set(r)
        for key in bx.RECORD_KEYS:
            if key.startswith('keep_recall') or key in ('AP', 'AP50', 'centroid_dy'):
                assert isinstance(r[key], float), (key, r[key])
        assert 0.0 <= r['keep_recall_near_P4'] <= 1.0 and r['steps'] == profile.stage2_epochs * profile.stage2_iters
    scheme_a = [r for r in records if r['cell'] == 'A_patch_r0.3_w0.01']
    assert scheme_a and all(r['cass_loss_weight'] == 0.01 and r['cass_expansion_ratio'] == 0.3 for r in scheme_a)
    curve = result['stage1_learning_curve']['0']
    assert [p['steps'] for p in curve] == [profile.stage1_iters * (e + 1) for e in range(profile.stage1_epochs)]


def test_smoke_profile_writes_table_plot_and_one_mask_picture_per_cell(smoke):
    out, _ = smoke
    table = (out / 'bias_experiment.md').read_text()
    for cell in bx.PROFILES['smoke'].cells:
        assert f'| {cell.name} |' in table
        assert (out / 'masks' / f'{cell.name}.png').stat().st_size > 1000
    assert (out / 'bias_experiment.png').stat().st_size > 1000


def test_finished_runs_are_skipped_on_a_second_call(smoke, capsys):
    out, work = smoke
    stamps = {p: p.stat().st_mtime for p in work.glob('runs/*/done.json')}
    assert bx.main(['--profile', 'smoke', '--out', str(out), '--work', str(work)]) == 0
    assert 'done, skipped' in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in work.glob('runs/*/done.json')} == stamps


def test_grid_is_five_normalisations_by_two_ratios_plus_scheme_a():
    names = [c.name for c in bx.GRID]
    assert len(names) == 11 == len(set(names))
    assert {(c.normalization, c.ratio) for c in bx.GRID if not c.is_scheme_a} == \
        {(n, r) for n in bx.NORMALIZATIONS for r in (0.8, 0.3)}


def test_smoke_profile_refuses_to_write_into_docs(capsys):
    assert bx.main(['--profile', 'smoke']) == 2


def _fake_run(monkeypatch, tmp_path, profile):
    """Run bx.run with train.py, evaluation and pictures stubbed out; returns the train_once calls."""
    calls = []

    def fake_train_once(cfg, run_dir, seed, device, amp, threads, tune_from=None, log=print):
        calls.append((run_dir.name, seed, tune_from.parent.name if tune_from else None))
        return {'steps': cfg['epochs'] * cfg['max_iters_per_epoch']}

    monkeypatch.setattr(bx, 'train_once', fake_train_once)
    monkeypatch.setattr(bx, 'ensure_data', lambda profile, data_dir, log=print: data_dir)
    monkeypatch.setattr(bx, 'run_record', lambda run_dir, cell, seed, profile, device, steps:
                        {'cell': cell.name, 'seed': seed, **{k: 0.5 for k in ('AP_large', 'keep_recall_near',
                                                                              'keep_recall_far')}})
    monkeypatch.setattr(bx, 'learning_curve', lambda run_dir, iters: [{'steps': iters, 'AP': 0.1, 'AP50': 0.2}])
    monkeypatch.setattr(bx, 'mask_picture', lambda *a, **k: None)
    monkeypatch.setattr(bx, 'markdown_table', lambda records, cells: '')
    result = bx.run(profile, tmp_path / 'out', tmp_path / 'work', 'cpu', False, log=lambda *_: None)
    return calls, result


def test_shared_stage1_profile_tunes_every_seed_from_the_one_stage1_run(monkeypatch, tmp_path):
    profile = bx.Profile(**{**bx.asdict(bx.PROFILES['cpu']), 'cells': bx.GRID[:2]})
    assert profile.stage1_seed == 0 and tuple(profile.seeds) == (0, 1)
    calls, result = _fake_run(monkeypatch, tmp_path, profile)
    assert [c for c in calls if c[0].startswith('stage1')] == [('stage1_seed0', 0, None)]
    stage2 = [c for c in calls if not c[0].startswith('stage1')]
    assert sorted((seed, src) for _, seed, src in stage2) == [(0, 'stage1_seed0')] * 2 + [(1, 'stage1_seed0')] * 2
    assert {r['seed']: r['stage1_seed'] for r in result['records']} == {0: 0, 1: 0}
    assert list(result['stage1_learning_curve']) == ['0']


def test_per_seed_stage1_profile_tunes_each_seed_from_its_own_stage1(monkeypatch, tmp_path):
    profile = bx.Profile(**{**bx.asdict(bx.PROFILES['gpu']), 'cells': bx.GRID[:1], 'jobs': 1})
    assert profile.stage1_seed is None
    calls, result = _fake_run(monkeypatch, tmp_path, profile)
    assert sorted(c for c in calls if c[0].startswith('stage1')) == [('stage1_seed0', 0, None), ('stage1_seed1', 1, None)]
    assert sorted((seed, src) for name, seed, src in calls if not name.startswith('stage1')) == \
        [(0, 'stage1_seed0'), (1, 'stage1_seed1')]
    assert {r['seed']: r['stage1_seed'] for r in result['records']} == {0: 0, 1: 1}
