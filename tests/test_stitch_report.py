"""analysis/stitch_report.py on a fabricated sqlite MLflow store whose answers are known in closed
form: power-law checkpoint evaluations (held-out FVU = A * FLOPs^-beta; the training-batch EV is
a decoy the report must not read), stitch FLOPs added to the stitched init, known final metrics,
probes and a feature-class parquet; and its pieces (crossings between checkpoints, the per-model
L(C) fit, the paper columns) on fabricated tables. No training code, no Ray."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils

ROOT = Path(__file__).resolve().parents[1]

PER_TOKEN = 1000.0  # SAE training FLOPs per token, as run
DENSE_PER_TOKEN = 4000.0  # ... and as a dense TopK counts them
TOKENS = [10 * 2**i for i in range(11)]  # 10 .. 10240: the checkpoints of every training curve
TRAIN_EV = 0.99  # the training-batch EV logged beside them: reached at once, were it read
SCRATCH = (2.0, 0.2)  # FVU = A * C^-beta from scratch
STITCHED = (1.2, 0.18)  # ... and from the stitched init, C including the stitch's FLOPs
STITCH_FLOPS = {"A1-B2": 8000.0, "A2-B3": 5000.0}
LAYERS = {"A1-B2": (1, 2), "A2-B3": (2, 3)}
BUDGETS = {"A1-B2": (2560,), "A2-B3": (2560, 10240)}
WIDTH = 64
CE = {"ce/a": 3.6, "ce/b": 3.14, "ce/a_to_b": 3.99, "ce/b_to_a": 4.21, "ce/a_round_trip": 3.7,
      "ce/b_round_trip": 3.3}
QUALITY = {"structural": [0.9, 0.8, 0.7, 0.6, 0.5], "semantic": [0.1, 0.2, 0.6],
           "inactive": [math.nan, math.nan]}


def ev_of(flops: float, law: tuple[float, float]) -> float:
    a, beta = law
    return 1 - a * flops**-beta


def log(client: MlflowClient, run_id: str, values: dict[str, float], step: int) -> None:
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, step) for k, v in values.items()])


def new_run(client: MlflowClient, exp_id: str, name: str, role: str, **tags: object) -> str:
    all_tags = {"raysae.sweep_kind": "stitch", "raysae.role": role,
                **{f"raysae.{k}": str(v) for k, v in tags.items()}}
    run_id = client.create_run(exp_id, run_name=name).info.run_id
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
    return run_id


def sae_run(client, exp_id, name, role, law, offset, budget, ev_final=None, **tags) -> str:
    """An SAE training: held-out EV on the power law at every checkpoint up to its budget (the
    final one `ev_final` if given), a decoy training-batch EV, FLOPs at the end."""
    run_id = new_run(client, exp_id, name, role, width=WIDTH, budget=budget, **tags)
    for t in (t for t in TOKENS if t < budget):
        log(client, run_id, {"train/explained_variance": TRAIN_EV, "eval/ces": 0.5,
                             "eval/explained_variance": ev_of(PER_TOKEN * t + offset, law)}, t)
    final = ev_final if ev_final is not None else ev_of(PER_TOKEN * budget + offset, law)
    log(client, run_id, {"eval/explained_variance": final, "eval/ces": final - 0.05,
                         "eval/l0": 64.0, "flops": PER_TOKEN * budget,
                         "flops_dense_equiv": DENSE_PER_TOKEN * budget, "tokens_seen": budget}, budget)
    client.set_terminated(run_id)
    return run_id


def fabricate(client: MlflowClient, exp_id: str, tmp: Path) -> None:
    parent = new_run(client, exp_id, "stitch sweep", "stitch_sweep")
    client.log_batch(parent, params=[Param("stitch.ev_thresholds", "(0.7, 0.8, 0.9)"),
                                     Param("model.name", "toy://default/small"),
                                     Param("stitch.large.name", "toy://default/large")])
    client.log_dict(parent, {"method": "svcca", "layers_a": [1, 2], "layers_b": [2, 3, 4],
                             "matrix": [[0.9, 0.7, 0.5], [0.6, 0.95, 0.8]],
                             "best": {"1": 2, "2": 3}}, "layer_match.json")
    client.set_terminated(parent)
    for i, (pair, (la, lb)) in enumerate(LAYERS.items()):
        tags = dict(pair=pair, layer_a=la, layer_b=lb)
        s = new_run(client, exp_id, f"A{la}→B{lb} stitch", "stitch", **tags)
        log(client, s, {k: 99.0 for k in CE}, 2048)  # an earlier evaluation, not the final one
        log(client, s, {k: v + i for k, v in CE.items()}, 4096)
        log(client, s, {f"lstsq/{k}": v + i + 0.5 for k, v in CE.items()}, 4096)
        log(client, s, {"map/up_ev": 0.8, "map/down_ev": 0.7, "map/round_trip_a_ev": 0.9,
                        "map/round_trip_b_ev": 0.6, "flops": STITCH_FLOPS[pair]}, 4096)
        client.set_terminated(s)
        sae_run(client, exp_id, f"A{la} scratch", "scratch_a", SCRATCH, 0.0, 10240,
                ev_final=0.8 + 0.01 * la, layer_a=la, layer_b="")
        z = new_run(client, exp_id, f"A{la}→B{lb} zeroshot", "zeroshot", width=WIDTH, **tags)
        log(client, z, {"eval/explained_variance": 0.48 - 0.01 * i, "eval/ces": 0.3,
                        "eval/l0": 70.0, "eval/kl_score": 0.2}, 0)
        client.set_terminated(z)
        for budget in BUDGETS[pair]:
            sae_run(client, exp_id, f"B{lb} scratch {budget}", "scratch_b", SCRATCH, 0.0, budget,
                    layer_a="", layer_b=lb)
            t = sae_run(client, exp_id, f"A{la}→B{lb} transfer {budget}", "transfer", STITCHED,
                        STITCH_FLOPS[pair], budget, **tags)
            if pair == "A2-B3":  # A1-B2 leaves it out: the report falls back on the stitch's flops
                log(client, t, {"stitch_flops": STITCH_FLOPS[pair]}, 0)
    probes = new_run(client, exp_id, "A2→B3 probes", "probes", pair="A2-B3", layer_a=2, layer_b=3)
    log(client, probes, {"probe/topic/a_on_a": 0.9, "probe/topic/a_on_b": 0.7,
                         "probe/topic/b_on_b": 0.95, "probe/topic/random": 0.25,
                         "probe/topic/majority": 0.3, "probe/depth/a_on_a": 0.6,
                         "sparse_probe/topic/w64/k1/a_on_b": 0.4,
                         "sparse_probe/topic/w64/k5/a_on_b": 0.6,
                         "sparse_probe/topic/w64/k5/b_on_b": 0.65,
                         "steering/b_own/success": 0.8, "steering/a_mapped/success": 0.6,
                         "steering/random/success": 0.1, "steering/unsteered/success": 0.05,
                         "steering/a_mapped/strength": 4.0, "steering/cosine_a_mapped_b_own": 0.55},
        0)
    classes = [c for c, q in QUALITY.items() for _ in q]
    quality = [v for q in QUALITY.values() for v in q]
    path = tmp / f"{exp_id}" / "w64.parquet"
    path.parent.mkdir(parents=True)
    pl.DataFrame({"feature": range(len(classes)), "quality": quality, "consistency": quality,
                  "class": classes, "frequency_a": 0.01, "frequency_b": 0.02}).write_parquet(path)
    client.log_artifact(probes, str(path), "features")
    client.set_terminated(probes)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/mlflow.db with experiments stitch-full, stitch-logged (the same runs) and
    stitch-bare (one stitch run and nothing else)."""
    runs = tmp_path_factory.mktemp("stitch") / "runs"
    runs.mkdir()
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    for name in ("stitch-full", "stitch-logged", "stitch-bare"):
        exp_id = client.create_experiment(name, (runs / "mlartifacts").resolve().as_uri())
        if name == "stitch-bare":
            s = new_run(client, exp_id, "A1→B2 stitch", "stitch", pair="A1-B2", layer_a=1, layer_b=2)
            log(client, s, CE, 4096)
        else:
            fabricate(client, exp_id, runs.parent)
    return runs


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch):
    """The script's main(); MLflow's global URI (which it also exports as MLFLOW_TRACKING_URI,
    see conftest.driver_env) is restored afterwards."""
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # main sets it otherwise
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # records the original value for teardown
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.syspath_prepend(str(ROOT / "analysis"))
    import stitch_report

    return stitch_report.main


def crossing(law, offset: float, budget: int, threshold: float
             ) -> tuple[int, int, float, float] | None:
    """First checkpoint whose analytic curve is at or above the threshold: (tokens, tokens of
    the checkpoint before it, FLOPs as run, FLOPs dense)."""
    a, beta = law
    needed = (a / (1 - threshold)) ** (1 / beta)
    for i, t in enumerate(TOKENS):
        flops = PER_TOKEN * t + offset
        if t <= budget and flops >= needed:
            assert abs(flops / needed - 1) > 1e-6  # no point on the edge of a threshold
            return t, TOKENS[i - 1] if i else 0, flops, DENSE_PER_TOKEN * t + offset
    return None


def test_tables_match_the_closed_forms(store, report, capsys):
    assert report(["stitch-full", "--runs-dir", str(store), "--no-log"]) == 0
    d = store / "analysis" / "stitch-full"
    printed = capsys.readouterr().out
    assert "stitch CE in nats (Table 1)" in printed and f"written to {d}" in printed

    ce = pl.read_csv(d / "stitch_ce.csv")
    assert ce["pair"].to_list() == ["A1-B2", "A2-B3"]
    assert ce["paper A→B"].null_count() == 2  # the toy pair is not the paper's
    assert ce["layer A"].to_list() == [1, 2] and ce["layer B"].to_list() == [2, 3]
    for i, row in enumerate(ce.iter_rows(named=True)):
        assert [row[c] for c in ("CE A", "CE B", "A→B", "B→A", "A round trip", "B round trip")] \
            == [v + i for v in CE.values()]
        assert (row["lstsq A→B"], row["lstsq B→A"]) == (CE["ce/a_to_b"] + i + 0.5, CE["ce/b_to_a"] + i + 0.5)
        assert (row["up EV"], row["down EV"], row["stitch FLOPs"]) == (0.8, 0.7, list(STITCH_FLOPS.values())[i])

    sae = pl.read_csv(d / "sae_transfer.csv")
    assert sae["pair"].to_list() == ["A1-B2", "A2-B3"] and sae["width"].to_list() == [WIDTH] * 2
    assert sae["A EV"].to_list() == pytest.approx([0.81, 0.82])  # final checkpoint, not the earlier
    assert sae["A FVU"].to_list() == pytest.approx([0.19, 0.18])
    assert sae["zero-shot EV"].to_list() == pytest.approx([0.48, 0.47])
    assert sae["zero-shot FVU"].to_list() == pytest.approx([0.52, 0.53])
    assert sae["zero-shot L0"].to_list() == [70.0, 70.0]
    assert sae["B budget"].to_list() == [2560, 10240]  # the largest budget of each pair
    for row in sae.iter_rows(named=True):
        assert row["B scratch EV"] == pytest.approx(ev_of(PER_TOKEN * row["B budget"], SCRATCH))
        stitched = ev_of(PER_TOKEN * row["B budget"] + STITCH_FLOPS[row["pair"]], STITCHED)
        assert row["B stitch-init EV"] == pytest.approx(stitched)

    table = pl.read_csv(d / "flops_to_threshold.csv")
    assert table.height == 3 * 3  # (A1-B2, 2560), (A2-B3, 2560), (A2-B3, 10240) x 3 thresholds
    cols = ("tokens", "last below", "FLOPs", "FLOPs dense")
    for row in table.iter_rows(named=True):
        offset = STITCH_FLOPS[row["pair"]]
        scratch = crossing(SCRATCH, 0.0, row["budget"], row["threshold"])
        stitch = crossing(STITCHED, offset, row["budget"], row["threshold"])
        assert stitch is not None  # the stitched init reaches every threshold in these budgets
        assert tuple(row[f"stitch {c}"] for c in cols) == stitch
        assert row["of which stitch FLOPs"] == offset
        assert row["paper saving %"] is None  # the toy pair is none of the paper's
        if scratch is None:
            assert row["scratch FLOPs"] is None and row["saving %"] is None
            assert row["saving % dense"] is None
            assert row["scratch last below"] == row["budget"]  # below it at the last checkpoint
        else:
            assert tuple(row[f"scratch {c}"] for c in cols) == scratch
            assert row["saving %"] == pytest.approx(100 * (1 - stitch[2] / scratch[2]))
            assert row["saving % dense"] == pytest.approx(100 * (1 - stitch[3] / scratch[3]))
    top = table.filter((pl.col("pair") == "A2-B3") & (pl.col("budget") == 10240)
                       & (pl.col("threshold") == 0.9)).row(0, named=True)
    # scratch first reaches 0.9 at 5120 tokens (needs 3200), the stitch at 1280 (needs 985)
    assert (top["scratch FLOPs"], top["stitch FLOPs"]) == (5_120_000.0, 1_285_000.0)
    assert (top["scratch last below"], top["stitch last below"]) == (2560, 640)
    assert (top["scratch FLOPs dense"], top["stitch FLOPs dense"]) == (20_480_000.0, 5_125_000.0)
    assert top["saving %"] == pytest.approx(100 * (1 - 1_285_000 / 5_120_000))
    assert table.filter(pl.col("budget") == 2560, pl.col("threshold") == 0.9)["scratch FLOPs"].null_count() == 2
    md = (d / "flops_to_threshold.md").read_text()
    assert md.startswith("EV: held-out") and "FLOPs dense: as a dense TopK" in md

    fit = pl.read_csv(d / "scaling_fit.csv")
    assert fit.height == 3 * 2 * 2  # curves x inits x FLOPs accountings
    for row in fit.iter_rows(named=True):
        a, beta = SCRATCH if row["init"] == "scratch" else STITCHED
        assert row["points"] == sum(t > 0.1 * row["budget"] for t in TOKENS if t <= row["budget"])
        if row["FLOPs"] == "as run":  # the laws are exact in FLOPs as run
            assert row["A"] == pytest.approx(a, abs=1e-3) and row["beta"] == pytest.approx(beta, abs=1e-3)
            assert row["r2"] == pytest.approx(1.0, abs=1e-9)
        elif row["init"] == "scratch":  # 4x the FLOPs: the same slope, A * 4^beta
            assert row["A"] == pytest.approx(a * 4**beta, rel=1e-6)
            assert row["beta"] == pytest.approx(beta, abs=1e-6)
    model = pl.read_csv(d / "scaling_fit_model.csv")
    assert model.height == 2 * 2 * 2  # pairs x inits x FLOPs accountings, one width each here
    assert model["paper A"].null_count() == model.height  # the toy pair is not the paper's

    paper = pl.read_csv(d / "paper.csv")
    assert set(paper["same setting"]) == {"no"}
    a_to_b = paper.filter(pl.col("quantity") == "ce/a_to_b")
    assert a_to_b["raysae"].to_list() == [CE["ce/a_to_b"], CE["ce/a_to_b"] + 1]
    assert a_to_b["paper"].to_list() == ["3.99"] * 2
    saving = paper.filter(pl.col("quantity").str.starts_with("saving"))
    assert saving["budget"].to_list() == [2560, 10240] and saving["paper"].to_list() == ["30-50"] * 2
    assert saving["raysae"][1] == pytest.approx(100 * (1 - 5_125_000 / 20_480_000))

    probes = pl.read_csv(d / "probes.csv")
    assert probes.columns == ["pair", "label", "a_on_a", "a_on_b", "b_on_b", "random", "majority"]
    topic = probes.filter(pl.col("label") == "topic").row(0, named=True)
    assert (topic["a_on_b"], topic["majority"]) == (0.7, 0.3)
    sparse = pl.read_csv(d / "sparse_probes.csv")
    assert sparse.select("label", "width", "k").rows() == [("topic", 64, 1), ("topic", 64, 5)]
    assert sparse["a_on_b"].to_list() == [0.4, 0.6] and sparse["b_on_b"].to_list() == [None, 0.65]
    steering = pl.read_csv(d / "steering.csv")
    assert steering["vector"].to_list() == ["b_own", "a_mapped", "random", "unsteered"]
    assert steering["success"].to_list() == [0.8, 0.6, 0.1, 0.05]
    assert steering["cosine to b_own"].to_list() == [None, 0.55, None, None]

    classes = pl.read_csv(d / "feature_classes.csv")
    assert classes["class"].to_list() == ["structural", "semantic", "inactive"]
    assert classes["count"].to_list() == [5, 3, 2]
    assert classes["mean quality"].to_list()[:2] == pytest.approx([0.7, 0.3])
    assert classes["median quality"].to_list()[:2] == pytest.approx([0.7, 0.2])

    match = pl.read_csv(d / "layer_match.csv")
    assert match["best B layer"].to_list() == [2, 3] and match["B3"].to_list() == [0.7, 0.95]
    for png in ("curves.png", "feature_classes.png", "layer_match.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stitch-full")
    assert not client.search_runs([exp.experiment_id], "tags.`raysae.role` = 'stitch_summary'")


def test_outputs_are_logged_to_one_summary_run(store, report, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    for _ in range(2):  # a second report reuses the summary run
        assert report(["stitch-logged", "--runs-dir", str(tmp_path / "elsewhere"),
                       "--out", str(tmp_path / "out")]) == 0
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stitch-logged")
    found = client.search_runs([exp.experiment_id], "tags.`raysae.role` = 'stitch_summary'")
    assert len(found) == 1 and found[0].info.run_name == "stitch-logged stitch summary"
    names = {a.path for a in client.list_artifacts(found[0].info.run_id, "analysis")}
    expected = {"stitch_ce", "sae_transfer", "flops_to_threshold", "scaling_fit",
                "scaling_fit_model", "paper", "probes", "sparse_probes", "steering",
                "feature_classes", "layer_match"}
    assert {f"analysis/{n}.{ext}" for n in expected for ext in ("csv", "md")} <= names
    assert {"analysis/curves.png", "analysis/feature_classes.png", "analysis/layer_match.png"} <= names
    assert {p.name for p in (tmp_path / "out" / "stitch-logged").iterdir()} == {
        Path(n).name for n in names}
    assert not (tmp_path / "elsewhere").exists()  # the env's URI won, nothing written there


def test_missing_pieces_are_skipped_with_a_note(store, report, capsys, tmp_path):
    assert report(["stitch-bare", "--runs-dir", str(store), "--out", str(tmp_path), "--no-log"]) == 0
    printed = capsys.readouterr().out
    for piece in ("sae_transfer", "flops_to_threshold", "probes", "feature_classes", "layer_match"):
        assert f"skipping {piece}" in printed
    assert "thresholds (0.7, 0.8, 0.9)" in printed  # no parent run: the default thresholds
    assert sorted(p.name for p in (tmp_path / "stitch-bare").iterdir()) == [
        "paper.csv", "paper.md", "stitch_ce.csv", "stitch_ce.md"]  # the CEs beside the paper's
    ce = pl.read_csv(tmp_path / "stitch-bare" / "stitch_ce.csv")
    assert ce["A→B"].to_list() == [CE["ce/a_to_b"]] and ce["lstsq A→B"].to_list() == [None]


@pytest.fixture
def sr(monkeypatch: pytest.MonkeyPatch):
    """The stitch_report module, for its pieces."""
    monkeypatch.syspath_prepend(str(ROOT / "analysis"))
    import stitch_report

    return stitch_report


PYTHIA = {"model_a": "EleutherAI/pythia-70m-deduped", "layer_a": 3,
          "model_b": "EleutherAI/pythia-160m-deduped", "layer_b": 4}


def curve(pair: str, width: int, budget: int, init: str, points: list[tuple[int, float]],
          rate: float = 1.0, dense: float = 4.0, offset: float = 0.0) -> pl.DataFrame:
    """A fabricated checkpoint history in `ev_curves`' form."""
    return pl.DataFrame(
        [(pair, width, budget, init, t, t * rate + offset, t * dense + offset, offset, ev)
         for t, ev in points],
        schema={"pair": pl.String, "width": pl.Int64, "budget": pl.Int64, "init": pl.String,
                "tokens": pl.Int64, "flops": pl.Float64, "flops_dense": pl.Float64,
                "stitch_flops": pl.Float64, "ev": pl.Float64}, orient="row")


def test_a_threshold_is_crossed_between_checkpoints_and_reported_at_the_next(sr):
    scratch = curve("A3-B4", 64, 400, "scratch", [(100, 0.5), (200, 0.75), (300, 0.85), (400, 0.95)])
    stitch = curve("A3-B4", 64, 400, "stitch", [(0, 0.72), (100, 0.8), (200, 0.91), (300, 0.92),
                                                (400, 0.97)], offset=50.0)
    t = sr.flops_to_threshold(pl.concat([scratch, stitch]), (0.7, 0.9, 0.96), {"A3-B4": PYTHIA})
    rows = {r["threshold"]: r for r in t.iter_rows(named=True)}
    # scratch: 0.7 between 100 and 200 -> the checkpoint at 200; 0.9 between 300 and 400
    assert [(rows[x]["scratch last below"], rows[x]["scratch tokens"]) for x in (0.7, 0.9)] == [
        (100, 200), (300, 400)]
    assert (rows[0.9]["scratch FLOPs"], rows[0.9]["scratch FLOPs dense"]) == (400.0, 1600.0)
    # never reached: no FLOPs, and the last checkpoint it was below at
    assert rows[0.96]["scratch tokens"] is None and rows[0.96]["scratch last below"] == 400
    # the stitched init's zero-shot point already reaches 0.7: its FLOPs are the stitch's alone
    assert (rows[0.7]["stitch tokens"], rows[0.7]["stitch last below"], rows[0.7]["stitch FLOPs"]) \
        == (0, None, 50.0)
    assert (rows[0.9]["stitch last below"], rows[0.9]["stitch tokens"]) == (100, 200)
    assert rows[0.9]["saving %"] == pytest.approx(100 * (1 - 250 / 400))
    assert rows[0.9]["saving % dense"] == pytest.approx(100 * (1 - 850 / 1600))
    assert rows[0.96]["stitch tokens"] == 400 and rows[0.96]["saving %"] is None
    assert [rows[x]["paper saving %"] for x in (0.7, 0.9, 0.96)] == [None, "30-50", None]


def test_one_fit_per_model_and_init_recovers_the_law_over_all_widths(sr):
    """Points of A * C^-beta spread over three widths (each its own stretch of C) give back A
    and beta; a shorter budget of a width (another law here) is left out, its first 10% too."""
    def law(a: float, beta: float, width: int, scale: float, budget: int = 1000,
            init: str = "scratch") -> pl.DataFrame:
        points = [(t, 1 - a * (t * scale) ** -beta) for t in range(50, budget + 1, 50)]
        return curve("A3-B4", width, budget, init, points, rate=scale, dense=scale)

    curves = pl.concat([
        *(law(41.2, 0.16, w, 1e9 * w / 64) for w in (64, 128, 256)),
        law(41.2, 0.16, 64, 1e9, budget=1000).head(1).with_columns(pl.lit(-0.5).alias("ev")),
        law(3.0, 0.5, 128, 1e9 * 2, budget=500),  # shorter budget, another law: ignored
        *(law(18.5, 0.14, w, 1e9 * w / 64, init="stitch") for w in (64, 128)),
    ])
    fit = sr.scaling_fit_model(curves, {"A3-B4": PYTHIA})
    assert fit.height == 2 * 2  # inits x FLOPs accountings
    for row in fit.iter_rows(named=True):
        a, beta = (41.2, 0.16) if row["init"] == "scratch" else (18.5, 0.14)
        assert row["A"] == pytest.approx(a, rel=1e-6) and row["beta"] == pytest.approx(beta, rel=1e-6)
        assert row["r2"] == pytest.approx(1.0)
        assert row["widths"] == ("64,128,256" if row["init"] == "scratch" else "64,128")
        assert row["points"] == (3 if row["init"] == "scratch" else 2) * 18  # tokens > 100 of 1000
        assert row["model B"] == PYTHIA["model_b"]
        paper = (row["paper A"], row["paper beta"])
        assert paper == ((a, beta) if row["FLOPs"] == "dense" else (None, None))
    # the per-curve fits of the same points: one law each
    per_curve = sr.scaling_fit(curves.filter(pl.col("budget") == 1000, pl.col("init") == "scratch"))
    assert per_curve["beta"].to_list() == pytest.approx([0.16] * 6, rel=1e-6)


def test_paper_columns_fill_where_the_setting_is_the_papers(sr):
    runs = pl.DataFrame({"role": ["stitch", "stitch"], "pair": ["A3-B4", "A2-B4"],
                         "layer_a": [3, 2], "layer_b": [4, 4], "metrics.ce/a": [3.7, 3.7]})
    settings = {"A3-B4": PYTHIA, "A2-B4": {**PYTHIA, "layer_a": 2}}
    ce = sr.stitch_ce(runs, settings)
    assert ce["paper CE A"].to_list() == [None, 3.60] and ce["paper B→A"].to_list() == [None, 4.21]
    assert ce["CE A"].to_list() == [3.7, 3.7] and ce["lstsq A→B"].null_count() == 2
    table = sr.paper_table(settings, {"stitch_ce": ce})
    mine = table.filter(pl.col("quantity") == "ce/a")
    assert mine["same setting"].to_list() == ["no", "yes"] and mine["paper"].to_list() == ["3.6"] * 2
    assert mine["paper setting"][0] == "pythia-70m-deduped L3 → pythia-160m-deduped L4"


def test_every_reference_number_names_its_source_and_setting():
    from raysae.reference import load, lookup, settings_of

    ref = load("stitching")
    assert "2506.06609" in ref["paper"]
    for number in ref["numbers"]:
        assert number["source"] and number["what"]
        assert all(s and isinstance(s, dict) for s in settings_of(number)), number["name"]
    assert lookup(ref, "scaling_fit/scratch", PYTHIA)["A"] == 41.2
    assert lookup(ref, "scaling_fit/stitch", {**PYTHIA, "layer_b": 5}) is None
    gpt2 = {"model_a": "openai-community/gpt2", "layer_a": 6,
            "model_b": "openai-community/gpt2-medium", "layer_b": 10}
    assert lookup(ref, "flops_saving_pct", gpt2)["low"] == 30  # any of the paper's three pairs
    assert lookup(ref, "flops_saving_pct", {**gpt2, "layer_b": 9}) is None
    with pytest.raises(FileNotFoundError, match="stitching"):
        load("no-such-paper")
