"""``carlrar report``'s Diagnostics section: how large and how aligned each auxiliary term's gradient (L_D, L_R) is
next to L_C's in the first 50 steps after the term starts, from the runs' diagnostics records, and the step each run's
auxiliary term starts at (also marked in ``report_plots``' figures)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

DIAGNOSTIC_WINDOW = 50  # steps after the auxiliary term starts that the Diagnostics section summarises


def aux_start(run: dict) -> int | None:
    """The step at which the run's auxiliary term starts: a branch's step; else CARL's carl_start_step (≥ 1: that
    step, < 1: that fraction of the run's steps, as ContrastiveTerm resolves it; under the plateau rule the first
    diagnostic step with ∇L_D); None when every term runs from the first step."""
    if run.get("branch"):
        return int(run["branch"]["step"])
    config = run["config"]
    if config.get("carl_start_rule") == "plateau":
        return next((x["step"] for x in run.get("diagnostics") or [] if "grad_D" in x), None)
    start = config.get("carl_start_step")
    if start is None:
        return None
    return int(round(start * run["final"]["steps"])) if 0 < start < 1 else int(start)


def ratio(a: str, b: str) -> Callable[[dict], float | None]:
    return lambda x: x[a] / x[b] if x.get(a) is not None and x.get(b) else None


# the Diagnostics columns: header, value of one diagnostics record, how the seeds' window means combine, format
DIAGNOSTICS = [("‖∇L_D‖ / ‖∇L_C‖ (median)", ratio("grad_D", "grad_C"), statistics.median, "{:.2f}"),
               ("cos(∇L_C, ∇L_D) (median)", lambda x: x.get("cos_C_D"), statistics.median, "{:+.3f}"),
               ("‖∇L_R‖ / ‖∇L_C‖ (median)", ratio("grad_R", "grad_C"), statistics.median, "{:.2f}"),
               ("cos(∇L_C, ∇L_R) (median)", lambda x: x.get("cos_C_R"), statistics.median, "{:+.3f}"),
               ("clip factor (mean)", lambda x: x.get("clip_factor"), statistics.mean, "{:.3f}")]


def window_mean(run: dict, get: Callable[[dict], float | None]) -> float | None:
    """Mean of ``get(record)`` over the run's diagnostics records in the first 50 steps from its auxiliary term's
    start (step 0 when it has none); None when no record there has the value."""
    start = aux_start(run) or 0
    values = [get(x) for x in run.get("diagnostics") or [] if start <= x["step"] < start + DIAGNOSTIC_WINDOW]
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def diagnostics_section(grid, d: str) -> list[str]:
    """How large and how aligned the auxiliary term's gradient is next to L_C's just after it starts: a term that
    dwarfs and opposes ∇L_C (GUIDE §2: ‖∇L_D‖ ≈ 49 × ‖∇L_C‖ at cos ≈ −0.06) takes over the clipped step."""
    from carlrar.report import NAMES, md_table  # the report's names and table; it imports this module

    rows = []
    for m in grid.methods:
        runs = [r for r in grid.runs(d, m) if r.get("diagnostics")]
        if not runs:
            continue
        cells = []
        for _, get, over_seeds, fmt in DIAGNOSTICS:
            means = [v for v in (window_mean(r, get) for r in runs) if v is not None]
            cells.append(fmt.format(over_seeds(means)) if means else "–")
        starts = sorted({aux_start(r) or 0 for r in runs})
        rows.append([NAMES.get(m, m), str(len(runs)), ", ".join(map(str, starts)), *cells])
    if not rows:
        return []
    return ["", f"## Diagnostics ({d}): objective terms' gradients in the first {DIAGNOSTIC_WINDOW} steps after the "
            "auxiliary term starts", "", f"Per run: the mean over its diagnostic steps in [start, start + "
            f"{DIAGNOSTIC_WINDOW}) (start: a branch's step, CARL's start step, else 0); then over seeds as marked. "
            "Clip factor: the fraction of the step's gradient kept by clipping.", "",
            *md_table(["method", "seeds", "start step", *(h for h, *_ in DIAGNOSTICS)], rows)]


def margin_section(grid, d: str) -> list[str]:
    """Why R turning less (Table 4) need not mean fewer flips (Table 5): on the clean-correct dev examples, the
    clean logit margin, and per Table 4 radius ‖R − R^adv‖, the margin the attack takes off and that drop per unit
    of ‖R − R^adv‖ (``attack.margin_drop``), and the drop as a share of the clean margin. Runs attacked before
    margins were recorded are left out."""
    from carlrar.report import NAMES, find, md_table, table4_alphas

    def margin(r):
        return r["attack"].get("mean_margin")

    def at(a, k):
        return lambda r: find(r["attack"]["attacks"], "eps", a).get(k)

    def share_lost(a):  # per run, then averaged over seeds: the share of its clean margin an example loses
        drop = at(a, "mean_margin_drop")

        def get(r):
            lost, had = drop(r), margin(r)
            return lost / had if lost is not None and had else None
        return get

    methods = [m for m in grid.methods if any(margin(r) is not None for r in grid.runs(d, m))]
    if not methods:
        return []
    alphas = table4_alphas(grid.attack(d))
    columns = [margin] + [get for a in alphas for get in (at(a, "mean_euclid"), at(a, "mean_margin_drop"),
                                                          at(a, "margin_drop_per_distance"), share_lost(a))]
    rows = [[NAMES.get(m, m), *(grid.cell(d, m, get, 1.0, 3) for get in columns)] for m in methods]
    header = ["method", "clean margin", *(f"α={a:g} {what}" for a in alphas for what in (
        "‖R − R^adv‖", "margin drop", "drop / ‖R − R^adv‖", "drop / clean margin"))]
    return ["", f"## Margins ({d}): why R turning less need not mean fewer flips", "",
            "On the dev examples each run classifies correctly: the mean clean logit margin (true label's logit minus "
            "the best other) and, after the attack at ε = α, the mean margin it takes off and that drop per unit of "
            "‖R − R^adv‖ (‖R − R^adv‖ itself over all examples, as in Table 4). An example flips when the drop "
            "exceeds its margin: a smaller ‖R − R^adv‖ protects only if the head does not read it more steeply, and a "
            "smaller drop only if the clean margin does not shrink with it (drop / clean margin, per run).", "",
            *md_table(header, rows)]
