"""Self-consistency aggregation of verifications and the Stage II training targets (SPEC 2.6, D4-D7).

Input: for one solution, the N raw verifier outputs in sampling order (plus, optionally, merged
meta-critique texts and reference-guided verifications). Output: one `VariantRecord` per data variant with
the aggregated labels, the text targets for every reward-model format, or the reason why the solution is
dropped from that variant.

Data variants (`VARIANTS`):
  single                 first verification (index 0), n = 1: the no-scaling baseline.
  outcome_consistency    y* = majority of the final verdicts; target text = first well-formed
                         verification whose final equals y*; step labels = that verification's steps.
  step_consistency       v* = per-step majority (D4), y* = outcome majority; target text = first
                         well-formed verification whose step vector equals v*; labels = (v*, y*).
  meta_critique          labels and text parsed from the merged (critic + merger) version of verification 0.
  meta_critique_outcome  the same, on the outcome_consistency selection.
  reference_guided       step_consistency applied to the reference-guided verifications (D7).

Decisions (each is a knob of `AggregationConfig` where a choice is possible):
  * Step majority (D4): for step index i, votes come from the verifications whose parsed step vector has
    an entry i (parsed vectors are contiguous from step 1, see parsing decision 5). `min_step_votes`
    (default 1, faithful to D4) ends the majority vector at the first index with fewer votes; set it to
    N // 2 + 1 to stop a single over-long verification from adding steps the others never saw.
  * Ties: `step_tie` "incorrect" (default) | "correct" | "drop"; `outcome_tie` "No" (default) | "Yes" |
    "drop". "drop" makes the majority function return None and the solution is dropped from the variant
    (reason "step_tie" / "outcome_tie").
  * Selection (D5): only well-formed verifications (at least one step verdict and a final verdict) can be
    selected, because the selected text becomes a PRM-CoT target that must parse. The first one in
    sampling order that matches wins. For step_consistency the match is on the step vector only (D5: the
    final-verdict condition is for the outcome variants); `step_match_final=True` also requires final == y*.
  * No match => the solution is dropped from the variant for ALL formats (reason "no_match"), so that the
    ORM, PRM and PRM-CoT sets of one variant hold the same solutions and a format comparison is not
    confounded by a different solution pool.
  * The PRM (no CoT) final line uses y*, the outcome majority, not the verdict derived from v*: D5 writes
    the PRM target from the aggregated labels "plus the final verdict line", and the aggregated final
    label is y*. For single / meta-critique variants, y* is simply that verification's own final verdict.
  * ThinkPRM target = the selected verification with its `<think>` trace kept (normalised to
    `<think>\\n...\\n</think>\\n\\n<verification>`). It is missing (not dropped) when the selected text has no
    closed trace, and for the meta-critique variants, whose trace is the merger's reasoning about a critique
    that a reward model never sees.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Mapping, Sequence

from spark_jax.text import verdicts as parsing
from spark_jax.text.rm import RM_FORMATS, final_verdict_line, prm_step_line

VARIANTS = (
    "single",
    "outcome_consistency",
    "step_consistency",
    "meta_critique",
    "meta_critique_outcome",
    "reference_guided",
)
STEP_TIE_POLICIES = ("incorrect", "correct", "drop")
OUTCOME_TIE_POLICIES = ("No", "Yes", "drop")

# Drop-reason codes (stable strings, counted in the data-quality table).
DROP_NO_VERIFICATIONS = "no_verifications"
DROP_PARSE_FAILURE = "parse_failure"
DROP_NO_FINAL_VERDICT = "no_final_verdict"
DROP_NO_STEP_VERDICTS = "no_step_verdicts"
DROP_OUTCOME_TIE = "outcome_tie"
DROP_STEP_TIE = "step_tie"
DROP_NO_MATCH = "no_match"


@dataclasses.dataclass(frozen=True)
class AggregationConfig:
  """Knobs of the Stage I aggregation; defaults are SPEC decisions D4/D5."""
  step_tie: str = "incorrect"
  outcome_tie: str = "No"
  min_step_votes: int = 1
  step_match_final: bool = False

  def __post_init__(self):
    if self.step_tie not in STEP_TIE_POLICIES:
      raise ValueError(f"AggregationConfig.step_tie={self.step_tie!r}; use one of {STEP_TIE_POLICIES}.")
    if self.outcome_tie not in OUTCOME_TIE_POLICIES:
      raise ValueError(
          f"AggregationConfig.outcome_tie={self.outcome_tie!r}; use one of {OUTCOME_TIE_POLICIES}.")
    if self.min_step_votes < 1:
      raise ValueError(f"AggregationConfig.min_step_votes={self.min_step_votes}; it must be >= 1.")


# --------------------------------------------------------------------------------------------------------
# Majorities and selection
# --------------------------------------------------------------------------------------------------------


def step_majority(verdict_lists: Sequence[Sequence[bool]], tie: str = "incorrect",
                  min_votes: int = 1) -> list[bool] | None:
  """Per-step majority vector v* (D4).

  Args:
    verdict_lists: one parsed step vector per verification (steps[i] True = step i+1 correct); vectors may
      differ in length, and step i gets votes only from the vectors that reach it.
    tie: what an equal vote gives: "incorrect" -> False, "correct" -> True, "drop" -> the whole result is
      None so that the caller drops the solution.
    min_votes: the vector ends at the first step index with fewer votes than this.

  Returns:
    The majority vector ([] when no verification has any step verdict), or None on a tie under "drop".
  """
  if tie not in STEP_TIE_POLICIES:
    raise ValueError(f"step tie policy {tie!r}; use one of {STEP_TIE_POLICIES}.")
  majority: list[bool] = []
  for index in range(max((len(v) for v in verdict_lists), default=0)):
    votes = [v[index] for v in verdict_lists if len(v) > index]
    if len(votes) < min_votes:
      break
    n_correct = sum(votes)
    n_incorrect = len(votes) - n_correct
    if n_correct == n_incorrect:
      if tie == "drop":
        return None
      majority.append(tie == "correct")
    else:
      majority.append(n_correct > n_incorrect)
  return majority


def outcome_majority(finals: Sequence[bool | None], tie: str = "No") -> bool | None:
  """Majority y* of the final verdicts (True = Yes); unparsed verdicts (None) do not vote.

  Returns None when no verdict was parsed or on a tie under tie="drop"; callers tell the two apart with
  `any(f is not None for f in finals)`.
  """
  if tie not in OUTCOME_TIE_POLICIES:
    raise ValueError(f"outcome tie policy {tie!r}; use one of {OUTCOME_TIE_POLICIES}.")
  n_yes = sum(1 for f in finals if f is True)
  n_no = sum(1 for f in finals if f is False)
  if n_yes == n_no:
    if n_yes == 0 or tie == "drop":
      return None
    return tie == "Yes"
  return n_yes > n_no


def is_well_formed(parsed: Mapping[str, Any]) -> bool:
  """A parsed verification can be a training target: it has step verdicts and a final verdict."""
  return bool(parsed["steps"]) and parsed["final"] is not None


def select_matching(parsed: Sequence[Mapping[str, Any]], *, steps: Sequence[bool] | None = None,
                    final: bool | None = None) -> int | None:
  """Index of the first well-formed verification (sampling order) matching `steps` and/or `final` (D5).

  A condition left as None is not checked. Returns None when nothing matches.
  """
  for index, p in enumerate(parsed):
    if not is_well_formed(p):
      continue
    if steps is not None and list(p["steps"]) != list(steps):
      continue
    if final is not None and p["final"] != final:
      continue
    return index
  return None


def select_for_meta_critique(verifications: Sequence[str],
                             config: AggregationConfig = AggregationConfig()) -> dict[str, int | None]:
  """Which verification the critic should see for each meta-critique variant (D6).

  meta_critique uses verification 0 (n = 1); meta_critique_outcome uses the outcome_consistency
  selection (None when that variant drops the solution, in which case no critique is needed).
  """
  parsed = [parsing.parse_verification(text) for text in verifications]
  return {
      "meta_critique": 0 if verifications else None,
      "meta_critique_outcome": _outcome_selection(parsed, config)[1],
  }


# --------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------


def orm_target(final: bool) -> str:
  """ORM target: exactly "Yes" or "No" (the RL reward requires the whole response to be one of them)."""
  return "Yes" if final else "No"


def prm_target(steps: Sequence[bool], final: bool) -> str:
  """No-CoT PRM target: `Step k: Correct|Incorrect` lines, then the bold final verdict line."""
  if not steps:
    raise ValueError("a PRM target needs at least one step label; got an empty step vector.")
  return "\n".join([prm_step_line(k, s) for k, s in enumerate(steps, start=1)] + [final_verdict_line(final)])


def prm_cot_target(verification: str) -> str:
  """PRM-CoT target: the verification text verbatim, with its reasoning trace removed."""
  return parsing.strip_thinking(verification)


def think_prm_target(verification: str) -> str | None:
  """ThinkPRM target: the verification with its reasoning trace kept; None when it has no closed trace."""
  thinking, visible = parsing.split_thinking(verification)
  if not thinking or not visible:
    return None
  return f"{parsing.THINK_OPEN}\n{thinking}\n{parsing.THINK_CLOSE}\n\n{visible}"


# --------------------------------------------------------------------------------------------------------
# Variant records
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VariantRecord:
  """Aggregated labels and training targets of one solution in one data variant.

  `targets` maps each of RM_FORMATS to its target text (None when that format has no target; the reason is
  in `missing_targets`). `selected_index` is the index, in the source list, of the verification whose text
  (or whose merged version) is the PRM-CoT target. Dropped records keep `kept=False`, a `drop_reason` code
  and a human-readable `drop_detail`, and have no targets.
  """
  variant: str
  kept: bool
  problem_id: str | None = None
  solution_id: str | None = None
  is_correct: bool | None = None
  drop_reason: str | None = None
  drop_detail: str | None = None
  steps: list[bool] = dataclasses.field(default_factory=list)
  final: bool | None = None
  selected_index: int | None = None
  n_verifications: int = 0
  targets: dict[str, str | None] = dataclasses.field(default_factory=dict)
  missing_targets: dict[str, str] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, row: Mapping[str, Any]) -> VariantRecord:
    unknown = set(row) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"variant record has unknown keys {sorted(unknown)}; was it written by another version?")
    return cls(**row)


def _dropped(variant: str, reason: str, detail: str, n: int, meta: Mapping[str, Any]) -> VariantRecord:
  return VariantRecord(variant=variant, kept=False, drop_reason=reason, drop_detail=detail, n_verifications=n,
                       **meta)


def _kept(variant: str, steps: Sequence[bool], final: bool, text: str, index: int, n: int,
          meta: Mapping[str, Any], think_allowed: bool = True) -> VariantRecord:
  targets: dict[str, str | None] = {
      "orm": orm_target(final),
      "prm": prm_target(steps, final),
      "prm_cot": prm_cot_target(text),
      "think_prm": think_prm_target(text) if think_allowed else None,
  }
  missing = {}
  if targets["think_prm"] is None:
    missing["think_prm"] = ("merged verification: its reasoning trace is about merging a critique"
                            if not think_allowed else "the selected verification has no closed <think> trace")
  assert set(targets) == set(RM_FORMATS)
  return VariantRecord(variant=variant, kept=True, steps=list(steps), final=final, selected_index=index,
                       n_verifications=n, targets=targets, missing_targets=missing, **meta)


def _single(variant: str, text: str | None, index: int | None, n: int, meta: Mapping[str, Any],
            think_allowed: bool) -> VariantRecord:
  if text is None or index is None:
    return _dropped(variant, DROP_NO_VERIFICATIONS, "no verification to take", n, meta)
  parsed = parsing.parse_verification(text)
  if not is_well_formed(parsed):
    return _dropped(variant, DROP_PARSE_FAILURE,
                    f"verification {index} parsed to steps={parsed['steps']} final={parsed['final']}", n, meta)
  return _kept(variant, parsed["steps"], parsed["final"], text, index, n, meta, think_allowed)


def _outcome_label(parsed: Sequence[Mapping[str, Any]], config: AggregationConfig
                   ) -> tuple[bool | None, tuple[str, str] | None]:
  """(y*, None) or (None, (drop code, detail)) for a list of parsed verifications."""
  finals = [p["final"] for p in parsed]
  if not parsed:
    return None, (DROP_NO_VERIFICATIONS, "no verifications")
  if all(f is None for f in finals):
    return None, (DROP_NO_FINAL_VERDICT, f"none of the {len(parsed)} verifications has a final verdict")
  y_star = outcome_majority(finals, config.outcome_tie)
  if y_star is None:
    n_yes = sum(f is True for f in finals)
    return None, (DROP_OUTCOME_TIE, f"final verdicts tie ({n_yes} Yes, {n_yes} No) under outcome_tie='drop'")
  return y_star, None


def _outcome_selection(parsed: Sequence[Mapping[str, Any]], config: AggregationConfig
                       ) -> tuple[bool | None, int | None, tuple[str, str] | None]:
  """(y*, selected index, drop (code, detail) or None) of the outcome-consistency variant."""
  y_star, drop = _outcome_label(parsed, config)
  if drop is not None:
    return None, None, drop
  index = select_matching(parsed, final=y_star)
  if index is None:
    return y_star, None, (DROP_NO_MATCH, f"no well-formed verification has final={orm_target(y_star)}")
  return y_star, index, None


def _step_consistency(variant: str, texts: Sequence[str], config: AggregationConfig,
                      meta: Mapping[str, Any]) -> VariantRecord:
  n = len(texts)
  parsed = [parsing.parse_verification(text) for text in texts]
  y_star, drop = _outcome_label(parsed, config)
  if drop is not None:
    return _dropped(variant, *drop, n, meta)
  v_star = step_majority([p["steps"] for p in parsed], config.step_tie, config.min_step_votes)
  if v_star is None:
    return _dropped(variant, DROP_STEP_TIE, "a step's verdicts tie under step_tie='drop'", n, meta)
  if not v_star:
    return _dropped(variant, DROP_NO_STEP_VERDICTS, f"none of the {n} verifications has a step verdict", n,
                    meta)
  index = select_matching(parsed, steps=v_star, final=y_star if config.step_match_final else None)
  if index is None:
    return _dropped(variant, DROP_NO_MATCH, f"no well-formed verification has the majority step vector "
                    f"{v_star}" + (f" and final={orm_target(y_star)}" if config.step_match_final else ""),
                    n, meta)
  return _kept(variant, v_star, y_star, texts[index], index, n, meta)


def build_variant_records(verifications: Sequence[str], *, problem_id: str | None = None,
                          solution_id: str | None = None, is_correct: bool | None = None,
                          merged: str | None = None, merged_outcome: str | None = None,
                          reference_verifications: Sequence[str] | None = None,
                          config: AggregationConfig = AggregationConfig()) -> list[VariantRecord]:
  """Builds every data variant's record for one solution.

  Args:
    verifications: the N reference-free verifier outputs, raw (with `<think>` traces), in sampling order.
    problem_id, solution_id: copied into the records (the SFT rows and the quality table use them).
    is_correct: ground-truth correctness of the solution, for diagnostics only (never used for labels).
    merged: merger output for verification 0 (meta_critique); None = variant not computed, omitted.
    merged_outcome: merger output for the outcome_consistency selection (meta_critique_outcome); None =
      variant omitted. An empty string is a failed merge ("parse_failure" drop). When
      `select_for_meta_critique` gave None (nothing to critique), pass "" so that the solution is still
      counted: the record is then dropped with the outcome_consistency reason.
    reference_verifications: the reference-guided verifier outputs; None = variant omitted.
    config: tie policies and selection knobs.

  Returns:
    Records in VARIANTS order: always single, outcome_consistency, step_consistency; then the optional
    variants whose inputs were given.
  """
  meta = {"problem_id": problem_id, "solution_id": solution_id, "is_correct": is_correct}
  n = len(verifications)
  parsed = [parsing.parse_verification(text) for text in verifications]
  records = [_single("single", verifications[0] if verifications else None, 0 if verifications else None, n,
                     meta, think_allowed=True)]

  y_star, outcome_index, outcome_drop = _outcome_selection(parsed, config)
  if outcome_drop is not None:
    records.append(_dropped("outcome_consistency", *outcome_drop, n, meta))
  else:
    records.append(_kept("outcome_consistency", parsed[outcome_index]["steps"], y_star,
                         verifications[outcome_index], outcome_index, n, meta))

  records.append(_step_consistency("step_consistency", verifications, config, meta))

  if merged is not None:
    records.append(_single("meta_critique", merged, 0 if verifications else None, n, meta, think_allowed=False))
  if merged_outcome is not None:
    if outcome_drop is not None:  # nothing was selected to critique: same reason as outcome_consistency.
      code, detail = outcome_drop
      records.append(_dropped("meta_critique_outcome", code, f"no outcome_consistency selection: {detail}", n,
                              meta))
    else:
      records.append(_single("meta_critique_outcome", merged_outcome, outcome_index, n, meta,
                             think_allowed=False))
  if reference_verifications is not None:
    records.append(_step_consistency("reference_guided", reference_verifications, config, meta))
  return records


# --------------------------------------------------------------------------------------------------------
# Data-quality diagnostics (SPEC 2.6: accuracy of final and step-derived verdicts vs ground truth)
# --------------------------------------------------------------------------------------------------------

QUALITY_SPLITS = ("all", "correct_solutions", "incorrect_solutions")


def _accuracy_cell(hits: int, n: int) -> dict[str, Any]:
  return {"n": n, "hits": hits, "accuracy": hits / n if n else None}


def data_quality_table(records: Iterable[VariantRecord | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Label accuracy of every data variant against the ground-truth correctness of the solutions.

  For the kept records of each variant: accuracy of the final label (final == is_correct) and of the
  step-derived verdict (all step labels correct <=> Yes), over all solutions and split into truly correct
  and truly incorrect ones. Dropped records are counted per reason, not scored.

  Returns:
    {variant: {"kept": int, "dropped": int, "drop_reasons": {code: count},
               "final": {split: {"n", "hits", "accuracy"}}, "step_derived": {split: {...}}}}
    with splits QUALITY_SPLITS; accuracy is None for an empty split. Variants appear in VARIANTS order.
  """
  counts: dict[str, dict[str, Any]] = {}
  for position, record in enumerate(records):
    if isinstance(record, Mapping):
      record = VariantRecord.from_dict(record)
    entry = counts.setdefault(record.variant, {
        "kept": 0, "dropped": 0, "drop_reasons": collections.Counter(),
        "final": {split: [0, 0] for split in QUALITY_SPLITS},
        "step_derived": {split: [0, 0] for split in QUALITY_SPLITS},
    })
    if not record.kept:
      entry["dropped"] += 1
      entry["drop_reasons"][record.drop_reason] += 1
      continue
    if record.is_correct is None:
      raise ValueError(f"record {position} (variant {record.variant}, solution {record.solution_id}) has no "
                       "is_correct; the quality table needs the ground-truth correctness of every kept solution.")
    entry["kept"] += 1
    split = "correct_solutions" if record.is_correct else "incorrect_solutions"
    for key, predicted in (("final", record.final), ("step_derived", parsing.step_derived_verdict(record.steps))):
      hit = int(predicted == record.is_correct)
      for s in ("all", split):
        entry[key][s][0] += hit
        entry[key][s][1] += 1
  order = [v for v in VARIANTS if v in counts] + sorted(v for v in counts if v not in VARIANTS)
  return {
      variant: {
          "kept": counts[variant]["kept"],
          "dropped": counts[variant]["dropped"],
          "drop_reasons": dict(sorted(counts[variant]["drop_reasons"].items())),
          **{key: {s: _accuracy_cell(*counts[variant][key][s]) for s in QUALITY_SPLITS}
             for key in ("final", "step_derived")},
      } for variant in order
  }


def render_quality_markdown(table: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown rendering of `data_quality_table`: one row per variant, cells "accuracy (hits/n)"."""

  def cell(c: Mapping[str, Any]) -> str:
    return "–" if not c["n"] else f"{c['accuracy']:.3f} ({c['hits']}/{c['n']})"

  header = ("| variant | kept | dropped | final: all | final: correct sol. | final: incorrect sol. "
            "| step-derived: all | step-derived: correct sol. | step-derived: incorrect sol. |")
  lines = [header, "|" + "---|" * 9]
  for variant, row in table.items():
    cells = [variant, str(row["kept"]), str(row["dropped"])]
    cells += [cell(row["final"][s]) for s in QUALITY_SPLITS]
    cells += [cell(row["step_derived"][s]) for s in QUALITY_SPLITS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
