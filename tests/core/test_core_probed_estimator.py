"""``occ.estimator: probed``: λ from the probes' cross-fitted statistics, held between probes, with λ+
and λ_max as for the proxies, refused inputs leaving λ unchanged, and a checkpoint that resumes the λ
sequence bit for bit."""

from __future__ import annotations

import io
import math

import pytest
import torch

from nemo_occ.core.calibration import OCCCalibrator
from nemo_occ.core.config import ConfigError, NemoOCCConfig, OCCConfig, load_config
from nemo_occ.core.diagnostics import ExactStatistics, GradientStatistics
from nemo_occ.core.fidelity import refresh_lambda_from_probe


def _stats(c_hat: float, v2_hat: float, n: float = 10.0) -> torch.Tensor:
    return torch.tensor([[c_hat, v2_hat, n, 0.0]], dtype=torch.float64)


def _exact(c, v2, precond=None):
    same = GradientStatistics([c * 3], [v2 * 3], 1.0)
    cross = GradientStatistics([c], [v2], 1.0)
    pre = GradientStatistics([precond[0]], [precond[1]], 1.0) if precond else None
    return ExactStatistics(same, cross, pre and same, pre)


def test_lambda_comes_from_the_probe_and_is_held_between_probes():
    cal = OCCCalibrator(1, OCCConfig(estimator="probed", lambda_plus=0.5, initial_lambda=0.1))
    for _ in range(3):  # proxies with a λ of their own (0.5 · 4 / 2 = 1): never applied
        cal.add_statistics(_stats(4.0, 2.0))
        update = cal.close_update(refresh=True)
        assert cal.lambdas == [0.1] and update.depths[0].lambda_next == 0.1
    assert refresh_lambda_from_probe(cal, _exact(0.3, 1.5), "euclidean")
    assert cal.lambdas == [0.5 * 0.3 / (1.5 + 1e-8)]
    cal.add_statistics(_stats(-4.0, 2.0))
    cal.close_update(refresh=True)
    assert cal.lambdas == [0.5 * 0.3 / (1.5 + 1e-8)]  # held
    assert refresh_lambda_from_probe(cal, _exact(0.3, 1.5, precond=(-2.0, 0.5)), "preconditioned")
    assert cal.lambdas == [0.5 * -2.0 / (0.5 + 1e-8)]
    with pytest.warns(UserWarning, match="no preconditioned statistics"):
        assert not refresh_lambda_from_probe(cal, _exact(1.0, 1.0), "preconditioned")
    assert cal.lambdas == [0.5 * -2.0 / (0.5 + 1e-8)]


def test_lambda_max_clamps_and_a_nonpositive_v2_keeps_lambda():
    cal = OCCCalibrator(2, OCCConfig(estimator="probed", lambda_max=2.0))
    assert cal.refresh_from_probe([10.0, -10.0], [1.0, 1.0]) == [2.0, -2.0]
    with pytest.warns(UserWarning, match="depth 2 is -0.1"):
        assert cal.refresh_from_probe([1.0, 1.0], [4.0, -0.1]) == [1.0 / (4.0 + 1e-8), -2.0]


def test_refused_inputs_change_nothing():
    cal = OCCCalibrator(1, OCCConfig(estimator="probed", initial_lambda=0.2))
    with pytest.raises(ValueError, match="NaN"):
        cal.refresh_from_probe([math.nan], [1.0])
    with pytest.raises(ValueError, match="per depth"):
        cal.refresh_from_probe([1.0, 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="overflowed"):
        OCCCalibrator(1, OCCConfig(estimator="probed", lambda_plus=1e300)).refresh_from_probe(
            [1e300], [1e-300]
        )
    assert cal.lambdas == [0.2]
    with pytest.raises(ValueError, match="not 'signed'"):
        OCCCalibrator(1, OCCConfig()).refresh_from_probe([1.0], [1.0])


def test_config_needs_probes_and_lagged_timing():
    with pytest.raises(ConfigError, match="set fidelity.every"):
        load_config({"regime": "occ", "occ": {"estimator": "probed"}}, key=None)
    with pytest.raises(ConfigError, match="use timing: lagged"):
        load_config(
            {
                "regime": "occ",
                "occ": {"estimator": "probed", "timing": "microbatch"},
                "fidelity": {"every": 5},
            },
            key=None,
        )
    cfg = NemoOCCConfig(occ={"estimator": "probed"}, fidelity={"every": 10, "metric": "preconditioned"})
    assert cfg.occ.estimator == "probed"


def _run(cal: OCCCalibrator, steps: range, lambdas: list) -> None:
    """A deterministic stream of proxies and, every third update, a probe."""
    for u in steps:
        g = torch.Generator().manual_seed(u)
        cal.add_statistics(torch.cat([torch.randn(2, 1, generator=g, dtype=torch.float64),
                                      torch.rand(2, 1, generator=g, dtype=torch.float64),
                                      torch.full((2, 2), 7.0, dtype=torch.float64)], dim=1))  # fmt: skip
        cal.close_update(refresh=u % 4 != 0)
        if u % 3 == 2:
            c = torch.randn(2, generator=g, dtype=torch.float64).tolist()
            v2 = (torch.rand(2, generator=g, dtype=torch.float64) + 0.1).tolist()
            cal.refresh_from_probe(c, v2)
        lambdas.append(cal.lambdas)


def test_checkpoint_resumes_the_lambda_sequence_bit_identically():
    cfg = OCCConfig(estimator="probed", lambda_plus=0.7, lambda_max=5.0)
    straight, resumed = [], []
    _run(OCCCalibrator(2, cfg), range(12), straight)
    first = OCCCalibrator(2, cfg)
    _run(first, range(7), resumed)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    second = OCCCalibrator(2, cfg)
    second.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    _run(second, range(7, 12), resumed)
    assert resumed == straight  # exact float equality, every update
    assert len({tuple(x) for x in straight}) > 3  # λ moved at the probes
