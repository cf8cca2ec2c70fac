"""The tracking benchmark's report and figure (`bench/tracking_report.py`) on rows whose figures are known: the
error statistics against numpy on the same arrays, the strongest AutoAttack as the lower of APGD and the standard
run, the alarm's epoch, and the figure's pixels where each curve must be drawn."""
import io
import sys
from pathlib import Path

import numpy as np
from matplotlib import image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks are not installed
from bench.tracking_report import _gap_interval, curves_figure, job_key, report  # noqa: E402

KEYS = ("l2/0.5", "linf/0.1")
EPOCHS = 6
CLEAN = 0.8


def run_rows(regime: str, aa: list[float], estimate: list[float], **job) -> list[dict]:
    """One run's rows: AutoAttack `aa` and the estimate `estimate` at every radius, the linear step 0.1 below
    the estimate, PGD-20 0.1 above AutoAttack."""
    rows = []
    for epoch in range(EPOCHS):
        row = {"data": "fashion_mnist", "regime": regime, "seed": 0, "epochs": EPOCHS, "train": 100,
               "probes": 64, "aa_probes": 32, "train_eps": 0.1, "recorded": "parts", "estimator": "min(d_l, s_u)",
               "search": "cut", "machine": "test", "epoch": epoch, "clean": CLEAN, "lambda_max_median": 1.0 + epoch,
               "grad_norm_median": 1.0, "estimate_s": 1.0, "pgd20_s": 20.0, "apgd_s": 50.0, **job}
        for key in KEYS:
            row |= {f"apgd/{key}": aa[epoch], f"pgd20/{key}": aa[epoch] + 0.1,
                    f"estimate/{key}": estimate[epoch], f"estimate_aa_probes/{key}": estimate[epoch],
                    f"linear/{key}": estimate[epoch] - 0.1, f"linear_aa_probes/{key}": estimate[epoch] - 0.1}
        rows.append(row)
    return rows


# FGSM-AT: robust share 0.75 of the correct probes, then 0.0625 at epoch 3 (the alarm there, and APGD's collapse)
FGSM_AA = [0.5, 0.55, 0.6, 0.1, 0.06, 0.06]
FGSM_ESTIMATE = [0.52, 0.56, 0.6, 0.05, 0.05, 0.05]
PLAIN_AA = [0.2, 0.3, 0.4, 0.4, 0.45, 0.45]
PLAIN_ESTIMATE = [0.25, 0.3, 0.35, 0.3, 0.3, 0.5]
STANDARD_AT = 2  # the standard AutoAttack ran at plain epoch 2, 0.05 below APGD


def rows_and_standard() -> tuple[list[dict], list[dict]]:
    rows = run_rows("fgsm", FGSM_AA, FGSM_ESTIMATE) + run_rows("plain", PLAIN_AA, PLAIN_ESTIMATE)
    plain = rows[EPOCHS + STANDARD_AT]
    standard = [{**{k: plain[k] for k in plain if "/" not in k}, **{f"aa/{key}": PLAIN_AA[STANDARD_AT] - 0.05
                                                                     for key in KEYS}}]
    return rows, standard


def table(text: str, header: str) -> list[list[str]]:
    section = text.split(header)[1].split("\n## ")[0]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| target") and not line.startswith("| regime")
            and not line.startswith("| signal")]


def test_report_figures_against_numpy():
    rows, standard = rows_and_standard()
    text = report("fashion_mnist", rows, standard=standard)
    plain_aa = np.array(PLAIN_AA)
    plain_aa[STANDARD_AT] -= 0.05  # the strongest AutoAttack: the standard run where it is lower
    aa, estimate = np.concatenate([FGSM_AA, plain_aa]), np.concatenate([FGSM_ESTIMATE, PLAIN_ESTIMATE])
    inside = (aa >= 0.05) & (aa <= 0.95)
    errors = np.tile(100 * (estimate - aa)[inside], len(KEYS))
    error = table(text, "## Error against AutoAttack")[0]
    assert int(error[1]) == len(errors) == 24
    assert float(error[2]) == round(float(np.median(np.abs(errors))), 2)
    assert float(error[3]) == round(float(np.quantile(np.abs(errors), 0.9)), 2)
    assert float(error[4]) == round(float(errors.mean()), 2)
    # the plain run's pick: the estimate's most robust epoch 5 (AutoAttack 0.45), the best 0.45 at epoch 4
    picks = [line for line in table(text, "## Per run and radius") if line[0] == "plain"]
    assert [line[8] for line in picks] == ["epoch 5: 0.450 / 0.450"] * len(KEYS)
    alarms = {line[0]: line[3] for line in table(text, "## Collapse")}
    assert alarms == {"fgsm 0.1": "3 (l2/0.5)", "plain": "-"}


def test_targets_on_held_out_runs():
    """A seed-1 FGSM-AT run took no part in choosing the estimator and the alarm, and its estimate runs against
    AutoAttack (rising while AutoAttack collapses): the held-out figures are its own (error statistics against numpy
    on its points alone; its Spearman and picks missed at both radii; its alarm silent at the collapse), beside the
    pooled figures of all three runs."""
    rows, standard = rows_and_standard()
    wrong = FGSM_ESTIMATE[::-1]
    held = [{**row, "seed": 1} for row in run_rows("fgsm", FGSM_AA, wrong)]
    text = report("fashion_mnist", rows + held, standard=standard)
    aa, estimate = np.array(FGSM_AA), np.array(wrong)
    inside = (aa >= 0.05) & (aa <= 0.95)
    errors = np.abs(np.tile(100 * (estimate - aa)[inside], len(KEYS)))
    targets = {line[0]: line[1] for line in table(text, "## Targets so far")}
    error = targets["median / p90 abs error <= 3 / 6 points"]
    assert error.endswith(f"; held out {np.median(errors):.2f} / {np.quantile(errors, 0.9):.2f} over {len(errors)}")
    assert targets["Spearman over epochs >= 0.9 per run and radius"].endswith("; held out 0 of 2")
    assert targets["estimate's pick within 1 point of the best"].endswith("; held out 0 of 2")
    assert targets["alarm at the collapse, never elsewhere"] == "2 of 3 runs; held out 0 of 1"
    assert "Held out: the runs other than fgsm seed 0, plain seed 0" in text


def test_gap_interval_against_the_normal_approximation():
    """The pick's paired interval: 20 probes robust only at the best epoch, 4 only at the pick, 232 alike, so the
    gap is 6.25 points with standard error sd / sqrt(256); the bootstrap's 95% interval is the normal one to
    within its resampling noise, and no interval where the flags are equal or were not kept."""
    best = np.zeros(256, dtype=int)
    picked = np.zeros(256, dtype=int)
    best[:20], picked[20:24], best[100:200], picked[100:200] = 1, 1, 1, 1
    difference = best - picked
    half = 1.96 * difference.std() / np.sqrt(len(difference))
    probes = {3: {"apgd/l2/0.5": best.tolist()}, 7: {"apgd/l2/0.5": picked.tolist()}}
    low, high = _gap_interval(probes, 3, 7, "l2/0.5")
    assert abs(low - 100 * (difference.mean() - half)) < 0.4 and abs(high - 100 * (difference.mean() + half)) < 0.4
    assert _gap_interval(probes, 3, 3, "l2/0.5") == (0.0, 0.0)
    assert np.isnan(_gap_interval(probes, 3, 5, "l2/0.5")).all()


def test_cost_target_is_read_per_run():
    """APGD on the curve costs (64 / 32 probes) x (2 / 2 radii) = 2 x its time: the FGSM run's estimate is 1 / 100
    of it, the plain run's (APGD twice as fast) 1 / 50, and the target is read on the plain run."""
    rows, standard = rows_and_standard()
    for row in rows[EPOCHS:]:
        row["apgd_s"] = 25.0
    text = report("fashion_mnist", rows, standard=standard)
    costs = {line[0]: line[6:] for line in table(text, "## Cost per evaluation")}
    assert costs["fgsm 0.1 seed 0"] == ["0.050 (met: <= 0.1)", "0.0100 (met: <= 0.01)"]
    assert costs["plain seed 0"] == ["0.050 (met: <= 0.1)", "0.0200 (missed: <= 0.01)"]
    target = next(line for line in table(text, "## Targets so far") if line[0].startswith("cost"))
    assert target[1:] == ["the largest of 2 runs' medians: 0.050 / 0.0200 (plain seed 0 for APGD)", "missed"]


def test_line_search_shortening_table():
    """Per run and norm: the share of correct probes whose line search lands nearer than the linear step, and the
    median ratio there (L2: 16 of 64 probes at half d_l; L-inf: 8 at a quarter, one more beyond d_l)."""
    rows = run_rows("plain", PLAIN_AA, PLAIN_ESTIMATE)
    linear = np.ones(64)
    l2, linf = np.full(64, np.inf), np.full(64, np.inf)
    l2[:16], linf[:8], linf[8] = 0.5, 0.25, 2.0
    parts = {"correct": [1] * 64, **{f"{name}/{norm}": linear.tolist() for name in ("linear", "first_order")
                                     for norm in ("l2", "linf")},
             "line_search/l2": l2.tolist(), "line_search/linf": linf.tolist(),
             **{f"apgd/{key}": [1] * 32 for key in KEYS}}
    text = report("fashion_mnist", rows, probes={job_key(rows[0]): {row["epoch"]: parts for row in rows}})
    assert table(text, "Where the line search shortens")[0] == ["plain", "0", str(EPOCHS), "25.0% / 0.50",
                                                                "12.5% / 0.25"]


def test_job_key_separates_widths():
    wide = run_rows("plain", PLAIN_AA, PLAIN_ESTIMATE, widths=[64, 128, 256])
    plain = run_rows("plain", PLAIN_AA, PLAIN_ESTIMATE)
    assert job_key(wide[0]) != job_key(plain[0]) and hash(job_key(wide[0]))
    runs = [line[0] for line in table(report("fashion_mnist", wide + plain), "## Runs")]
    assert runs == ["plain w64-128-256", "plain"]


def _pixel(figure, ax, x: float, y: float, pixels: np.ndarray, dpi: float) -> np.ndarray:
    """The colours within 2 pixels of data point (x, y) of `ax` in the saved image (rows from the top)."""
    px, py = ax.transData.transform((x, y)) * dpi / figure.dpi
    row, column = int(round(pixels.shape[0] - py)), int(round(px))
    return pixels[row - 2:row + 3, column - 2:column + 3].reshape(-1, 3)


def _near(colours: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 40) -> bool:
    return bool((np.abs(colours - np.array(rgb)).max(1) < tolerance).any())


def test_curves_figure_pixels():
    rows, standard = rows_and_standard()
    figure = curves_figure("fashion_mnist", rows, standard)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    pixels = (image.imread(io.BytesIO(buffer.getvalue()))[..., :3] * 255).round().astype(int)
    axes = np.array(figure.axes).reshape(2, len(KEYS))
    blue, black, red, orange, white = (31, 119, 180), (0, 0, 0), (255, 0, 0), (255, 127, 14), (255, 255, 255)
    fgsm, plain = axes
    # each curve at its value in the plain run's panels
    assert _near(_pixel(figure, plain[0], 1, 0.3, pixels, 80), blue)  # estimate = AutoAttack 0.3: drawn on top
    assert _near(_pixel(figure, plain[0], 1, 0.2, pixels, 80), orange)  # the linear step, 0.1 below
    assert _near(_pixel(figure, plain[1], 3.5, 0.425, pixels, 80), black)  # AutoAttack alone, between epochs
    assert _near(_pixel(figure, plain[1], 3.5, 0.3, pixels, 80), blue)  # the estimate there
    assert _near(_pixel(figure, plain[1], STANDARD_AT, PLAIN_AA[STANDARD_AT] - 0.05, pixels, 80), black)  # square
    assert (_pixel(figure, plain[1], 3.5, 0.65, pixels, 80) == white).all()  # nothing drawn there
    # the alarm: a red line at FGSM epoch 3 above the curves, none in the plain run's panels
    assert all(_near(_pixel(figure, ax, 3, 0.95, pixels, 80), red) for ax in fgsm)
    for ax in plain:
        (x0, y0), (x1, y1) = ax.get_window_extent().get_points() * 80 / figure.dpi
        box = pixels[int(pixels.shape[0] - y1):int(pixels.shape[0] - y0), int(x0):int(x1)].reshape(-1, 3)
        assert not _near(box, red, tolerance=30)


def test_curves_figure_run_under_way():
    """A run of one epoch so far is drawn (a line of one point draws nothing) on the job's planned epoch axis."""
    rows, standard = rows_and_standard()
    rows += run_rows("trades", PLAIN_AA, PLAIN_ESTIMATE)[:1]
    figure = curves_figure("fashion_mnist", rows, standard)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    pixels = (image.imread(io.BytesIO(buffer.getvalue()))[..., :3] * 255).round().astype(int)
    trades = np.array(figure.axes).reshape(3, len(KEYS))[2]
    for ax in trades:
        assert ax.get_xlim() == (-0.5, EPOCHS - 0.5)
        assert _near(_pixel(figure, ax, 0, PLAIN_ESTIMATE[0], pixels, 80), (31, 119, 180))  # the estimate's dot
        assert _near(_pixel(figure, ax, 0, CLEAN, pixels, 80), (178, 178, 178), tolerance=10)  # clean, grey 0.7
        assert (_pixel(figure, ax, 2.5, 0.35, pixels, 80) == 255).all()  # no data after epoch 0 (off the grid)


def test_plan_counts_what_the_sweep_has_left():
    """`bench/tracking.py --plan` on rows with known rates: an ended job with its selected epoch attacked by the
    standard AutoAttack has nothing left; a job at 1 of 2 epochs has one epoch (7200 s) and the median count of
    standard AutoAttack epochs (1, at 3600 s) left, 3 core-hours; a data set with no rows has no rate."""
    from bench.tracking import plan

    def job(data: str, regime: str, seed: int) -> dict:
        return {"data": data, "regime": regime, "seed": seed, "epochs": 2, "train": 100, "probes": 64,
                "aa_probes": 32, "train_eps": 0.1, "recorded": "parts"}

    keys = ("l2/0.5", "l2/1", "linf/0.05", "linf/0.1")
    ended, under_way, unmeasured = job("fashion_mnist", "fgsm", 0), job("fashion_mnist", "plain", 1), \
        job("cifar10", "plain", 0)
    rows = [{**ended, "epoch": epoch, "estimate_s": 1.0, "fisher_s": 1.0, "pgd20_s": 8.0, "apgd_s": 90.0,
             "train_s": 20.0, "lambda_max_median": 2.0 - epoch, "grad_norm_median": 2.0 - epoch,
             **{f"{signal}/{key}": 0.1 * (1 + epoch) for key in keys
                for signal in ("estimate_aa_probes", "linear_aa_probes", "apgd")}} for epoch in (0, 1)]
    rows.append({**under_way, "epoch": 0, "estimate_s": 100.0, "pgd20_s": 100.0, "apgd_s": 7000.0})
    standard = [{**ended, "epoch": 1, "aa_s": 3600.0}]
    text = plan([ended, under_way, unmeasured], rows, standard)
    lines = [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()[2:5]]
    assert lines[0] == ["fashion_mnist fgsm seed 0", "2 / 2", "100", "20", "0", "0.0"]
    assert lines[1] == ["fashion_mnist plain seed 1", "1 / 2", "7200", "-", "1", "3.0"]
    assert lines[2] == ["cifar10 plain seed 0", "0 / 2", "nan (other regimes)", "-", "1", "nan"]
    assert text.splitlines()[-1].startswith("Left: 3 core-hours at the measured rates (the standard AutoAttack at "
                                            "3600 s an epoch, 1 selected epochs per job)")
    assert text.endswith("1 jobs without any measured rate.")
