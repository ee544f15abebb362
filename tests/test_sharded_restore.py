"""Sharded restore on 8 host CPU devices, checked in a subprocess.

The device count is fixed when jax initialises, so tests/scripts/sharded_restore.py
runs in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=8
and reports every check; each test below asserts one of them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "sharded_restore.py"

CHECKS = [
    "eight_devices_seen",
    "rows_sharded_8_ways_read_only_their_tiles",
    "cols_sharded_8_ways_read_only_their_tiles",
    "mesh_2x4_both_dims_read_only_their_tile",
    "four_d_leaf_sharded_on_leading_dim",
    "four_d_leaf_sharded_on_inner_dims",
    "coder_view_leaf_shards_read_only_their_tiles",
    "unaligned_rows_read_only_overlapping_tiles",
    "replicated_every_device_reads_everything",
    "bfloat16_sharded_and_dtype_override",
    "raw_leaf_sharded",
    "thin_quantized_leaf_sharded",
    "whole_tree_mixed_targets",
    "different_device_count_than_saved",
    "concrete_target_keeps_its_device",
    "load_honours_target_placement",
    "saved_sharded_last_axis_4_ways_reads_a_quarter",
    "saved_sharded_first_axis_reads_its_share",
    "saved_on_2x4_mesh_reads_an_eighth",
    "saved_sharded_loud_slices_are_balanced_as_unsharded",
    "saved_sharded_restores_on_other_shardings",
    "orbax_handler_cuts_tiles_along_shards",
    "custom_encoder_gets_the_shards",
    "numpy_and_replicated_leaves_split_their_largest_axis_evenly",
    "saved_sharded_flax_conv_decodes_into_its_shards",
    "sharded_leaves_decode_in_one_call_per_device",
    "a_device_argument_is_one_device",
    "sharding_target_leaves_place_their_leaves",
    "host_memory_targets_come_back_in_host_memory",
    "loaded_leaves_decode_into_any_out_shardings",
    "unplaced_restores_follow_the_default_device_and_meshes",
    "an_indivisible_sharding_names_its_leaf",
    "a_sharding_of_another_rank_names_its_leaf",
    "key_leaves_are_laid_out_as_keys",
    "a_shard_of_an_inner_axis_decodes_its_box_in_part",
    "stacked_layers_saved_sharded_read_their_share",
    "stacked_loud_columns_saved_sharded_are_balanced",
    "equal_leaves_sharded_apart_are_tied",
    "restores_inside_a_context_mesh",
    "restores_under_a_transfer_guard",
    "a_restore_traced_by_jit_says_to_load_and_decode",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path_factory.mktemp("sharded"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(CHECKS), "script and test disagree on the checks"
    return report


@pytest.mark.parametrize("name", CHECKS)
def test_sharded_restore(results, name):
    assert results[name] == "ok", results[name]
