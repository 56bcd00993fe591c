"""tools/bias_experiment.py: the smoke profile end to end (real train.py runs), and the grid, statistics and
resume logic against hand-computed values."""
import json
import math

import pytest

from tools import bias_experiment as bx


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp('bias')
    out, work = root / 'out', root / 'work'
    assert bx.main(['--profile', 'smoke', '--out', str(out), '--work', str(work)]) == 0
    return out, work


def _result(out):
    return json.loads((out / 'bias_experiment.json').read_text())


def test_smoke_writes_controls_step0_and_a_time_course_record_per_evaluation(smoke):
    out, _ = smoke
    result = _result(out)
    profile = bx.PROFILES['smoke']
    got = {(r['cell'], r['seed'], r['steps']) for r in result['records']}
    expected = {(c.name, s, e * profile.stage2_iters) for s in profile.seeds for c in profile.cells
                for e in range(profile.stage2_epochs + 1)}
    expected |= {(c.name, s, e * profile.stage2_iters) for s in profile.extra_seeds for c in profile.extra_cells
                 for e in range(profile.extra_stage2_epochs + 1)}
    assert got == expected
    assert {'plain_continue', 'cass_w0'} <= {r['cell'] for r in result['records']}
    assert result['complete'] is True and result['missing_runs'] == []
    for r in result['records']:
        assert set(bx.RECORD_KEYS) <= set(r), set(bx.RECORD_KEYS) - set(r)
        assert isinstance(r['AP'], float) and r['commit'] == result['commit'] and len(r['commit']) >= 40
        if r['cell'] != 'plain_continue':
            assert 0.0 <= r['keep_recall_near_P4'] <= 1.0 and 0.0 <= r['keep_recall_far_half1'] <= 1.0
            assert r['keep_fraction_P4'] == pytest.approx(r['keep_fraction_P4'])
        else:
            assert r['keep_recall_near'] is None and r['cass_loss_weight'] is None
    # every DSET cell of a seed starts from the same weights: the step-0 keep decisions are the same
    step0 = [r for r in result['records'] if r['steps'] == 0 and r['cell'] != 'plain_continue']
    assert len({r['keep_recall_near'] for r in step0}) == 1 and all(r['step0_shared'] for r in step0)
    # the plain control's step 0 is stage 1's last evaluation
    plain0 = next(r for r in result['records'] if r['cell'] == 'plain_continue' and r['steps'] == 0)
    assert plain0['AP'] == result['stage1_learning_curve']['0'][-1]['AP']


def test_smoke_matched_cell_uses_the_measured_scale_and_the_controls_their_weights(smoke):
    out, _ = smoke
    result = _result(out)
    strength = result['strength']['0']
    cell = 'perlevel_ob+ap_r0.3_matched'
    assert strength[cell]['reference'] == 'patch_r0.3'
    assert strength[cell]['scale'] == pytest.approx(strength['patch_r0.3']['grad_norm'] / strength[cell]['grad_norm'])
    weights = {r['cell']: r['cass_loss_weight'] for r in result['records']}
    assert weights[cell] == pytest.approx(0.05 * strength[cell]['scale'])
    assert weights['cass_w0'] == 0.0 and weights['patch_r0.8'] == 0.05
    perlevel = next(r for r in result['records'] if r['cell'] == cell)
    assert perlevel['cass_normalization'] == ['object_balanced', 'area_patch']


def test_smoke_target_stats_per_ratio_and_level(smoke):
    out, _ = smoke
    stats = _result(out)['target_stats']
    assert set(stats) == {'r0.8', 'r0.3'}
    for ratio in stats.values():
        for level in ('P4', 'P5'):
            s = ratio[level]
            assert 0 < s['target_bottom_share'] < 1 and 0 < s['target_positive_share'] <= 1
            assert 0 < s['keep_fraction'] <= 1 and 0 <= s['oracle_keep_recall_near'] <= 1
    # a wider context band marks at least as many patches positive
    assert stats['r0.8']['P4']['target_positive_share'] >= stats['r0.3']['P4']['target_positive_share']


def test_smoke_writes_tables_plots_and_mask_pictures(smoke):
    out, _ = smoke
    table = (out / 'bias_experiment.md').read_text()
    for cell in bx.PROFILES['smoke'].cells:
        assert f'| {cell.name} |' in table
        if cell.dset:
            assert (out / 'masks' / f'{cell.name}.png').stat().st_size > 1000
    assert 'Paired per-seed differences against patch_r0.8' in table and 'Time course' in table
    assert (out / 'bias_experiment.png').stat().st_size > 1000
    assert (out / 'bias_time_course.png').stat().st_size > 1000


def test_recorded_runs_are_not_run_again_even_without_their_work_files(smoke, tmp_path, monkeypatch):
    """The json is the resume point across sessions: a new --work folder runs nothing already recorded."""
    out, _ = smoke
    before = _result(out)['records']

    def refuse(*args, **kwargs):
        raise AssertionError('train.py was started for a recorded run')

    monkeypatch.setattr(bx, 'train_once', refuse)
    monkeypatch.setattr(bx, 'mask_picture', lambda *a, **k: None)
    assert bx.main(['--profile', 'smoke', '--out', str(out), '--work', str(tmp_path / 'fresh')]) == 0
    assert _result(out)['records'] == before


def test_runs_tuned_from_another_stage1_are_dropped_and_run_again(smoke, tmp_path, monkeypatch):
    """Stage 1 is retrained in each session and is deterministic on one machine only: when the recorded curve
    of a seed differs from the one trained now, its records are redone from the new stage 1, never mixed."""
    import shutil

    out, work = smoke
    mine = tmp_path / 'out'
    shutil.copytree(out, mine)
    result = _result(mine)
    seed = str(bx.PROFILES['smoke'].seeds[0])
    result['stage1_learning_curve'][seed][-1]['AP'] += 0.01   # as written on another machine
    for r in result['records']:
        if r['seed'] == int(seed):
            r['AP'] = -1.0                                      # so that a kept record would show
    missing = result['records'][-1]['cell']                     # one run left to do: stage 1 is trained again
    result['records'] = [r for r in result['records'] if not (r['seed'] == int(seed) and r['cell'] == missing)]
    (mine / 'bias_experiment.json').write_text(json.dumps(result))
    logs = []
    monkeypatch.setattr(bx, 'mask_picture', lambda *a, **k: None)
    # every run dir of the smoke work folder has its done.json: train_once re-reads its evaluations, no training
    profile = bx.PROFILES['smoke']
    bx.run(profile, mine, work, profile.device, False, log=logs.append)
    again = _result(mine)
    assert any('WARNING seed 0: the stage 1 trained now differs' in line for line in logs)
    assert {(r['cell'], r['steps']) for r in again['records'] if r['seed'] == int(seed)} == \
           {(r['cell'], r['steps']) for r in _result(out)['records'] if r['seed'] == int(seed)}
    assert all(r['AP'] >= 0 for r in again['records'])
    assert again['stage1_learning_curve'] == _result(out)['stage1_learning_curve']
    assert bx.stale_seeds({'0': [{'AP': 1}], '1': [{'AP': 2}]}, {'0': [{'AP': 1}], '1': [{'AP': 3}], '2': []}) == [1]


def test_a_json_of_another_protocol_is_refused(tmp_path, capsys):
    (tmp_path / 'bias_experiment.json').write_text(json.dumps({'protocol': {'version': 1}, 'records': []}))
    assert bx.main(['--profile', 'smoke', '--out', str(tmp_path), '--work', str(tmp_path / 'w')]) == 2
    assert 'another protocol' in capsys.readouterr().err


def test_smoke_profile_refuses_to_write_into_docs():
    assert bx.main(['--profile', 'smoke']) == 2


def test_unknown_seed_is_refused(capsys):
    assert bx.main(['--profile', 'cpu', '--seeds', '7']) == 2
    assert 'not seeds of the cpu profile' in capsys.readouterr().err


def test_cpu_grid_has_controls_matched_modes_and_the_per_level_mode_on_three_seeds():
    cpu = bx.PROFILES['cpu']
    names = [c.name for c in cpu.cells]
    assert names == ['plain_continue', 'cass_w0', 'patch_r0.8', 'patch_r0.3', 'object_balanced_r0.3_matched',
                     'area_patch_r0.3_matched', 'perlevel_ob+ap_r0.3_matched']
    assert tuple(cpu.seeds) == (0, 1, 2) and tuple(cpu.extra_seeds) == (0, 1)
    jobs = bx.plan(cpu)
    assert len(jobs) == 3 * 7 + 2 * 3 and len({(s, c.name) for s, c, _ in jobs}) == len(jobs)
    assert {e for _, c, e in jobs if c in cpu.extra_cells} == {cpu.extra_stage2_epochs}
    assert cpu.pruning_warmup_epochs == 0 and bx.PROFILES['gpu'].pruning_warmup_epochs == 0
    assert set(bx.SHORT) == set(bx.NORMALIZATIONS)


def test_paired_difference_has_the_hand_computed_t_interval():
    d = bx.paired_difference([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])    # differences 0.1, 0.2, 0.3: sd 0.1
    half = 4.303 * 0.1 / math.sqrt(3)
    assert d['n'] == 3 and d['mean'] == pytest.approx(0.2)
    assert d['low'] == pytest.approx(0.2 - half) and d['high'] == pytest.approx(0.2 + half)
    assert bx.paired_difference([0.5], [0.4]) == {'mean': pytest.approx(0.1), 'low': None, 'high': None, 'n': 1}
    assert bx.paired_difference([None], [0.4]) is None


def test_strength_scale_matches_the_reference_gradient():
    assert bx.strength_scale(0.3, 0.1) == pytest.approx(3.0)
    assert bx.strength_scale(0.3, 0.0) == 1.0 and bx.strength_scale(0.0, 0.2) == 1.0


def test_selection_is_made_on_one_half_and_reported_on_the_other():
    def rec(cell, seed, near0, far0, near1):
        r = {'cell': cell, 'seed': seed, 'steps': 10}
        r.update({'keep_recall_near_half0': near0, 'keep_recall_far_half0': far0, 'keep_recall_near_half1': near1,
                  'keep_recall_far_half1': 0.5, 'keep_recall_large_half1': 0.4, 'keep_recall_small_half1': 0.6})
        return r
    records = [rec('a', 0, 0.9, 0.6, 0.1), rec('a', 1, 0.9, 0.6, 0.3),   # min 0.6 on half 0
               rec('b', 0, 0.7, 0.7, 0.8), rec('b', 1, 0.7, 0.8, 0.8),   # min 0.7: chosen
               {**rec('b', 0, 0.0, 0.0, 0.0), 'steps': 5}]               # an earlier step is ignored
    sel = bx.select_on_half(records, ['a', 'b'])
    assert sel['cell'] == 'b' and sel['scores'] == {'a': pytest.approx(0.6), 'b': pytest.approx(0.7)}
    assert sel['keep_recall']['near'] == pytest.approx(0.8) and sel['reported_on'] == 'half1'


def test_gpu_jobs_go_to_the_gpus_round_robin(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 3)
    assert bx.devices_for('cuda', 5) == ['cuda:0', 'cuda:1', 'cuda:2', 'cuda:0', 'cuda:1']
    assert bx.devices_for('cpu', 2) == ['cpu', 'cpu']


def test_report_only_rewrites_the_table_from_the_json_without_running(smoke, monkeypatch):
    out, _ = smoke
    before = _result(out)['records']
    (out / 'bias_experiment.md').write_text('stale')
    monkeypatch.setattr(bx, 'train_once', lambda *a, **k: (_ for _ in ()).throw(AssertionError('ran train.py')))
    assert bx.main(['--profile', 'smoke', '--out', str(out), '--report-only']) == 0
    assert '| patch_r0.8 |' in (out / 'bias_experiment.md').read_text()
    assert _result(out)['records'] == before


def test_cells_with_only_their_step0_record_are_left_out_of_the_last_step_table():
    rows = [{'cell': 'a', 'seed': 0, 'steps': 0}, {'cell': 'b', 'seed': 0, 'steps': 0},
            {'cell': 'b', 'seed': 0, 'steps': 50}]
    assert list(bx.last_records(rows)) == [('b', 0)]


def test_differences_take_the_reference_at_the_cells_own_last_step():
    def rec(cell, seed, steps, ap):
        return {'cell': cell, 'seed': seed, 'steps': steps, 'AP': ap}

    records = [rec('patch_r0.8', 0, 50, 0.40), rec('patch_r0.8', 0, 100, 0.50),
               rec('patch_r0.8', 1, 50, 0.42), rec('patch_r0.8', 1, 100, 0.54),
               rec('short', 0, 50, 0.45), rec('short', 1, 50, 0.43),       # an extra cell that ran 50 steps
               rec('long', 0, 100, 0.52), rec('long', 1, 100, 0.55)]
    table = bx.difference_table(records, ['short', 'long'])
    short = next(line for line in table.splitlines() if line.startswith('| short |'))
    long_ = next(line for line in table.splitlines() if line.startswith('| long |'))
    assert short.split(' | ')[2] == '50' and '+0.030 [' in short      # (0.05 + 0.01) / 2 against step 50, not 100
    assert long_.split(' | ')[2] == '100' and '+0.015 [' in long_     # (0.02 + 0.01) / 2


def test_each_seed_names_the_machine_its_stage_1_ran_on_and_old_jsons_keep_theirs(smoke):
    result = _result(smoke[0])
    assert result['machines'] == {'0': bx.machine()} and 'machine' not in result
    old = {'machine': 'Intel(R) Xeon(R) Processor, 2 cores', 'stage1_learning_curve': {'0': []},
           'records': [{'seed': 0}, {'seed': 2}]}
    assert bx.machines_of(old) == {'0': 'Intel(R) Xeon(R) Processor, 2 cores',
                                                '2': 'Intel(R) Xeon(R) Processor, 2 cores'}
    assert bx.machines_of({'machines': {'1': 'AMD EPYC'}, 'machine': 'x'}) == {'1': 'AMD EPYC'}
