"""Verdicts on the paper's and the prototype's claims, and the generated ``report.md``.

Each claim has one written rule (``RULES``) that the report prints next to its verdict, and
one of three verdicts: ``reproduced``, ``not reproduced`` or ``inconclusive at this budget``.
A claim about lengths that were not run, or runs that did not finish, is inconclusive; a
run that fails to learn within a reduced (quick) budget is evidence of nothing, since the
paper trained far longer, so only a full budget can turn "not solved" into "not reproduced".
"""
from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from ..results.aggregate import MODEL_NAMES, SettingStats, find_cell

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive at this budget"
PAPER_LENGTHS = (150, 200, 300, 400)
NO_GUARD_TEXT = ("divergence guard off (chosen with --no-guard): the raw runs, to compare with the guarded study; "
                 "a run stops as diverged at its first NaN/inf")
NEAR_BASELINE = 0.5  # "near the baseline": final MSE at least this fraction of the baseline
ALPHA = 0.05  # a verdict is "clear" when its one-sided exact test gives p < ALPHA, "weak" otherwise

_COUNT_RULE = (f"Each seed counts for or against the claim, and the majority of the seeds decides; an even split, "
               f"an unfinished seed or a length not run leaves it inconclusive (the details say what would decide "
               f"it). Uncertainty: the one-sided exact binomial test of that majority against a fair coin; "
               f"p < {ALPHA:g} is a clear verdict, otherwise a weak one (with the number of seeds that, all agreeing, "
               f"would make it clear). The verdict holds for the step budget the study ran, stated with it.")
_STEPS_RULE = (f"Steps to test MSE < 0.01 of the IRNN's seeds at the two lengths, a seed that never got there "
               f"counting as slower than every seed that did. The medians decide; equal medians, or both "
               f"lengths unsolved by most seeds, leave it inconclusive. Uncertainty: the one-sided exact "
               f"Mann-Whitney test of the two sets of seeds (p < {ALPHA:g}: clear, otherwise weak).")

RULES = {
    "irnn_solves": "A seed counts for the claim when it reaches test MSE < 0.01 at some evaluation within the "
                   "length's step budget. " + _COUNT_RULE,
    "lstm_solves": "As for the IRNN, for the LSTM's seeds. " + _COUNT_RULE,
    "baselines_fail": f"A seed counts for the claim when it never reaches test MSE < 0.01 and ends at a test MSE of "
                      f"at least {NEAR_BASELINE:g} x the constant-prediction baseline, for the tanh RNN and the "
                      f"Gaussian ReLU RNN separately. " + _COUNT_RULE,
    "steps_grow": "The IRNN at each pair of consecutive lengths run: the longer needs more steps. " + _STEPS_RULE,
    "adam_200_faster": "The IRNN trained with Adam at T=200 against T=150: T=200 needs fewer steps (the claim is "
                       "about Adam: any other optimiser leaves it inconclusive). " + _STEPS_RULE,
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
    where: str = ""  # the length (or pair of lengths, or task) it is about; "" for the whole study
    strength: str = ""  # "clear" / "weak" where a test stands behind the verdict

    @property
    def rule(self) -> str:
        return self.rule_text or RULES[self.key]


def _unfinished(c: SettingStats) -> int:
    return sum(1 for m in c.members if m.state in ("pending", "running"))


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): the exact one-sided p of k of n seeds agreeing by chance."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def seeds_for_clear(alpha: float = ALPHA) -> int:
    """The fewest seeds that, all agreeing, give a clear verdict (p < alpha): 5 for alpha 0.05."""
    n = 1
    while binomial_tail(n, n) >= alpha:
        n += 1
    return n


EXACT_SPLITS = 100_000  # beyond this many splits of the seeds, a seeded sample of them


def mann_whitney_greater(a: Sequence[float], b: Sequence[float]) -> float:
    """One-sided p that ``b`` tends to be larger than ``a``: the share of splits of the pooled values
    whose U is at least the observed one (ties count half); values may be ``math.inf`` (a seed that
    never solved). Exact over all splits up to ``EXACT_SPLITS`` of them (10 + 10 seeds: 184,756);
    above that a fixed-seed sample of ``EXACT_SPLITS`` splits, so that --seeds 30 does not hang."""
    pooled = list(a) + list(b)
    na, n = len(a), len(pooled)

    def u(idx: Sequence[int]) -> float:  # U of "the rest beats the chosen" for one split
        chosen = set(idx)
        rest = [pooled[i] for i in range(n) if i not in chosen]
        return sum(1.0 if y > pooled[x] else 0.5 if y == pooled[x] else 0.0 for y in rest for x in idx)

    observed = u(range(na))
    if math.comb(n, na) <= EXACT_SPLITS:
        splits: Iterable[Sequence[int]] = itertools.combinations(range(n), na)
    else:
        rng = random.Random(0)
        splits = [rng.sample(range(n), na) for _ in range(EXACT_SPLITS)]
    hits = total = 0
    for idx in splits:
        hits += u(idx) >= observed - 1e-12
        total += 1
    if total == math.comb(n, na) and isinstance(splits, itertools.combinations):
        return hits / total
    return (hits + 1) / (total + 1)  # a sample: count the observed split itself, so p is never 0


def _count_verdict(agree: int, n: int, unfinished: int) -> tuple[str, str, str]:
    """Verdict, strength and its text for ``agree`` of ``n`` seeds counting for a claim."""
    if unfinished:
        return INCONCLUSIVE, "", f"{unfinished} of {n} seeds unfinished: resume the study to decide"
    if 2 * agree == n:
        return INCONCLUSIVE, "", (f"an even split ({agree} of {n}): decide with more seeds (an odd number, at least "
                                  f"{max(n + 1, seeds_for_clear())})")
    verdict = REPRODUCED if 2 * agree > n else NOT_REPRODUCED
    p = binomial_tail(max(agree, n - agree), n)
    if p < ALPHA:
        return verdict, "clear", f"{agree} of {n} seeds for it; clear (exact binomial p = {p:.3f})"
    return verdict, "weak", (f"{agree} of {n} seeds for it; weak (exact binomial p = {p:.3f}; {seeds_for_clear()} "
                             f"seeds all agreeing would make it clear)")


def _final_text(m) -> str:
    return "no final MSE" if m.final is None else f"final MSE {m.final:.3g}"


def _seed_line(c: SettingStats) -> str:
    parts = []
    for m in sorted(c.members, key=lambda m: m.seed):
        s = m.steps_to_threshold()
        parts.append(f"s{m.seed}: " + (f"solved at {s:,}" if s is not None else
                                       "unfinished" if m.state in ("pending", "running") else
                                       f"not solved, {_final_text(m)}"))
    return "; ".join(parts)


def _steps_str(c: SettingStats) -> str:
    m, s = c.steps
    if m is None:
        if _unfinished(c):
            furthest = max(mm.steps_done for mm in c.members)
            return f"not solved so far (furthest seed at step {furthest:,} of {c.budget:,})"
        return f"not solved within {c.budget:,} steps"
    return f"{m:,.0f}" + (f" ± {s:,.0f}" if c.n_solved > 1 else "") + f" steps ({c.n_solved}/{c.n} seeds solved)"


def _lengths_run(cells: Sequence[SettingStats], lengths: Sequence[int]) -> list[int]:
    return sorted(set(lengths) | {c.seq_len for c in cells if c.task == "adding"})


def verdicts_solve(cells: Sequence[SettingStats], model: str, lengths: Sequence[int]) -> list[Verdict]:
    key = "irnn_solves" if model == "irnn" else "lstm_solves"
    claim, source = CLAIMS[key]
    out = []
    for T in lengths:
        c = find_cell(cells, model, seq_len=T)
        if c is None:
            out.append(Verdict(key, claim, source, INCONCLUSIVE, "not run in this study: run `irnn reproduce adding "
                               "--budget standard` to decide", where=f"T={T}"))
            continue
        verdict, strength, text = _count_verdict(c.n_solved, c.n, _unfinished(c))
        out.append(Verdict(key, claim, source, verdict, f"{c.n_solved}/{c.n} seeds reached MSE < {c.threshold:g} "
                           f"within {c.budget:,} steps — {text}", [_steps_str(c), _seed_line(c)],
                           where=f"T={T}", strength=strength))
    return out


def verdicts_baselines(cells: Sequence[SettingStats], lengths: Sequence[int]) -> list[Verdict]:
    claim, source = CLAIMS["baselines_fail"]
    out = []
    for T in lengths:
        for model in ("rnn-tanh", "rnn-relu"):
            name = MODEL_NAMES[model]
            c = find_cell(cells, model, seq_len=T)
            if c is None:
                out.append(Verdict("baselines_fail", claim, source, INCONCLUSIVE,
                                   f"{name}: not run in this study: run `irnn reproduce adding --budget standard` "
                                   f"to decide", where=f"T={T}"))
                continue
            base = c.baseline or 1 / 6
            near = [m for m in c.finished if m.steps_to_threshold() is None and m.final is not None
                    and m.final >= NEAR_BASELINE * base]
            verdict, strength, text = _count_verdict(len(near), c.n, _unfinished(c))
            out.append(Verdict("baselines_fail", claim, source, verdict,
                               f"{name}: {len(near)}/{c.n} seeds stayed near the baseline ({base:.3g}) within "
                               f"{c.budget:,} steps — {text}", [_seed_line(c)], where=f"T={T}", strength=strength))
    return out


def _steps_or_inf(c: SettingStats) -> list[float]:
    return [float(s) if s is not None else math.inf for s in (m.steps_to_threshold() for m in c.members)]


def _compare_steps(key: str, short: SettingStats, long: SettingStats, *, longer_slower: bool) -> Verdict:
    """The claim "``long`` needs more steps than ``short``" (``longer_slower``) or fewer (not)."""
    claim, source = CLAIMS[key]
    where = f"T={short.seq_len} → T={long.seq_len}"
    details = [f"T={short.seq_len}: {_steps_str(short)}", f"T={long.seq_len}: {_steps_str(long)}"]
    if _unfinished(short) or _unfinished(long):
        return Verdict(key, claim, source, INCONCLUSIVE, "seeds unfinished: resume the study to decide", details,
                       where=where)
    a, b = _steps_or_inf(short), _steps_or_inf(long)
    ma, mb = statistics.median(a), statistics.median(b)

    def fmt(x: float) -> str:
        return "not solved" if math.isinf(x) else f"{x:,.0f}"

    medians = f"median steps to solve {fmt(ma)} at T={short.seq_len}, {fmt(mb)} at T={long.seq_len}"
    if math.isinf(ma) and math.isinf(mb):
        return Verdict(key, claim, source, INCONCLUSIVE, f"{medians}: neither length was solved by most seeds; "
                       f"decide with a larger step budget", details, where=where)
    if ma == mb:
        return Verdict(key, claim, source, INCONCLUSIVE, f"{medians}: equal; decide with more seeds", details,
                       where=where)
    grew = mb > ma
    verdict = REPRODUCED if grew == longer_slower else NOT_REPRODUCED
    p = mann_whitney_greater(a, b) if grew else mann_whitney_greater(b, a)
    strength = "clear" if p < ALPHA else "weak"
    text = f"{medians}; {strength} (exact Mann-Whitney p = {p:.3f}, {len(a)} and {len(b)} seeds)"
    return Verdict(key, claim, source, verdict, text, details, where=where, strength=strength)


def verdicts_steps_grow(cells: Sequence[SettingStats], model: str = "irnn") -> list[Verdict]:
    claim, source = CLAIMS["steps_grow"]
    runs = sorted((c for c in cells if c.model == model and c.task == "adding"), key=lambda c: c.seq_len)
    if len(runs) < 2:
        return [Verdict("steps_grow", claim, source, INCONCLUSIVE,
                        f"needs at least two lengths; {len(runs)} ran: run `irnn reproduce adding --budget standard` "
                        f"to decide", [f"T={c.seq_len}: {_steps_str(c)}" for c in runs])]
    return [_compare_steps("steps_grow", a, b, longer_slower=True) for a, b in zip(runs, runs[1:])]


def verdict_200_faster(cells: Sequence[SettingStats], model: str = "irnn") -> Verdict:
    claim, source = CLAIMS["adam_200_faster"]
    a, b = find_cell(cells, model, seq_len=150), find_cell(cells, model, seq_len=200)
    if a is None or b is None:
        missing = ", ".join(f"T={T}" for T, c in ((150, a), (200, b)) if c is None)
        return Verdict("adam_200_faster", claim, source, INCONCLUSIVE,
                       f"needs irnn-150 and irnn-200; not run: {missing}: run `irnn reproduce adding --budget "
                       f"standard` to decide", where="T=150 → T=200")
    opts = {a.hparams.get("optimizer"), b.hparams.get("optimizer")}
    if opts != {"adam"}:
        return Verdict("adam_200_faster", claim, source, INCONCLUSIVE,
                       f"this study trained the IRNN with {', '.join(sorted(map(str, opts)))}, not Adam: run the "
                       f"Adam study (--preset seed) to decide", where="T=150 → T=200")
    return _compare_steps("adam_200_faster", a, b, longer_slower=False)


def verdicts(cells: Sequence[SettingStats], *, lengths: Sequence[int] = PAPER_LENGTHS) -> list[Verdict]:
    """Every claim's verdict at every length (or pair of lengths), for the chosen settings."""
    lengths = _lengths_run(cells, lengths)
    return (verdicts_solve(cells, "irnn", lengths) + verdicts_solve(cells, "lstm", lengths)
            + verdicts_baselines(cells, lengths) + verdicts_steps_grow(cells) + [verdict_200_faster(cells)])


def isa_check(main: Sequence[Verdict], other: Sequence[Verdict], isa: str) -> list[str]:
    """Compare the IRNN's verdicts (``main``) with the same seeds under instruction set ``isa`` (``other``);
    a verdict that flips becomes inconclusive in ``main``. Returns the lines of the report's section."""
    index = {(v.key, v.where): v for v in other}
    lines = []
    for v in main:
        w = index.get((v.key, v.where))
        if w is None:
            continue
        same = w.verdict == v.verdict
        lines.append(f"{v.claim}, {v.where}: {'same verdict' if same else 'FLIPS'} — default: {v.verdict} "
                     f"({v.summary}); `{isa}`: {w.verdict} ({w.summary})")
        if not same and v.verdict != INCONCLUSIVE:
            v.details.append(f"under `{isa}` the same seeds give {w.verdict}: {w.summary}")
            v.summary = (f"flips with the instruction set ({v.verdict} by default, {w.verdict} under `{isa}`): "
                         f"decide with more seeds; " + v.summary)
            v.verdict, v.strength = INCONCLUSIVE, ""
    return lines


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
    lines += ["", "## Verdicts", "", "| claim | source | where | verdict | the numbers |", "|---|---|---|---|---|"]
    for v in verdict_list:
        verdict = f"**{v.verdict}**" + (f" ({v.strength})" if v.strength else "")
        lines.append(f"| {v.claim} | {v.source} | {v.where or 'all'} | {verdict} | {v.summary} |")
    lines += ["", "How each verdict was decided, with the numbers:", ""]
    ruled: set[str] = set()
    for v in verdict_list:
        lines.append(f"### {v.claim} ({v.source})" + (f", {v.where}" if v.where else "") + f": {v.verdict}")
        lines.append("")
        if v.rule not in ruled:  # the rule once per claim
            lines += [f"*Rule.* {v.rule}", ""]
            ruled.add(v.rule)
        lines += [f"- {d}" for d in [v.summary] + v.details]
        lines.append("")
    if meta.get("isa_check"):
        lines += ["## Instruction-set check", "", meta.get("isa_note", ""), ""]
        lines += [f"- {line}" for line in meta["isa_check"]] + [""]
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
