"""Self-consistency aggregation of verifications and the Stage II training targets (docs/method.md §2.6, D4-D7).

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
  * Step majority (D4) with a quorum: for step index i, votes come from the verifications whose parsed step
    vector has an entry i (parsed vectors are contiguous from step 1, see decision 5 in
    `spark_jax.text.verdicts`). Index i is voted only when MORE than `step_quorum` (default 0.5: a
    majority) of the verifications with at least one step verdict reach it; the majority vector ends at the
    first index that misses the quorum. Without it, one over-long verification among 16 sets the labels of
    the steps only it saw, and then the exact-vector match of D5 selects that outlier (or drops a 15-of-16
    consensus as no_match when the outlier also differs earlier). `step_quorum=0` restores the literal D4
    rule (a step is voted when any verification reaches it).
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
  * Contradictory targets: labels whose steps are all correct but whose final verdict is No, or with an
    incorrect step but a final Yes. Checked per format on what the format teaches: prm on (v*, y*), prm_cot
    and think_prm on the parsed target text; an ORM target has no steps and never contradicts. Every kept
    record lists its contradictory formats (`contradictory_formats`), and the job counts them per variant
    and format in the manifest and the data-quality table. `contradictions` "keep" (default, faithful to
    the authors) keeps them; "drop" drops the record from the variant for all formats (reason
    "contradiction"), like no_match, so that the formats of one variant keep the same solutions.
  * Step-count check: with the solution's own step count (`solution_steps`, see
    `spark_jax.text.verdicts.count_solution_steps`), each record counts the variant's source verifications
    (with at least one step verdict) whose number of step verdicts differs from it.
  * The PRM (no CoT) final line uses y*, the outcome majority, not the verdict derived from v*: D5 writes
    the PRM target from the aggregated labels "plus the final verdict line", and the aggregated final
    label is y*. For single / meta-critique variants, y* is simply that verification's own final verdict.
  * ThinkPRM target = the selected verification with its `<think>` trace kept (normalised to
    `<think>\\n...\\n</think>\\n\\n<verification>`). It is missing (not dropped) when the selected text has no
    closed trace, and for the meta-critique variants, whose trace is the merger's reasoning about a critique
    that a reward model never sees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

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
CONTRADICTION_POLICIES = ("keep", "drop")
# Formats whose target carries step labels and a final verdict, so that it can contradict itself.
CONTRADICTION_FORMATS = ("prm", "prm_cot", "think_prm")

# Drop-reason codes (stable strings, counted in the data-quality table).
DROP_NO_VERIFICATIONS = "no_verifications"
DROP_PARSE_FAILURE = "parse_failure"
DROP_NO_FINAL_VERDICT = "no_final_verdict"
DROP_NO_STEP_VERDICTS = "no_step_verdicts"
DROP_OUTCOME_TIE = "outcome_tie"
DROP_STEP_TIE = "step_tie"
DROP_NO_MATCH = "no_match"
DROP_CONTRADICTION = "contradiction"


@dataclasses.dataclass(frozen=True)
class AggregationConfig:
  """Knobs of the Stage I aggregation (module docstring; defaults live in configs/stage1.py)."""
  step_tie: str = "incorrect"
  outcome_tie: str = "No"
  step_quorum: float = 0.5
  step_match_final: bool = False
  contradictions: str = "keep"

  def __post_init__(self):
    if self.step_tie not in STEP_TIE_POLICIES:
      raise ValueError(f"AggregationConfig.step_tie={self.step_tie!r}; use one of {STEP_TIE_POLICIES}.")
    if self.outcome_tie not in OUTCOME_TIE_POLICIES:
      raise ValueError(
          f"AggregationConfig.outcome_tie={self.outcome_tie!r}; use one of {OUTCOME_TIE_POLICIES}.")
    if not 0 <= self.step_quorum < 1:
      raise ValueError(f"AggregationConfig.step_quorum={self.step_quorum!r}; use a fraction in [0, 1): 0.5 = a "
                       "majority of the parsed verifications must reach a step, 0 = any one.")
    if self.contradictions not in CONTRADICTION_POLICIES:
      raise ValueError(f"AggregationConfig.contradictions={self.contradictions!r}; use one of "
                       f"{CONTRADICTION_POLICIES}.")


# --------------------------------------------------------------------------------------------------------
# Majorities and selection
# --------------------------------------------------------------------------------------------------------


def step_majority(verdict_lists: Sequence[Sequence[bool]], tie: str = "incorrect",
                  quorum: float = 0.5) -> list[bool] | None:
  """Per-step majority vector v* (D4) under the step quorum (module docstring).

  Args:
    verdict_lists: one parsed step vector per verification (steps[i] True = step i+1 correct); vectors may
      differ in length, and step i gets votes only from the vectors that reach it.
    tie: what an equal vote gives: "incorrect" -> False, "correct" -> True, "drop" -> the whole result is
      None so that the caller drops the solution.
    quorum: step i is voted only when more than `quorum` x (number of non-empty vectors) reach it; the
      vector ends at the first index that misses it. 0 = any vector suffices.

  Returns:
    The majority vector ([] when no verification has any step verdict), or None on a tie under "drop".
  """
  if tie not in STEP_TIE_POLICIES:
    raise ValueError(f"step tie policy {tie!r}; use one of {STEP_TIE_POLICIES}.")
  parsed = sum(1 for v in verdict_lists if v)
  majority: list[bool] = []
  for index in range(max((len(v) for v in verdict_lists), default=0)):
    votes = [v[index] for v in verdict_lists if len(v) > index]
    if len(votes) <= quorum * parsed:
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


def contradicts(steps: Sequence[bool], final: bool | None) -> bool:
  """Whether labels contradict themselves: all steps correct but final No, or a step incorrect but final Yes."""
  return bool(steps) and final is not None and all(steps) != final


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
  and a human-readable `drop_detail`, and have no targets. `contradictory_formats` lists the formats whose
  target contradicts itself (module docstring; set on kept records and on records dropped for it).
  `solution_steps` is the solution's own step count (None = not given, 0 = no step headers);
  `step_count_checked` / `step_count_differing` count the variant's source verifications with step
  verdicts and those among them whose number of step verdicts differs from `solution_steps` (both 0 when
  `solution_steps` is None or 0).
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
  contradictory_formats: list[str] = dataclasses.field(default_factory=list)
  solution_steps: int | None = None
  step_count_checked: int = 0
  step_count_differing: int = 0

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
          meta: Mapping[str, Any], config: AggregationConfig, think_allowed: bool = True) -> VariantRecord:
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
  cot = parsing.parse_verification(targets["prm_cot"])
  contradictory = [fmt for fmt, labels in (("prm", (steps, final)), ("prm_cot", (cot["steps"], cot["final"])),
                                           ("think_prm", (cot["steps"], cot["final"])))
                   if targets[fmt] is not None and contradicts(*labels)]
  if contradictory and config.contradictions == "drop":
    record = _dropped(variant, DROP_CONTRADICTION, f"the {', '.join(contradictory)} target(s) contradict "
                      f"themselves (steps {list(steps)}, final {orm_target(final)}) under contradictions='drop'",
                      n, meta)
    record.contradictory_formats = contradictory
    return record
  return VariantRecord(variant=variant, kept=True, steps=list(steps), final=final, selected_index=index,
                       n_verifications=n, targets=targets, missing_targets=missing,
                       contradictory_formats=contradictory, **meta)


def _single(variant: str, text: str | None, index: int | None, n: int, meta: Mapping[str, Any],
            config: AggregationConfig, think_allowed: bool) -> VariantRecord:
  if text is None or index is None:
    return _dropped(variant, DROP_NO_VERIFICATIONS, "no verification to take", n, meta)
  parsed = parsing.parse_verification(text)
  if not is_well_formed(parsed):
    return _dropped(variant, DROP_PARSE_FAILURE,
                    f"verification {index} parsed to steps={parsed['steps']} final={parsed['final']}", n, meta)
  return _kept(variant, parsed["steps"], parsed["final"], text, index, n, meta, config, think_allowed)


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
  v_star = step_majority([p["steps"] for p in parsed], config.step_tie, config.step_quorum)
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
  return _kept(variant, v_star, y_star, texts[index], index, n, meta, config)


def _check_step_counts(record: VariantRecord, sources: Sequence[Mapping[str, Any]]) -> VariantRecord:
  """Fills the step-count check of `record` from the parsed verifications its labels come from."""
  if record.solution_steps:
    counts = [len(p["steps"]) for p in sources]
    record.step_count_checked = sum(1 for c in counts if c)
    record.step_count_differing = sum(1 for c in counts if c and c != record.solution_steps)
  return record


def build_variant_records(verifications: Sequence[str], *, problem_id: str | None = None,
                          solution_id: str | None = None, is_correct: bool | None = None,
                          solution_steps: int | None = None,
                          merged: str | None = None, merged_outcome: str | None = None,
                          reference_verifications: Sequence[str] | None = None,
                          config: AggregationConfig = AggregationConfig()) -> list[VariantRecord]:
  """Builds every data variant's record for one solution.

  Args:
    verifications: the N reference-free verifier outputs, raw (with `<think>` traces), in sampling order.
    problem_id, solution_id: copied into the records (the SFT rows and the quality table use them).
    is_correct: ground-truth correctness of the solution, for diagnostics only (never used for labels).
    solution_steps: the solution's own step count (`spark_jax.text.verdicts.count_solution_steps`), for the
      step-count check only; None = not checked.
    merged: merger output for verification 0 (meta_critique); None = variant not computed, omitted.
    merged_outcome: merger output for the outcome_consistency selection (meta_critique_outcome); None =
      variant omitted. An empty string is a failed merge ("parse_failure" drop). When
      `select_for_meta_critique` gave None (nothing to critique), pass "" so that the solution is still
      counted: the record is then dropped with the outcome_consistency reason.
    reference_verifications: the reference-guided verifier outputs; None = variant omitted.
    config: tie policies, quorum, contradiction policy and selection knobs.

  Returns:
    Records in VARIANTS order: always single, outcome_consistency, step_consistency; then the optional
    variants whose inputs were given.
  """
  meta = {"problem_id": problem_id, "solution_id": solution_id, "is_correct": is_correct,
          "solution_steps": solution_steps}
  n = len(verifications)
  parsed = [parsing.parse_verification(text) for text in verifications]
  records = [_check_step_counts(
      _single("single", verifications[0] if verifications else None, 0 if verifications else None, n, meta, config,
              think_allowed=True), parsed[:1])]

  y_star, outcome_index, outcome_drop = _outcome_selection(parsed, config)
  if outcome_drop is not None:
    outcome = _dropped("outcome_consistency", *outcome_drop, n, meta)
  else:
    outcome = _kept("outcome_consistency", parsed[outcome_index]["steps"], y_star, verifications[outcome_index],
                    outcome_index, n, meta, config)
  records.append(_check_step_counts(outcome, parsed))
  records.append(_check_step_counts(_step_consistency("step_consistency", verifications, config, meta), parsed))

  if merged is not None:
    records.append(_check_step_counts(
        _single("meta_critique", merged, 0 if verifications else None, n, meta, config, think_allowed=False),
        [parsing.parse_verification(merged)]))
  if merged_outcome is not None:
    if outcome_drop is not None:  # nothing was selected to critique: same reason as outcome_consistency.
      code, detail = outcome_drop
      record = _dropped("meta_critique_outcome", code, f"no outcome_consistency selection: {detail}", n, meta)
    else:
      record = _single("meta_critique_outcome", merged_outcome, outcome_index, n, meta, config, think_allowed=False)
    records.append(_check_step_counts(record, [parsing.parse_verification(merged_outcome)]))
  if reference_verifications is not None:
    records.append(_check_step_counts(
        _step_consistency("reference_guided", reference_verifications, config, meta),
        [parsing.parse_verification(text) for text in reference_verifications]))
  return records
