"""Aggregation, target building, variant records, data-quality table and SFT rows on hand-built cases."""

from __future__ import annotations

import pytest

from spark_jax.stage1 import aggregate, formats, quality
from spark_jax.text import verdicts as parsing
from spark_jax.stage1.aggregate import AggregationConfig, build_variant_records, outcome_majority, step_majority

T, F = True, False


def verification(steps, final, trace="I checked every step.", tag=""):
  """A raw verifier output with the given labels (final None = no verdict line)."""
  blocks = [f"## Step {k}: part {k} {tag}\nAnalysis.\n" + ("**This step is correct.**" if ok else
                                                            "**This step is incorrect.**")
            for k, ok in enumerate(steps, start=1)]
  if final is not None:
    blocks.append(f"**Verification: Is the answer correct (Yes/No)? {'Yes' if final else 'No'}**")
  body = "\n\n".join(blocks)
  return f"<think>\n{trace}\n</think>\n\n{body}" if trace is not None else body


def by_variant(records):
  return {r.variant: r for r in records}


# ----------------------------------------------------------------------------------------------- majorities


def test_step_majority_all_agree():
  assert step_majority([[T, F, F]] * 4) == [T, F, F]


def test_step_majority_per_index_majority():
  assert step_majority([[T, T, F], [T, F, F], [F, T, T]]) == [T, T, F]


@pytest.mark.parametrize("tie,expected", [("incorrect", [T, F]), ("correct", [T, T]), ("drop", None)])
def test_step_majority_tie_policies(tie, expected):
  assert step_majority([[T, T], [T, F]], tie=tie) == expected


def test_step_majority_different_lengths_votes_only_where_present():
  # Step 3 is reached by 2 of 3 vectors (F, F): a majority; step 4 by 1 of 3 (T): below the default quorum.
  lists = [[T, T], [T, T, F], [T, F, F, T]]
  assert step_majority(lists) == [T, T, F]
  assert step_majority(lists, quorum=0.0) == [T, T, F, T]  # the literal D4 rule: any vector votes
  assert step_majority(lists, quorum=2 / 3) == [T, T]


def test_step_majority_quorum_counts_only_vectors_with_a_parse():
  # 2 of the 4 verifications parsed no step: the quorum is over the 2 that did, both reach step 2.
  assert step_majority([[T, F], [T, F], [], []]) == [T, F]
  # Exactly half is not more than half.
  assert step_majority([[T, F], [T]]) == [T]


def test_step_majority_empty_inputs():
  assert step_majority([]) == []
  assert step_majority([[], []]) == []


def test_step_majority_rejects_unknown_tie():
  with pytest.raises(ValueError, match="tie policy 'maybe'"):
    step_majority([[T]], tie="maybe")


def test_outcome_majority():
  assert outcome_majority([T, T, F]) is True
  assert outcome_majority([F, F, T, None, None, None]) is False
  assert outcome_majority([None, T]) is True
  assert outcome_majority([T, F]) is False  # tie -> "No"
  assert outcome_majority([T, F], tie="Yes") is True
  assert outcome_majority([T, F, None], tie="drop") is None
  assert outcome_majority([None, None]) is None
  assert outcome_majority([]) is None


def test_select_matching_first_in_sampling_order_and_well_formed_only():
  parsed = [{"steps": [T, F], "final": None},  # matches steps but has no final -> not eligible
            {"steps": [T, T], "final": True},
            {"steps": [T, F], "final": True},
            {"steps": [T, F], "final": False}]
  assert aggregate.select_matching(parsed, steps=[T, F]) == 2
  assert aggregate.select_matching(parsed, steps=[T, F], final=False) == 3
  assert aggregate.select_matching(parsed, final=True) == 1
  assert aggregate.select_matching(parsed, steps=[F]) is None


def test_config_validation_names_the_bad_knob():
  with pytest.raises(ValueError, match="step_tie='sometimes'"):
    AggregationConfig(step_tie="sometimes")
  with pytest.raises(ValueError, match="outcome_tie='no'"):
    AggregationConfig(outcome_tie="no")
  with pytest.raises(ValueError, match="step_quorum=1"):
    AggregationConfig(step_quorum=1)
  with pytest.raises(ValueError, match="step_quorum=-0.1"):
    AggregationConfig(step_quorum=-0.1)
  with pytest.raises(ValueError, match="contradictions='maybe'"):
    AggregationConfig(contradictions="maybe")


# -------------------------------------------------------------------------------------------------- targets


def test_prm_target_exact_text():
  assert aggregate.prm_target([T, F, F], False) == (
      "Step 1: Correct\nStep 2: Incorrect\nStep 3: Incorrect\n"
      "**Verification: Is the answer correct (Yes/No)? No**")
  assert aggregate.prm_target([T], True) == "Step 1: Correct\n**Verification: Is the answer correct (Yes/No)? Yes**"
  with pytest.raises(ValueError):
    aggregate.prm_target([], True)


def test_orm_cot_and_think_targets():
  text = verification([T, F], False, trace="  deep thoughts  ")
  assert aggregate.orm_target(True) == "Yes" and aggregate.orm_target(False) == "No"
  cot = aggregate.prm_cot_target(text)
  assert cot.startswith("## Step 1: part 1") and "<think>" not in cot and "deep thoughts" not in cot
  assert aggregate.think_prm_target(text) == "<think>\ndeep thoughts\n</think>\n\n" + cot
  assert aggregate.think_prm_target(verification([T], True, trace=None)) is None


# ------------------------------------------------------------------------------------------ variant records


def test_all_agree_every_variant_kept_with_same_labels():
  texts = [verification([T, T, F], False, trace=f"trace {j}") for j in range(4)]
  records = by_variant(build_variant_records(texts, problem_id="p", solution_id="s", is_correct=False))
  assert list(records) == ["single", "outcome_consistency", "step_consistency"]
  for record in records.values():
    assert record.kept and record.steps == [T, T, F] and record.final is False and record.selected_index == 0
    assert record.targets["orm"] == "No"
    assert record.targets["prm"] == aggregate.prm_target([T, T, F], False)
    assert record.targets["prm_cot"] == parsing.strip_thinking(texts[0])
    assert record.targets["think_prm"].startswith("<think>\ntrace 0\n</think>")
    assert (record.problem_id, record.solution_id, record.is_correct, record.n_verifications) == ("p", "s", F, 4)


def test_selection_picks_first_matching_verification():
  texts = [
      verification([T, F], True),   # 0: steps off-majority, final off-majority
      verification([T, F], False),  # 1: final = y*, steps off-majority
      verification([F, T], False),  # 2
      verification([T, T], True),   # 3: steps = v* ([T, T]), final off-majority
      verification([T, T], False),  # 4: steps = v* and final = y*
  ]
  # finals: 2 Yes, 3 No -> y* = No. Step 1: 4T/1F -> T; step 2: 3T/2F -> T.
  records = by_variant(build_variant_records(texts))
  assert records["single"].selected_index == 0 and records["single"].final is True
  outcome = records["outcome_consistency"]
  assert (outcome.selected_index, outcome.steps, outcome.final) == (1, [T, F], False)
  step = records["step_consistency"]
  assert (step.selected_index, step.steps, step.final) == (3, [T, T], False)
  # D5: the PRM line uses y* even though the selected text says Yes.
  assert step.targets["prm"].endswith("(Yes/No)? No**")
  assert parsing.parse_verification(step.targets["prm_cot"])["final"] is True
  matched = by_variant(build_variant_records(texts, config=AggregationConfig(step_match_final=True)))
  assert matched["step_consistency"].selected_index == 4


def test_no_matching_verification_drops_step_consistency():
  texts = [verification([T, F, F], False), verification([F, T, F], False), verification([F, F, T], False)]
  step = by_variant(build_variant_records(texts))["step_consistency"]
  assert not step.kept and step.drop_reason == "no_match" and "[False, False, False]" in step.drop_detail
  assert step.targets == {} and step.steps == []


@pytest.mark.parametrize("tie,kept,steps", [("incorrect", True, [T, F]), ("correct", True, [T, T]),
                                            ("drop", False, [])])
def test_step_tie_policies_in_records(tie, kept, steps):
  # Step 2 is voted 2 correct vs 2 incorrect; finals are 1 Yes vs 3 No.
  texts = [verification([T, T], True), verification([T, F], False), verification([T, F], False),
           verification([T, T], False)]
  step = by_variant(build_variant_records(texts, config=AggregationConfig(step_tie=tie)))["step_consistency"]
  assert step.kept is kept and step.steps == steps
  if not kept:
    assert step.drop_reason == "step_tie"


def test_outcome_tie_policies_in_records():
  texts = [verification([T], True), verification([T], False)]
  default = by_variant(build_variant_records(texts))
  assert default["outcome_consistency"].final is False and default["outcome_consistency"].selected_index == 1
  dropped = by_variant(build_variant_records(texts, config=AggregationConfig(outcome_tie="drop")))
  assert dropped["outcome_consistency"].drop_reason == "outcome_tie"
  assert dropped["step_consistency"].drop_reason == "outcome_tie"
  assert dropped["single"].kept


def test_different_step_counts_and_quorum():
  texts = [verification([T, T, T], True), verification([T, T, T], True), verification([T, T, T, F], False)]
  default = by_variant(build_variant_records(texts))["step_consistency"]
  assert default.steps == [T, T, T] and default.selected_index == 0
  literal = by_variant(build_variant_records(texts, config=AggregationConfig(step_quorum=0.0)))
  assert literal["step_consistency"].steps == [T, T, T, F] and literal["step_consistency"].selected_index == 2


def test_one_outlier_does_not_set_the_labels():
  # 15 verifications: 5 steps, all correct, Yes; 1 outlier: 6 steps, step 6 incorrect, No.
  texts = [verification([T] * 5, True)] * 15 + [verification([T] * 5 + [F], False)]
  step = by_variant(build_variant_records(texts))["step_consistency"]
  assert step.kept and step.steps == [T] * 5 and step.final is True and step.selected_index == 0
  assert step.targets["prm"].endswith("Step 5: Correct\n**Verification: Is the answer correct (Yes/No)? Yes**")
  assert parsing.parse_verification(step.targets["prm_cot"]) == {"steps": [T] * 5, "final": True}
  # The old rule (any one verification votes) let the outlier set step 6 and then selected the outlier.
  literal = by_variant(build_variant_records(texts, config=AggregationConfig(step_quorum=0.0)))["step_consistency"]
  assert literal.steps == [T] * 5 + [F] and literal.selected_index == 15


def test_outlier_that_differs_earlier_does_not_drop_the_consensus():
  texts = [verification([T] * 5, True)] * 15 + [verification([T, T, F, T, T, F], False)]
  step = by_variant(build_variant_records(texts))["step_consistency"]
  assert step.kept and step.steps == [T] * 5 and step.selected_index == 0
  literal = by_variant(build_variant_records(texts, config=AggregationConfig(step_quorum=0.0)))["step_consistency"]
  assert not literal.kept and literal.drop_reason == "no_match"


def test_drop_reasons_for_missing_or_unparseable_inputs():
  empty = by_variant(build_variant_records([]))
  assert {v: r.drop_reason for v, r in empty.items()} == {
      "single": "no_verifications", "outcome_consistency": "no_verifications", "step_consistency": "no_verifications"}
  truncated = verification([T, T], None)
  no_final = by_variant(build_variant_records([truncated, truncated]))
  assert no_final["single"].drop_reason == "parse_failure"
  assert no_final["outcome_consistency"].drop_reason == "no_final_verdict"
  assert no_final["step_consistency"].drop_reason == "no_final_verdict"
  no_steps = by_variant(build_variant_records(["**Verification: Is the answer correct (Yes/No)? Yes**"]))
  assert no_steps["step_consistency"].drop_reason == "no_step_verdicts"
  assert no_steps["outcome_consistency"].drop_reason == "no_match"


def test_meta_critique_and_reference_variants():
  texts = [verification([T, T], True), verification([T, F], False), verification([T, F], False)]
  merged = "<think>merging the critique</think>\n\n" + verification([T, F], False, trace=None)
  refs = [verification([F, F], False), verification([F, F], False), verification([T, F], False)]
  records = by_variant(build_variant_records(texts, merged=merged, merged_outcome="", reference_verifications=refs))
  assert list(records) == list(aggregate.VARIANTS)
  meta = records["meta_critique"]
  assert meta.kept and meta.steps == [T, F] and meta.final is False and meta.selected_index == 0
  assert meta.targets["think_prm"] is None and "merg" in meta.missing_targets["think_prm"]
  assert meta.targets["prm_cot"] == verification([T, F], False, trace=None)
  assert records["meta_critique_outcome"].drop_reason == "parse_failure"
  ref = records["reference_guided"]
  assert ref.kept and ref.steps == [F, F] and ref.selected_index == 0 and ref.n_verifications == 3
  assert aggregate.select_for_meta_critique(texts) == {"meta_critique": 0, "meta_critique_outcome": 1}


def test_meta_critique_outcome_mirrors_outcome_drop():
  texts = [verification([T], True), verification([T], False)]
  records = by_variant(build_variant_records(texts, merged_outcome="",
                                             config=AggregationConfig(outcome_tie="drop")))
  assert records["meta_critique_outcome"].drop_reason == "outcome_tie"
  assert records["meta_critique_outcome"].drop_detail.startswith("no outcome_consistency selection")
  selection = aggregate.select_for_meta_critique(texts, AggregationConfig(outcome_tie="drop"))
  assert selection == {"meta_critique": 0, "meta_critique_outcome": None}


def test_contradictions_are_listed_per_format_and_dropped_on_request():
  # v* = [T, T] (all correct) but y* = No: the PRM target contradicts itself. The selected text (index 1)
  # reads [T, T] + Yes, so its prm_cot / think_prm targets do not.
  texts = [verification([T, F], False), verification([T, T], True), verification([T, T], False),
           verification([F, T], False)]
  records = by_variant(build_variant_records(texts))
  step = records["step_consistency"]
  assert step.kept and (step.steps, step.final, step.selected_index) == ([T, T], False, 1)
  assert step.contradictory_formats == ["prm"]
  outcome = records["outcome_consistency"]  # selects text 0: [T, F] + No, consistent
  assert outcome.kept and outcome.contradictory_formats == []
  single_texts = [verification([T, T], False)] + texts[1:]
  single = by_variant(build_variant_records(single_texts))["single"]
  assert single.contradictory_formats == ["prm", "prm_cot", "think_prm"]
  dropped = by_variant(build_variant_records(texts, config=AggregationConfig(contradictions="drop")))
  assert not dropped["step_consistency"].kept and dropped["step_consistency"].drop_reason == "contradiction"
  assert dropped["step_consistency"].contradictory_formats == ["prm"] and dropped["step_consistency"].targets == {}
  assert dropped["outcome_consistency"].kept


def test_step_count_check_counts_differing_verifications():
  texts = [verification([T, T, T], True), verification([T, T], True), verification([T, T, T], True),
           verification([], True)]
  records = by_variant(build_variant_records(texts, solution_steps=3, merged=verification([T, T], True),
                                             reference_verifications=[verification([T], True)]))
  assert (records["single"].step_count_checked, records["single"].step_count_differing) == (1, 0)
  for variant in ("outcome_consistency", "step_consistency"):
    assert (records[variant].step_count_checked, records[variant].step_count_differing) == (3, 1), variant
  assert (records["meta_critique"].step_count_checked, records["meta_critique"].step_count_differing) == (1, 1)
  assert records["reference_guided"].step_count_differing == 1
  assert all(r.solution_steps == 3 for r in records.values())
  unchecked = build_variant_records(texts, solution_steps=0)
  assert all(r.step_count_checked == r.step_count_differing == 0 for r in unchecked)


def test_variant_record_round_trips_through_dict():
  record = build_variant_records([verification([T], True)], problem_id="p", solution_id="s", is_correct=True)[0]
  assert aggregate.VariantRecord.from_dict(record.to_dict()) == record
  with pytest.raises(ValueError, match="unknown keys"):
    aggregate.VariantRecord.from_dict({**record.to_dict(), "extra": 1})


# ------------------------------------------------------------------------------------------- quality table


def _record(variant, is_correct, final, steps, kept=True, reason=None, contradictory=()):
  return aggregate.VariantRecord(variant=variant, kept=kept, is_correct=is_correct, final=final, steps=steps,
                                 drop_reason=reason, contradictory_formats=list(contradictory))


def test_data_quality_table_hand_computed():
  records = [
      _record("step_consistency", True, True, [T, T]),    # final hit, step-derived hit
      _record("step_consistency", True, False, [T, F]),   # final miss, step-derived miss
      _record("step_consistency", False, False, [T, T], contradictory=["prm", "prm_cot"]),  # final hit, step miss
      _record("step_consistency", False, False, [F]),     # final hit, step-derived hit
      _record("step_consistency", None, None, [], kept=False, reason="no_match"),
      _record("step_consistency", None, None, [], kept=False, reason="contradiction", contradictory=["prm"]),
      _record("single", True, True, [T]),
      _record("single", False, None, [], kept=False, reason="parse_failure"),
  ]
  table = quality.data_quality_table(records)
  assert list(table) == ["single", "step_consistency"]
  step = table["step_consistency"]
  assert (step["kept"], step["dropped"], step["drop_reasons"]) == (4, 2, {"contradiction": 1, "no_match": 1})
  assert step["contradictions"] == {"prm": 2, "prm_cot": 1, "think_prm": 0}
  assert step["final"]["all"] == {"n": 4, "hits": 3, "accuracy": 0.75}
  assert step["final"]["correct_solutions"] == {"n": 2, "hits": 1, "accuracy": 0.5}
  assert step["final"]["incorrect_solutions"] == {"n": 2, "hits": 2, "accuracy": 1.0}
  assert step["step_derived"]["all"] == {"n": 4, "hits": 2, "accuracy": 0.5}
  assert step["step_derived"]["correct_solutions"]["hits"] == 1
  assert step["step_derived"]["incorrect_solutions"]["hits"] == 1
  assert table["single"]["final"]["incorrect_solutions"] == {"n": 0, "hits": 0, "accuracy": None}
  markdown = quality.render_quality_markdown(table)
  lines = markdown.strip().splitlines()
  assert len(lines) == 4 and lines[0].startswith("| variant | kept | dropped |")
  assert lines[3] == ("| step_consistency | 4 | 2 | 0.750 (3/4) | 0.500 (1/2) | 1.000 (2/2) | 0.500 (2/4) "
                      "| 0.500 (1/2) | 0.500 (1/2) | 2/1/0 |")
  assert "| single | 1 | 1 | 1.000 (1/1) | 1.000 (1/1) | – |" in markdown
  # Dict input (as read back from JSONL) gives the same table.
  assert quality.data_quality_table([r.to_dict() for r in records]) == table


def test_data_quality_table_needs_ground_truth():
  with pytest.raises(ValueError, match="record 0 .*is_correct"):
    quality.data_quality_table([_record("single", None, True, [T])])


# ------------------------------------------------------------------------------------------------- SFT rows


def test_sft_rows_from_record():
  texts = [verification([T, F], False, trace="why")] * 3
  record = build_variant_records(texts, problem_id="p1", solution_id="p1-s0", is_correct=False)[2]
  rows = formats.sft_examples_from_record(record.to_dict(), "What is 2+2?", "Step 1: 2+2=5\nAnswer: 5")
  assert [r["format"] for r in rows] == ["orm", "prm", "prm_cot", "think_prm"]
  orm = rows[0]
  assert orm["messages"] == [
      {"role": "user", "content": "Problem: What is 2+2?\n\nSolution: Step 1: 2+2=5\nAnswer: 5\n\n"
                                  "Is the answer correct (Yes/No)?"},
      {"role": "assistant", "content": "No"}]
  assert (orm["variant"], orm["problem_id"], orm["solution_id"]) == ("step_consistency", "p1", "p1-s0")
  assert orm["labels"] == {"steps": [T, F], "final": False}
  # The trainer builds the user turn's ids from these parts (text/rm_ids.rm_prompt_ids), not from its text.
  assert [r["rm_prompt"] for r in rows] == [
      {"format": f, "problem": "What is 2+2?", "solution": "Step 1: 2+2=5\nAnswer: 5"}
      for f in ("orm", "prm", "prm_cot", "think_prm")]
  assert rows[1]["messages"][0]["content"].endswith("\n\nLet's verify step by step.")
  assert rows[1]["messages"][1]["content"] == aggregate.prm_target([T, F], False)
  assert rows[3]["messages"][1]["content"].startswith("<think>\nwhy\n</think>\n\n## Step 1")
  assert formats.count_rows(rows) == {("step_consistency", f): 1 for f in ("orm", "prm", "prm_cot", "think_prm")}
  dropped = aggregate.VariantRecord(variant="single", kept=False, drop_reason="no_match")
  assert formats.sft_examples_from_record(dropped, "q", "s") == []


def test_sft_example_rejects_bad_format_or_unparseable_target():
  with pytest.raises(ValueError, match="unknown reward-model format 'rm'"):
    formats.sft_example("rm", "q", "s", "Yes", variant="single", problem_id="p", solution_id="s")
  with pytest.raises(ValueError, match="problem p, solution s.*orm target"):
    formats.sft_example("orm", "q", "s", "Yes.", variant="single", problem_id="p", solution_id="s")
  with pytest.raises(ValueError, match="prm_cot target"):
    formats.sft_example("prm_cot", "q", "s", "## Step 1: a\nfine", variant="single", problem_id="p",
                        solution_id="s")
  with pytest.raises(ValueError, match="think_prm target"):
    formats.sft_example("think_prm", "q", "s", verification([T], True, trace=None), variant="single",
                        problem_id="p", solution_id="s")
  with pytest.raises(ValueError, match="unknown reward-model formats"):
    formats.sft_examples_from_record(aggregate.VariantRecord(variant="single", kept=False), "q", "s",
                                     formats=("orm", "xrm"))
