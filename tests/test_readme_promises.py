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
    ("11 minutes on two idle cores since its probes are cross-fitted", ("docs/demo.md", "idle cores it took 11 min 19 s wall and 654 s of CPU")),
    ("(16 min on cores shared with two other jobs)", ("docs/demo.md", "took 617 s of CPU (10 min 17 s user) and 16 min 6 s wall")),
    ("`--quick` is a tiny version (16 s of CPU; 44 s and 95 s wall", ("docs/demo.md", "15.3 s user + 0.8 s system CPU, 44 s and 95 s wall")),
    ("all 69 jobs took 36 min on two cores", ("docs/study/README.md", "ran all 69 jobs")),
    ("all 69 jobs took 36 min on two cores", ("docs/study/README.md", "36 min 19 s on the 2-core machine")),
    ("The commands answer a misuse", "tests/test_cli_misuse.py::test_misuse"),
    ("a missing package", "tests/test_cli_misuse.py::test_a_missing_package_is_one_line_naming_it"),
    ("a full or read-only disk", "tests/test_cli_misuse.py::test_misuse_on_a_full_or_read_only_disk"),
    ("Ctrl-C) with one line on stderr and exit status 2 (130 for Ctrl-C)", "tests/test_cli_misuse.py::test_ctrl_c_while_training_is_one_line_exit_130_and_nothing_half_written"),
    ("a planted pickle is refused in one line instead of running", "tests/test_safe_load.py::test_load_state_refuses_a_planted_pickle_in_one_line"),
    ("the OCC calibrator's state in a NeMo-RL checkpoint", "tests/nemo_rl/test_nemo_rl_worker.py::test_a_planted_state_file_is_refused_without_running_its_code"),
    ("megatron's `common.pt` during `nemo-occ export`", "tests/test_safe_load.py::test_megatron_common_pt_is_read_weights_only_inside_the_export"),
    ("(a step's first update keeps it)", "tests/nemo_rl/test_nemo_rl_worker.py::test_which_lambda_each_update_uses_is_what_the_docs_say"),
    ("CE at coef 1.0 lowers the final training reward (0.27 vs 0.76; Welch p = 0.0004, adjusted 0.012; paired adjusted 0.065)", "tests/test_readme_promises.py::test_the_study_paragraph_quotes_the_adjusted_p_values_of_summary_json"),
    ("CE at coef 1.0 lowers the final training reward (0.27 vs 0.76", ("docs/study/README.md", "final training reward 0.271 ± 0.026 against 0.758 ± 0.047")),
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
    """The README's study numbers are Benjamini-Hochberg over all 50 p-values (Welch and paired) of the
    committed run's 25 comparisons, recomputed here from docs/study/summary.json with scipy."""
    import json

    from scipy.stats import false_discovery_control

    comparisons = json.loads((ROOT / "docs" / "study" / "summary.json").read_text())["comparisons"]
    names = list(comparisons)
    assert len(names) == 25
    raw = [comparisons[n]["p"] for n in names] + [comparisons[n]["paired"]["p"] for n in names]
    keys = [("welch", n) for n in names] + [("paired", n) for n in names]
    adjusted = dict(zip(keys, false_discovery_control(raw), strict=True))
    readme = _flat((ROOT / "README.md").read_text())
    ce = "ce_coef1 - none"
    assert f"Welch p = {comparisons[ce]['p']:.4f}, adjusted {adjusted[('welch', ce)]:.3f}" in readme
    assert f"paired adjusted {adjusted[('paired', ce)]:.3f}" in readme
    coef = "policy_coef1 - policy"
    assert (
        f"paired p = {comparisons[coef]['paired']['p']:.3f}, adjusted {adjusted[('paired', coef)]:.3f}"
        in readme
    )
    # "one effect remains": only CE at coef 1.0 (against none, policy and ce) is below 0.05 after adjustment
    survivors = {n for (_, n), p in adjusted.items() if p < 0.05}
    assert survivors == {"ce_coef1 - none", "ce_coef1 - policy", "ce_coef1 - ce"}
