"""Sharded restore under jax.distributed: 2 processes x 4 host CPU devices.

tests/scripts/multiprocess_restore.py runs as NUM_PROCESSES processes joined
over loopback (coordinator on 127.0.0.1, CPU collectives off), forming one
global mesh of 8 devices. Process 0 saves a checkpoint, then every process
restores it with shardings over the global mesh and checks the shards it holds
and the tile bytes it read; each reports its checks as one JSON line. Each
test below asserts one check in every process, or compares the processes.
"""

from pathlib import Path

import pytest

from multiprocess_launch import run_reports

SCRIPT = Path(__file__).parent / "scripts" / "multiprocess_restore.py"
NUM_PROCESSES = 2
TIMEOUT_S = 120

CHECKS = [
    "global_mesh_spans_processes",
    "unsharded_reference_on_local_device",
    "rows_sharded_across_processes",
    "cols_sharded_across_processes",
    "mesh_2d_one_tile_per_device",
    "mesh_2d_processes_split_columns",
    "four_d_leaf_sharded_on_leading_dim",
    "four_d_leaf_sharded_on_inner_dims",
    "bfloat16_sharded",
    "replicated_each_process_reads_everything",
    "raw_leaf_sharded",
    "whole_tree_mixed_targets",
    "compressed_load_on_local_device",
    "tied_leaves_on_one_global_sharding",
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return run_reports(tmp_path_factory, SCRIPT, NUM_PROCESSES, TIMEOUT_S, CHECKS)[1]


@pytest.mark.parametrize("name", CHECKS)
def test_multiprocess_restore(reports, name):
    for r in reports:
        assert r["checks"][name] == "ok", f"process {r['process']}:\n{r['checks'][name]}"


def test_every_process_decodes_the_same_values(reports):
    assert all(r["reference_sha256"] == reports[0]["reference_sha256"] for r in reports)


# check -> (leaf, how many devices' shards overlap each tile): the processes
# hold disjoint parts of these leaves, so together they read every tile that
# many times, and each process only its own part of them.
DISJOINT = {
    # 8-way shards of the largest axis: the tiles of numpy leaves end there
    "rows_sharded_across_processes": ("rows", 1),
    "cols_sharded_across_processes": ("cols", 1),
    "mesh_2d_one_tile_per_device": ("cols", 1),
    "mesh_2d_processes_split_columns": ("rows", 1),
    "four_d_leaf_sharded_on_leading_dim": ("conv", 2),
}


@pytest.mark.parametrize("name", sorted(DISJOINT))
def test_processes_split_the_tile_reads(reports, name):
    leaf, per_tile = DISJOINT[name]
    total = reports[0]["leaf_tile_bytes"][leaf]
    read = [r["tile_bytes_read"][name] for r in reports]
    assert sum(read) == per_tile * total, (read, total)
    assert all(0 < n < per_tile * total for n in read), (read, total)


def test_replicated_every_process_reads_every_tile(reports):
    total = reports[0]["leaf_tile_bytes"]["cols"]
    for r in reports:
        assert r["tile_bytes_read"]["replicated_each_process_reads_everything"] == 4 * total
