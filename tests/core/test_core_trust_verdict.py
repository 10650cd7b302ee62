"""The trust verdict (``nemo_occ.core.fidelity.trust_verdict``) on synthetic probe histories whose truth
is known, table-driven. Each row also names a weakened rule under which its verdict goes wrong, and
the test checks that it does: every part of the rule is needed by some row.

Weakened rules (written here, from the study's old rule and from the parts of the new one):
- ``same_sample``: the verdict fed the same-sample c, v² instead of the cross-fitted ones;
- ``pooled``: the old rule: Spearman over all probes with a Fisher interval that counts every probe
  as independent, and sign agreement above its base rate without an interval;
- ``two_sided``: rank agreement of either sign (|ρ|) accepted;
- ``no_sign``: the sign part dropped; ``no_v2``: the v² rank part dropped.
"""

from __future__ import annotations

import numpy as np
import pytest

from nemo_occ.core.fidelity import (
    ProbeHistory,
    block_bootstrap,
    sign_agreement,
    spearman_interval,
    trust_verdict,
    windows_of,
)

WINDOW, MIN_WINDOWS = 6, 3


def _history(kind: str, windows: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Per probe (oldest first): ĉ, v̂² (per token), same-sample c, v², cross-fitted c_x, v²_x."""
    rng = np.random.default_rng(seed)
    n = windows * WINDOW
    w = np.repeat(np.arange(windows), WINDOW)  # each probe's window
    z = rng.normal(0.2, 1.0, n)  # the expected alignment, both signs
    v2_x = rng.uniform(0.5, 2.0, n)
    v2_hat = 3 * v2_x + rng.normal(0, 0.1, n)
    self_term = rng.uniform(0.0, 20.0, n)  # each sequence's covariance with itself, > 0
    noise = rng.normal(0, 0.2, n)
    c_x = z
    if kind == "aligned":
        c_hat = 2 * z + noise
    elif kind == "anti_aligned":
        c_hat = -2 * z + noise
    elif kind == "orthogonal_same_sample":
        c_x = rng.normal(0, 0.3, n)  # no expected alignment: cross-fitting sees noise around 0
        c_hat = 0.1 * self_term + 0.01  # the proxies track the same-sample terms
        v2_hat = 3 * (v2_x + self_term) + rng.normal(0, 0.1, n)
    elif kind == "aligned_drifting":
        # aligned within every window, positive throughout, while the levels drift apart over training
        # (c_x falls, ĉ rises): pooled, ρ is negative (the study's pooled ρ(ĉ, c))
        c_x = 0.5 * (6 - w) + 0.1 * z
        c_hat = 1.0 + w + 0.2 * z + 0.1 * noise
    elif kind == "unaligned_drifting":
        # unrelated within every window, both drifting up together (Simpson's paradox)
        c_x = w + rng.normal(0, 0.3, n)
        c_hat = w + rng.normal(0, 0.3, n)
    elif kind == "sign_offset":
        c_hat = 2 * z + 10.0  # ranks like c_x, always positive (the study's ce runs)
    elif kind == "v2_untracked":
        c_hat = 2 * z + noise
        v2_hat = rng.uniform(0.5, 2.0, n)
    else:
        raise AssertionError(kind)
    return {
        "c_hat": c_hat, "v2_hat": v2_hat, "c_same": c_x + self_term, "v2_same": v2_x + self_term,
        "c_x": c_x, "v2_x": v2_x,
    }  # fmt: skip


def _verdict(h, c="c_x", v2="v2_x", c_hat=None):
    return trust_verdict(
        h["c_hat"] if c_hat is None else c_hat,
        h[c],
        h["v2_hat"],
        h[v2],
        window=WINDOW,
        min_windows=MIN_WINDOWS,
    )


def _weakened(rule: str, h) -> bool:
    if rule == "same_sample":
        return _verdict(h, "c_same", "v2_same").trusted
    if rule == "pooled":
        rho_c, rho_v = spearman_interval(h["c_hat"], h["c_x"]), spearman_interval(h["v2_hat"], h["v2_x"])
        agree, base = sign_agreement(h["c_hat"], h["c_x"])
        return rho_c[1] > 0 and rho_v[1] > 0 and agree > base
    if rule == "two_sided":
        return _verdict(h).trusted or _verdict(h, c_hat=-h["c_hat"]).trusted
    v = _verdict(h)
    enough = v.windows >= MIN_WINDOWS and v.rho_c is not None and v.rho_v2 is not None
    if rule == "no_sign":
        return enough and v.rho_c[1] > 0 and v.rho_v2[1] > 0
    if rule == "no_v2":
        return enough and v.rho_c[1] > 0 and v.sign_ok
    raise AssertionError(rule)


CASES = [
    # kind, windows, truth, the weakened rule that gets it wrong
    ("aligned", 6, True, "same_sample"),
    ("anti_aligned", 6, False, "two_sided"),
    ("orthogonal_same_sample", 6, False, "same_sample"),
    ("aligned_drifting", 6, True, "pooled"),
    ("unaligned_drifting", 6, False, "pooled"),
    ("sign_offset", 6, False, "no_sign"),
    ("v2_untracked", 6, False, "no_v2"),
    ("aligned", 2, False, "pooled"),  # too few independent windows to tell, however many probes
]


@pytest.mark.parametrize(
    ("kind", "windows", "truth", "weakening"), CASES, ids=[f"{c[0]}-{c[1]}w" for c in CASES]
)
def test_verdict_is_right_and_the_weakened_rule_is_not(kind, windows, truth, weakening):
    h = _history(kind, windows)
    assert _verdict(h).trusted is truth
    assert _weakened(weakening, h) is (not truth)


def test_untrusted_when_same_sample_c_is_positive_and_cross_fitted_c_is_zero():
    """The issue's acceptance case through ProbeHistory: c_same > 0 on every probe, tracked by ĉ; c_x = 0."""
    from nemo_occ.core.diagnostics import ExactStatistics, GradientStatistics

    h = _history("orthogonal_same_sample")
    history = ProbeHistory(1, window=WINDOW, min_windows=MIN_WINDOWS)
    for i in range(len(h["c_hat"])):
        same = GradientStatistics([float(h["c_same"][i])], [float(h["v2_same"][i])], 1.0)
        cross = GradientStatistics([0.0], [float(h["v2_x"][i])], 1.0)
        out = history.record(
            c_hat=[float(h["c_hat"][i]) * 10], v2_hat=[float(h["v2_hat"][i]) * 10], tokens=[10.0], lambdas=[0.1],
            exact=ExactStatistics(same, cross),
        )  # fmt: skip
    assert all(x > 0 for x in h["c_same"])
    assert out["fidelity/trusted_1"] == 0.0 and out["fidelity/windows_1"] == 6.0
    assert "fidelity/spearman_c_1" not in out  # c_x constant: ρ undefined in every window


def test_trusted_through_the_history_on_an_aligned_run_and_it_survives_a_checkpoint():
    from nemo_occ.core.diagnostics import ExactStatistics, GradientStatistics

    h = _history("aligned")
    history = ProbeHistory(1, window=WINDOW, min_windows=MIN_WINDOWS)
    outs = []
    for i in range(len(h["c_hat"])):
        same = GradientStatistics([float(h["c_same"][i])], [float(h["v2_same"][i])], 1.0)
        cross = GradientStatistics([float(h["c_x"][i])], [float(h["v2_x"][i])], 1.0)
        outs.append(history.record(
            c_hat=[float(h["c_hat"][i])], v2_hat=[float(h["v2_hat"][i])], tokens=[1.0], lambdas=[0.1],
            exact=ExactStatistics(same, cross),
        ))  # fmt: skip
    assert [o["fidelity/trusted_1"] for o in outs].index(1.0) >= WINDOW * MIN_WINDOWS - 1  # never before
    assert outs[-1]["fidelity/spearman_c_low_1"] > 0
    restored = ProbeHistory(1, window=WINDOW, min_windows=MIN_WINDOWS)
    restored.load_state_dict(history.state_dict())
    assert restored.metrics() == history.metrics()
    # the preconditioned metric was never available: a history judged in it has nothing to judge
    pre = ProbeHistory(1, window=WINDOW, min_windows=MIN_WINDOWS, metric="preconditioned")
    pre.load_state_dict(history.state_dict())
    assert pre.metrics()["fidelity/trusted_1"] == 0.0 and pre.latest() is None
    assert history.latest() == [(float(h["c_x"][-1]), float(h["v2_x"][-1]))]
    with pytest.warns(UserWarning, match="predate"):
        old = ProbeHistory(1)
        old.load_state_dict({"num_depths": 1, "records": [[[1.0, 1.0, 1.0, 1.0]]]})
    assert old.records == []


def test_block_bootstrap_resamples_blocks_and_windows_are_whole():
    assert windows_of(13, 6) == [slice(0, 6), slice(6, 12)]
    blocks = np.array([1.0, 1.0, 1.0])
    assert block_bootstrap(blocks, lambda r: r.mean(axis=1)) == (1.0, 1.0)
    low, high = block_bootstrap(np.array([0.0, 1.0]), lambda r: r.mean(axis=1))
    assert (low, high) == (0.0, 1.0)  # two blocks: every mean from 0 to 1 is possible
