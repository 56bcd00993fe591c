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
