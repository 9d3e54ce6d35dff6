"""Parser tests on a hand-written corpus of verifier / PRM / ORM outputs with their expected parses."""

from __future__ import annotations

import pytest

from spark_jax.text import verdicts as parsing

C = "**This step is correct.**"
I = "**This step is incorrect.**"
YES = "**Verification: Is the answer correct (Yes/No)? Yes**"
NO = "**Verification: Is the answer correct (Yes/No)? No**"


def _blocks(verdicts, header="## Step {k}: Title {k}", marker=None):
  parts = []
  for k, ok in enumerate(verdicts, start=1):
    mark = (C if ok else I) if marker is None else marker(ok)
    parts.append(f"{header.format(k=k)}\nThe student computes something in step {k}; I re-derive it.\n{mark}")
  return "\n\n".join(parts)


# (name, raw output, expected steps, expected final)
VERIFICATION_CORPUS = [
    ("well_formed_all_correct", _blocks([True, True, True]) + "\n\n" + YES, [True, True, True], True),
    ("well_formed_error_propagation", _blocks([True, True, False, False, False]) + "\n\n" + NO,
     [True, True, False, False, False], False),
    ("teacher_verification_prefix", "Teacher Verification:\n" + _blocks([True, False]) + "\n\n" + NO,
     [True, False], False),
    ("closed_think_trace_with_misleading_markers",
     "<think>\nHmm, step 1 ... maybe **This step is incorrect.** Is the answer correct (Yes/No)? No\n</think>\n\n"
     + _blocks([True, True]) + "\n\n" + YES, [True, True], True),
    ("close_tag_only_template_opened_think",
     "The student's step 2 looks off... Is the answer correct? No\n</think>\n\n" + _blocks([True]) + "\n\n" + YES,
     [True], True),
    ("unclosed_think_resumes_at_step_1",
     "<think>\nLet me check every step carefully. I think it is fine.\n\n" + _blocks([True, False]) + "\n\n" + NO,
     [True, False], False),
    ("unclosed_think_without_step_1_is_empty",
     "<think>\nChecking... **This step is correct.** Verification: Is the answer correct (Yes/No)? Yes", [], None),
    ("final_verdict_only_inside_trace",
     "<think>Is the answer correct (Yes/No)? Yes</think>\n\n" + _blocks([True, True]), [True, True], None),
    ("plain_markers_and_plain_final",
     _blocks([True, False], marker=lambda ok: "This step is correct." if ok else "This step is incorrect.")
     + "\n\nVerification: Is the answer correct (Yes/No)? No", [True, False], False),
    ("lowercase_bold_markers",
     _blocks([False, True], marker=lambda ok: "**this step is Correct.**" if ok else "**THIS STEP IS INCORRECT.**")
     + "\n\n" + NO, [False, True], False),
    ("bold_marker_without_period", _blocks([True], marker=lambda ok: "**This step is correct**.") + "\n" + YES,
     [True], True),
    ("bold_word_only_marker", _blocks([False], marker=lambda ok: "This step is **incorrect**.") + "\n" + NO,
     [False], False),
    ("bold_step_header_colon_inside", _blocks([True, False], header="**Step {k}:** Check part {k}") + "\n\n" + NO,
     [True, False], False),
    ("bold_step_header_whole_line", _blocks([True, True], header="**Step {k}: Check part {k}**") + "\n\n" + YES,
     [True, True], True),
    ("plain_step_headers", _blocks([True, False, False], header="Step {k}: part {k}") + "\n\n" + NO,
     [True, False, False], False),
    ("three_hashes_dash", _blocks([True, True], header="### Step {k} - part {k}") + "\n\n" + YES, [True, True], True),
    ("markdown_bold_header", _blocks([False], header="## **Step {k}: part {k}**") + "\n\n" + NO, [False], False),
    ("header_without_space_after_hashes", _blocks([True, True], header="##Step {k}.") + "\n\n" + YES,
     [True, True], True),
    ("missing_final_verdict", _blocks([True, False]), [True, False], None),
    ("duplicate_step_later_overwrites",
     _blocks([True, False]) + "\n\n## Step 2: Re-checking step 2\nOn a second look the sign is right.\n" + C
     + "\n\n" + YES, [True, True], True),
    ("duplicate_without_verdict_erases_nothing",
     _blocks([True, False]) + "\n\n## Step 2: Re-checking step 2\nSame as before." + "\n\n" + NO,
     [True, False], False),
    ("gap_in_step_numbers_ends_vector",
     "## Step 1: a\nok\n" + C + "\n\n## Step 2: b\nok\n" + C + "\n\n## Step 4: d\nwrong\n" + I + "\n\n" + NO,
     [True, True], False),
    ("missing_step_1_gives_no_steps", "## Step 2: b\nok\n" + C + "\n\n## Step 3: c\nok\n" + C + "\n\n" + YES, [], True),
    ("block_without_verdict_does_not_borrow_next",
     "## Step 1: a\nfine\n" + C + "\n\n## Step 2: b\nI am not sure about this one.\n\n## Step 3: c\nwrong\n" + I
     + "\n\n" + NO, [True], False),
    ("truncated_mid_step", _blocks([True, True]) + "\n\n## Step 3: Compute the area\nThe area is 12 times",
     [True, True], None),
    ("truncated_mid_marker", _blocks([True]) + "\n\n## Step 2: b\nThe value is right.\n**This step is corr", [True],
     None),
    ("revised_verdict_last_bold_wins",
     "## Step 1: a\nLooks fine.\n" + C + "\nWait, the sign of the root is wrong.\n" + I + "\n\n" + NO,
     [False], False),
    ("bold_marker_beats_prose",
     "## Step 1: a\nOne might say this step is correct, but the exponent is wrong.\n" + I + "\n\n" + NO,
     [False], False),
    ("extra_prose_around",
     "Let me grade this carefully, one step at a time.\n\n" + _blocks([True, True, True]) + "\n\n" + YES
     + "\n\nOverall the student did a good job; the presentation could be tidier.", [True, True, True], True),
    ("quoted_plain_step_lines_inside_markdown",
     "## Step 1: Set up\nThe student wrote:\nStep 2: x = 5\nwhich belongs to the next step.\n" + C
     + "\n\n## Step 2: Solve\nx = 5 is right.\n" + C + "\n\n" + YES, [True, True], True),
    ("double_digit_steps", _blocks([True] * 9 + [False, False]) + "\n\n" + NO, [True] * 9 + [False, False], False),
    ("final_bold_label_and_bold_answer",
     _blocks([True]) + "\n\n**Verification:** Is the answer correct (Yes/No)? **No**", [True], False),
    ("final_without_verification_prefix", _blocks([True]) + "\n\nIs the answer correct? Yes", [True], True),
    ("final_boxed", _blocks([True]) + "\n\nVerification: Is the answer correct (Yes/No)? \\boxed{Yes}", [True], True),
    ("final_bare_question_at_end", _blocks([False]) + "\n\nSo, did the student get it right? No", [False], False),
    ("final_first_verification_line_wins",
     _blocks([True]) + "\n\nVerification: Is the answer correct (Yes/No)? Yes\n\nHmm, the units are missing.\n\n"
     + NO, [True], True),
    ("final_first_match_of_a_lower_tier",
     _blocks([True]) + "\n\nIs the answer correct? No. The student's answer is correct? Yes", [True], False),
    ("negated_plain_marker_gives_no_verdict",
     "## Step 1: a\nI don't think this step is correct, the sign flips.\n\n## Step 2: b\nfine\n" + C + "\n\n" + NO,
     [], False),
    ("negated_plain_marker_words",
     "## Step 1: a\nfine\nThis step is correct.\n\n## Step 2: b\nIt is not clear that this step is correct.\n\n"
     + NO, [True], False),
    ("negation_in_another_sentence_does_not_count",
     "## Step 1: a\nThe student did not simplify. Still, this step is correct.\n\n" + YES, [True], True),
    ("mixed_markdown_and_bold_headers",
     "## Step 1: a\nfine\n" + C + "\n\n**Step 2:** b\nwrong\n" + I + "\n\n### **Step 3: c**\nwrong\n" + I
     + "\n\n" + NO, [True, False, False], False),
    ("bold_step_quoted_inside_prose_is_not_a_header",
     "## Step 1: a\nThe student then writes **Step 2:** x = 5, which is right.\n" + C + "\n\n## Step 2: b\nok\n"
     + I + "\n\n" + NO, [True, False], False),
    ("final_not_is_not_no", _blocks([True]) + "\n\nIs the answer correct (Yes/No)? Not quite, the units differ.",
     [True], None),
    ("crlf_line_endings", (_blocks([True, False]) + "\n\n" + NO).replace("\n", "\r\n"), [True, False], False),
    ("empty_output", "", [], None),
    ("prm_format_is_not_a_verification", "Step 1: Correct\nStep 2: Incorrect\n" + NO, [], False),
]


def test_corpus_is_large_enough():
  assert len(VERIFICATION_CORPUS) >= 30
  assert len({name for name, *_ in VERIFICATION_CORPUS}) == len(VERIFICATION_CORPUS)


@pytest.mark.parametrize("name,text,steps,final", VERIFICATION_CORPUS, ids=[c[0] for c in VERIFICATION_CORPUS])
def test_parse_verification_corpus(name, text, steps, final):
  assert parsing.parse_verification(text) == {"steps": steps, "final": final}, name


PRM_CORPUS = [
    ("prm_exact_target", "Step 1: Correct\nStep 2: Incorrect\n" + NO, [True, False], False),
    ("prm_all_correct", "Step 1: Correct\nStep 2: Correct\nStep 3: Correct\n" + YES, [True, True, True], True),
    ("prm_lowercase", "step 1: correct\nstep 2: incorrect\nverification: is the answer correct (yes/no)? no",
     [True, False], False),
    ("prm_bold_step_labels", "**Step 1:** Correct\n**Step 2:** Incorrect\n" + NO, [True, False], False),
    ("prm_missing_final", "Step 1: Correct\nStep 2: Correct", [True, True], None),
    ("prm_gap", "Step 1: Correct\nStep 3: Incorrect\n" + NO, [True], False),
    ("prm_duplicate_later_wins", "Step 1: Correct\nStep 2: Correct\nStep 2: Incorrect\n" + NO, [True, False], False),
    ("prm_one_line", "Step 1: Correct Step 2: Correct " + YES, [True, True], True),
    ("prm_orm_style_answer", "Yes", [], None),
    ("prm_with_closed_think", "<think>Step 1: Incorrect?</think>\nStep 1: Correct\n" + YES, [True], True),
]


@pytest.mark.parametrize("name,text,steps,final", PRM_CORPUS, ids=[c[0] for c in PRM_CORPUS])
def test_parse_prm_output_corpus(name, text, steps, final):
  assert parsing.parse_prm_output(text) == {"steps": steps, "final": final}, name


ORM_CORPUS = [
    ("Yes", True), ("No", False), (" yes \n", True), ("NO", False), ("Yes.", None), ("The answer is Yes", None),
    ("", None), ("<think>fine</think>Yes", None), ("Yes\nNo", None),
]


@pytest.mark.parametrize("text,expected", ORM_CORPUS)
def test_parse_orm_output_is_exact(text, expected):
  assert parsing.parse_orm_output(text) is expected


def test_split_thinking_returns_trace_and_visible_text():
  assert parsing.split_thinking("<think>\n trace \n</think>\n\nanswer ") == ("trace", "answer")
  assert parsing.split_thinking("trace only closed</think>answer") == ("trace only closed", "answer")
  assert parsing.split_thinking("no tags at all\n") == (None, "no tags at all")
  assert parsing.split_thinking("<think>never closed") == (None, "")


def test_think_rule_repeated_tags_keep_everything_after_the_first_close():
  assert parsing.split_thinking("<think>a</think>x<think>b</think>y") == ("a", "x<think>b</think>y")
  assert parsing.split_thinking("<think>a</think>x</think>y") == ("a", "x</think>y")
  assert parsing.split_thinking("pre <think>a<think>b</think> y") == ("a<think>b", "y")


def test_think_rule_unclosed_and_untagged():
  # Unclosed: resume at the first "\n\n## Step 1:" or give no text at all.
  assert parsing.split_thinking("<think>a\n\n## Step 1: x\nok") == (None, "## Step 1: x\nok")
  assert parsing.split_thinking("<think>a\n## Step 1: x\nok") == (None, "")
  # Never opened: a plain answer, a generator solution or a PRM output without thinking is all visible,
  # even without a "## Step 1:" header.
  assert parsing.split_thinking("Step 1: 2+2=4\nAnswer: 4") == (None, "Step 1: 2+2=4\nAnswer: 4")


def test_count_solution_steps():
  assert parsing.count_solution_steps("Step 1: a\nStep 2: b\n**Step 3:** c\n### Step 4 d\nAnswer: 1") == 4
  assert parsing.count_solution_steps("Step 1: a\nStep 3: c") == 1  # a gap ends the run
  assert parsing.count_solution_steps("First, x = 2. In Step 2: we add.\nAnswer: 2") == 0
  assert parsing.count_solution_steps("") == 0


def test_strip_thinking_unclosed_cuts_at_first_step_1_header():
  text = "<think>draft\n\n## Step 2: not a start\n\n## Step 1: Real start\nok\n" + C
  assert parsing.strip_thinking(text) == "## Step 1: Real start\nok\n" + C


def test_parse_final_verdict_and_step_map():
  text = "<think>Is the answer correct? No</think>\n## Step 3: c\n" + I + "\n## Step 1: a\n" + C + "\n" + YES
  assert parsing.parse_final_verdict(text) is True
  assert parsing.parse_step_verdict_map(text) == {3: False, 1: True}
  assert parsing.parse_verification(text)["steps"] == [True]


def test_contiguous_steps():
  assert parsing.contiguous_steps({1: True, 2: False, 4: True}) == [True, False]
  assert parsing.contiguous_steps({0: True, 2: True}) == []
  assert parsing.contiguous_steps({}) == []


@pytest.mark.parametrize("steps,expected", [([True, True], True), ([True, False], False), ([False], False),
                                            ([], None)])
def test_step_derived_verdict(steps, expected):
  assert parsing.step_derived_verdict(steps) is expected
