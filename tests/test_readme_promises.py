"""Every sentence of the README that promises behaviour, a figure or a timing, with what backs it.

``PROMISES`` pairs each such phrase (as the README words it, whitespace aside) with its evidence: a test
(``tests/<file>.py::<test>``, which must exist) or a recorded run (a docs page and the figure it records).
A README edit that drops or rewords a promise, or a renamed or deleted test behind one, fails here: the
ledger is updated with the sentence, so the README never claims what nothing measures.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (phrase in the README, evidence: "tests/<file>.py::<test>" or ("<docs page>", "<figure it records>"))
PROMISES = [
    ("`python -m nemo_occ` is the same command as `nemo-occ`", "tests/test_main_module.py::test_python_m_nemo_occ_is_the_cli"),
    ("Run the tests (CI, `.ci/run`, runs this line verbatim)", "tests/test_docs_links.py::test_the_readme_test_command_is_what_ci_runs_verbatim"),
    ("The package itself asks for `torch>=2.4`", ("pyproject.toml", '"torch>=2.4"')),
    ("Last runs 2026-12-07, 0 failed on both refs: the megatron-core environment 168 passed on 0.19 and 169 on 0.20", ("docs/nemo_rl.md", "| (a) megatron (nemo-occ `ea0f741`) | 168 passed, 5 skipped, 0 failed | 169 passed, 4 skipped, 0 failed |")),
    ("NeMo-RL's driver side 322 passed and its Megatron worker side 9 passed on each ref", ("docs/nemo_rl.md", "| 322 passed, 5 skipped, 0 failed | 322 passed, 5 skipped, 0 failed |")),
    ("stops on an override of a key that does not exist", "tests/nemo_rl/test_nemo_rl_preflight.py::test_a_bad_override_is_one_line_naming_it"),
    ("a setting the MTP term cannot work with", "tests/nemo_rl/test_nemo_rl_recipes.py::test_checker_rejects_with_a_message_saying_what_to_set"),
    ("with `--strict`, a key NeMo-RL would ignore", "tests/nemo_rl/test_nemo_rl_preflight.py::test_check_warns_about_a_typo_in_a_recipe_file_and_strict_fails"),
    ("(`--dry-run` prints the `sbatch` call)", "tests/nemo_rl/test_nemo_rl_slurm.py::test_dry_run_prints_the_sbatch_call_for_ray_sub"),
    ("`nemo-occ info` prints the versions, CUDA and import checks", "tests/test_info.py::test_info_reports_versions_cuda_and_imports"),
    ("every metric with how a step's updates are combined", "tests/nemo_rl/test_nemo_rl_metric_names.py::test_every_emitted_metric_is_documented"),
    ("unknown keys and non-finite floats are rejected", "tests/core/test_core_config.py::test_unknown_keys_are_rejected"),
    ("unknown keys and non-finite floats are rejected", "tests/core/test_core_config.py::test_non_finite_floats_are_rejected_and_name_the_key"),
    ("resumes when rerun after an interruption", "tests/lab/test_lab_demo_rerun.py::test_ctrl_c_prints_one_line_and_the_rerun_resumes_to_the_uninterrupted_result"),
    ("about 10 minutes on two idle cores (9 min 53 s wall and 602 s of CPU in a fresh clone, the install included)", ("docs/demo.md", "9 min 53 s wall and 602 s of CPU (564 s user + 38 s system) on two idle cores, the install included")),
    ("`--quick` is a tiny version (16 s of CPU; 44 s and 95 s wall", ("docs/demo.md", "15.3 s user + 0.8 s system CPU, 44 s and 95 s wall")),
    ("all 80 jobs in 49 min 9 s on the 2-core machine (5161 s of CPU)", ("docs/study/README.md", "All 80 jobs finished (5 warm starts, 45 training runs, 30 probes; none dropped) in 49 min 9 s wall on the 2-core machine, two jobs at a time (5161 s user")),
    ("`--max-minutes` (default 60) starts no job that would end past the bound", "tests/lab/test_lab_study.py::test_max_minutes_starts_no_job_its_kind_says_would_end_past_the_bound"),
    ("each a process with one torch thread (`--jobs`)", "tests/lab/test_lab_study.py::test_jobs_in_parallel_give_the_same_numbers_as_one_at_a_time"),
    ("moved seed 0's pass rate from 0.50 to 0.14 and seed 4's from 0.29 to 0.40", ("docs/demo.md", "ended at a pass rate of 0.14 instead of 0.50 for seed 0 and 0.40 instead of 0.29 for seed 4")),
    ("(pass rate 0.29-1.00 over seeds 0-4)", ("docs/study/README.md", "| warm start (1000 SFT steps): pass rate | 0.29-1.00 (0.50, 1.00, 1.00, 0.80, 0.29) |")),
    ("`detach`'s held-out accuracy 0.49-0.99 over the same seeds", ("docs/study/README.md", "| `detach`: held-out accuracy at step 45 | 0.49-0.99 |")),
    ("The commands answer a misuse", "tests/test_cli_misuse.py::test_misuse"),
    ("a missing package", "tests/test_cli_misuse.py::test_a_missing_package_is_one_line_naming_it"),
    ("a full or read-only disk", "tests/test_cli_misuse.py::test_misuse_on_a_full_or_read_only_disk"),
    ("Ctrl-C) with one line on stderr and exit status 2 (130 for Ctrl-C)", "tests/test_cli_misuse.py::test_ctrl_c_while_training_is_one_line_exit_130_and_nothing_half_written"),
    ("a planted pickle is refused in one line instead of running", "tests/test_safe_load.py::test_load_state_refuses_a_planted_pickle_in_one_line"),
    ("the OCC calibrator's state in a NeMo-RL checkpoint", "tests/nemo_rl/test_nemo_rl_worker.py::test_a_planted_state_file_is_refused_without_running_its_code"),
    ("megatron's `common.pt` during `nemo-occ export`", "tests/test_safe_load.py::test_megatron_common_pt_is_read_weights_only_inside_the_export"),
    ("(a step's first update keeps it)", "tests/nemo_rl/test_nemo_rl_worker.py::test_which_lambda_each_update_uses_is_what_the_docs_say"),
    ("**No claim survives the correction** (smallest adjusted p = 0.067)", "tests/test_readme_promises.py::test_the_study_paragraph_quotes_the_adjusted_p_values_of_summary_json"),
    ("the fixed warm start leaves seeds 1 and 2 nearly saturated", ("docs/study/README.md", "1000 SFT steps leave seeds 1 and 2 at a pass rate of 0.998 and 0.996")),
    ("Tests that need what a CPU machine lacks carry a marker", ("pyproject.toml", 'addopts = "-ra --strict-markers"')),
]  # fmt: skip


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("phrase, evidence", PROMISES, ids=[p for p, _ in PROMISES])
def test_each_promise_is_in_the_readme_and_backed(phrase, evidence):
    assert _flat(phrase) in _flat((ROOT / "README.md").read_text()), "the README no longer says this"
    if isinstance(evidence, tuple):
        page, figure = evidence
        assert _flat(figure) in _flat((ROOT / page).read_text()), f"{page} does not record it"
        return
    path, _, test = evidence.partition("::")
    source = (ROOT / path).read_text()
    if test:
        assert re.search(rf"^def {re.escape(test)}\(", source, re.M), f"{evidence} does not exist"


def test_the_study_paragraph_quotes_the_adjusted_p_values_of_summary_json():
    """The README's study numbers are Benjamini-Hochberg over every p-value of the committed run's tests,
    recomputed here from docs/study/summary.json with scipy (not read off the report's own adjusted values)."""
    import json

    from scipy.stats import false_discovery_control

    summary = json.loads((ROOT / "docs" / "study" / "summary.json").read_text())
    tests = summary["tests"]
    names = [n for n in tests if tests[n]["p"] is not None]
    adjusted = dict(zip(names, false_discovery_control([tests[n]["p"] for n in names]), strict=True))
    readme = _flat((ROOT / "README.md").read_text())
    assert f"Benjamini-Hochberg over all {len(names)} of the report's tests" in readme
    assert f"smallest adjusted p = {min(adjusted.values()):.3f}" in readme
    assert min(adjusted.values()) >= 0.05  # "No claim survives the correction"
    claims = {c["test_key"]: c for c in summary["claims"]}
    for key, words in (
        ("eval_final: occ − detach", "held-out accuracy"),
        ("reward_final: ce_coef1 − detach", "reward at coef 1.0"),
    ):
        low, high = claims[key]["ci"]
        numbers = [f"{x:.3f}".replace("-", "−") for x in (claims[key]["mean"], low, high)]
        quoted = f"{words} {numbers[0]} [{numbers[1]}, {numbers[2]}], adjusted p = {adjusted[key]:.2f}"
        assert quoted in readme, quoted
    share = summary["confounds"]["occ"]["mtp_share_median"]["mean"]  # median over steps, mean over seeds
    assert f"median share of the update {share:.3f}" in readme
