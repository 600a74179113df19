"""Aggregation arithmetic, best-setting selection, figures and verdicts, on synthetic run folders."""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest

from irnn.config import ConfigError
from irnn.experiments import collect, create, parse_spec, steps_to_threshold, write_report
from irnn.results.aggregate import Member, SettingStats, best_settings, mean_std, settings, settings_table
from irnn.experiments.report import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, verdicts
from irnn.experiments.reproduce import STANDARD_STEPS, make_figures, study_spec
from irnn.experiments.sweep import expand as expand_spec

BASELINE = 1 / 6
EVERY = 250


def curve(solve_at: int | None, steps: int, end: float = 0.002, plateau: float = 0.17) -> list[tuple[int, float]]:
    """Test MSE every EVERY steps: the plateau, then ``end`` from ``solve_at`` on."""
    return [(s, plateau if solve_at is None or s < solve_at else end) for s in range(EVERY, steps + 1, EVERY)]


def write_run(path: Path, cfg: dict, evals: list[tuple[int, float]], *, status: str = "completed",
              wall: float = 10.0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"config": cfg}))
    lines = []
    for step, v in evals:
        lines.append({"step": step, "kind": "train", "train_loss": v * 0.9, "time_s": step / 100})
        lines.append({"step": step, "kind": "eval", "test_mse": v, "test_loss": v})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    solved = steps_to_threshold(evals, 0.01)
    summary = {"status": status, "name": path.name, "label": f"{cfg['model']}-{cfg['seq_len']}", "model": cfg["model"],
               "seq_len": cfg["seq_len"], "seed": cfg["seed"], "steps": evals[-1][0] if evals else 0,
               "total_steps": cfg["steps"], "primary_metric": "test_mse", "best_test_mse": min(v for _, v in evals),
               "final_test_mse": evals[-1][1], "baseline_test_mse": BASELINE, "baseline_mse": BASELINE,
               "baseline_loss": BASELINE, "solved_step": solved, "solved_threshold": 0.01, "wall_time_s": wall}
    (path / "summary.json").write_text(json.dumps(summary))


def fake_sweep(root: Path, runs: dict[str, tuple], *, grid: dict, base: dict | None = None, meta: dict | None = None,
               name: str = "fake") -> Path:
    """A real sweep folder (sweep.json from the real expansion) whose members' run folders are written by hand.

    ``runs`` maps a member name to ``(evals, status)``; members left out stay pending.
    """
    base = {"steps": 3000, "eval_every": EVERY, "optimizer": "adam", "batch_size": 32, "train_size": 32_000, **(base or {})}
    sw = create(parse_spec({"name": name, "base": base, "grid": grid}), root, meta=meta)
    index = {}
    for n in sw.names:
        if n in runs:
            evals, status = runs[n]
            write_run(sw.member_dir(n), sw.configs[n], evals, status=status)
            index[n] = {"state": status}
    sw.update_index(index)
    return sw.path


def member(model: str, T: int, seed: int, evals, *, state: str = "completed", steps: int = 3000, **cfg) -> Member:
    config = {"model": model, "seq_len": T, "seed": seed, "steps": steps, "optimizer": "adam", "lr": 1e-3,
              "clip_norm": 1.0, "batch_size": 32, "task": "adding", "train_size": 32_000, **cfg}
    summary = {"primary_metric": "test_mse", "baseline_test_mse": BASELINE, "total_steps": steps, "seq_len": T,
               "final_test_mse": evals[-1][1] if evals else None, "status": state}
    return Member(name=f"{model}-{T}__s{seed}", path=Path("/nonexistent"), config=config, state=state,
                  summary=summary, evals=list(evals))


def cells(spec: dict[tuple[str, int], list], **cfg) -> list[SettingStats]:
    """``{(model, T): [solve_at or None per seed]}`` -> one chosen setting per cell."""
    ms = [member(m, T, i, curve(at, cfg.get("steps", 3000)), **cfg) for (m, T), ats in spec.items()
          for i, at in enumerate(ats)]
    return best_settings(settings(ms))


# -- arithmetic -----------------------------------------------------------------------------------------
def test_steps_to_threshold_and_mean_std():
    assert steps_to_threshold([(100, 0.2), (200, 0.009), (300, 0.001)], 0.01) == 200
    assert steps_to_threshold([(100, 0.2), (200, 0.01)], 0.01) is None  # strictly below
    assert steps_to_threshold([(100, float("nan")), (200, 0.005)], 0.01) == 200
    assert steps_to_threshold([(100, 0.5), (200, 0.99)], 0.98, higher_is_better=True) == 200
    m, s = mean_std([1000, 1500, 2000])
    assert m == 1500 and s == pytest.approx(500)  # sample std (ddof=1)
    assert mean_std([7.0]) == (7.0, 0.0) and mean_std([]) == (None, None)
    assert mean_std([1.0, None, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_aggregation_of_fake_runs(tmp_path):
    g = {"model": ["irnn", "rnn-tanh"], "seq_len": [150], "seed": [0, 1, 2]}
    runs = {
        "irnn-150__adam__lr0.001__s0": (curve(1000, 3000, end=0.004), "completed"),
        "irnn-150__adam__lr0.001__s1": (curve(1500, 3000, end=0.002), "completed"),
        "irnn-150__adam__lr0.001__s2": (curve(2000, 3000, end=0.003), "completed"),
        "rnn-tanh-150__adam__lr0.001__s0": (curve(None, 3000), "completed"),
        "rnn-tanh-150__adam__lr0.001__s1": (curve(None, 3000, plateau=0.18), "completed"),
        "rnn-tanh-150__adam__lr0.001__s2": (curve(1500, 3000, end=0.005)[:5], "diverged"),
    }
    path = fake_sweep(tmp_path, runs, grid=g)
    table = settings_table(collect(path))
    irnn, tanh = table.stats
    assert (irnn.model, tanh.model) == ("irnn", "rnn-tanh")
    assert irnn.solved_steps == [1000, 1500, 2000] and irnn.steps == (1500, pytest.approx(500))
    assert irnn.final[0] == pytest.approx(0.003) and irnn.final[1] == pytest.approx(0.001)
    assert irnn.steps_text() == "1,500 ± 500 (3/3 seeds)"
    assert tanh.n_solved == 0 and tanh.steps_text() == "not solved within 3,000 steps (0 of 3 seeds)"
    assert tanh.states == {"completed": 2, "diverged": 1}
    assert tanh.final[0] == pytest.approx((0.17 + 0.18 + 0.17) / 3)  # the diverged seed's last value counts
    md = table.markdown()
    assert "| 150 | IRNN | adam, lr 0.001, clip 1, batch 32, init 1 | 3 | 1,500 ± 500 (3/3 seeds) | 0.003 ± 0.001 |" in md
    assert "3 (1 diverged)" in md
    rows = list(csv.DictReader(io.StringIO(table.csv())))
    assert rows[0]["steps_to_threshold_mean"] == "1500.0" and float(rows[0]["steps_to_threshold_std"]) == pytest.approx(500)
    assert rows[1]["steps_to_threshold_mean"] == "" and rows[1]["solved"] == "0" and rows[1]["diverged"] == "1"
    # one seed of three solved
    part = settings([member("irnn", 150, i, curve(at, 3000)) for i, at in enumerate([None, 2500, None])])[0]
    assert part.steps_text() == "2,500 (1 of 3 seeds solved within 3,000)"


def test_guard_rollbacks_are_counted_per_setting():
    ms = [member("irnn", 150, i, curve(1000, 3000)) for i in range(3)]
    ms[0].summary["guard_interventions"] = 2
    ms[1].summary["divergences"] = 1  # a summary written before the per-incident guard
    ms[2].summary.update(guard_interventions=0, spikes_absorbed=4)
    table = settings_table(ms)
    [stats] = table.stats
    assert [m.guard_rollbacks for m in ms] == [2, 1, 0] and stats.guard_text() == "3 (2 of 3 seeds)"
    head, _, row = table.markdown().splitlines()
    assert head.split(" | ")[-2] == "guard rollbacks" and row.split(" | ")[-2] == "3 (2 of 3 seeds)"
    assert table.rows[0]["guard_rollbacks"] == 3
    assert settings([member("lstm", 150, 0, curve(1000, 3000))])[0].guard_text() == "0"


def test_best_setting_is_lowest_mean_final_and_skips_diverged():
    ms = []
    for i in range(3):
        ms.append(member("irnn", 150, i, curve(1000, 3000, end=0.004), lr=1e-3))
        ms.append(member("irnn", 150, i, curve(2000, 3000, end=0.002), lr=1e-4))
        # lowest final of all, but one seed diverged: not eligible
        ms.append(member("irnn", 150, i, curve(500, 3000, end=0.0001), lr=1e-2, state="diverged" if i == 1 else "completed"))
    chosen = best_settings(settings(ms))
    assert len(chosen) == 1 and chosen[0].hparams["lr"] == 1e-4


# -- figures -------------------------------------------------------------------------------------------
def test_figures_are_valid_images(tmp_path):
    g = {"model": ["irnn", "lstm", "rnn-relu"], "seq_len": [150, 200], "seed": [0, 1]}
    runs = {}
    for T, at in ((150, 1000), (200, 1750)):
        for s in (0, 1):
            runs[f"irnn-{T}__adam__lr0.001__s{s}"] = (curve(at + 250 * s, 3000), "completed")
            runs[f"lstm-{T}__adam__lr0.001__s{s}"] = (curve(at + 500, 3000), "completed")
            runs[f"rnn-relu-{T}__adam__lr0.001__s{s}"] = (curve(None, 3000), "completed")
    path = fake_sweep(tmp_path, runs, grid=g)
    figs = make_figures(collect(path), tmp_path / "figs")
    assert len(figs) == 3
    for png in figs.values():
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
        svg = png.with_suffix(".svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg and len(svg) > 10_000


# -- verdicts ------------------------------------------------------------------------------------------
def _by_key(vs):
    return {v.key: v for v in vs}


ALL = (150, 200, 300, 400)


def _at(vs, key, where):
    found = [v for v in vs if v.key == key and v.where == where]
    assert len(found) == 1, [(v.key, v.where) for v in vs]
    return found[0]


def test_binomial_and_mann_whitney_are_exact():
    from irnn.experiments.report import binomial_tail, mann_whitney_greater, seeds_for_clear

    assert binomial_tail(5, 5) == 1 / 32 and binomial_tail(4, 5) == 6 / 32 and binomial_tail(0, 3) == 1.0
    assert seeds_for_clear() == 5  # 4 of 4 agreeing: p = 1/16 > 0.05; 5 of 5: 1/32
    # 3 against 3 with no overlap: 1 split of C(6, 3) = 20 is as extreme
    assert mann_whitney_greater([1, 2, 3], [4, 5, 6]) == pytest.approx(1 / 20)
    assert mann_whitney_greater([4, 5, 6], [1, 2, 3]) == 1.0
    inf = math.inf
    assert mann_whitney_greater([1, 2, 3, 4, 5], [inf] * 5) == pytest.approx(1 / 252)
    assert mann_whitney_greater([inf, inf], [inf, inf]) == 1.0  # all tied: no evidence
    # many seeds: a seeded sample of the splits, quick, and as clear as the exact test would be
    import time
    t0 = time.perf_counter()
    p = mann_whitney_greater(list(range(20)), [x + 100 for x in range(20)])
    assert p < 1e-3 and p == mann_whitney_greater(list(range(20)), [x + 100 for x in range(20)])
    assert time.perf_counter() - t0 < 60


def test_verdict_models_solve_per_length():
    ok = {("irnn", T): [1000, 1250, None] for T in ALL} | {("lstm", T): [2000, 2500, 2750, 2000, 1000] for T in ALL}
    vs = verdicts(cells(ok))
    for T in ALL:
        irnn, lstm = _at(vs, "irnn_solves", f"T={T}"), _at(vs, "lstm_solves", f"T={T}")
        assert irnn.verdict == REPRODUCED and irnn.strength == "weak" and "2/3 seeds" in irnn.summary
        assert "p = 0.500" in irnn.summary  # P(X >= 2 | 3, 1/2)
        assert lstm.verdict == REPRODUCED and lstm.strength == "clear" and "p = 0.031" in lstm.summary
    # the LSTM fails at 400 in 4 of 5 seeds: not reproduced there, still reproduced elsewhere
    bad = {**ok, ("lstm", 400): [None, None, 2500, None, None]}
    vs = verdicts(cells(bad))
    assert _at(vs, "lstm_solves", "T=400").verdict == NOT_REPRODUCED
    assert "1/5 seeds reached MSE < 0.01 within 3,000 steps" in _at(vs, "lstm_solves", "T=400").summary
    assert _at(vs, "lstm_solves", "T=300").verdict == REPRODUCED
    # an even split decides nothing and says what would
    even = verdicts(cells({("irnn", 150): [1000, None, 1500, None]}))
    assert _at(even, "irnn_solves", "T=150").verdict == INCONCLUSIVE and "more seeds" in _at(even, "irnn_solves", "T=150").summary
    # a length not run: inconclusive there, with the budget that would decide it
    short = {k: x for k, x in ok.items() if k[1] != 300}
    v = _at(verdicts(cells(short)), "irnn_solves", "T=300")
    assert v.verdict == INCONCLUSIVE and "--budget standard" in v.summary
    # unfinished seeds: inconclusive, resume
    ms = [member("irnn", 150, 0, curve(1000, 3000)), member("irnn", 150, 1, curve(None, 1000), state="running")]
    v = _at(verdicts(best_settings(settings(ms))), "irnn_solves", "T=150")
    assert v.verdict == INCONCLUSIVE and "resume" in v.summary


def test_verdict_baselines_stay_near_baseline_per_model_and_length():
    near = {(m, T): [None, None, None] for m in ("rnn-tanh", "rnn-relu") for T in ALL}
    vs = [v for v in verdicts(cells(near)) if v.key == "baselines_fail"]
    assert len(vs) == 8 and all(v.verdict == REPRODUCED and v.strength == "weak" for v in vs)
    learned = {**near, ("rnn-relu", 150): [1000, None, 1500]}
    v150 = [v for v in verdicts(cells(learned)) if v.key == "baselines_fail" and v.where == "T=150"]
    relu = next(v for v in v150 if "ReLU" in v.summary)
    tanh = next(v for v in v150 if "tanh" in v.summary)
    assert relu.verdict == NOT_REPRODUCED and "1/3 seeds stayed near" in relu.summary and tanh.verdict == REPRODUCED
    # clearly below the baseline without reaching 0.01 also counts against the claim
    half = [member("rnn-tanh", 150, i, curve(500, 3000, end=0.05)) for i in range(3)]
    v = [v for v in verdicts(best_settings(settings(half))) if v.key == "baselines_fail" and v.where == "T=150"]
    assert next(x for x in v if "tanh" in x.summary).verdict == NOT_REPRODUCED


@pytest.mark.parametrize("at150, at400, expected, strength", [
    ([1000, 1250, 1500], [4000, 4500, 5000], REPRODUCED, "weak"),  # p = 1/20: 3 against 3 is never clear
    ([1000, 1250, 1500, 1750, 2000], [4000, 4500, 5000, 5250, 5500], REPRODUCED, "clear"),  # p = 1/252
    ([4000, 4500, 5000], [1000, 1250, 1500], NOT_REPRODUCED, "weak"),
    ([1000, 2000, 3000], [1500, 2500, 2750], REPRODUCED, "weak"),  # medians 2000 < 2500, overlapping seeds
    ([1000, 1250, 1500], [None, None, None], REPRODUCED, "weak"),  # T=400 not solved within the budget
    ([None] * 5, [1000, 1250, 1500, 1750, 2000], NOT_REPRODUCED, "clear"),
    ([None, None, None], [None, None, None], INCONCLUSIVE, ""),
    ([1000, 2000, 3000], [3000, 2000, 1000], INCONCLUSIVE, ""),  # equal medians
])
def test_verdict_steps_grow(at150, at400, expected, strength):
    c = cells({("irnn", 150): at150, ("irnn", 400): at400}, steps=6000)
    v = _at(verdicts(c), "steps_grow", "T=150 → T=400")
    assert (v.verdict, v.strength) == (expected, strength), v.summary
    one = [v for v in verdicts(cells({("irnn", 150): at150})) if v.key == "steps_grow"]
    assert len(one) == 1 and one[0].verdict == INCONCLUSIVE


def test_verdict_steps_grow_per_consecutive_pair():
    c = cells({("irnn", 150): [1000] * 3, ("irnn", 200): [2000] * 3, ("irnn", 300): [1500] * 3}, steps=6000)
    vs = {v.where: v.verdict for v in verdicts(c) if v.key == "steps_grow"}
    assert vs == {"T=150 → T=200": REPRODUCED, "T=200 → T=300": NOT_REPRODUCED}


@pytest.mark.parametrize("at150, at200, optimizer, expected", [
    ([3000, 3250, 3500], [2000, 2250, 2500], "adam", REPRODUCED),
    ([2000, 2250, 2500], [3000, 3250, 3500], "adam", NOT_REPRODUCED),
    ([3000, 3250, 3500], [2750, 3250, 3500], "adam", INCONCLUSIVE),  # equal medians
    ([3000, 3250, 3500], [2000, 2250, 2500], "sgd", INCONCLUSIVE),  # the claim is about Adam
    ([None, None, None], [2000, 2250, 2500], "adam", REPRODUCED),
])
def test_verdict_irnn_200_faster_with_adam(at150, at200, optimizer, expected):
    c = cells({("irnn", 150): at150, ("irnn", 200): at200}, steps=6000, optimizer=optimizer)
    v = _by_key(verdicts(c))["adam_200_faster"]
    assert v.verdict == expected, v.summary
    assert _by_key(verdicts(cells({("irnn", 150): at150})))["adam_200_faster"].verdict == INCONCLUSIVE


def test_a_verdict_that_flips_with_the_instruction_set_is_inconclusive():
    from irnn.experiments.report import isa_check

    main = verdicts(cells({("irnn", 150): [1000, 1500, None], ("irnn", 200): [1000, 1200, 1400]}))
    other = verdicts(cells({("irnn", 150): [1000, None, None], ("irnn", 200): [1000, 1200, 1400]}))
    irnn = [v for v in main if v.key == "irnn_solves"]
    lines = isa_check(irnn, other, "avx2")
    assert _at(main, "irnn_solves", "T=150").verdict == INCONCLUSIVE
    assert "flips with the instruction set" in _at(main, "irnn_solves", "T=150").summary
    assert _at(main, "irnn_solves", "T=200").verdict == REPRODUCED
    assert sum("FLIPS" in line for line in lines) == 1 and len(lines) == 4  # T=150..400 (300 and 400 not run)


# -- the report and `irnn plot` -------------------------------------------------------------------------
def test_report_and_plot_of_a_study(tmp_path, capsys):
    from irnn.cli import main

    spec, meta = study_spec("seed", "quick", name="study")
    g = {"model": ["irnn", "rnn-tanh", "rnn-relu", "lstm"], "seq_len": [150], "seed": [0, 1, 2]}
    runs = {}
    for s in range(3):
        runs[f"irnn-150__adam__lr0.001__s{s}"] = (curve(1000 + 500 * s, 3000), "completed")
        runs[f"lstm-150__adam__lr0.001__s{s}"] = (curve(None, 3000, plateau=0.12), "completed")
        runs[f"rnn-tanh-150__adam__lr0.001__s{s}"] = (curve(None, 3000), "completed")
    runs["rnn-relu-150__adam__lr0.001__s0"] = (curve(None, 3000), "failed")  # the other two stay pending
    path = fake_sweep(tmp_path, runs, grid=g, meta=meta, name="study")
    report = write_report(path, wall_time_s=126.0)
    text = report.read_text()
    for claim in ("solves the adding problem at T = 150, 200, 300 and 400", "LSTM solves them too",
                  "stay near the baseline", "grow with the sequence length", "irnn-200 converged slightly faster"):
        assert claim in text
    assert text.count(f"**{INCONCLUSIVE}**") >= 4 and "*Rule.*" in text
    assert "- 1,500 ± 500 steps (3/3 seeds solved)" in text and "s2: solved at 2,000" in text
    assert "sequence lengths 150 only" in text and "2.1 min" in text
    assert "1 failed" in text and "2 pending" in text
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (path / link).is_file() and (path / link).stat().st_size > 10_000
    assert (path / "results.csv").is_file() and (path / "members.csv").read_text().count("\n") == 13

    # `irnn plot` on the sweep rewrites the report; on one run it draws that run's figures
    assert main(["plot", str(path)]) == 0
    assert "report.md" in capsys.readouterr().out
    run = path / "members" / "irnn-150__adam__lr0.001__s0"
    assert main(["plot", str(run), "--out", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "fig_loss_per_epoch.png", "fig_loss_per_epoch.svg", "fig_overfit_check.png", "fig_overfit_check.svg"]
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("irnn: error:") for line in err)


def test_study_specs():
    spec, meta = study_spec("paper", "full")
    from irnn.experiments import expand

    members = expand(spec)
    assert len(members) == 4 * 3 * (9 + 9 + 9 + 9 * 4)  # lengths x seeds x (lr x clip [x forget bias])
    assert {c.seq_len for c in members.values()} == set(ALL) and {c.optimizer for c in members.values()} == {"sgd"}
    assert {c.forget_bias for c in members.values() if c.model == "lstm"} == {1.0, 4.0, 10.0, 20.0}
    assert meta["full_budget"] and not meta["reductions"]
    spec, meta = study_spec("seed", "quick")
    members = expand(spec)
    assert len(members) == 5 + 3 * 3 and not meta["full_budget"] and meta["reductions"]  # 5 IRNN seeds
    with pytest.raises(ConfigError):
        study_spec("seed", "medium")
    with pytest.raises(ConfigError):
        study_spec("seed", "quick", lengths=[1])


def test_verdict_of_a_length_whose_seeds_all_failed_before_a_summary():
    # every seed of the IRNN at T=400 failed before writing its baseline: the verdict still renders
    ms = [member(m, T, s, curve(1000, 3000)) for m in ("irnn", "lstm") for T in ALL for s in range(2)
          if (m, T) != ("irnn", 400)]
    ms += [Member(name=f"irnn-400__s{s}", path=Path("/nonexistent"), state="failed", summary={"status": "failed"},
                  config={**member("irnn", 400, s, []).config}) for s in range(2)]
    v = _at(verdicts(best_settings(settings(ms))), "irnn_solves", "T=400")
    assert v.verdict == NOT_REPRODUCED and "0/2 seeds" in v.summary


def test_standard_study_spec():
    spec, meta = study_spec("seed", "standard")
    members = expand_spec(spec)
    assert expand_spec(parse_spec(spec.to_dict())) == members  # what a worker process reads back
    by = {}
    for c in members.values():
        by.setdefault((c.model, c.seq_len, c.isa), []).append(c)
    for T in ALL:
        assert len(by[("irnn", T, "auto")]) == len(by[("lstm", T, "auto")]) == 5
        assert len(by[("rnn-tanh", T, "auto")]) == len(by[("rnn-relu", T, "auto")]) == 3
        assert {c.steps for (m, t, _), cs in by.items() if t == T for c in cs} == {STANDARD_STEPS[T]}
        pinned = [k for k in by if k[0] == "irnn" and k[1] == T and k[2] != "auto"]
        assert len(pinned) <= 1 and all(len(by[k]) == 5 for k in pinned)
    assert not meta["full_budget"] and any("steps at T=400" in r for r in meta["reductions"])
    # the costliest members first: two workers then finish together
    assert next(iter(members.values())).seq_len == 400 and next(iter(members.values())).model == "lstm"
    with pytest.raises(ConfigError):
        study_spec("paper", "standard")


def test_report_compares_the_instruction_sets(tmp_path):
    g = [{"model": ["irnn"], "seq_len": [150, 200], "seed": [0, 1, 2]},
         {"model": ["irnn"], "seq_len": [150, 200], "seed": [0, 1, 2], "isa": ["generic"]}]
    solve = {(150, "auto"): [1000, 1500, None], (200, "auto"): [2000, None, None],
             (150, "generic"): [1000, 1250, 1750], (200, "generic"): [2000, 2500, None]}
    sw = create(parse_spec({"name": "isa", "base": {"steps": 3000, "eval_every": EVERY}, "grid": g}), tmp_path,
                meta={"study": "adding", "lengths": [150, 200]})
    for n in sw.names:
        cfg = sw.configs[n]
        write_run(sw.member_dir(n), cfg, curve(solve[(cfg["seq_len"], cfg.get("isa", "auto"))][cfg["seed"]], 3000))
    sw.update_index({n: {"state": "completed"} for n in sw.names})
    text = write_report(sw.path).read_text()
    section = text[text.index("## Instruction-set check"):]
    assert "pinned to `generic`" in section and "T=150 3/3 solved (s0 1,000, s1 1,250, s2 1,750)" in section
    # T=200: 1 of 3 by default, 2 of 3 under generic: the verdict flips, so it is inconclusive
    assert "The IRNN solves the adding problem at T = 150, 200, 300 and 400, T=200: FLIPS" in section
    row = next(line for line in text.splitlines() if line.startswith("| The IRNN solves") and "| T=200 |" in line)
    assert f"**{INCONCLUSIVE}**" in row and "flips with the instruction set" in row
    # the results table holds the default members only
    assert (sw.path / "members.csv").read_text().count("\n") == 7


def test_a_seed_stopped_once_solved_keeps_its_last_value_in_the_mean():
    from irnn.results.figures import _curve_band

    stopped = member("irnn", 150, 0, curve(500, 1000, end=0.002))
    stopped.summary["stopped_early"] = "solved at 2 evaluations in a row (stop_when_solved)"
    running = member("irnn", 150, 1, curve(None, 2000))
    diverged = member("irnn", 150, 2, curve(None, 750), state="diverged")
    steps, mean, lo, hi = _curve_band([stopped, running, diverged])
    assert steps == [250.0, 500.0, 750.0, 1000.0, 1250.0, 1500.0, 1750.0, 2000.0]
    assert mean[-1] == pytest.approx((0.002 + 0.17) / 2)  # the stopped seed counts, the diverged one does not
    assert lo[-1] == 0.002 and hi[-1] == 0.17
    assert mean[2] == pytest.approx((0.002 + 0.17 + 0.17) / 3)
