"""The penalty frontier's report (`bench/regularization_frontier.py`): time ratios only from runs timed alone on
the device, and `--first` (the runs as first trained) against `--report` (the latest row of each run)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks are not installed
from bench.regularization_frontier import first, latest, report  # noqa: E402


def row(method: str, setting: str, train_s: float, sharing: int = 1, pgd_l2: float = 0.5, **extra) -> dict:
    return {"method": method, "setting": setting, "seed": 0, "epochs": 8, "train": 100, "clean": 0.8,
            "pgd_l2": pgd_l2, "pgd_linf": 0.4, "median_min_perturbation": 1.0, "train_s": train_s,
            "sharing": sharing, **extra}


def matched_rows(text: str) -> dict[str, list[str]]:
    section = text.split("| method | setting | clean - TRADES")[1].split("\n\n")[0]
    return {cells[0]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                          for line in section.splitlines()[2:])}


def test_time_ratio_only_from_runs_timed_alone(tmp_path):
    """TRADES and the KL penalty timed alone (100 s, 30 s): ratio 0.30, met; the worst-direction penalty ran only
    beside another process: its wall time is shown, its ratio is not, and its verdict is on PGD L2 alone."""
    rows = [row("TRADES", "beta=6.0", 100.0), row("FisherKLPenalty", "w=0.1", 30.0),
            row("FisherWorstDirectionPenalty", "w=1.0", 40.0, sharing=2, pgd_l2=0.49)]
    text = report(rows, "test", 500, tmp_path / "frontier_test")
    table = matched_rows(text)
    assert table["FisherKLPenalty"][6:] == ["30 (1 runs)", "0.30", "met"]
    assert table["FisherWorstDirectionPenalty"][6:] == ["40 (1 runs)", "-", "missed (PGD L2)"]
    assert table["TRADES"][6:8] == ["100 (1 runs)", "1.00"]
    assert "against TRADES' 100 s; runs trained while up to 2 processes shared the device give no time" in text
    assert (tmp_path / "frontier_test.md").read_text() == text + "\n"


def test_first_and_latest_rows():
    """A run trained, then rerun with AutoAttack: `latest` keeps the rerun, `first` the original, in order."""
    original, other = row("TRADES", "beta=6.0", 100.0), row("FisherKLPenalty", "w=0.1", 30.0)
    rerun = row("TRADES", "beta=6.0", 150.0, sharing=2, aa_l2=0.45, aa_linf=0.35)
    assert first([original, other, rerun]) == [original, other]
    assert latest([original, other, rerun]) == [rerun, other]


def test_autoattack_section(tmp_path):
    """AutoAttack's accuracy and PGD minus it, mean over seeds, in the search's order (TRADES before PGD-AT)."""
    rows = [row("PGD-AT", "eps=8/255", 10.0, pgd_l2=0.5, aa_linf=0.3, aa_l2=0.45),
            row("TRADES", "beta=6.0", 10.0, pgd_l2=0.5, aa_linf=0.35, aa_l2=0.40),
            {**row("TRADES", "beta=6.0", 10.0, pgd_l2=0.5, aa_linf=0.25, aa_l2=0.44), "seed": 1}]
    text = report(rows, "test", 500, tmp_path / "frontier_test")
    section = text.split("PGD minus it, points, mean over seeds:")[1].split("\n\n")[1].splitlines()[2:]
    assert section == ["| TRADES | beta=6.0 | 2 | 0.300 | +10.0 | 0.420 | +8.0 |",
                       "| PGD-AT | eps=8/255 | 1 | 0.300 | +10.0 | 0.450 | +5.0 |"]
