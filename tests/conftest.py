"""Test setup, before JAX is imported anywhere: 8 fake CPU devices and one persistent JAX
compilation cache for the whole run (this process, xdist's workers and every subprocess a
test starts read the same environment variables)."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# --- the compilation cache ------------------------------------------------------------------
# VITVQ_TEST_JAX_CACHE=DIR puts it in DIR; =off runs the suite with no persistent cache (a cold
# measurement). The default survives between runs, so a second `pytest` compiles little.
# Multi-process CPU runs switch it off themselves (vitvq.distributed), so pods always compile.
CACHE_ENV = "VITVQ_TEST_JAX_CACHE"
CACHE_MAX_BYTES = 4 << 30  # least recently used entries go beyond this (JAX locks with filelock)


def default_cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/vitvq/jax-tests, ~/.cache/vitvq/jax-tests without it."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "vitvq" / "jax-tests"


def _set_up_compilation_cache() -> None:
    choice = os.environ.get(CACHE_ENV, "").strip()
    if choice.lower() in ("off", "0", "none", "false"):
        os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        return
    directory = pathlib.Path(choice).expanduser() if choice else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(directory)  # subprocesses' own conftest-free runs see it too
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "true"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(directory)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every compile
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"  # entries of every size
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(CACHE_MAX_BYTES)
    repair_compilation_cache(directory)


def repair_compilation_cache(directory: os.PathLike) -> int:
    """Gives every entry of the cache in `directory` that lacks one its access-time file;
    returns how many it gave.

    With a size cap JAX keeps, beside each `KEY-cache`, a `KEY-atime`, and before every write it
    reads the atime of every entry to find what to evict. An entry without one (its process
    was SIGKILLed between the two writes, as tests/test_faults.py does, or a run without the
    cap wrote it) makes every later write fail with a FileNotFoundError that JAX only warns
    about: the cache silently stops growing, and each later run compiles what it lacks again.
    The entry's own modification time stands in for its last access."""
    given = 0
    for entry in pathlib.Path(directory).glob("*-cache"):
        atime = entry.with_name(entry.name.removesuffix("-cache") + "-atime")
        if atime.exists():
            continue
        try:
            atime.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
            given += 1
        except FileNotFoundError:  # evicted meanwhile by another process
            pass
    return given


_set_up_compilation_cache()


# --- the fast tier: `pytest -m "not slow"` -------------------------------------------------
# Whole modules that train, export, spawn processes or compile for TPUs, and the slowest
# tests elsewhere (each over ~10 s on a 2-core machine). `pytest` still runs everything.
SLOW_MODULES = {
    "test_ablations",
    "test_aot",
    "test_bad_data",
    "test_benchmarks",
    "test_collapse_guard",
    "test_evaluate",
    "test_export",
    "test_faults",
    "test_fsdp_memory",
    "test_main",
    "test_multiprocess",
    "test_overfit",
    "test_pipeline",
    "test_remote_workdir",
    "test_train_stage1",
    "test_train_stage2",
}
SLOW_TESTS = {
    "test_codebook_restart.py::test_restart_step_revives_unused_codes_of_a_collapsed_codebook",
    "test_discriminator.py::test_r1_penalty_matches_finite_differences",
    "test_discriminator.py::test_logits_shape_and_dtype",
    "test_discriminator.py::test_sharded_init_and_apply_on_a_mesh",
    "test_discriminator.py::test_stddev_groups_couple_only_their_own_images",
    "test_cnn.py::test_sharded_init_and_apply_on_a_mesh",
    "test_rejection.py::test_inception_scores_the_candidates",
    "test_probe.py::test_probe_on_digits_matches_in_memory_features_and_resumes",
    "test_probe.py::test_probe_command_on_a_folder_dataset",
    "test_probe.py::test_probe_command_sigterm_mid_run_then_resume",
    "test_quantizer.py::test_straight_through_gradient_reaches_the_encoder_input",
    "test_quantizer.py::test_vq_loss_formula_and_codebook_gradient",
    "test_vim.py::test_remat_recomputes_blocks_with_the_same_parameters_results_and_gradients",
    "test_vim.py::test_sampling_on_a_mesh_matches_one_device",
    "test_vim.py::test_blocked_cache_decoding_is_greedy_too",
    "test_vitvqgan.py::test_remat_recomputes_vit_blocks_with_the_same_parameters_results_and_gradients",
    "test_vitvqgan.py::test_other_patch_and_image_sizes",
    "test_discriminator.py::test_bfloat16_compute_gives_float32_logits",
    "test_probe.py::test_probe_refuses_bad_requests",
    "test_perceptual.py::test_gradients_finite_at_zero_features",
    "test_cnn.py::test_bfloat16_compute_is_close_to_float32",
    "test_cnn.py::test_losses_and_gradients_on_patch_logits",
    "test_cnn.py::test_encoder_and_decoder_use_raster_order",
    "test_cnn.py::test_dropout_in_training_mode",
    "test_cnn.py::test_small_spec_256_round_trip_shapes_and_values",
    "test_rejection.py::test_rejection_keeps_the_best_fraction_in_order",
    "test_reconstruct.py::test_output_inside_input_is_not_read_back",
    "test_reconstruct.py::test_single_file_input_and_rerun_overwrites",
    "test_checkpoint.py::test_kill_during_async_save_keeps_the_last_checkpoint",
    "test_discriminator.py::test_gradients_finite",
    "test_vitvqgan.py::test_paper_presets_256_to_32x32_codes_and_back",
    "test_vim.py::test_features_and_config",
    "test_kmeans.py::test_fewer_latents_than_codes_gives_distinct_codes_near_the_latents",
    "test_quantizer.py::test_codes_and_latents_have_unit_norm",
    "test_metrics.py::test_metrics_are_per_example",
    "test_perceptual.py::test_gradients_flow_to_images_not_weights",
    "test_schedule.py::test_lpips_sees_one_window_of_both_images_drawn_from_the_steps_key",
}
# Cheap tests of the slow modules that stay in the fast tier, so that it exercises the
# modules those cover (the loop, the distributed settings, URL paths, the export command, the
# step benchmark's config loader, the memory report).
FAST_IN_SLOW_MODULES = {
    "test_train_stage1.py::test_loop_stops_on_nonfinite_and_returns_on_preemption_without_a_device",
    "test_multiprocess.py::test_settings_resolution",
    "test_remote_workdir.py::test_urls_stay_as_given_and_local_paths_become_absolute",
    "test_export.py::test_export_cli_errors_exit_2",
    "test_benchmarks.py::test_config_overrides_are_typed",
    "test_fsdp_memory.py::test_step_memory_of_a_tiny_vim_counts_the_donated_state",
    # The commands' error paths, in-process (one case each of main and the multi-process
    # settings still a real subprocess).
    "test_main.py::test_user_error_is_one_line_and_exit_2",
    "test_aot.py::test_bad_arguments_exit_2_with_one_error_line",
    "test_multiprocess.py::test_inconsistent_settings_are_one_line_errors",
}


# --- the serial pass: `pytest -m serial`, run alone after the parallel pass -----------------
# Timing-bound tests: process rendezvous windows (gloo gives a pod's processes 30 s to meet),
# heartbeats, SIGTERM and SIGKILL at chosen moments, time bounds. A second busy xdist worker
# would make them slow or flaky, so scripts/test.sh runs them on their own. Each is slow too.
SERIAL_MODULES = {"test_faults", "test_multiprocess"}
SERIAL_TESTS = {
    "test_probe.py::test_probe_command_sigterm_mid_run_then_resume",
}
NOT_SERIAL_IN_SERIAL_MODULES = {
    "test_multiprocess.py::test_settings_resolution",
    "test_multiprocess.py::test_inconsistent_settings_are_one_line_errors",
}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        module = item.path.stem
        name = f"{item.path.name}::{item.originalname}"
        slow_module = module in SLOW_MODULES and name not in FAST_IN_SLOW_MODULES
        serial_module = module in SERIAL_MODULES and name not in NOT_SERIAL_IN_SERIAL_MODULES
        if serial_module or name in SERIAL_TESTS:
            item.add_marker(pytest.mark.serial)
            item.add_marker(pytest.mark.slow)
        elif slow_module or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
