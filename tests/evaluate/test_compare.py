"""`oodfast evaluate compare`: headline metrics of several representation reports in one table."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from oodfast.cli import main as cli
from oodfast.evaluate.compare import HEADLINE_METRICS, compare_representations, comparison_markdown


def report(knn_acc: float, lin_acc: float, auroc: float | None = 0.6, tau: float = 0.001) -> dict:
    """The parts of an `evaluate represent` report the comparison reads."""
    interval = {"mean": lin_acc, "low": lin_acc - 0.01, "high": lin_acc + 0.01, "values": [lin_acc] * 3, "n": 3}
    rare_linear = {"balanced_accuracy": {"mean": 0.55, "low": 0.5, "high": 0.6, "values": [0.55], "n": 3}}
    rare_knn: dict = {"accuracy": 0.9, "balanced_accuracy": 0.5}
    if auroc is not None:
        rare_linear["auroc"] = {"mean": auroc, "low": auroc - 0.02, "high": auroc + 0.02, "values": [auroc], "n": 3}
        rare_knn["auroc"] = auroc - 0.05
    return {"config": {"seeds": [0, 1, 2], "size": 64, "crops_per_image": 4, "tau": tau},
            "dominant": {"knn": {"overall": {"accuracy": knn_acc}}, "linear": {"overall.accuracy": interval}},
            "rare_present": {"knn": rare_knn, "linear": rare_linear}}


def test_one_report_keeps_its_probe_interval_and_knn_is_exact() -> None:
    out = compare_representations({"none": [report(0.6, 0.7)]})
    row = out["arms"]["none"]
    assert out["reports"] == {"none": 1} and out["metrics"] == [t for t, _ in HEADLINE_METRICS]
    assert row["dominant class, kNN acc."] == {"mean": 0.6, "low": None, "high": None, "values": [0.6], "n": 1,
                                               "interval_over": None}
    lin = row["dominant class, linear acc."]
    assert (lin["mean"], lin["low"], lin["high"]) == pytest.approx((0.7, 0.69, 0.71))
    assert lin["n"] == 3 and lin["interval_over"] == "probe seeds"
    assert out["config"]["tau"] == 0.001
    assert row["rare presence, kNN AUROC"]["mean"] == pytest.approx(0.55)
    # A metric the report does not hold (here: tail classes) is None, shown as "-".
    assert row["tail classes, linear mean-class acc."]["mean"] is None
    text = comparison_markdown(out)
    assert "| none | 1 | 0.600 | 0.700 [0.690, 0.710] |" in text and "| - |" in text
    assert "tau 0.001" in text and "class-balanced" in text


def test_several_reports_give_a_t_interval_over_pretraining_seeds() -> None:
    out = compare_representations({"ood": [report(0.60, 0.70), report(0.64, 0.74)], "none": [report(0.5, 0.6, None)]})
    cell = out["arms"]["ood"]["dominant class, linear acc."]
    # mean 0.72, s = 0.02 * sqrt(2), half-width t_{0.975,1} * s / sqrt(2) = 12.706 * 0.02 -> clipped to [0, 1].
    assert cell["mean"] == pytest.approx(0.72) and cell["values"] == pytest.approx([0.70, 0.74])
    assert cell["interval_over"] == "pretraining seeds"
    assert cell["low"] == pytest.approx(max(0.0, 0.72 - 12.7062 * 0.02), abs=1e-4)
    assert cell["high"] == pytest.approx(min(1.0, 0.72 + 12.7062 * 0.02), abs=1e-4)
    assert out["reports"] == {"ood": 2, "none": 1}
    assert out["arms"]["none"]["rare presence, linear AUROC"]["mean"] is None
    with pytest.raises(ValueError, match="no report"):
        compare_representations({"x": []})
    with pytest.raises(ValueError, match="at least one arm"):
        compare_representations({})
    # Reports of different protocols do not share a table.
    with pytest.raises(ValueError, match=r"tau is 0.001 in none\[0\] but 0.03 in ood\[1\]"):
        compare_representations({"none": [report(0.5, 0.6)], "ood": [report(0.5, 0.6), report(0.5, 0.6, tau=0.03)]})


def test_compare_cli(tmp_path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report(0.6, 0.7)))
    b.write_text(json.dumps(report(0.62, 0.72)))
    out_json, out_md = tmp_path / "cmp.json", tmp_path / "cmp.md"
    res = CliRunner().invoke(cli, ["evaluate", "compare", f"none={a}", f"ood={a},{b}", "--json", str(out_json),
                                   "--markdown", str(out_md)])
    assert res.exit_code == 0, res.output
    assert json.loads(out_json.read_text())["reports"] == {"none": 1, "ood": 2}
    assert "| ood | 2 |" in out_md.read_text()
    for bad in ("no-label", "x=,"):
        res = CliRunner().invoke(cli, ["evaluate", "compare", bad])
        assert res.exit_code == 2 and "LABEL=REPORT.json" in res.output
    res = CliRunner().invoke(cli, ["evaluate", "compare", f"x={tmp_path / 'missing.json'}"])
    assert res.exit_code != 0 and "cannot read report" in res.output
    for text in ("{}", '{"dominant": 1, "rare_present": 2}'):
        (tmp_path / "other.json").write_text(text)
        res = CliRunner().invoke(cli, ["evaluate", "compare", f"x={tmp_path / 'other.json'}"])
        assert res.exit_code == 1 and "not an `oodfast evaluate represent` JSON report" in res.output
    c = tmp_path / "c.json"
    c.write_text(json.dumps(report(0.6, 0.7, tau=0.03)))
    res = CliRunner().invoke(cli, ["evaluate", "compare", f"none={a}", f"ood={c}"])
    assert res.exit_code == 1 and "different evaluation settings: tau" in res.output
