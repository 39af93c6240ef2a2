"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        module = item.path.stem
        name = f"{item.path.name}::{item.originalname}"
        if module in SLOW_MODULES or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
