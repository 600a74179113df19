"""Verdicts on the paper's and the prototype's claims, and the generated ``report.md``.

Each claim has one written rule (``RULES``) that the report prints next to its verdict, and
one of three verdicts: ``reproduced``, ``not reproduced`` or ``inconclusive at this budget``.
A claim about lengths that were not run, or runs that did not finish, is inconclusive; a
run that fails to learn within a reduced (quick) budget is evidence of nothing, since the
paper trained far longer, so only a full budget can turn "not solved" into "not reproduced".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .aggregate import MODEL_NAMES, SettingStats, find_cell

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive at this budget"
PAPER_LENGTHS = (150, 200, 300, 400)
NEAR_BASELINE = 0.5  # "near the baseline": mean final MSE at least this fraction of the baseline

RULES = {
    "irnn_solves": "A length counts as solved when more than half of the seeds of the chosen setting reach "
                   "test MSE < 0.01 at some evaluation. Reproduced: all four lengths run and solved. Not reproduced: "
                   "a length ran its full budget without being solved. Otherwise (a length not run, runs "
                   "unfinished, or not solved within a reduced budget): inconclusive.",
    "lstm_solves": "As for the IRNN, for the LSTM's chosen setting.",
    "baselines_fail": f"A model stays near the baseline at a length when no seed reaches test MSE < 0.01 and its mean "
                      f"final test MSE is at least {NEAR_BASELINE:g} x the constant-prediction baseline. Not reproduced: "
                      f"the tanh RNN or the Gaussian ReLU RNN gets clearly below that at any length run (more training "
                      f"would only lower it further). Reproduced: both stay near the baseline at all four lengths with "
                      f"the full budget. Otherwise inconclusive.",
    "steps_grow": "IRNN steps to test MSE < 0.01 (mean over the seeds that solved it) at the shortest and the longest "
                  "length run. Reproduced: the longest needs more steps by more than the larger seed standard "
                  "deviation of the two, or the longest was not solved within its budget while the shortest was. Not "
                  "reproduced: the opposite. Inconclusive: the difference is within that spread, fewer than two "
                  "lengths ran, or neither was solved.",
    "adam_200_faster": "IRNN trained with Adam, steps to test MSE < 0.01 at T=200 against T=150 (means over the seeds "
                       "that solved). Reproduced: T=200 needs fewer steps by more than the larger seed standard "
                       "deviation, or only T=200 was solved. Not reproduced: T=200 needs more steps by more than that "
                       "spread, or only T=150 was solved. Inconclusive: the difference is within the seed spread, a "
                       "length was not run or not solved, or the IRNN did not use Adam.",
}

CLAIMS = {
    "irnn_solves": ("The IRNN solves the adding problem at T = 150, 200, 300 and 400", "paper"),
    "lstm_solves": ("The LSTM solves them too", "paper"),
    "baselines_fail": ("The tanh RNN and the Gaussian-initialised ReLU RNN stay near the baseline at these lengths",
                       "paper"),
    "steps_grow": ("The steps needed grow with the sequence length", "prototype README"),
    "adam_200_faster": ("With Adam, irnn-200 converged slightly faster than irnn-150", "prototype README"),
}


@dataclass
class Verdict:
    key: str
    claim: str
    source: str
    verdict: str
    summary: str  # one line with the numbers
    details: list[str] = field(default_factory=list)
    rule_text: str = ""  # a study's own rule; the adding study's come from RULES

    @property
    def rule(self) -> str:
        return self.rule_text or RULES[self.key]


def _unfinished(c: SettingStats) -> int:
    return sum(1 for m in c.members if m.state in ("pending", "running"))


def _solved(c: SettingStats) -> bool:
    return 2 * c.n_solved > c.n


def _steps_str(c: SettingStats) -> str:
    m, s = c.steps
    if m is None:
        if _unfinished(c):
            furthest = max(mm.steps_done for mm in c.members)
            return f"not solved so far (furthest seed at step {furthest:,} of {c.budget:,})"
        return f"not solved within {c.budget:,} steps"
    return f"{m:,.0f}" + (f" ± {s:,.0f}" if c.n_solved > 1 else "") + f" steps ({c.n_solved}/{c.n} seeds solved)"


def _final_str(c: SettingStats) -> str:
    m, s = c.final
    if m is None:
        return "no finished seed"
    text = f"final MSE {m:.3g}" + (f" ± {s:.2g}" if len(c.finished) > 1 else "")
    base = c.baseline
    if base:
        below = sum(1 for mm in c.finished if mm.final is not None and mm.final < NEAR_BASELINE * base)
        text += f" ({m / base:.0%} of the baseline; {below} of {len(c.finished)} seeds ended below half of it)"
    return text


def verdict_solves(cells: Sequence[SettingStats], model: str, *, full_budget: bool,
                   lengths: Sequence[int] = PAPER_LENGTHS) -> Verdict:
    key = "irnn_solves" if model == "irnn" else "lstm_solves"
    claim, source = CLAIMS[key] if model in ("irnn", "lstm") else (f"{model} solves the adding problem", "paper")
    details, status = [], {}
    for T in lengths:
        c = find_cell(cells, model, seq_len=T)
        if c is None:
            status[T] = "not run"
            details.append(f"T={T}: not run in this study")
        elif _solved(c):
            status[T] = "solved"
            details.append(f"T={T}: solved — {_steps_str(c)}, {_final_str(c)}")
        elif _unfinished(c):
            status[T] = "unfinished"
            details.append(f"T={T}: {_unfinished(c)} of {c.n} seeds unfinished — {_steps_str(c)}")
        else:
            status[T] = "not solved"
            details.append(f"T={T}: not solved — {c.n_solved}/{c.n} seeds reached MSE < {c.threshold:g} within "
                           f"{c.budget:,} steps; {_final_str(c)}"
                           + (f", baseline {c.baseline:.3g}" if c.baseline is not None else ""))
    solved = [T for T in lengths if status[T] == "solved"]
    if all(status[T] == "solved" for T in lengths):
        verdict = REPRODUCED
    elif full_budget and any(status[T] == "not solved" for T in lengths):
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    missing = [T for T in lengths if status[T] == "not run"]
    summary = (f"solved at T = {', '.join(map(str, solved))}" if solved else "solved at no length") + \
        (f"; not run: T = {', '.join(map(str, missing))}" if missing else "") + \
        "".join(f"; T = {T} {status[T]}" for T in lengths if status[T] in ("not solved", "unfinished"))
    return Verdict(key, claim, source, verdict, summary, details)


def verdict_baselines(cells: Sequence[SettingStats], *, full_budget: bool,
                      lengths: Sequence[int] = PAPER_LENGTHS) -> Verdict:
    claim, source = CLAIMS["baselines_fail"]
    details, near, far, missing = [], [], [], []
    for model in ("rnn-tanh", "rnn-relu"):
        for T in lengths:
            c = find_cell(cells, model, seq_len=T)
            name = MODEL_NAMES[model]
            if c is None or not c.finished:
                missing.append((model, T))
                details.append(f"{name}, T={T}: " + ("not run" if c is None else "no finished seed"))
                continue
            fm, _ = c.final
            base = c.baseline or 1 / 6
            ok = c.n_solved == 0 and fm is not None and fm >= NEAR_BASELINE * base
            (near if ok else far).append((model, T))
            details.append(f"{name}, T={T}: {'near' if ok else 'below'} the baseline — {_final_str(c)}; "
                           f"{c.n_solved}/{c.n} seeds reached MSE < {c.threshold:g} within {c.budget:,} steps")
    if far:
        verdict = NOT_REPRODUCED
    elif not missing and full_budget:
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    summary = f"near the baseline in {len(near)} of {len(near) + len(far)} (model, length) pairs run" + \
        (f"; clearly below at {', '.join(f'{m} T={T}' for m, T in far)}" if far else "") + \
        (f"; {len(missing)} pairs not run or unfinished" if missing else "") + \
        ("" if full_budget or far else "; reduced budget: the paper trained far longer")
    return Verdict("baselines_fail", claim, source, verdict, summary, details)


def _compare(short: SettingStats, long: SettingStats) -> tuple[Optional[float], str]:
    """Sign of "long needs more steps than short": +1, -1, 0 (within spread) or None (no evidence)."""
    s_ok, l_ok = _solved(short), _solved(long)
    if s_ok and l_ok:
        ms, ss = short.steps
        ml, sl = long.steps
        d = ml - ms
        noise = max(ss or 0.0, sl or 0.0)
        text = (f"T={long.seq_len}: {ml:,.0f} vs T={short.seq_len}: {ms:,.0f} steps (difference {d:+,.0f}; "
                f"larger seed std {noise:,.0f})")
        return (1.0 if d > noise else -1.0 if d < -noise else 0.0), text
    if s_ok and not l_ok and not _unfinished(long):
        return 1.0, (f"T={short.seq_len} solved in {_steps_str(short)}; T={long.seq_len} not solved within "
                     f"{long.budget:,} steps")
    if l_ok and not s_ok and not _unfinished(short):
        return -1.0, (f"T={long.seq_len} solved in {_steps_str(long)}; T={short.seq_len} not solved within "
                      f"{short.budget:,} steps")
    return None, f"T={short.seq_len}: {_steps_str(short)}; T={long.seq_len}: {_steps_str(long)}"


def verdict_steps_grow(cells: Sequence[SettingStats], model: str = "irnn") -> Verdict:
    claim, source = CLAIMS["steps_grow"]
    runs = sorted((c for c in cells if c.model == model), key=lambda c: c.seq_len)
    details = [f"T={c.seq_len}: {_steps_str(c)}" for c in runs]
    if len(runs) < 2:
        return Verdict("steps_grow", claim, source, INCONCLUSIVE,
                       f"needs at least two lengths; {len(runs)} ran", details)
    sign, text = _compare(runs[0], runs[-1])
    verdict = {1.0: REPRODUCED, -1.0: NOT_REPRODUCED}.get(sign, INCONCLUSIVE)  # type: ignore[arg-type]
    if sign == 0.0:
        text += " — within seed-to-seed spread"
    return Verdict("steps_grow", claim, source, verdict, text, details)


def verdict_200_faster(cells: Sequence[SettingStats], model: str = "irnn") -> Verdict:
    claim, source = CLAIMS["adam_200_faster"]
    a, b = find_cell(cells, model, seq_len=150), find_cell(cells, model, seq_len=200)
    if a is None or b is None:
        return Verdict("adam_200_faster", claim, source, INCONCLUSIVE,
                       f"needs irnn-150 and irnn-200; not run: {', '.join(f'T={T}' for T, c in ((150, a), (200, b)) if c is None)}")
    opts = {a.hparams.get("optimizer"), b.hparams.get("optimizer")}
    details = [f"irnn-150: {_steps_str(a)}", f"irnn-200: {_steps_str(b)}"]
    if opts != {"adam"}:
        return Verdict("adam_200_faster", claim, source, INCONCLUSIVE,
                       f"this study trained the IRNN with {', '.join(sorted(map(str, opts)))}, not Adam", details)
    sign, text = _compare(a, b)
    # the claim is the reverse of "longer needs more": irnn-200 needs fewer
    verdict = {-1.0: REPRODUCED, 1.0: NOT_REPRODUCED}.get(sign, INCONCLUSIVE)  # type: ignore[arg-type]
    if sign == 0.0:
        text += " — within seed-to-seed spread"
    return Verdict("adam_200_faster", claim, source, verdict, text, details)


def verdicts(cells: Sequence[SettingStats], *, full_budget: bool) -> list[Verdict]:
    """Every claim's verdict for the chosen settings (one per length and model)."""
    return [verdict_solves(cells, "irnn", full_budget=full_budget),
            verdict_solves(cells, "lstm", full_budget=full_budget),
            verdict_baselines(cells, full_budget=full_budget),
            verdict_steps_grow(cells),
            verdict_200_faster(cells)]


# -- report.md -------------------------------------------------------------------------------------------
def render_report(*, title: str, meta: dict[str, Any], verdict_list: Sequence[Verdict], table_md: str,
                  figures: dict[str, str], all_settings_md: Optional[str], members_states: dict[str, int],
                  failures: Sequence[str], wall_time_s: Optional[float], provenance: dict[str, Any]) -> str:
    """The Markdown text of ``report.md`` (figures are paths relative to the report)."""
    lines = [f"# {title}", ""]
    lines.append(f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{meta.get('command', 'irnn reproduce ' + str(meta.get('study', 'adding')))}`"
                 + (f"; irnn {provenance.get('irnn')}" if provenance.get("irnn") else "")
                 + (f", git {provenance.get('git')}" if provenance.get("git") else "")
                 + (f", torch {provenance.get('torch')}" if provenance.get("torch") else "")
                 + (f", device {provenance.get('device')}" if provenance.get("device") else "") + ".")
    lines.append("")
    if wall_time_s is not None:
        runs = int(meta.get("invocations") or 1)
        lines.append(f"Wall time: **{wall_time_s / 60:.1f} min**"
                     + (f" over {runs} invocations of `irnn reproduce` (a resumed study)" if runs > 1 else "")
                     + (f" ({meta['workers']} worker processes)" if meta.get("workers", 1) > 1 else "") + ". "
                     f"Summed training time of all members: {meta.get('train_time_s', 0) / 60:.1f} min.")
        lines.append("")
    lines += ["## Study and budget", ""]
    for item in meta.get("description", []):
        lines.append(f"- {item}")
    if meta.get("reductions"):
        lines += ["", f"**Reduced for the `{meta.get('budget')}` budget** (compared with `full`):", ""]
        lines += [f"- {r}" for r in meta["reductions"]]
    states = ", ".join(f"{v} {k}" for k, v in sorted(members_states.items()))
    lines += ["", f"Members: {sum(members_states.values())} runs ({states})."]
    if failures:
        lines += ["", "Failed or diverged members:", ""] + [f"- {f}" for f in failures]
    lines += ["", "## Verdicts", "", "| claim | source | verdict | the numbers |", "|---|---|---|---|"]
    for v in verdict_list:
        lines.append(f"| {v.claim} | {v.source} | **{v.verdict}** | {v.summary} |")
    lines += ["", "How each verdict was decided, with the numbers:", ""]
    for v in verdict_list:
        lines.append(f"### {v.claim} ({v.source}): {v.verdict}")
        lines.append("")
        lines.append(f"*Rule.* {v.rule}")
        lines.append("")
        lines += [f"- {d}" for d in v.details]
        lines.append("")
    lines += ["## Results", "", meta.get("selection_rule", ""), "", table_md, ""]
    lines.append(meta.get("results_note") or (
        "Steps to threshold: mean ± sample standard deviation over the seeds that reached it (the first "
        "evaluation below the threshold; evaluations every "
        f"{meta.get('eval_every', '?')} steps). Final/best: the last/lowest evaluated test MSE, mean ± "
        "sample std over seeds. Wall time: training time summed over seeds (evaluation excluded). Guard "
        "rollbacks: how often the divergence guard rolled a run back, summed over seeds (and how many seeds "
        "needed it)."))
    lines.append("")
    lines += ["Tables: [results.md](results.md), [results.csv](results.csv); every member: "
              "[members.csv](members.csv).", ""]
    lines += ["## Figures", ""]
    for caption, path in figures.items():
        lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]
    if all_settings_md:
        lines += ["## Every setting searched", "", all_settings_md, ""]
    return "\n".join(lines)
