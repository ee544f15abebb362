"""Distributed save under jax.distributed: 2 processes x 4 host CPU devices.

tests/scripts/multiprocess_save.py runs as NUM_PROCESSES processes joined
over loopback (coordinator on 127.0.0.1); every process saves the same tree
of global arrays with ``distributed=True`` (each codes and writes its share,
process 0 commits one file), then restores it on one local device and sharded
over the global mesh. Here, in this one-process pytest run (a different
topology: one process, its own devices), the file is restored again.
"""

from pathlib import Path

import numpy as np
import pytest

import jaxjpeg
import jaxjpeg.cli
from multiprocess_launch import run_reports

SCRIPT = Path(__file__).parent / "scripts" / "multiprocess_save.py"
NUM_PROCESSES = 2
TIMEOUT_S = 180

CHECKS = [
    "every_process_codes_some_leaves",
    "bias_correction_crosses_processes",
    "same_file_content_as_one_process_save",
    "sharded_restore_over_the_global_mesh",
    "report_and_metadata",
    "byte_targets_allocate_one_budget_over_every_process",
    "byte_targets_land_as_a_one_process_save_lands_them",
    "a_share_between_two_candidates_is_landed",
    "one_process_refusing_fails_every_process_quickly",
    "processes_naming_different_files_fail_every_process",
    "processes_saving_other_trees_or_options_fail_every_process",
    "a_process_failing_while_coding_fails_every_process_quickly",
    "a_process_failing_to_read_its_leaves_fails_every_process_quickly",
    "process_0_failing_to_read_its_leaves_fails_every_process_quickly",
    "a_process_failing_under_a_byte_target_fails_every_process_quickly",
    "a_process_refusing_its_options_alone_keeps_the_processes_in_step",
    "a_second_save_replaces_the_first",
    "bytes_paths_file_urls_and_symlinks_are_local_files",
    "process_local_arrays_are_saved_like_numpy_leaves",
    "a_process_interrupted_while_coding_fails_every_process_quickly",
    "earlier_saves_leave_no_keys_in_the_coordination_service",
    "typed_prng_keys_split_across_processes_are_saved",
    "sub_byte_leaves_split_across_processes_are_saved",
    "adam_moments_split_across_processes_are_paired",
    "a_centered_pair_with_a_lossless_first_moment_split_across_processes",
    "a_generous_target_says_a_distributed_save_keeps_its_moments_steps",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_reports(tmp_path_factory, SCRIPT, NUM_PROCESSES, TIMEOUT_S, CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_multiprocess_save(run, name):
    for r in run[1]:
        assert r["checks"][name] == "ok", f"process {r['process']}:\n{r['checks'][name]}"


def test_processes_agree_on_the_plan(run):
    reports = run[1]
    assert all(r["owners"] == reports[0]["owners"] for r in reports)
    assert all(r["gathered"] == reports[0]["gathered"] for r in reports)


def test_one_process_restores_the_distributed_file(run):
    """Another topology: this pytest process alone, with its own devices."""
    workdir, _ = run
    restored = jaxjpeg.restore(workdir / "distributed.jjpg")
    reference = jaxjpeg.restore(workdir / "one_process_0.jjpg")
    assert set(restored) == set(reference)
    for name in reference:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(reference[name]))
    assert not list(workdir.glob("*.tmp-*")), "a temporary file was left behind"
    assert jaxjpeg.cli.main(["verify", str(workdir / "distributed.jjpg")]) == 0


def test_named_pairs_that_share_a_leaf_have_one_owner():
    """Review (session 29): a leaf in two named pairs (nu/m with mu/m, and
    as an "m" beside nu/v) was given two owners, the last splitting a pair."""
    from jaxjpeg.distributed_save import plan_owners
    leaves = [np.zeros((64, 64), np.float32)] * 6
    owners, gather = plan_owners(leaves, 2, {0: 2, 1: 3, 2: 3})
    assert owners[0] == owners[1] == owners[2] == owners[3] and not any(gather)
    assert plan_owners(leaves, 2)[0] == [0, 1, 0, 1, 0, 1]


def test_a_running_maximum_has_its_moments_owner():
    """Review: amsgrad's nu_max (PyTorch's max_exp_avg_sq) went to another
    process than its nu, whose pair() then never saw the pair: JPEG-coded
    where a one-process save put it on log2 steps. The optimizers' names keep
    it with its second moment."""
    from jaxjpeg import checkpoint as ck
    from jaxjpeg.distributed_save import plan_owners

    zeros = np.zeros((64, 64), np.float32)
    leaves = [ck.SourceLeaf.of([["key", "opt_state"], ["key", name], ["key", "w"]], zeros)
              for name in ("mu", "nu", "nu_max")]
    leaves += [ck.SourceLeaf.of([["key", "state.0." + name]], zeros)
               for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
    saver = ck._Save("unused.jjpg", leaves)
    together = saver.log_coding.named_pairs(leaves)
    assert together == {0: 1, 2: 1, 3: 4, 5: 4}, together
    owners, _ = plan_owners([np.zeros((64, 64), np.float32)] * 6, 2, together)
    assert owners[0] == owners[1] == owners[2] and owners[3] == owners[4] == owners[5]


def test_a_process_that_exited_before_saving_is_named_after_the_wait(tmp_path):
    """Found by review: process 0 waited TIMEOUT_S for a process that had
    exited, then raised a bare DEADLINE_EXCEEDED of a coordination key."""
    from multiprocess_launch import free_loopback_port, launch
    script = Path(__file__).parent / "scripts" / "dead_peer_save.py"
    runs = launch(script, tmp_path, free_loopback_port(), 2, 120)
    assert [code for code, _, _ in runs] == [0, 0], runs
    said = runs[0][1].strip().splitlines()[-1]
    assert said.startswith("TimeoutError: distributed save: waited 3 s for 'ready/1'"), said
    assert not (tmp_path / "d.jjpg").exists()
